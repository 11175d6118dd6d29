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
from worker.backends.breaker import CircuitBreaker, CircuitOpenError, input_suspected
from worker.backends.cache import CachingBackend
from worker.ops import metrics
from worker.pipeline.scoring import WAIT_BACKOFF_S, Degraded, Scorer
from worker.pipeline.types import Job, PartitionOffsets


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
    """A Scorer with recorded sleeps; ``sleeps_end=False``: a wait ends only when woken."""

    def __init__(
        self, backend: Backend, fail_policy: str = "wait", max_concurrency: int = 4, *, sleeps_end: bool = True
    ) -> None:
        self.fatal: list[BaseException] = []
        self.slept: list[float] = []
        self.failed = False
        never = asyncio.Event()

        async def sleep(delay: float) -> None:
            self.slept.append(delay)
            if not sleeps_end:
                await never.wait()

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
    assert harness.slept == [WAIT_BACKOFF_S[0], WAIT_BACKOFF_S[1], 7.5]  # the backend's retry_in_s when given


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


class PoisonBackend(Backend):
    """Fails every batch that holds ``poison`` (raising ``error``); scores the others."""

    name = "poison"

    def __init__(self, error: BaseException, poison: str = "POISON") -> None:
        self.error = error
        self.poison = poison
        self.batches: list[list[str]] = []

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.batches.append(list(texts))
        await asyncio.sleep(0)  # a real call yields: others run meanwhile
        if any(self.poison in text for text in texts):
            raise self.error
        return [Scored({"len": len(text) / 100}, "m") for text in texts]

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        raise AssertionError("not used")


async def score_under_traffic(harness: Harness, jobs: list, *, rounds: int = 200) -> list:
    """Score ``jobs`` while other (healthy) batches keep succeeding, as in a live stream."""
    task = asyncio.create_task(harness.scorer.score("content", jobs))
    for n in range(rounds):
        if task.done():
            break
        assert await harness.scorer.score("content", [make_job(f"other {n}", offset=1000 + n)]) is not None
    assert task.done(), "the poisoned batch never finished although the backend answered others"
    return task.result()


@pytest.mark.parametrize(
    "error",
    [
        unavailable(),  # what a 5xx, a timeout or a bad response shape become once the retries are spent
        RuntimeError("CUDA error: device-side assert triggered"),  # a local model raising on one input
    ],
    ids=["backend-unavailable", "local-model-exception"],
)
async def test_a_poison_input_is_bisected_out_and_rejected_as_backend_failed_the_rest_scored_in_order(error):
    backend = PoisonBackend(error)
    harness = Harness(backend, sleeps_end=False)
    texts = [f"t{i}" for i in range(8)]
    texts[5] = "a POISON input"
    splits_before = metrics.POISON_SPLITS._value.get()

    results = await score_under_traffic(harness, [make_job(t, offset=i) for i, t in enumerate(texts)])

    assert len(results) == 8
    poisoned = results[5]
    assert isinstance(poisoned, Rejected) and poisoned.error_type == "backend_failed"
    assert "failed on this input alone 3 times" in poisoned.reason
    assert str(error) in poisoned.reason, "the last error is in the reason"
    assert results[:5] + results[6:] == [Scored({"len": len(t) / 100}, "m") for t in texts[:5] + texts[6:]]
    assert backend.batches.count(["a POISON input"]) == 3, "tried alone the configured number of times"
    assert metrics.POISON_SPLITS._value.get() - splits_before == 3  # 8 -> 4 -> 2 -> 1


async def test_the_number_of_tries_alone_is_configurable():
    backend = PoisonBackend(unavailable())
    harness = Harness(backend, sleeps_end=False)
    harness.scorer._poison_attempts = 5
    (result,) = await score_under_traffic(harness, [make_job("POISON")])
    assert isinstance(result, Rejected) and result.error_type == "backend_failed"
    # The first failure has no evidence yet: the call in flight with it started before it failed.
    assert backend.batches.count(["POISON"]) == 1 + 5


