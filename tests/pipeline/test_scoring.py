"""Scoring stage: the fail policy, concurrency and fatal errors, on an in-process backend."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka.structs import TopicPartition

from tests.pipeline.conftest import make_job
from worker.backends.base import (
    Backend,
    BackendAuthError,
    BackendUnavailable,
    Conversation,
    Outcome,
    Rejected,
    Scored,
)
from worker.pipeline.scoring import WAIT_BACKOFF_S, Degraded, Scorer
from worker.pipeline.types import PartitionOffsets


class ScriptedBackend(Backend):
    """Raises the scripted errors in turn, then scores every text by its length."""

    name = "scripted"

    def __init__(self, *errors: BaseException, short_by: int = 0) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.short_by = short_by
        self.in_flight = 0
        self.peak = 0
        self.gate: asyncio.Event | None = None

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.errors:
                raise self.errors.pop(0)
            outcomes: list[Outcome] = [Scored({"len": len(text) / 100}, "m") for text in texts]
            return outcomes[: len(outcomes) - self.short_by]
        finally:
            self.in_flight -= 1

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        raise AssertionError("not used")


def unavailable(retry_in_s: float | None = None) -> BackendUnavailable:
    err = BackendUnavailable("API down")
    err.retry_in_s = retry_in_s
    return err


class Harness:
    def __init__(self, backend: Backend, fail_policy: str = "wait", max_concurrency: int = 4) -> None:
        self.fatal: list[BaseException] = []
        self.slept: list[float] = []
        self.failed = False

        async def sleep(delay: float) -> None:
            self.slept.append(delay)

        self.scorer = Scorer(
            backend,
            fail_policy=fail_policy,  # type: ignore[arg-type]
            max_concurrency=max_concurrency,
            on_fatal=self.fatal.append,
            failed=lambda: self.failed,
            sleep=sleep,
        )


async def test_scores_come_back_one_per_job_in_order():
    harness = Harness(ScriptedBackend())
    jobs = [make_job("a" * n, offset=n) for n in (1, 5, 3)]
    results = await harness.scorer.score("content", jobs)
    assert results == [Scored({"len": 0.01}, "m"), Scored({"len": 0.05}, "m"), Scored({"len": 0.03}, "m")]


async def test_wait_retries_the_batch_until_the_backend_answers_backing_off_as_the_table_says():
    backend = ScriptedBackend(unavailable(), unavailable(), unavailable(retry_in_s=7.5))
    harness = Harness(backend)
    results = await harness.scorer.score("content", [make_job()])
    assert results == [Scored({"len": 0.05}, "m")]
    assert backend.calls == 4
    assert harness.slept == [WAIT_BACKOFF_S[0], WAIT_BACKOFF_S[1], 7.5]  # never sooner than retry_in_s


async def test_an_unexpected_backend_exception_is_waited_out_like_an_outage():
    backend = ScriptedBackend(KeyError("bug"))
    harness = Harness(backend)
    assert await harness.scorer.score("content", [make_job()]) == [Scored({"len": 0.05}, "m")]
    assert harness.fatal == []


@pytest.mark.parametrize("policy", ["review", "allow"])
async def test_review_and_allow_give_every_job_a_degraded_result_with_the_reason(policy):
    harness = Harness(ScriptedBackend(unavailable()), fail_policy=policy)
    results = await harness.scorer.score("content", [make_job(offset=0), make_job(offset=1)])
    assert results == [Degraded(policy, "API down"), Degraded(policy, "API down")]
    assert harness.slept == []


async def test_bad_credentials_are_fatal_and_give_the_batch_up():
    harness = Harness(ScriptedBackend(BackendAuthError("MISTRAL_API_KEY refused")))
    assert await harness.scorer.score("content", [make_job()]) is None
    assert [str(err) for err in harness.fatal] == ["MISTRAL_API_KEY refused"]


async def test_a_backend_that_answers_fewer_results_than_inputs_is_fatal():
    harness = Harness(ScriptedBackend(short_by=1))
    assert await harness.scorer.score("content", [make_job(offset=0), make_job(offset=1)]) is None
    assert "returned 1 results for 2 inputs" in str(harness.fatal[0])


async def test_waiting_stops_once_no_job_of_the_batch_is_owned_any_more():
    slot = PartitionOffsets(TopicPartition("in.c", 0))
    job = make_job(slot=slot)
    slot.owned = False
    harness = Harness(ScriptedBackend(unavailable(), unavailable()))
    assert await harness.scorer.score("content", [job]) is None
    assert harness.slept == []


async def test_waiting_stops_once_the_worker_failed():
    harness = Harness(ScriptedBackend(unavailable()))
    harness.failed = True
    assert await harness.scorer.score("content", [make_job()]) is None


async def test_no_more_batches_than_the_concurrency_limit_reach_the_backend_at_once():
    backend = ScriptedBackend()
    backend.gate = asyncio.Event()
    harness = Harness(backend, max_concurrency=2)
    tasks = [asyncio.create_task(harness.scorer.score("content", [make_job(offset=i)])) for i in range(5)]
    await asyncio.sleep(0.05)
    assert backend.in_flight == 2
    backend.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(isinstance(r, list) and len(r) == 1 for r in results)
    assert backend.peak == 2


async def test_a_rejected_input_is_passed_on_untouched():
    class RejectAll(ScriptedBackend):
        async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
            return [Rejected("too long for the API")] * len(texts)

    harness = Harness(RejectAll())
    assert await harness.scorer.score("content", [make_job()]) == [Rejected("too long for the API")]
