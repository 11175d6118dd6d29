"""Verdict and violation assembly: the Structs built hold exactly what validation would."""

from __future__ import annotations

import json

import msgspec
from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

import schemas
from schemas import Turn
from worker.backends.base import Scored, StageScores
from worker.pipeline.decode import Decoder
from worker.pipeline.policy import Policy
from worker.pipeline.types import DecodeFailure, Job, PartitionOffsets
from worker.pipeline.verdict_data import Verdict, Violation, to_contract
from worker.pipeline.verdicts import VerdictBuilder, verdict_id

DECODER = Decoder(content_topic="in.c", conversation_topic="in.v", max_text_chars=1000)
BUILDER = VerdictBuilder(policy=Policy.load(None), backend_name="mistral", include_text=True)
SCORES = {"sexual": 0.93, "pii": 0.7, "health": 0.01, "law": 0.0}


def decode(rec: ConsumerRecord) -> Job | DecodeFailure:
    """Decode ``rec`` as the worker does, tracked in a fresh slot of its partition."""
    return DECODER.decode(rec, PartitionOffsets(TopicPartition(rec.topic, rec.partition)))


def job(value: dict, topic: str = "in.c") -> Job:
    raw = json.dumps(value).encode()
    decoded = decode(ConsumerRecord(topic, 2, 41, 1_700_000_000_000, 0, b"k", raw, None, 1, len(raw), []))
    assert isinstance(decoded, Job)
    return decoded


def assert_same_as_validated(value: Verdict | Violation) -> None:
    """The contract's model validated from the Struct's values equals its unvalidated
    conversion (``to_contract``) and writes the same JSON: the Struct holds only valid values."""
    contract = schemas.Verdict if isinstance(value, Verdict) else schemas.Violation
    model = to_contract(value)
    validated = contract.model_validate(msgspec.to_builtins(value, enc_hook=lambda v: v.model_dump()))
    assert value.__struct_fields__ == tuple(contract.model_fields), "the Struct's fields drifted from the contract"
    assert model == validated
    assert model.model_dump_json() == validated.model_dump_json()


def test_scored_content_verdict_equals_the_validated_model():
    verdict = BUILDER.scored(
        job({"id": "c1", "text": "hi", "tenant": "t", "metadata": {"a": 1}}),
        Scored(scores=SCORES, model="mistral-moderation-2411"),
    )
    assert_same_as_validated(verdict)
    assert verdict.action == "block" and verdict.flagged and verdict.input.offset == 41
    assert {hit.category for hit in verdict.violations} == {"sexual", "pii"}
    assert verdict.text == "hi" and verdict.metadata == {"a": 1}


def test_violation_and_degraded_verdicts_equal_the_validated_models():
    conversation = job({"id": "t1", "conversation_id": "c", "role": "user", "content": "yo"}, topic="in.v")
    verdict = BUILDER.scored(conversation, Scored(scores=SCORES, model="m"))
    violation = BUILDER.violation(verdict)
    assert violation is not None and violation.verdict_id == verdict.verdict_id
    assert_same_as_validated(violation)
    degraded = BUILDER.degraded(conversation, action="review", reason="backend down")
    assert_same_as_validated(degraded)
    assert degraded.degraded and degraded.conversation_id == "c" and degraded.scores == {}
    assert BUILDER.violation(BUILDER.scored(conversation, Scored(scores={"law": 0.0}, model="m"))) is None


def test_the_context_a_turn_was_judged_with_is_part_of_its_verdict_id():
    turn = {"id": "t1", "conversation_id": "c", "role": "assistant", "content": "do it like this"}
    alone = BUILDER.scored(job(turn, topic="in.v"), Scored(SCORES, "m")).verdict_id
    stated = job(turn, topic="in.v")
    stated.context = (Turn(role="user", content="how do I do it?"),)
    with_context = BUILDER.scored(stated, Scored(SCORES, "m")).verdict_id
    again = job(turn, topic="in.v")
    again.context = (Turn(role="user", content="how do I do it?"),)
    assert with_context != alone
    assert BUILDER.scored(again, Scored(SCORES, "m")).verdict_id == with_context
    # no context: the id is what it was before context counted
    policy = Policy.load(None).version
    assert alone == verdict_id("conversation", "t1", "do it like this", policy, "m")


def test_a_cascade_verdict_says_who_decided_and_keeps_both_stages_scores():
    first = StageScores("first", "local", "starter", {"sexual": 0.45})
    then = StageScores("then", "mistral", "mistral-moderation-2411", SCORES)
    verdict = BUILDER.scored(
        job({"id": "c2", "text": "hm"}),
        Scored(SCORES, "mistral-moderation-2411", decided_by="mistral", stages=(first, then)),
    )
    assert_same_as_validated(verdict)
    assert verdict.decided_by == "mistral" and not verdict.degraded
    assert [(s.stage, s.backend, s.scores) for s in verdict.stages or []] == [
        ("first", "local", {"sexual": 0.45}),
        ("then", "mistral", SCORES),
    ]
    assert verdict.scores == SCORES and verdict.action == "block"


def test_a_fallback_verdict_is_degraded_with_the_reason_and_the_policy_still_decides():
    verdict = BUILDER.scored(
        job({"id": "c3", "text": "x"}),
        Scored(SCORES, "starter", decided_by="local", degraded_reason="scored by fallback backend local: down"),
    )
    assert_same_as_validated(verdict)
    assert verdict.degraded and verdict.degraded_reason == "scored by fallback backend local: down"
    assert verdict.decided_by == "local" and verdict.model == "starter" and verdict.action == "block"
    assert verdict.stages is None


def test_every_struct_has_its_contracts_fields_in_order():
    from worker.pipeline import verdict_data

    pairs = [
        (verdict_data.CategoryHit, schemas.CategoryHit),
        (verdict_data.InputPosition, schemas.InputPosition),
        (verdict_data.StageScore, schemas.StageScore),
        (verdict_data.Verdict, schemas.Verdict),
        (verdict_data.Violation, schemas.Violation),
    ]
    for struct, contract in pairs:
        assert struct.__struct_fields__ == tuple(contract.model_fields), struct.__name__
