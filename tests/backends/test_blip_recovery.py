"""The issue's blip: six 503s at once, the API healthy from the seventh request on.

A real Mistral backend against a loopback server, scored through the pipeline's Scorer
under ``wait``. The breaker's clock and the Scorer's sleeps are one fake clock, so what
is checked is how long the worker *decides* to stay away, not wall-clock timing. It used
to be two full reset periods (30 s open, the probe meets the sixth 503, 30 s again);
now the circuit is open 0.5 s, then 1 s, and the batch is scored at the second probe.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.backends.conftest import started
from tests.pipeline.conftest import make_job
from worker.backends.base import Scored
from worker.backends.mistral import MistralBackend
from worker.config import Settings
from worker.pipeline.scoring import Scorer
from worker.testing import Fault, MistralServer, first


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_six_503s_then_healthy_cost_a_second_and_a_half_of_waiting_not_sixty(
    api_key: str, settings_for: Callable[..., Settings]
) -> None:
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(delay: float) -> None:  # the Scorer's waits move the breaker's clock
        slept.append(delay)
        clock.now += delay

    with MistralServer(api_key=api_key, fault_plan=first(6, Fault(status=503))) as server:
        backend = MistralBackend(
            settings_for(server, http={"retry_attempts": 6, "breaker_failure_threshold": 5})  # the defaults
        )
        backend.api.breaker._clock = clock
        scorer = Scorer(
            backend, fail_policy="wait", max_concurrency=4, on_fatal=print, failed=lambda: False, sleep=sleep
        )
        async with started(backend):
            results = await scorer.score("content", [make_job("hello")])
        statuses = [request.status for request in server.requests]

    assert results is not None and isinstance(results[0], Scored)
    assert statuses == [503] * 6 + [200]
    assert slept == [0.5, 1.0], "open 0.5 s; the probe meets the sixth 503; open 1 s; the next probe succeeds"
