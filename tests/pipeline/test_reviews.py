"""Reviews stage: a human review decision becomes a superseding verdict, with its violation and
statement of reasons in one acknowledged group; bad decisions are refused with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jsonschema
import msgspec
from aiokafka.structs import TopicPartition

from schemas import ReviewDecision, Verdict, Violation
from schemas.export import strict_json_schema
from tests.pipeline.conftest import make_job, make_record
from tests.pipeline.test_statements import FORUM_DSA, Recording, policy_with
from worker.backends.base import Scored
from worker.config import Settings
from worker.ops import metrics
from worker.pipeline.decode import Decoder
from worker.pipeline.encode import verdict_bytes
from worker.pipeline.outputs import Outputs
from worker.pipeline.reviews import ReviewRefused, ReviewStage, Superseding
from worker.pipeline.statements import StatementBuilder
from worker.pipeline.types import DecodeFailure, PartitionOffsets, Review
from worker.pipeline.verdict_data import to_contract
from worker.pipeline.verdicts import VerdictBuilder, human_verdict_id

REVIEWS_TOPIC = "in.reviews"
POLICY = policy_with(FORUM_DSA)
VERDICTS = VerdictBuilder(policy=POLICY, backend_name="mistral", include_text=False)
DECIDED_AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def stage(**bounds: int) -> ReviewStage:
    return ReviewStage(
        policy=POLICY,
        verdicts=VERDICTS,
        recent_events=bounds.get("recent_events", 100),
        recent_reviews=bounds.get("recent_reviews", 100),
    )


def machine_verdict(reviews: ReviewStage, scores: dict[str, float], offset: int = 0, **event: Any) -> Verdict:
    """A machine verdict for event ``e{offset}``, remembered as the outputs' hook would."""
    job = make_job("some text", offset=offset, key=f"e{offset}".encode(), **event)
    verdict = VERDICTS.scored(job, Scored(scores, "mistral-moderation-2411"))
    reviews.remember(job, verdict)
    return verdict


def review(offset: int = 0, *, partition: int = 0, **decision: Any) -> Review:
    body = {
        "review_id": f"r{offset}",
        "verdict_id": "v",
        "event_id": "e0",
        "reviewer_id": "alice",
        "action": "allow",
        "decided_at": DECIDED_AT.isoformat(),
        **decision,
    }
    record = make_record(
        json.dumps(body).encode(),
        topic=REVIEWS_TOPIC,
        partition=partition,
        offset=offset,
        key=body["event_id"].encode(),
        timestamp=1_764_000_000_000,
    )
    slot = PartitionOffsets(TopicPartition(REVIEWS_TOPIC, partition))
    slot.track(offset)
    decoded = Decoder.decode_review(record, slot)
    assert isinstance(decoded, Review)
    return decoded


def applied(outcome: Superseding | ReviewRefused) -> Superseding:
    assert isinstance(outcome, Superseding), outcome
    return outcome


def test_an_overturned_block_supersedes_the_machine_verdict_as_the_reviewer_decided():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.93}, tenant="acme", source="comments", author_id="u1")
    outcome = applied(
        reviews.judge(review(5, verdict_id=machine.verdict_id, tenant="acme", source="comments", author_id="u1"))
    )
    verdict = outcome.verdict
    assert verdict.verdict_id == human_verdict_id("r5") != machine.verdict_id
    assert verdict.supersedes == machine.verdict_id
    assert (verdict.decided_by, verdict.reviewer_id, verdict.backend) == ("human", "alice", "human")
    assert (verdict.action, verdict.flagged, verdict.violations) == ("allow", False, [])
    assert (verdict.event_id, verdict.kind, verdict.tenant, verdict.source, verdict.author_id) == (
        "e0",
        "content",
        "acme",
        "comments",
        "u1",
    )
    assert verdict.policy_version == POLICY.version
    assert (verdict.input.topic, verdict.input.partition, verdict.input.offset) == (REVIEWS_TOPIC, 0, 5)
    assert verdict.decided_at == DECIDED_AT
    assert outcome.machine is not None and outcome.machine.action == "block" and not outcome.confirmed
    # Valid against the contract, field for field (the verdict is assembled, not validated).
    assert Verdict.model_validate(msgspec.to_builtins(verdict)) == to_contract(verdict)
    jsonschema.validate(json.loads(verdict_bytes(verdict)), strict_json_schema("verdict"))