async def test_a_poison_input_is_found_when_no_other_traffic_answers_by_probing_with_a_scored_input():
    """The stream stopped: no other batch succeeds. A batch that waited with no success
    meanwhile probes the backend with an input it scored before; the probe answering is the
    evidence, so the search runs to the end instead of waiting like an outage."""
    backend = PoisonBackend(unavailable())
    harness = Harness(backend)  # every wait ends on its own: nothing else wakes it
    assert await harness.scorer.score("content", [make_job("earlier", offset=0)]) is not None
    probes_before = metrics.BACKEND_PROBES.labels(result="answered")._value.get()
    texts = ["t1", "t2", "a POISON input", "t3"]

    scoring = harness.scorer.score("content", [make_job(t, offset=i + 1) for i, t in enumerate(texts)])
    results = await asyncio.wait_for(scoring, timeout=10)  # without the probe: waits for ever, like an outage

    assert results is not None and isinstance(results[2], Rejected) and results[2].error_type == "backend_failed"
    assert [results[i] for i in (0, 1, 3)] == [Scored({"len": len(texts[i]) / 100}, "m") for i in (0, 1, 3)]
    assert backend.batches.count(["earlier"]) >= 2, "the canary was sent as the probe"
    assert metrics.BACKEND_PROBES.labels(result="answered")._value.get() > probes_before


async def test_a_probe_that_fails_is_an_outage_nothing_is_split_or_dead_lettered():
    backend = ScriptedBackend()
    harness = Harness(backend)
    assert await harness.scorer.score("content", [make_job("earlier", offset=0)]) is not None
    backend.errors = [unavailable() for _ in range(6)]  # batch, probe, batch, probe, batch, probe
    jobs = [make_job(f"t{i}", offset=i + 1) for i in range(4)]

    results = await harness.scorer.score("content", jobs)

    assert results == [Scored({"len": 0.02}, "m")] * 4
    assert backend.calls == 1 + 7, "three failed tries, each followed by a failed probe, then the batch whole"
    assert harness.slept == [1.0, 2.0, 5.0]


async def test_an_outage_is_waited_out_whole_never_split_nor_dead_lettered():
    """Everything fails (no other batch succeeds): the batch waits, as one, until the backend is back."""
    backend = ScriptedBackend(*[unavailable() for _ in range(8)])
    harness = Harness(backend)
    splits_before = metrics.POISON_SPLITS._value.get()
    jobs = [make_job(f"t{i}", offset=i) for i in range(4)]
    results = await harness.scorer.score("content", jobs)
    assert results == [Scored({"len": 0.02}, "m")] * 4
    assert metrics.POISON_SPLITS._value.get() == splits_before, "never split"
    # Nothing answered before, so no canary: each wait's probe is one of the batch's own
    # inputs, and it fails too (4 tries of the whole batch, 4 probes, then the batch whole).
    assert backend.calls == 9
    assert harness.slept == [1.0, 2.0, 5.0, 10.0]


async def test_a_waiting_batch_is_woken_as_soon_as_another_batch_succeeds():
    """The backend answers again: waiters retry at once instead of sleeping out the table."""
    backend = ScriptedBackend(unavailable())
    harness = Harness(backend, sleeps_end=False)
    waiting = asyncio.create_task(harness.scorer.score("content", [make_job("first")]))
    while not harness.slept:  # the first batch failed and is waiting
        await asyncio.sleep(0)
    assert await harness.scorer.score("content", [make_job("later", offset=1)]) == [Scored({"len": 0.05}, "m")]
    for _ in range(20):
        await asyncio.sleep(0)
    assert waiting.done(), "the waiting batch slept on although the backend answered"
    assert waiting.result() == [Scored({"len": 0.05}, "m")]
    assert harness.slept == [WAIT_BACKOFF_S[0]]


async def test_an_open_circuit_says_when_to_retry_and_the_table_does_not_stretch_it():
    backend = ScriptedBackend(unavailable(retry_in_s=0.5), unavailable(retry_in_s=1.0), unavailable(retry_in_s=2.0))
    harness = Harness(backend)
    assert await harness.scorer.score("content", [make_job()]) == [Scored({"len": 0.05}, "m")]
    assert harness.slept == [0.5, 1.0, 2.0]  # the probe times, not max(probe, 1/2/5 s)


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


class SuspectRecordingBackend(PoisonBackend):
    """A PoisonBackend that also records, per call, whether it was made inside ``suspect_input()``."""

    def __init__(self, error: BaseException, poison: str = "POISON") -> None:
        super().__init__(error, poison)
        self.suspected: list[tuple[int, bool]] = []  # (inputs, suspected) per call

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.suspected.append((len(texts), input_suspected()))
        return await super().score_texts(texts)


