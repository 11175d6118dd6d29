"""A poison input must not open the circuit while it is isolated: other traffic goes on.

A real Mistral backend against a loopback server that answers 500 to every request carrying
the poison text and 200 to all others, scored through the pipeline's Scorer under ``wait``
with the default tries per call (6) above the breaker's threshold (5). As in the blip test,
the breaker's clock and the Scorer's sleeps are one fake clock; whenever the poison batch
waits, time passes and a healthy batch arrives, scored by the same Scorer (the evidence
that the API answers others).

What is checked is the breaker's own state and count of openings and what the server
recorded, not wall-clock timing. Before the fix each call of the poison search (32, 16, 8,
4, 2, 1 inputs, then the lone input twice more) opened the circuit after five of its six
tries, so traffic arriving while it waited met an open circuit.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.backends.conftest import started
from tests.pipeline.conftest import make_job
from worker.backends.base import BackendUnavailable, Rejected, Scored
from worker.backends.breaker import CircuitOpenError
from worker.backends.mistral import MistralBackend
from worker.config import Settings
from worker.pipeline.scoring import Scorer
from worker.testing import Fault, MistralServer, when_input_contains
from worker.testing.loopback import RecordedRequest

POISON = "this one breaks the API"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def inputs_of(request: RecordedRequest) -> list[str]:
    assert isinstance(request.body, dict)
    value = request.body["input"]
    return [value] if isinstance(value, str) else list(value)


async def test_a_poison_input_is_isolated_without_opening_the_circuit_on_other_traffic(
    api_key: str, settings_for: Callable[..., Settings]
) -> None:
    clock = FakeClock()
    circuit_when_waiting: list[str] = []  # the breaker's state each time the poison batch starts a wait
    healthy: list[object] = []  # what each healthy batch that arrived meanwhile got
    nested = False

    with MistralServer(api_key=api_key, fault_plan=when_input_contains(POISON, Fault(status=500))) as server:
        backend = MistralBackend(
            settings_for(server, http={"retry_attempts": 6, "breaker_failure_threshold": 5, "breaker_reset_s": 30})
        )
        breaker = backend.api.breaker
        breaker._clock = clock

        async def sleep(delay: float) -> None:
            nonlocal nested
            clock.now += delay
            if nested:  # a healthy batch waiting itself: time passes, nothing more arrives
                return
            circuit_when_waiting.append(breaker.state)
            nested = True
            try:
                answer = await scorer.score("content", [make_job(f"healthy {len(healthy)}", offset=100 + len(healthy))])
            finally:
                nested = False
            healthy.append(answer[0] if answer else answer)

        scorer = Scorer(
            backend,
            fail_policy="wait",
            max_concurrency=4,
            on_fatal=print,
            failed=lambda: len(circuit_when_waiting) > 20,  # a search that never ends gives up: results None
            poison_attempts=3,
            sleep=sleep,
        )
        batch = [make_job(POISON if i == 21 else f"message {i}", offset=i) for i in range(32)]
        async with started(backend):
            results = await scorer.score("content", batch)
        requests = list(server.requests)

    assert results is not None
    assert [type(r) for r in results] == [Scored] * 21 + [Rejected] + [Scored] * 10
    poisoned = results[21]
    assert isinstance(poisoned, Rejected) and poisoned.error_type == "backend_failed"
    assert "HTTP 500" in poisoned.reason

    # The batch's first call: nothing else was answered during its tries, so to the breaker
    # it was the start of an outage, and the circuit opened once. Everything after that is
    # the poison search, with healthy batches answered in between: no more openings.
    assert breaker.times_opened == 1, f"the circuit opened {breaker.times_opened - 1} more times during the search"
    assert circuit_when_waiting == ["open", "closed", "closed"], "waits: first call; lone input twice"
    assert all(isinstance(answer, Scored) for answer in healthy), healthy

    poison_requests = [r for r in requests if any(POISON in text for text in inputs_of(r))]
    assert sorted({len(inputs_of(r)) for r in poison_requests}, reverse=True) == [32, 16, 8, 4, 2, 1]
    assert all(r.status == 500 for r in poison_requests)
    lone_tries = [r for r in poison_requests if len(inputs_of(r)) == 1]
    assert len(lone_tries) == 3 * 2, "three lone calls of two tries each (suspect calls): none refused"


async def test_a_call_whose_own_tries_open_the_circuit_stops_there_and_leaves_the_probe_to_others(
    api_key: str, settings_for: Callable[..., Settings]
) -> None:
    """Its remaining tries would fail the probe for certain if its input is the trouble (and
    double the open time for everyone); in an outage the next call probes just the same."""
    ticks = iter(range(0, 10_000, 10))  # each reading of the breaker's clock is 10 s later: every open time is over

    with MistralServer(api_key=api_key, fault_plan=when_input_contains(POISON, Fault(status=500))) as server:
        backend = MistralBackend(
            settings_for(server, http={"retry_attempts": 6, "breaker_failure_threshold": 5, "breaker_reset_s": 30})
        )
        backend.api.breaker._clock = lambda: float(next(ticks))
        async with started(backend):
            try:
                await backend.score_texts([POISON])
            except BackendUnavailable as err:
                error: BackendUnavailable = err
            (healthy,) = await backend.score_texts(["all fine here"])  # the probe, after the open time
        statuses = [request.status for request in server.requests]

    assert isinstance(error, CircuitOpenError)
    assert statuses == [500] * 5 + [200], "five tries opened the circuit; the sixth did not take the probe"
    assert backend.api.breaker.times_opened == 1 and backend.api.breaker.state == "closed"
    assert isinstance(healthy, Scored)