def test_the_reviewer_s_categories_take_the_machine_score_where_it_found_them_else_one():
    reviews = stage()
    machine = machine_verdict(reviews, {"selfharm": 0.71})
    outcome = applied(
        reviews.judge(review(verdict_id=machine.verdict_id, action="review", categories=["selfharm", "violence"]))
    )
    hits = {hit.category: hit for hit in outcome.verdict.violations}
    # "violence" is an alias of violence_and_threats in the built-in policy: resolved.
    assert set(hits) == {"selfharm", "violence_and_threats"}
    assert hits["selfharm"].score == 0.71 and hits["violence_and_threats"].score == 1.0
    assert all(hit.threshold == 0.5 and hit.action == "review" for hit in hits.values())
    assert outcome.confirmed  # the machine sent it to review too


def test_the_threshold_is_the_policy_s_for_the_decision_s_tenant():
    policy = policy_with(None)
    document = policy.document()
    document["overrides"] = [{"match": {"tenant": "kids"}, "categories": {"sexual": {"threshold": 0.2}}}]
    strict = type(policy).from_mapping(document)
    reviews = ReviewStage(
        policy=strict,
        verdicts=VerdictBuilder(policy=strict, backend_name="m", include_text=False),
        recent_events=10,
        recent_reviews=10,
    )
    outcome = applied(reviews.judge(review(action="block", categories=["sexual"], tenant="kids")))
    assert outcome.verdict.violations[0].threshold == 0.2


def test_a_redelivered_decision_gives_the_same_verdict_and_a_repeat_elsewhere_is_a_duplicate():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.9})
    first = applied(reviews.judge(review(3, verdict_id=machine.verdict_id)))
    again = applied(reviews.judge(review(3, verdict_id=machine.verdict_id)))  # same position: a redelivery
    assert again.verdict.verdict_id == first.verdict.verdict_id
    repeat = reviews.judge(review(4, verdict_id=machine.verdict_id, review_id="r3"))
    assert isinstance(repeat, ReviewRefused) and repeat.error_type == "duplicate_review"
    assert "in.reviews-0 offset 3" in repeat.message


def test_the_duplicate_memory_is_bounded():
    reviews = stage(recent_reviews=2)
    for offset in range(3):
        applied(reviews.judge(review(offset, event_id=f"x{offset}")))
    # r0 left the bound: a repeat of it is applied again (best-effort, as documented).
    assert isinstance(reviews.judge(review(9, review_id="r0", event_id="x0")), Superseding)
    assert isinstance(reviews.judge(review(10, review_id="r2", event_id="x2")), ReviewRefused)


def test_unknown_categories_and_inconsistent_decisions_are_refused():
    reviews = stage()
    unknown = reviews.judge(review(action="block", categories=["sexual", "astrology"]))
    assert isinstance(unknown, ReviewRefused) and unknown.error_type == "unknown_category"
    assert "'astrology'" in unknown.message and "sexual" not in unknown.message.split(";")[0]
    allow_with = reviews.judge(review(action="allow", categories=["sexual"]))
    assert isinstance(allow_with, ReviewRefused) and allow_with.error_type == "invalid_review"
    block_without = reviews.judge(review(action="block"))
    assert isinstance(block_without, ReviewRefused) and block_without.error_type == "invalid_review"


def test_a_verdict_id_unknown_for_a_remembered_event_is_refused_and_an_unremembered_event_is_applied():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.9})
    wrong = reviews.judge(review(verdict_id="not-" + machine.verdict_id))
    assert isinstance(wrong, ReviewRefused) and wrong.error_type == "unknown_verdict"
    assert machine.verdict_id in wrong.message
    elsewhere = applied(reviews.judge(review(1, event_id="judged-by-another-replica", verdict_id="v9")))
    assert elsewhere.machine is None and elsewhere.verdict.supersedes == "v9"


def test_an_id_a_decision_named_does_not_make_the_event_known_to_refuse_the_real_verdict():
    reviews = stage()  # this process built no verdict of e0: a restart, or another replica judged it
    applied(reviews.judge(review(1, verdict_id="made-up")))
    real = applied(reviews.judge(review(2, verdict_id="judged-before-the-restart")))
    assert real.verdict.supersedes == "judged-before-the-restart"