async def test_the_poison_search_makes_its_calls_as_suspect_so_they_cannot_open_the_circuit():
    """Once others were answered since the batch failed, its calls blame it, not the API (see breaker)."""
    backend = SuspectRecordingBackend(unavailable())
    harness = Harness(backend, sleeps_end=False)
    texts = [f"t{i}" for i in range(8)]
    texts[2] = "a POISON input"

    results = await score_under_traffic(harness, [make_job(t, offset=i) for i, t in enumerate(texts)])

    assert isinstance(results[2], Rejected)
    calls = list(zip(backend.batches, backend.suspected, strict=True))
    batch_calls = [(n, suspected) for batch, (n, suspected) in calls if not batch[0].startswith("other")]
    assert batch_calls[0] == (8, False), "the first call has no evidence yet: an outage looks the same"
    assert len(batch_calls) > 5 and all(suspected for _, suspected in batch_calls[1:]), batch_calls
    others = [suspected for batch, (_, suspected) in calls if batch[0].startswith("other")]
    assert others and not any(others), "other traffic is never suspect"


class RefusedThenHealthy(ScriptedBackend):
    """Calls for the batch under test (texts ``t0``, ``t1`` ...) meet the scripted errors in turn;
    other traffic is always scored."""

    def __init__(self, *errors: BaseException) -> None:
        super().__init__(*errors)
        self.sizes: list[int] = []  # inputs per call for the batch under test

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        under_test = texts[0].startswith("t")
        for _ in range(3 if under_test else 1):  # a real call yields: others start and answer meanwhile
            await asyncio.sleep(0)
        if under_test:
            self.sizes.append(len(texts))
            if self.errors:
                raise self.errors.pop(0)
        return [Scored({"len": len(text) / 100}, "m") for text in texts]


async def test_a_call_refused_by_an_open_circuit_is_neither_split_nor_counted_against_its_inputs():
    """The batch failed while others were answered (split once); then an outage opened the
    circuit: its refusals tested nothing, so the halves wait whole and nothing is dead-lettered."""
    backend = RefusedThenHealthy(unavailable(), *[CircuitOpenError("Mistral", 1.0) for _ in range(4)])
    harness = Harness(backend, sleeps_end=False)
    splits_before = metrics.POISON_SPLITS._value.get()
    jobs = [make_job(f"t{i}", offset=i) for i in range(4)]

    results = await score_under_traffic(harness, jobs)

    assert results == [Scored({"len": 0.02}, "m")] * 4
    assert backend.sizes == [4] + [2] * 6, "split once on the failure; the refused halves were not split"
    assert metrics.POISON_SPLITS._value.get() - splits_before == 1


class BreakerGuardedPoison(PoisonBackend):
    """``PoisonBackend`` behind a real ``CircuitBreaker`` (threshold 1, on a fake clock that
    the scorer's sleeps move on), two tries a call, counted as the HTTP layer does: a call
    whose failed first try opened the circuit ends refused, with ``CircuitOpenError``."""

    def __init__(self) -> None:
        super().__init__(unavailable())
        self.now = 0.0
        self.breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=30, first_open_s=1, clock=lambda: self.now)

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        for _ in range(2):
            self.breaker.before_call()
            try:
                outcomes = await super().score_texts(texts)
            except BackendUnavailable:
                self.breaker.record_neutral() if input_suspected() else self.breaker.record_failure()
                continue
            self.breaker.record_success()
            return outcomes
        raise unavailable()


async def test_a_circuit_opened_by_a_poison_batch_is_closed_by_the_probe_not_kept_open_by_the_batch():
    """The poison batch's first call (no evidence yet) opened the circuit, and no other traffic
    comes. Were the batch the circuit's trial call it would fail it again and again; the
    canary probe is the trial, closes the circuit, and the search runs to the end."""
    backend = BreakerGuardedPoison()

    async def sleep(delay: float) -> None:
        backend.now += delay

    scorer = Scorer(
        backend, fail_policy="wait", max_concurrency=4, on_fatal=lambda _: None, failed=lambda: False, sleep=sleep
    )
    assert await scorer.score("content", [make_job("earlier", offset=0)]) is not None
    texts = ["t1", "a POISON input", "t2", "t3"]

    scoring = scorer.score("content", [make_job(t, offset=i + 1) for i, t in enumerate(texts)])
    results = await asyncio.wait_for(scoring, timeout=10)

    assert results is not None and isinstance(results[1], Rejected) and results[1].error_type == "backend_failed"
    assert [results[i] for i in (0, 2, 3)] == [Scored({"len": len(texts[i]) / 100}, "m") for i in (0, 2, 3)]
    assert backend.breaker.times_opened == 1, "only the first, unsuspected failure opened the circuit"


