"""A verdict whose scores lack categories the backend could not score: degraded, never an allow by omission."""

from __future__ import annotations

import json

from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from worker.backends.base import Scored
from worker.pipeline.decode import Decoder
from worker.pipeline.policy import Policy
from worker.pipeline.types import Job, PartitionOffsets
from worker.pipeline.verdicts import VerdictBuilder, unscored_action

FORUM = Policy.from_mapping(
    {
        "categories": {
            "spam": {"threshold": 0.7, "action": "review"},
            "off_topic": {"threshold": 0.8, "action": "flag"},
            "hate_and_discrimination": {"threshold": 0.5, "action": "block"},
        }
    }
)
DECODER = Decoder(content_topic="in.c", conversation_topic="in.v", max_text_chars=1000)


def job() -> Job:
    raw = json.dumps({"id": "c1", "text": "hi"}).encode()
    record = ConsumerRecord("in.c", 0, 7, 1_700_000_000_000, 0, b"k", raw, None, 1, len(raw), [])
    decoded = DECODER.decode(record, PartitionOffsets(TopicPartition("in.c", 0)))
    assert isinstance(decoded, Job)
    return decoded


def builder(fail_policy: str = "wait") -> VerdictBuilder:
    return VerdictBuilder(
        policy=FORUM, backend_name="llm", include_text=False, unscored_action=unscored_action(fail_policy)
    )


def test_an_unscored_category_makes_an_otherwise_allowed_verdict_a_degraded_review() -> None:
    partial = Scored(scores={"spam": 0.1, "off_topic": 0.0}, model="judge-1", unscored=("hate_and_discrimination",))
    verdict = builder().scored(job(), partial)
    assert verdict.action == "review" and verdict.flagged
    assert verdict.degraded and verdict.degraded_reason is not None
    assert "hate_and_discrimination" in verdict.degraded_reason
    assert verdict.scores == {"spam": 0.1, "off_topic": 0.0}
    complete = builder().scored(
        job(), Scored(scores={**partial.scores, "hate_and_discrimination": 0.0}, model="judge-1")
    )
    assert complete.action == "allow" and not complete.degraded
    assert complete.verdict_id != verdict.verdict_id, "a later complete verdict is not taken for a duplicate"


def test_a_stricter_decision_on_the_scores_there_are_still_applies() -> None:
    partial = Scored(scores={"hate_and_discrimination": 0.9}, model="judge-1", unscored=("spam", "off_topic"))
    verdict = builder().scored(job(), partial)
    assert verdict.action == "block" and verdict.degraded
    assert [hit.category for hit in verdict.violations] == ["hate_and_discrimination"]
    assert "spam, off_topic" in (verdict.degraded_reason or "")


def test_the_fail_policy_decides_the_least_action_as_it_does_for_an_outage() -> None:
    assert [unscored_action(p) for p in ("wait", "review", "fallback", "allow")] == [
        "review",
        "review",
        "review",
        "allow",
    ]
    partial = Scored(scores={"spam": 0.1}, model="judge-1", unscored=("off_topic",))
    verdict = builder("allow").scored(job(), partial)
    assert verdict.action == "allow" and verdict.degraded, "allowed as the fail policy says, but marked degraded"


def test_a_fallback_reason_and_the_unscored_categories_are_both_named() -> None:
    partial = Scored(
        scores={"spam": 0.1}, model="judge-1", unscored=("off_topic",), degraded_reason="scored by fallback backend llm"
    )
    reason = builder().scored(job(), partial).degraded_reason or ""
    assert reason.startswith("scored by fallback backend llm; ") and "off_topic" in reason