def test_many_reviews_of_one_event_never_push_its_machine_verdict_out():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.9})
    for offset in range(1, 12):  # more superseding verdicts than the per-event bound
        applied(reviews.judge(review(offset, verdict_id=machine.verdict_id)))
    again = applied(reviews.judge(review(20, verdict_id=machine.verdict_id)))
    assert again.machine is not None and again.machine.verdict_id == machine.verdict_id
    wrong = reviews.judge(review(21, verdict_id="not-" + machine.verdict_id))
    assert isinstance(wrong, ReviewRefused) and wrong.error_type == "unknown_verdict"


def test_a_second_review_may_supersede_the_first_and_is_compared_with_the_machine():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.9})
    first = applied(reviews.judge(review(1, verdict_id=machine.verdict_id)))
    second = applied(
        reviews.judge(review(2, verdict_id=first.verdict.verdict_id, action="block", categories=["sexual"]))
    )
    assert second.verdict.supersedes == first.verdict.verdict_id
    assert second.machine is not None and second.machine.verdict_id == machine.verdict_id and second.confirmed
    assert second.verdict.violations[0].score == 0.9


def test_agreement_is_counted_by_action_pair_and_category():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.9, "hate_and_discrimination": 0.8})
    outcome = applied(
        reviews.judge(review(verdict_id=machine.verdict_id, action="block", categories=["sexual", "pii"]))
    )

    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(f"moderation_worker_{name}_total", labels) or 0.0

    before = {
        "pair": value("review_decisions", machine_action="block", human_action="block"),
        "confirmed": value("review_categories", category="sexual", outcome="confirmed"),
        "added": value("review_categories", category="pii", outcome="added"),
        "removed": value("review_categories", category="hate_and_discrimination", outcome="removed"),
    }
    ReviewStage.count(outcome)
    assert value("review_decisions", machine_action="block", human_action="block") == before["pair"] + 1
    assert value("review_categories", category="sexual", outcome="confirmed") == before["confirmed"] + 1
    assert value("review_categories", category="pii", outcome="added") == before["added"] + 1
    assert value("review_categories", category="hate_and_discrimination", outcome="removed") == before["removed"] + 1


def test_decode_review_dead_letters_bad_json_and_schema_failures():
    slot = PartitionOffsets(TopicPartition(REVIEWS_TOPIC, 0))
    bad = Decoder.decode_review(make_record(b"{not json", topic=REVIEWS_TOPIC), slot)
    assert isinstance(bad, DecodeFailure) and bad.error_type == "not_json"
    no_reviewer = json.dumps({"review_id": "r", "verdict_id": "v", "event_id": "e", "action": "allow"}).encode()
    schema = Decoder.decode_review(make_record(no_reviewer, topic=REVIEWS_TOPIC), slot)
    assert isinstance(schema, DecodeFailure) and schema.error_type == "schema"
    assert "reviewer_id" in schema.message and "decided_at" in schema.message


# -- published by outputs ---------------------------------------------------------------


def outputs(publisher: Recording, finished: list[int], *, dsa: bool = True) -> Outputs:
    settings = Settings(verdict_topic="v", violation_topic="x", dead_letter_topic="d")
    return Outputs(
        settings,
        sink=publisher,
        verdicts=VERDICTS,
        on_finished=lambda slot, offset: finished.append(offset),
        on_abandoned=lambda: None,
        statements=StatementBuilder(POLICY.dsa) if dsa else None,
    )


def test_a_restricting_decision_publishes_verdict_violation_and_statement_in_one_group():
    reviews = stage()
    machine = machine_verdict(reviews, {"selfharm": 0.8})  # the machine sent it to review
    decision = review(7, verdict_id=machine.verdict_id, action="block", categories=["sexual"], tenant="acme-de")
    outcome = applied(reviews.judge(decision))
    publisher, finished, counted = Recording(), [], []
    outputs(publisher, finished).supersede(decision, outcome, lambda: counted.append(1))
    (group,) = publisher.groups
    assert [out.topic for out in group] == ["v", "x", "moderation.statements-of-reasons"]
    assert {out.key for out in group} == {b"e0"}  # the machine verdict's key: its partition
    verdict = Verdict.model_validate_json(group[0].value)
    assert verdict.supersedes == machine.verdict_id and verdict.decided_by == "human"
    violation = Violation.model_validate_json(group[1].value)
    assert violation.verdict_id == verdict.verdict_id and violation.action == "block"
    statement = json.loads(group[2].value)
    jsonschema.validate(statement, strict_json_schema("statement_of_reasons"))
    assert statement["puid"] == verdict.verdict_id
    assert statement["automated_decision"] == "AUTOMATED_DECISION_NOT_AUTOMATED"  # it changed the action
    assert statement["automated_detection"] == "Yes"
    assert statement["territorial_scope"] == ["AT", "DE"]
    assert "A person reviewed" in statement["decision_facts"]
    assert statement["content_date"] == "2026-11-30"  # no date remembered: the decision's day
    assert finished == [] and counted == []
    publisher.acks[0]()
    assert finished == [7] and counted == [1]