class Switchable(ScriptedBackend):
    """Scores every text while up; raises ``BackendUnavailable`` for every call while down."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.sent: list[list[str]] = []

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.sent.append(list(texts))
        if self.down:
            raise unavailable()
        return await super().score_texts(texts)


async def test_answers_from_the_dedup_cache_are_no_evidence_and_the_probe_bypasses_the_cache():
    """An outage while repeated texts keep being answered from the cache: those answers say
    nothing of the backend, and the probe must ask the backend, not the cache. Otherwise the
    waiting batch would be split and its inputs dead-lettered as poison during an outage."""
    backend = Switchable()
    cached = CachingBackend(backend, max_entries=100, ttl_s=600)
    waits = 0

    async def sleep(delay: float) -> None:  # each wait: a repeated text, answered from the cache
        nonlocal waits
        waits += 1
        assert await scorer.score("content", [make_job("earlier", offset=99)]) is not None
        if waits == 6:
            backend.down = False  # the API is back

    scorer = Scorer(
        cached, fail_policy="wait", max_concurrency=4, on_fatal=lambda _: None, failed=lambda: False, sleep=sleep
    )
    assert await scorer.score("content", [make_job("earlier", offset=0)]) is not None  # cached, and the canary
    backend.down = True
    splits_before = metrics.POISON_SPLITS._value.get()
    jobs = [make_job(f"t{i}", offset=i + 1) for i in range(4)]

    results = await asyncio.wait_for(scorer.score("content", jobs), timeout=10)

    assert results == [Scored({"len": 0.02}, "m")] * 4, "nothing dead-lettered: it was an outage"
    assert metrics.POISON_SPLITS._value.get() == splits_before, "never split"
    probes = [texts for texts in backend.sent if texts == ["earlier"]]
    assert len(probes) >= 5, "each wait's probe reached the backend instead of the cache"


async def test_the_probe_sends_the_shortest_input_of_the_last_batch_scored_whole():
    backend = Switchable()
    waits = 0

    async def sleep(delay: float) -> None:
        nonlocal waits
        waits += 1
        if waits == 2:
            backend.down = False

    scorer = Scorer(
        backend, fail_policy="wait", max_concurrency=4, on_fatal=lambda _: None, failed=lambda: False, sleep=sleep
    )
    long_text = "a long text the probe should not resend " * 20
    assert await scorer.score("content", [make_job(long_text, offset=0), make_job("short", offset=1)]) is not None
    backend.down = True
    sent_before = len(backend.sent)

    assert await asyncio.wait_for(scorer.score("content", [make_job("t0", offset=2)]), timeout=10) is not None

    probes = [texts for texts in backend.sent[sent_before:] if texts != ["t0"]]
    assert probes and all(texts == ["short"] for texts in probes), backend.sent[sent_before:]


# -- evidence through the cascade, and per kind -----------------------------------------


class FirstStage(ScriptedBackend):
    """Scores a text containing '?' 0.5 on ``sexual`` (inside the band: escalated), others 0.01."""

    name = "first"

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        await asyncio.sleep(0)
        return [Scored({"sexual": 0.5 if "?" in t else 0.01}, "first-model") for t in texts]


class PoisonSecondStage(PoisonBackend):
    name = "then"


async def test_a_poison_input_for_the_cascades_second_stage_is_bisected_out_and_dead_lettered():
    from worker.backends.cascade import CascadeBackend, UncertaintyBands
    from worker.pipeline.policy import Policy

    policy = Policy.from_mapping({"categories": {"sexual": {"threshold": 0.5, "action": "block"}}})
    second = PoisonSecondStage(unavailable())
    cascade = CascadeBackend(FirstStage(), second, UncertaintyBands(policy, default_band=0.1))
    harness = Harness(cascade, sleeps_end=False)
    texts = ["sure", "t1?", "a POISON?", "t3?"]
    task = asyncio.create_task(harness.scorer.score("content", [make_job(t, offset=i) for i, t in enumerate(texts)]))
    for n in range(60):  # others' escalated inputs keep being answered by the second stage
        if task.done():
            break
        assert await harness.scorer.score("content", [make_job(f"other {n}?", offset=1000 + n)]) is not None
    assert task.done(), "the second stage's poison input never settled although it answered others"

    results = task.result()
    assert results is not None
    assert isinstance(results[2], Rejected) and results[2].error_type == "backend_failed"
    assert [r.decided_by for r in results if isinstance(r, Scored)] == ["first", "then", "then"]
    assert second.batches.count(["a POISON?"]) == 3, "tried alone the configured number of times"


class EndpointDown(ScriptedBackend):
    """Texts are scored; conversations fail (their endpoint answers 503) while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.conversation_calls = 0

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        await asyncio.sleep(0)
        return await super().score_texts(texts)

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        self.conversation_calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise unavailable()
        return [Scored({"turn": 0.1}, "m") for _ in conversations]


