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
    Unavailable,
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


# -- inputs a composite backend could not score, and the fallback backend ---------------


class HalfDown(ScriptedBackend):
    """Like a cascade whose second stage is down: texts containing '?' come back
    Unavailable for the first ``down_for`` calls; the rest are scored."""

    def __init__(self, down_for: int) -> None:
        super().__init__()
        self.down_for = down_for
        self.seen: list[list[str]] = []

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.seen.append(list(texts))
        self.calls += 1
        down = self.calls <= self.down_for
        return [
            Unavailable("second stage down", retry_in_s=3.0)
            if down and "?" in t
            else Scored({"len": len(t) / 100}, "m")
            for t in texts
        ]


async def test_wait_retries_only_the_inputs_left_unavailable_and_keeps_the_others():
    backend = HalfDown(down_for=2)
    harness = Harness(backend)
    jobs = [make_job("sure", offset=0), make_job("unsure?", offset=1), make_job("ok", offset=2)]
    results = await harness.scorer.score("content", jobs)
    assert results == [Scored({"len": 0.04}, "m"), Scored({"len": 0.07}, "m"), Scored({"len": 0.02}, "m")]
    assert backend.seen == [["sure", "unsure?", "ok"], ["unsure?"], ["unsure?"]]
    assert harness.slept == [3.0, 3.0]  # never sooner than the unavailable inputs' retry_in_s


async def test_review_degrades_only_the_inputs_left_unavailable():
    harness = Harness(HalfDown(down_for=1), fail_policy="review")
    results = await harness.scorer.score("content", [make_job("sure", offset=0), make_job("unsure?", offset=1)])
    assert results == [Scored({"len": 0.04}, "m"), Degraded("review", "second stage down")]


class Fallback(ScriptedBackend):
    name = "spare"

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return [Scored({"spare": 0.5}, "spare-model") for _ in texts]


def fallback_harness(primary: Backend, fallback: Backend) -> Harness:
    harness = Harness(primary, fail_policy="fallback")
    harness.scorer = Scorer(
        primary,
        fail_policy="fallback",
        max_concurrency=4,
        on_fatal=harness.fatal.append,
        failed=lambda: harness.failed,
        sleep=harness.scorer._sleep,
        fallback=fallback,
    )
    return harness


async def test_fallback_scores_the_batch_when_the_primary_gives_up_and_says_so():
    spare = Fallback()
    harness = fallback_harness(ScriptedBackend(unavailable()), spare)
    results = await harness.scorer.score("content", [make_job(offset=0), make_job(offset=1)])
    reason = "scored by fallback backend spare: API down"
    assert results == [
        Scored({"spare": 0.5}, "spare-model", decided_by="spare", degraded_reason=reason),
        Scored({"spare": 0.5}, "spare-model", decided_by="spare", degraded_reason=reason),
    ]
    assert harness.slept == []


async def test_the_primary_is_tried_first_on_every_batch_and_takes_over_when_it_answers():
    primary = ScriptedBackend(unavailable())
    spare = Fallback()
    harness = fallback_harness(primary, spare)
    first = await harness.scorer.score("content", [make_job()])
    second = await harness.scorer.score("content", [make_job()])
    assert first is not None and first[0].decided_by == "spare"  # type: ignore[union-attr]
    assert second == [Scored({"len": 0.05}, "m")]
    assert (primary.calls, spare.calls) == (2, 1)


async def test_when_the_fallback_is_down_too_the_batch_waits_for_either():
    primary = ScriptedBackend(unavailable(), unavailable())
    spare = Fallback(unavailable())
    harness = fallback_harness(primary, spare)
    results = await harness.scorer.score("content", [make_job()])
    # 1st round: primary down, spare down -> wait; 2nd: primary down, spare answers.
    assert results is not None and results[0].decided_by == "spare"  # type: ignore[union-attr]
    assert harness.slept == [WAIT_BACKOFF_S[0]]


async def test_fallback_takes_only_the_inputs_a_composite_left_unavailable():
    spare = Fallback()
    harness = fallback_harness(HalfDown(down_for=1), spare)
    results = await harness.scorer.score("content", [make_job("sure", offset=0), make_job("unsure?", offset=1)])
    assert results is not None
    assert results[0] == Scored({"len": 0.04}, "m")
    assert results[1].decided_by == "spare" and "second stage down" in results[1].degraded_reason  # type: ignore[union-attr]


async def test_inputs_left_unavailable_in_a_revoked_partition_do_not_hold_back_the_scored_rest():
    revoked = PartitionOffsets(TopicPartition("in.c", 1))
    unsure = make_job("unsure?", slot=revoked, offset=1)
    revoked.owned = False
    harness = Harness(HalfDown(down_for=5))
    results = await harness.scorer.score("content", [make_job("sure", offset=0), unsure])
    assert results is not None and results[0] == Scored({"len": 0.04}, "m")
    assert harness.slept == []  # nothing to wait for: the unsure input's partition is gone
