"""Shadow evaluation: sampling, the bounded queue, agreement counting, failures kept away
from the live path. The publish function stands in for the shadow's own producer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from schemas import CategoryHit, ShadowVerdict
from tests.pipeline.conftest import make_job
from worker.backends.base import Backend, BackendUnavailable, Conversation, Outcome, Scored
from worker.config import load_settings
from worker.ops import metrics
from worker.pipeline.policy import Policy
from worker.pipeline.shadow import Shadow, create_shadow, sampled
from worker.pipeline.verdicts import VerdictBuilder

LIVE = Policy.from_mapping({"categories": {"sexual": {"threshold": 0.5, "action": "block"}}})
STRICT = Policy.from_mapping({"categories": {"sexual": {"threshold": 0.3, "action": "block"}}})


def settings(**shadow):
    return load_settings(kafka={"bootstrap_servers": "x:1"}, require_backend=False, shadow={"sample": 1.0, **shadow})


def live_verdict(job, score: float):
    return VerdictBuilder(policy=LIVE, backend_name="mistral", include_text=False).scored(
        job, Scored({"sexual": score}, "live-model")
    )


def counter(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, ShadowVerdict]] = []

    async def __call__(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, ShadowVerdict.model_validate(json.loads(value))))


async def drain(shadow: Shadow, count: int, recorder: Recorder) -> None:
    for _ in range(200):
        if len(recorder.sent) >= count and shadow.queued == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(recorder.sent)} of {count} shadow verdicts published")


def test_sampling_is_deterministic_by_event_id_and_close_to_the_fraction():
    ids = [f"event-{i}" for i in range(20_000)]
    chosen = [i for i in ids if sampled(i, 0.1)]
    assert chosen == [i for i in ids if sampled(i, 0.1)]
    assert 1_700 < len(chosen) < 2_300
    assert set(chosen) <= {i for i in ids if sampled(i, 0.5)}  # a larger sample contains a smaller one
    assert not any(sampled(i, 0.0) for i in ids[:100]) and all(sampled(i, 1.0) for i in ids[:100])


async def test_a_policy_shadow_reuses_the_live_scores_and_counts_agreement():
    recorder = Recorder()
    shadow = Shadow(settings(), policy=STRICT, backend=None, publish=recorder)
    agree_before = counter(metrics.SHADOW_DECISIONS, "block", "block")
    differ_before = counter(metrics.SHADOW_DECISIONS, "allow", "block")
    shadow_only_before = counter(metrics.SHADOW_CATEGORIES, "sexual", "shadow_only")
    await shadow.start()
    try:
        for i, score in enumerate((0.9, 0.4)):
            job = make_job(f"text {i}", offset=i, key=f"k{i}".encode())
            shadow.offer(job, live_verdict(job, score))
        await drain(shadow, 2, recorder)
    finally:
        await shadow.close()
    by_event = {v.event_id: v for _, _, v in recorder.sent}
    assert by_event["e0"].live_action == "block" and by_event["e0"].action == "block" and by_event["e0"].agree
    assert by_event["e1"].live_action == "allow" and by_event["e1"].action == "block" and not by_event["e1"].agree
    assert by_event["e1"].policy_version == STRICT.version and by_event["e1"].live_policy_version == LIVE.version
    [hit] = by_event["e1"].violations  # the contract's model, written like any other
    assert isinstance(hit, CategoryHit) and (hit.category, hit.score, hit.action) == ("sexual", 0.4, "block")
    assert json.loads(by_event["e1"].model_dump_json())["violations"][0]["category"] == "sexual"
    assert {(topic, key) for topic, key, _ in recorder.sent} == {
        ("moderation.shadow-verdicts", b"k0"),
        ("moderation.shadow-verdicts", b"k1"),
    }
    assert counter(metrics.SHADOW_DECISIONS, "block", "block") == agree_before + 1
    assert counter(metrics.SHADOW_DECISIONS, "allow", "block") == differ_before + 1
    assert counter(metrics.SHADOW_CATEGORIES, "sexual", "shadow_only") == shadow_only_before + 1


async def test_a_full_queue_drops_and_counts_without_blocking_the_caller():
    shadow = Shadow(settings(queue_size=3), policy=STRICT, backend=None, publish=Recorder())
    dropped_before = metrics.SHADOW_DROPPED._value.get()
    # Not started: nothing consumes, so the fourth and fifth offers find the queue full.
    for i in range(5):
        job = make_job(offset=i)
        shadow.offer(job, live_verdict(job, 0.1))
    assert shadow.queued == 3
    assert metrics.SHADOW_DROPPED._value.get() == dropped_before + 2


async def test_verdicts_without_scores_are_not_shadowed():
    shadow = Shadow(settings(), policy=STRICT, backend=None, publish=Recorder())
    job = make_job()
    degraded = VerdictBuilder(policy=LIVE, backend_name="mistral", include_text=False).degraded(
        job, action="review", reason="down"
    )
    shadow.offer(job, degraded)
    assert shadow.queued == 0


class DownBackend(Backend):
    name = "candidate"

    def __init__(self) -> None:
        self.calls = 0

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.calls += 1
        raise BackendUnavailable("candidate API down")

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        raise BackendUnavailable("candidate API down")


async def test_a_shadow_backend_outage_is_counted_and_the_shadow_goes_on():
    recorder = Recorder()
    backend = DownBackend()
    shadow = Shadow(settings(backend="mistral"), policy=LIVE, backend=backend, publish=recorder)
    failures_before = counter(metrics.SHADOW_FAILURES, "score")
    await shadow.start()
    try:
        for i in range(3):
            job = make_job(offset=i)
            shadow.offer(job, live_verdict(job, 0.9))  # returns at once whatever the backend does
        for _ in range(200):
            if counter(metrics.SHADOW_FAILURES, "score") >= failures_before + 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await shadow.close()
    assert counter(metrics.SHADOW_FAILURES, "score") == failures_before + 3
    assert backend.calls >= 1 and recorder.sent == []


async def test_a_failing_publish_is_counted_only():
    async def broken(topic: str, key: bytes, value: bytes) -> None:
        raise OSError("broker gone")

    shadow = Shadow(settings(), policy=STRICT, backend=None, publish=broken)
    before = counter(metrics.SHADOW_FAILURES, "publish")
    await shadow.start()
    try:
        job = make_job()
        shadow.offer(job, live_verdict(job, 0.9))
        for _ in range(200):
            if counter(metrics.SHADOW_FAILURES, "publish") > before:
                break
            await asyncio.sleep(0.01)
    finally:
        await shadow.close()
    assert counter(metrics.SHADOW_FAILURES, "publish") == before + 1


def test_no_shadow_unless_a_sample_and_a_candidate_are_set():
    plain = load_settings(kafka={"bootstrap_servers": "x:1"}, require_backend=False)
    assert create_shadow(plain, LIVE) is None
    assert create_shadow(settings(), LIVE) is None  # a sample but no candidate


class RecordingCandidate(Backend):
    name = "candidate"

    def __init__(self) -> None:
        self.conversations: list[Conversation] = []

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        raise AssertionError("not used")

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        self.conversations += conversations
        return [Scored({"sexual": 0.1}, "candidate-model") for _ in conversations]


async def test_a_candidate_judges_a_turn_with_the_context_the_conversation_state_gave_the_live_backend():
    from dataclasses import replace

    from schemas import Turn
    from tests.pipeline.conftest import CONVERSATION_TOPIC, DECODER, make_record
    from worker.pipeline.scoring import conversation_of
    from worker.pipeline.types import Job

    value = json.dumps({"id": "t2", "conversation_id": "c", "role": "user", "content": "and now?"}).encode()
    decoded = DECODER.decode(make_record(value, topic=CONVERSATION_TOPIC), make_job().slot)
    assert isinstance(decoded, Job)
    state = (Turn(role="user", content="earlier turn"), Turn(role="assistant", content="earlier answer"))
    job = replace(decoded, context=state)  # the turn carried no context; the state supplied it
    candidate = RecordingCandidate()
    shadow = Shadow(settings(backend="mistral"), policy=LIVE, backend=candidate, publish=Recorder())
    await shadow.start()
    try:
        shadow.offer(job, live_verdict(job, 0.2))
        for _ in range(200):
            if candidate.conversations:
                break
            await asyncio.sleep(0.01)
    finally:
        await shadow.close()
    assert candidate.conversations == [conversation_of(job.event, job.context)], "what the live backend judged"
    assert candidate.conversations[0].context == state