def make_turn(content: str, offset: int) -> Job:
    import json

    from tests.pipeline.conftest import CONVERSATION_TOPIC, DECODER, make_record

    slot = PartitionOffsets(TopicPartition(CONVERSATION_TOPIC, 0))
    slot.track(offset)
    value = json.dumps({"id": f"t{offset}", "conversation_id": f"c{offset}", "role": "user", "content": content})
    job = DECODER.decode(make_record(value.encode(), topic=CONVERSATION_TOPIC, offset=offset), slot)
    assert isinstance(job, Job)
    return job


async def test_an_outage_of_one_kinds_endpoint_is_not_evidence_from_the_other_kinds_successes():
    """``/v1/chat/moderations`` down while ``/v1/moderations`` answers: the content successes
    say nothing of the conversation endpoint, so the healthy turns wait; none is dead-lettered."""
    backend = EndpointDown()
    harness = Harness(backend)  # every wait ends at once: the batch retries between the content batches
    poison_before = metrics.POISON_INPUTS._value.get()
    turns = [make_turn(f"healthy turn {i}", i) for i in range(4)]
    waiting = asyncio.create_task(harness.scorer.score("conversation", turns))
    for n in range(40):  # the content endpoint answers all along
        assert await harness.scorer.score("content", [make_job(f"text {n}", offset=n)]) is not None
    assert backend.conversation_calls > 5, "the turns were retried meanwhile"
    assert not waiting.done(), f"the healthy turns were settled while their endpoint was down: {waiting.result()}"
    assert metrics.POISON_INPUTS._value.get() == poison_before

    backend.down = False
    results = await asyncio.wait_for(waiting, timeout=5)
    assert results == [Scored({"turn": 0.1}, "m")] * 4, "nothing dead-lettered: it was an outage"


async def test_a_split_half_of_revoked_jobs_only_does_not_give_up_the_owned_half():
    """The poison search splits a batch of two partitions; the half holding only the revoked
    partition's jobs is given up, the owned half is still scored (not abandoned with it)."""
    backend = PoisonBackend(unavailable())
    harness = Harness(backend, sleeps_end=False)
    revoked = PartitionOffsets(TopicPartition("in.c", 1))
    jobs = [make_job("t0", offset=0), make_job("a POISON input", slot=revoked, offset=1)]
    revoked.owned = False

    results = await score_under_traffic(harness, jobs)

    assert results is not None, "the owned half was abandoned with the revoked one"
    assert results[0] == Scored({"len": 0.02}, "m")


async def test_a_poison_input_before_the_first_success_is_found_by_probing_with_the_batchs_own_inputs():
    """Nothing was scored yet, so there is no canary, and no other traffic comes (every
    batch in flight holds a poison input; the in-flight cap stops reading). The probe takes
    the waiting batch's own inputs in turn: one that answers is the evidence."""
    backend = PoisonBackend(unavailable())
    harness = Harness(backend)  # every wait ends on its own: nothing else wakes it
    texts = ["a POISON input", "t1", "t2", "t3"]

    scoring = harness.scorer.score("content", [make_job(t, offset=i) for i, t in enumerate(texts)])
    results = await asyncio.wait_for(scoring, timeout=10)

    assert results is not None and isinstance(results[0], Rejected) and results[0].error_type == "backend_failed"
    assert results[1:] == [Scored({"len": 0.02}, "m")] * 3


