"""The remote HTTP layer under injected faults, against a real loopback Mistral server.

Waits are checked from the server's own receive/answer timestamps, as lower bounds only
(a retry may come later than Retry-After, never earlier).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable

import pytest
import structlog

from tests.backends.conftest import started
from tests.conftest import SPEC
from worker.backends.base import BackendAuthError, BackendUnavailable, Rejected, Scored
from worker.backends.breaker import CircuitOpenError
from worker.backends.mistral import MistralBackend
from worker.config import Settings
from worker.testing import (
    Fault,
    MistralServer,
    RateLimit,
    RecordedRequest,
    every,
    fake_scores,
    first,
    when_input_contains,
)
from worker.testing.faults import combine
from worker.testing.openapi import load_spec_validator

SettingsFor = Callable[..., Settings]
MODEL = "mistral-moderation-2411"


def server(api_key: str, **options: object) -> MistralServer:
    return MistralServer(api_key=api_key, validator=load_spec_validator(SPEC), **options)  # type: ignore[arg-type]


def retry_of(requests: list[RecordedRequest], failed: RecordedRequest) -> RecordedRequest:
    """The first later request carrying the same body: the retry of ``failed``."""
    return next(r for r in requests if r.index > failed.index and r.raw_body == failed.raw_body)


async def test_429_retry_after_seconds_is_honoured(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, fault_plan=[Fault(status=429, retry_after="1")]) as srv:
        async with started(MistralBackend(settings_for(srv))) as backend:
            outcomes = await backend.score_texts(["a", "b"])
        limited, retried = srv.requests

    assert limited.status == 429 and retried.status == 200
    assert limited.answered_at is not None and retried.received_at - limited.answered_at >= 1.0
    assert outcomes == [Scored(fake_scores("a"), MODEL), Scored(fake_scores("b"), MODEL)]


async def test_429_retry_after_http_date_is_honoured(api_key: str, settings_for: SettingsFor) -> None:
    # An HTTP date has whole seconds: the retry may come no earlier than that second.
    not_before = int(time.time()) + 2
    date = email.utils.formatdate(not_before, usegmt=True)
    with server(api_key, fault_plan=[Fault(status=429, retry_after=date)]) as srv:
        async with started(MistralBackend(settings_for(srv))) as backend:
            (outcome,) = await backend.score_texts(["a"])
        limited, retried = srv.requests
        assert limited.status == 429
        wall_minus_monotonic = time.time() - time.monotonic()

    assert isinstance(outcome, Scored)
    # Compared on the wall clock the date speaks of (a loaded machine may answer the 429 late).
    assert retried.received_at + wall_minus_monotonic >= not_before - 0.05


async def test_retry_after_beyond_the_budget_gives_up_without_retrying_early(
    api_key: str, settings_for: SettingsFor
) -> None:
    with server(api_key, fault_plan=[Fault(status=429, retry_after="120")]) as srv:
        settings = settings_for(srv, http={"retry_budget_s": 5})
        async with started(MistralBackend(settings)) as backend:
            with pytest.raises(BackendUnavailable, match=r"429.*Retry-After 120s.*RETRY_BUDGET_S"):
                await backend.score_texts(["a"])
        assert srv.request_count == 1


async def test_a_burst_of_503_loses_nothing(api_key: str, settings_for: SettingsFor) -> None:
    texts = [f"text {i}" for i in range(10)]
    with server(api_key, fault_plan=first(4, Fault(status=503))) as srv:
        async with started(MistralBackend(settings_for(srv, http={"retry_attempts": 6}))) as backend:
            outcomes = await backend.score_texts(texts)
        assert [r.status for r in srv.requests] == [503, 503, 503, 503, 200]
        assert srv.violations == []
    assert outcomes == [Scored(fake_scores(t), MODEL) for t in texts]


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_other_server_errors_are_retried(api_key: str, settings_for: SettingsFor, status: int) -> None:
    with server(api_key, fault_plan=[Fault(status=status)]) as srv:
        async with started(MistralBackend(settings_for(srv))) as backend:
            (outcome,) = await backend.score_texts(["a"])
        assert [r.status for r in srv.requests] == [status, 200]
    assert isinstance(outcome, Scored)


async def test_spent_retry_attempts_raise_backend_unavailable_with_the_reason(
    api_key: str, settings_for: SettingsFor
) -> None:
    with server(api_key, fault_plan=lambda request: Fault(status=503)) as srv:
        async with started(MistralBackend(settings_for(srv, http={"retry_attempts": 3}))) as backend:
            with pytest.raises(BackendUnavailable, match=r"HTTP 503 on POST /v1/moderations; gave up after 3 tries"):
                await backend.score_texts(["a"])
        assert srv.request_count == 3


async def test_a_response_slower_than_the_read_timeout_is_retried(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, fault_plan=[Fault(delay_s=2.0)]) as srv:
        settings = settings_for(srv, http={"read_timeout_s": 0.3})
        async with started(MistralBackend(settings)) as backend:
            (outcome,) = await backend.score_texts(["slow"])
        assert srv.request_count == 2
    assert outcome == Scored(fake_scores("slow"), MODEL)


async def test_connection_resets_are_retried(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, fault_plan=first(3, Fault(reset=True))) as srv:
        async with started(MistralBackend(settings_for(srv))) as backend:
            outcomes = await backend.score_texts(["x", "y"])
        assert [r.reset for r in srv.requests] == [True, True, True, False]
    assert outcomes == [Scored(fake_scores("x"), MODEL), Scored(fake_scores("y"), MODEL)]


async def test_an_unreachable_api_raises_backend_unavailable(settings_for: SettingsFor, api_key: str) -> None:
    with server(api_key) as srv:
        settings = settings_for(srv, http={"retry_attempts": 2})
    # The server is stopped: nothing listens on its port any more.
    async with started(MistralBackend(settings)) as backend:
        with pytest.raises(BackendUnavailable, match="ConnectError"):
            await backend.score_texts(["a"])


async def test_one_bad_input_in_a_batch_is_bisected_out_and_the_rest_scored(
    api_key: str, settings_for: SettingsFor
) -> None:
    texts = [f"fine {i}" for i in range(8)]
    texts[5] = "POISON input"
    bad = Fault(
        status=400,
        body={
            "object": "error",
            "message": "Input 5 is invalid",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        },
    )
    with server(api_key, fault_plan=when_input_contains("POISON", bad)) as srv:
        async with started(MistralBackend(settings_for(srv))) as backend:
            outcomes = await backend.score_texts(texts)
        statuses = [r.status for r in srv.requests]
        assert srv.violations == []

    assert outcomes[5] == Rejected(reason="Mistral API refused the input (HTTP 400): Input 5 is invalid")
    assert [o for i, o in enumerate(outcomes) if i != 5] == [
        Scored(fake_scores(t), MODEL) for i, t in enumerate(texts) if i != 5
    ]
    # 8 -> 4+4 -> 2+2 -> 1+1: four refusals, never a retry of the same body, and three good sub-batches.
    assert statuses.count(400) == 4 and statuses.count(200) == 3


async def test_an_input_over_the_context_gets_the_api_message_when_chunking_is_off(
    api_key: str, settings_for: SettingsFor
) -> None:
    long_text = "word " * 2_000  # 10,000 bytes: 2,500 server tokens
    with server(api_key, max_input_tokens=1_000) as srv:
        # The worker believes the model's context is larger than it is: the API's 400 decides.
        settings = settings_for(srv, mistral={"max_input_tokens": 100_000})
        async with started(MistralBackend(settings)) as backend:
            outcomes = await backend.score_texts(["short", long_text, "also short"])

    assert isinstance(outcomes[0], Scored) and isinstance(outcomes[2], Scored)
    assert isinstance(outcomes[1], Rejected)
    assert "too large for model with 1000 maximum context length" in outcomes[1].reason


async def test_422_is_not_retried(api_key: str, settings_for: SettingsFor) -> None:
    with server(
        api_key,
        fault_plan=[Fault(status=422, body={"detail": [{"loc": ["body", "input"], "msg": "bad", "type": "x"}]})],
    ) as srv:
        async with started(MistralBackend(settings_for(srv))) as backend:
            (outcome,) = await backend.score_texts(["a"])
        assert srv.request_count == 1
    assert outcome == Rejected(reason="Mistral API refused the input (HTTP 422): body.input: bad")


async def test_403_is_an_auth_error_and_not_retried(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, fault_plan=lambda request: Fault(status=403, body={"message": "Forbidden"})) as srv:
        async with started(MistralBackend(settings_for(srv))) as backend:
            with pytest.raises(BackendAuthError, match="MISTRAL_API_KEY"):
                await backend.score_texts(["a"])
        assert srv.request_count == 1


async def test_missing_key_stops_at_start_with_the_variable_to_set(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key) as srv:
        settings = settings_for(srv)
        settings.mistral.api_key = None  # load_settings refuses this; a backend built in code must too
        backend = MistralBackend(settings)
        with pytest.raises(BackendAuthError, match="MISTRAL_API_KEY is not set"):
            await backend.start()
        assert srv.request_count == 0


async def test_breaker_opens_after_consecutive_failures_then_probes_and_closes(
    api_key: str, settings_for: SettingsFor
) -> None:
    with server(api_key, fault_plan=first(3, Fault(status=503))) as srv:
        settings = settings_for(srv, http={"retry_attempts": 1, "breaker_failure_threshold": 3, "breaker_reset_s": 0.3})
        async with started(MistralBackend(settings)) as backend:
            for _ in range(3):
                with pytest.raises(BackendUnavailable):
                    await backend.score_texts(["a"])
            assert backend.api.breaker.state == "open" and not await backend.ready()
            with pytest.raises(CircuitOpenError) as open_error:
                await backend.score_texts(["a"])
            assert srv.request_count == 3, "an open circuit must not call the API"
            assert 0 < open_error.value.retry_in_s <= 0.3

            await _sleep(0.35)
            (outcome,) = await backend.score_texts(["a"])  # the probe
            assert isinstance(outcome, Scored)
            assert backend.api.breaker.state == "closed"
        assert srv.request_count == 4


async def test_429_does_not_open_the_breaker(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, fault_plan=first(4, Fault(status=429, retry_after="0"))) as srv:
        settings = settings_for(srv, http={"breaker_failure_threshold": 2})
        async with started(MistralBackend(settings)) as backend:
            (outcome,) = await backend.score_texts(["a"])
            assert backend.api.breaker.times_opened == 0
    assert isinstance(outcome, Scored)


async def test_low_remaining_rate_limit_headers_slow_the_client_down(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, rate_limit=RateLimit(requests_per_minute=4, enforce=False)) as srv:
        settings = settings_for(srv, http={"rate_limit_low_watermark": 0.5})
        async with started(MistralBackend(settings)) as backend:
            await backend.score_texts(["a"])
            assert backend.api.pacer.interval_s == 0, "3 of 4 left, above half: full speed"
            await backend.score_texts(["b"])
            await backend.score_texts(["c"])
            assert srv.requests[-1].response_headers["x-ratelimit-remaining-req-minute"] == "1"
            # 1 of 4 left, below half: the one request left is spread over the 60 s window.
            assert backend.api.pacer.interval_s == pytest.approx(60.0)


async def test_an_enforced_server_window_answers_429_and_the_client_waits_it_out(
    api_key: str, settings_for: SettingsFor
) -> None:
    limit = RateLimit(requests_per_minute=2, window_s=1.0)
    with server(api_key, rate_limit=limit) as srv:
        # Header pacing off: it would assume Mistral's 60 s window, not this 1 s test window.
        async with started(MistralBackend(settings_for(srv, http={"rate_limit_low_watermark": 0}))) as backend:
            outcomes = [await backend.score_texts([f"t{i}"]) for i in range(4)]
        limited = [r for r in srv.requests if r.status == 429]
        assert limited, "the window must have been exceeded"
        for failed in limited:
            assert failed.answered_at is not None
            assert retry_of(srv.requests, failed).received_at - failed.answered_at >= float(failed.retry_after or 0)
    assert all(isinstance(o, Scored) for batch in outcomes for o in batch)


async def test_the_api_key_appears_in_no_log_line_or_error(
    api_key: str, settings_for: SettingsFor, caplog: pytest.LogCaptureFixture
) -> None:
    plan = combine(
        first(2, Fault(status=503)),
        every(3, Fault(status=429, retry_after="0"), offset=2),
        when_input_contains("POISON", Fault(status=400)),
        [None, None, None, None, Fault(reset=True)],
    )
    errors: list[str] = []
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events, server(api_key, fault_plan=plan) as srv:
        async with started(MistralBackend(settings_for(srv, http={"breaker_failure_threshold": 100}))) as backend:
            await backend.score_texts(["a", "POISON", "b", "c"])
            await backend.score_texts(["d", "e"])
        async with started(MistralBackend(settings_for(srv, key=api_key + "-wrong"))) as bad:
            try:
                await bad.score_texts(["a"])
            except BackendAuthError as err:
                errors.append(f"{err!s} {err!r}")

    # The default engine (aiohttp) writes no standard-library records per request; httpx's did.
    assert errors and events, "the scenario must have produced output to check"
    assert {e["event"] for e in events} >= {"backend.http.retry", "backend.http.rejected", "backend.http.auth_failed"}
    output = "\n".join([repr(e) for e in events] + [r.getMessage() for r in caplog.records] + errors)
    assert api_key not in output


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def test_a_call_sleeping_in_its_own_backoff_retries_as_soon_as_another_call_is_answered(
    api_key: str, settings_for: SettingsFor
) -> None:
    """The API is back (another call got an answer): a backoff we chose ourselves ends early.
    With a backoff drawn from [0, 10,000 s] the first call would be asleep when the guard fires."""
    plan = [Fault(status=503)]  # the first request only
    slow_backoff = {"retry_base_wait_s": 10_000.0, "retry_max_wait_s": 10_000.0, "retry_budget_s": 50_000.0}
    with server(api_key, fault_plan=plan) as srv:
        async with started(MistralBackend(settings_for(srv, http=slow_backoff))) as backend:
            first = asyncio.create_task(backend.score_texts(["a"]))
            while srv.request_count < 1:  # the first call failed and is in its backoff
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert not first.done()
            (other,) = await backend.score_texts(["b"])
            (outcome,) = await asyncio.wait_for(first, timeout=60)  # a hang guard, not a timing claim
    assert isinstance(other, Scored) and isinstance(outcome, Scored)
    assert [r.status for r in srv.requests] == [503, 200, 200]