def test_a_confirmed_restriction_is_partially_automated_and_dated_by_the_decision_s_content_date():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.9})
    decision = review(
        verdict_id=machine.verdict_id,
        action="block",
        categories=["sexual"],
        content_created_at="2026-11-01T08:00:00Z",
    )
    publisher: Recording = Recording()
    outputs(publisher, []).supersede(decision, applied(reviews.judge(decision)), lambda: None)
    statement = json.loads(publisher.groups[0][2].value)
    assert statement["automated_decision"] == "AUTOMATED_DECISION_PARTIALLY"
    assert statement["content_date"] == "2026-11-01"


def test_an_overturn_to_allow_publishes_the_verdict_alone():
    reviews = stage()
    machine = machine_verdict(reviews, {"sexual": 0.9})
    decision = review(2, verdict_id=machine.verdict_id)
    publisher: Recording = Recording()
    outputs(publisher, []).supersede(decision, applied(reviews.judge(decision)), lambda: None)
    (group,) = publisher.groups
    assert [out.topic for out in group] == ["v"]


def test_without_dsa_a_restricting_decision_gets_no_statement():
    reviews = stage()
    decision = review(action="block", categories=["sexual"])
    publisher: Recording = Recording()
    outputs(publisher, [], dsa=False).supersede(decision, applied(reviews.judge(decision)), lambda: None)
    assert [out.topic for out in publisher.groups[0]] == ["v", "x"]


def test_the_decision_contract_round_trips():
    decision = review(action="block", categories=["sexual"]).decision
    assert ReviewDecision.model_validate_json(decision.model_dump_json()) == decision


async def test_enabling_reviews_adds_the_reviews_topic_as_an_input_to_read_and_to_create():
    from worker.ops.topics import planned_topics
    from worker.pipeline.source import Source

    async def nothing(tps: list[TopicPartition]) -> None:
        return None

    off, on = Settings(), Settings(reviews={"enabled": True, "topic": "rev"})
    assert "moderation.reviews" not in {t.name for t in planned_topics(off)}
    assert {t.name: t.role for t in planned_topics(on)}["rev"] == "input"
    source = Source(on, on_assign=nothing, on_revoke=nothing, rebalance_timeout_ms=10_000)
    assert "rev" in source._topics


def test_a_conversation_turn_s_decision_is_keyed_by_its_conversation_and_matched_by_turn():
    from tests.pipeline.conftest import CONVERSATION_TOPIC, DECODER
    from worker.pipeline.types import Job

    reviews = stage()
    slot = PartitionOffsets(TopicPartition(CONVERSATION_TOPIC, 0))
    slot.track(0)
    turn = {"id": "t-1", "conversation_id": "conv-9", "role": "user", "content": "hi there"}
    job = DECODER.decode(make_record(json.dumps(turn).encode(), topic=CONVERSATION_TOPIC, key=b"conv-9"), slot)
    assert isinstance(job, Job)
    machine = VERDICTS.scored(job, Scored({"sexual": 0.95}, "m"))
    reviews.remember(job, machine)
    decision = review(
        verdict_id=machine.verdict_id, event_id="t-1", kind="conversation", conversation_id="conv-9", action="allow"
    )
    unkeyed_record = make_record(decision.record.value, topic=REVIEWS_TOPIC, key=None)
    unkeyed = Review(unkeyed_record, decision.slot, decision.decision)
    assert unkeyed.key == b"conv-9"  # the machine verdict's key
    outcome = applied(reviews.judge(decision))
    assert (outcome.verdict.kind, outcome.verdict.conversation_id) == ("conversation", "conv-9")
    assert outcome.machine is not None and outcome.machine.action == "block"
    wrong_kind = reviews.judge(review(1, verdict_id="x", event_id="t-1", kind="conversation"))
    assert isinstance(wrong_kind, ReviewRefused) and wrong_kind.error_type == "unknown_verdict"