async def test_an_outage_before_the_first_success_is_still_waited_out_whole():
    backend = ScriptedBackend(*[unavailable() for _ in range(12)])
    harness = Harness(backend)
    jobs = [make_job(f"t{i}", offset=i) for i in range(4)]
    results = await harness.scorer.score("content", jobs)
    assert results == [Scored({"len": 0.02}, "m")] * 4, "nothing dead-lettered: it was an outage"


class FirstStageWithOutage(FirstStage):
    """``FirstStage`` that raises ``BackendUnavailable`` while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        await asyncio.sleep(0)
        if self.down:
            raise unavailable()
        return await super().score_texts(texts)


class HeldSecondStage(ScriptedBackend):
    """A second stage whose calls each finish only when released, in the order they came."""

    name = "then"

    def __init__(self) -> None:
        super().__init__()
        self.held: list[asyncio.Event] = []

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        release = asyncio.Event()
        self.held.append(release)
        await release.wait()
        return [Scored({"sexual": 0.9}, "then-model") for _ in texts]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_cascade_call_whose_first_stage_answered_before_an_outage_is_no_evidence_against_it():
    """Three cascade calls pass the first stage, then it goes down; while it is down they
    finish one by one at the second stage. Those answers come from calls started before the
    batch failed, so they say nothing of the first stage now: the healthy input waits out
    the outage and is scored, never dead-lettered."""
    from worker.backends.cascade import CascadeBackend, UncertaintyBands
    from worker.pipeline.policy import Policy

    policy = Policy.from_mapping({"categories": {"sexual": {"threshold": 0.5, "action": "block"}}})
    first, second = FirstStageWithOutage(), HeldSecondStage()
    cascade = CascadeBackend(first, second, UncertaintyBands(policy, default_band=0.1))
    harness = Harness(cascade, max_concurrency=5, sleeps_end=False)
    early = [
        asyncio.create_task(harness.scorer.score("content", [make_job(f"early {n}?", offset=n)])) for n in range(3)
    ]
    await settle()
    assert len(second.held) == 3, "the early calls passed the first stage"
    first.down = True
    healthy = asyncio.create_task(harness.scorer.score("content", [make_job("healthy", offset=10)]))
    await settle()
    for release in second.held:  # each finishes after the healthy input failed again
        release.set()
        await settle()
    assert not healthy.done(), "the healthy input was given an outcome during the outage"

    first.down = False
    assert await harness.scorer.score("content", [make_job("later", offset=11)]) is not None
    await settle()
    assert healthy.done()
    (result,) = healthy.result()
    assert isinstance(result, Scored) and result.decided_by == "first"
    assert all(task.done() for task in early)


async def test_a_second_stage_poison_input_alone_before_that_stage_ever_answered_is_found_by_probing_the_stage():
    """Nothing reached the cascade's second stage before a poison input for it, which waits
    alone (at the in-flight cap nothing else comes). No input known to reach that stage is
    left to probe it with, so the probe sends one the cascade answered to the stage itself:
    it answers, and the poison input is dead-lettered instead of waiting for ever."""
    from worker.backends.cascade import CascadeBackend, UncertaintyBands
    from worker.pipeline.policy import Policy

    policy = Policy.from_mapping({"categories": {"sexual": {"threshold": 0.5, "action": "block"}}})
    second = PoisonSecondStage(unavailable())
    cascade = CascadeBackend(FirstStage(), second, UncertaintyBands(policy, default_band=0.1))
    harness = Harness(cascade)  # every wait ends on its own: nothing else wakes it
    assert await harness.scorer.score("content", [make_job("earlier", offset=0)]) is not None
    assert second.batches == [], "decided by the first stage"

    scoring = harness.scorer.score("content", [make_job("sure", offset=1), make_job("a POISON?", offset=2)])
    results = await asyncio.wait_for(scoring, timeout=10)  # without the stage probe: waits for ever

    assert results is not None and isinstance(results[0], Scored) and results[0].decided_by == "first"
    assert isinstance(results[1], Rejected) and results[1].error_type == "backend_failed"
    assert ["sure"] in second.batches, "the stage itself was probed with an input the cascade answered last"
