"""Unit contracts of the circuit breaker, the pacer and Retry-After parsing (no network)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from worker.backends.breaker import CircuitBreaker, CircuitOpenError
from worker.backends.http import decode_json, parse_retry_after
from worker.backends.pacing import RateLimitHeaderNames, RateLimitHeaders, RequestPacer, parse_duration, parse_int


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_half_open_lets_exactly_one_probe_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=5, clock=clock)
    breaker.before_call()
    breaker.record_failure()
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        breaker.before_call()

    clock.now += 5
    breaker.before_call()  # the probe
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # a second caller while the probe is out
    breaker.record_failure()
    assert breaker.state == "open" and breaker.times_opened == 2

    clock.now += 5
    breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 0


def test_breaker_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=5, clock=FakeClock())
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state == "closed"


def test_retry_after_forms() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("1.5", now=now) == 1.5
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


def test_reset_durations() -> None:
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("1s") == 1.0
    assert parse_duration("150ms") == pytest.approx(0.15)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("20") == 20.0
    assert parse_duration("later") is None


def test_pacer_slows_down_only_below_the_watermark_and_recovers() -> None:
    pacer = RequestPacer(low_watermark=0.1)
    pacer.observe(RateLimitHeaders(limit_requests=600, remaining_requests=100))
    assert pacer.interval_s == 0
    pacer.observe(RateLimitHeaders(limit_requests=600, remaining_requests=30))
    assert pacer.interval_s == pytest.approx(60 / 30)
    pacer.observe(RateLimitHeaders(limit_tokens=100_000, remaining_tokens=500_000))
    assert pacer.interval_s == 0


async def test_pacer_hold_delays_the_next_request() -> None:
    pacer = RequestPacer()
    pacer.hold(0.2)
    started = time.monotonic()
    await pacer.wait()
    assert time.monotonic() - started >= 0.2


def test_breaker_open_time_starts_short_and_doubles_with_each_failed_probe_up_to_the_reset_time() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5, first_open_s=1, clock=clock)
    breaker.record_failure()
    waits = []
    for _ in range(5):
        with pytest.raises(CircuitOpenError) as refused:
            breaker.before_call()
        waits.append(refused.value.retry_in_s)
        clock.now += refused.value.retry_in_s
        breaker.before_call()  # the probe
        breaker.record_failure()
    assert waits == [1, 2, 4, 5, 5]

    clock.now += 5
    breaker.before_call()
    breaker.record_success()
    breaker.record_failure()  # a new blip after recovery starts short again
    with pytest.raises(CircuitOpenError) as refused:
        breaker.before_call()
    assert refused.value.retry_in_s == 1


def test_a_blip_of_six_failures_costs_the_first_open_time_not_the_reset_time() -> None:
    """The issue's scenario: six 5xx, then the API is healthy. Threshold 5 opens the circuit;
    the first probe (after 1 s) meets the sixth failure, the second (2 s later) closes it."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=5, reset_timeout_s=30, first_open_s=1, clock=clock)
    start = clock.now
    for _ in range(5):
        breaker.before_call()
        breaker.record_failure()
    answers = iter([False, True])  # the sixth try fails, the seventh succeeds
    while breaker.state != "closed":
        try:
            breaker.before_call()
        except CircuitOpenError as refused:
            clock.now += refused.retry_in_s
            continue
        breaker.record_success() if next(answers) else breaker.record_failure()
    assert clock.now - start == 3  # was 60 (two reset periods of 30 s)


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "-inf"])
def test_a_retry_after_that_is_not_a_finite_number_is_unreadable(value: str) -> None:
    # "inf" would hold every request for ever.
    assert parse_retry_after(value) is None


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "1.2.3s", "..s", ".s", "5m1.1.1s"])
def test_rate_limit_headers_that_are_not_finite_numbers_are_unreadable_not_raised(value: str) -> None:
    assert parse_int(value) is None
    assert parse_duration(value) is None
    names = RateLimitHeaderNames(remaining_requests="x-remaining", reset_requests="x-reset")
    read = names.read({"x-remaining": value, "x-reset": value})
    assert read.remaining_requests is None and read.reset_requests_s is None


def test_an_answer_body_nested_too_deeply_is_not_json_not_a_recursion_error() -> None:
    # The HTTP layer turns ValueError into "a body that is not JSON" (retried); RecursionError escaped it.
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_json(b"[" * 100_000 + b"]" * 100_000)
