"""Statements stage: the policy's dsa section, the statement of reasons a restricting
verdict gets, its schema, and how outputs publish it (or dead-letter the input when it fails)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from schemas import DeadLetterHeaders, StatementOfReasons
from schemas.export import strict_json_schema
from tests.pipeline.conftest import make_job
from worker.backends.base import Scored
from worker.config import Settings
from worker.pipeline.outputs import Outputs
from worker.pipeline.policy import EU_COUNTRIES, Policy, PolicyError
from worker.pipeline.scoring import Degraded
from worker.pipeline.statements import StatementBuilder, StatementRejected, dsa_problem
from worker.pipeline.types import OutRecord, PartitionOffsets
from worker.pipeline.verdicts import VerdictBuilder

FORUM_DSA: dict[str, Any] = {
    "categories": {
        "sexual": {
            "category": "STATEMENT_CATEGORY_PROTECTION_OF_MINORS",
            "specification": ["KEYWORD_ADULT_SEXUAL_MATERIAL"],
            "ground": "DECISION_GROUND_INCOMPATIBLE_CONTENT",
            "reference": "Forum rules, section 4: no sexual content",
            "reference_url": "https://forum.example/rules#4",
        },
        "hate_and_discrimination": {
            "category": "STATEMENT_CATEGORY_ILLEGAL_OR_HARMFUL_SPEECH",
            "specification": ["KEYWORD_HATE_SPEECH"],
            "ground": "DECISION_GROUND_ILLEGAL_CONTENT",
            "reference": "Section 130 of the German Criminal Code (incitement of masses)",
            "explanation": "The content incites hatred against a group for a protected characteristic.",
        },
    },
    "default": {
        "category": "STATEMENT_CATEGORY_OTHER_VIOLATION_TC",
        "ground": "DECISION_GROUND_INCOMPATIBLE_CONTENT",
        "reference": "Forum rules, section 1: be civil",
    },
    "territorial_scope": {"default": ["EU"], "tenants": {"acme-de": ["DE", "AT"]}},
    "restrictions": {
        "block": {"decision_visibility": ["DECISION_VISIBILITY_CONTENT_REMOVED"]},
        "review": {"decision_visibility": ["DECISION_VISIBILITY_CONTENT_DISABLED"]},
    },
}


def policy_with(dsa: dict[str, Any] | None) -> Policy:
    document = Policy.load(None).document()
    if dsa is not None:
        document["dsa"] = dsa
    return Policy.from_mapping(document)


FORUM = policy_with(FORUM_DSA)
assert FORUM.dsa is not None
BUILDER = StatementBuilder(FORUM.dsa)
VERDICTS = VerdictBuilder(policy=FORUM, backend_name="mistral", include_text=False)


def verdict_for(scores: dict[str, float], **event: Any):
    job = make_job("some text", **event)
    return job, VERDICTS.scored(job, Scored(scores, "mistral-moderation-2411"))


# --- the dsa section -------------------------------------------------------------------------


def test_a_policy_without_dsa_keeps_its_version_and_one_with_it_gets_a_new_one():
    assert policy_with(None).version == Policy.load(None).version
    assert FORUM.version != Policy.load(None).version


def test_dsa_problem_names_a_missing_section_and_the_unmapped_restricting_categories():
    assert "has no 'dsa' section" in (dsa_problem(Policy.load(None)) or "")
    without_default = {k: v for k, v in FORUM_DSA.items() if k != "default"}
    problem = dsa_problem(policy_with(without_default)) or ""
    # block categories of the built-in policy not mapped; selfharm (review) restricts too here
    assert "violence_and_threats" in problem and "dangerous_and_criminal_content" in problem
    assert "selfharm" in problem and "sexual" not in problem.split("lacks")[1].split(":")[0]
    assert "\n" not in problem
    assert dsa_problem(FORUM) is None


def test_a_review_that_hides_nothing_needs_no_mapping():
    dsa = {k: v for k, v in FORUM_DSA.items() if k != "default"}
    dsa["restrictions"] = {"block": {"decision_visibility": ["DECISION_VISIBILITY_CONTENT_REMOVED"]}}
    problem = dsa_problem(policy_with(dsa)) or ""
    assert "selfharm" not in problem and "violence_and_threats" in problem


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"categories": {"sexual": {"category": "STATEMENT_CATEGORY_PORN", "ground": "x", "reference": "r"}}},
            "category",
        ),
        ({"territorial_scope": {"default": ["US"]}}, "territorial_scope.default"),
        ({"restrictions": {"allow": {"decision_visibility": ["DECISION_VISIBILITY_CONTENT_REMOVED"]}}}, "allow"),
        ({"restrictions": {"block": {}}}, "empty restriction"),
        ({"categories": {"dangerous": dict(FORUM_DSA["default"])}}, "is an alias"),
    ],
)
def test_a_bad_dsa_section_is_refused_naming_its_key(change, expected):
    with pytest.raises(PolicyError, match=expected):
        policy_with({**FORUM_DSA, **change})


def test_eu_and_tenant_scopes_expand_to_country_codes():
    assert FORUM.dsa is not None
    scope = FORUM.dsa.territorial_scope
    assert scope.of(None) == sorted(EU_COUNTRIES) and len(scope.of("other")) == 27
    assert scope.of("acme-de") == ["AT", "DE"]


# --- the statement ---------------------------------------------------------------------------


def test_a_blocked_verdict_gets_a_statement_on_the_ground_of_its_first_violation():
    job, verdict = verdict_for({"hate_and_discrimination": 0.93, "sexual": 0.6}, tenant="acme-de")
    assert BUILDER.restricts(verdict)
    statement = BUILDER.statement(job, verdict)
    assert statement.puid == verdict.verdict_id
    assert statement.decision_visibility == ["DECISION_VISIBILITY_CONTENT_REMOVED"]
    assert statement.decision_ground == "DECISION_GROUND_ILLEGAL_CONTENT"
    assert statement.illegal_content_legal_ground == FORUM_DSA["categories"]["hate_and_discrimination"]["reference"]
    assert statement.incompatible_content_ground is None
    assert statement.category == "STATEMENT_CATEGORY_ILLEGAL_OR_HARMFUL_SPEECH"
    assert statement.category_addition == ["STATEMENT_CATEGORY_PROTECTION_OF_MINORS"]
    assert statement.category_specification == ["KEYWORD_HATE_SPEECH", "KEYWORD_ADULT_SEXUAL_MATERIAL"]
    assert statement.territorial_scope == ["AT", "DE"]
    assert statement.content_type == ["CONTENT_TYPE_TEXT"]
    assert statement.automated_detection == "Yes" and statement.automated_decision == "AUTOMATED_DECISION_FULLY"
    assert statement.source_type == "SOURCE_VOLUNTARY"
    assert statement.application_date == verdict.decided_at.date()
    assert "hate_and_discrimination (score 0.93, threshold 0.50" in statement.decision_facts
    assert "sexual (score 0.60" in statement.decision_facts


def test_the_statement_is_valid_against_its_published_strict_schema():
    job, verdict = verdict_for({"sexual": 0.9}, created_at="2025-03-04T23:30:00-02:00")
    statement = BUILDER.statement(job, verdict)
    body = json.loads(statement.model_dump_json(exclude_none=True))
    jsonschema.validate(body, strict_json_schema("statement_of_reasons"))
    assert body["content_date"] == "2025-03-05"  # in UTC
    assert body["incompatible_content_ground"].startswith("Forum rules, section 4")
    assert body["decision_ground_reference_url"] == "https://forum.example/rules#4"
    assert "illegal_content_legal_ground" not in body


def test_review_restricts_only_when_the_policy_says_it_hides_content_and_flag_never():
    _, review = verdict_for({"selfharm": 0.8})
    _, flag = verdict_for({"pii": 0.8})
    assert BUILDER.restricts(review) and not BUILDER.restricts(flag)
    assert BUILDER.statement(make_job("x"), review).decision_visibility == ["DECISION_VISIBILITY_CONTENT_DISABLED"]
    only_block = {**FORUM_DSA, "restrictions": {"block": {"decision_account": "DECISION_ACCOUNT_SUSPENDED"}}}
    dsa = policy_with(only_block).dsa
    assert dsa is not None and not StatementBuilder(dsa).restricts(review)


def test_a_degraded_verdict_names_no_category_and_gets_no_statement():
    verdict = VERDICTS.degraded(make_job("x"), action="review", reason="backend down")
    assert not BUILDER.restricts(verdict)


def test_a_content_date_the_database_refuses_is_a_rejection_not_a_crash():
    job, verdict = verdict_for({"sexual": 0.9}, created_at="1999-12-31T12:00:00Z")
    with pytest.raises(StatementRejected, match="content_date 1999-12-31 is outside"):
        BUILDER.statement(job, verdict)


def valid_body(**change: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "decision_visibility": ["DECISION_VISIBILITY_CONTENT_REMOVED"],
        "decision_ground": "DECISION_GROUND_INCOMPATIBLE_CONTENT",
        "incompatible_content_ground": "rules 1",
        "incompatible_content_explanation": "not allowed",
        "category": "STATEMENT_CATEGORY_VIOLENCE",
        "content_type": ["CONTENT_TYPE_TEXT"],
        "content_date": "2025-01-01",
        "application_date": "2025-01-02",
        "territorial_scope": ["DE"],
        "decision_facts": "facts",
        "source_type": "SOURCE_VOLUNTARY",
        "automated_detection": "Yes",
        "automated_decision": "AUTOMATED_DECISION_FULLY",
        "puid": "abc-123_X",
    }
    body.update(change)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"decision_visibility": None}, "one of decision_visibility"),
        ({"incompatible_content_ground": None}, "incompatible_content_ground is required"),
        ({"illegal_content_legal_ground": "law"}, "does not belong"),
        ({"decision_visibility": ["DECISION_VISIBILITY_OTHER"]}, "decision_visibility_other is required"),
        ({"puid": "has space"}, "puid"),
        ({"puid": "x" * 501}, "puid"),
        ({"territorial_scope": ["US"]}, "territorial_scope"),
        ({"decision_facts": "x" * 5001}, "decision_facts"),
        ({"application_date": "2019-12-31"}, "application_date"),
        ({"automated_decision": "Fully automated"}, "automated_decision"),
        ({"source_identity": "someone"}, "source_identity"),
    ],
)
def test_the_model_refuses_what_the_database_api_refuses(change, expected):
    StatementOfReasons.model_validate(valid_body())
    with pytest.raises(ValidationError, match=expected):
        StatementOfReasons.model_validate(valid_body(**change))


# --- published with the verdict --------------------------------------------------------------


class Recording:
    def __init__(self) -> None:
        self.groups: list[list[OutRecord]] = []
        self.acks: list[Callable[[], None]] = []

    def publish(self, records, on_acked, origin=None, messages=1) -> None:
        self.groups.append(records)
        self.acks.append(on_acked)


def outputs(publisher: Recording, finished: list[int], max_output_bytes: int = 1_048_588) -> Outputs:
    settings = Settings(
        verdict_topic="v", violation_topic="x", dead_letter_topic="d", max_output_bytes=max_output_bytes
    )
    return Outputs(
        settings,
        sink=publisher,
        verdicts=VERDICTS,
        on_finished=lambda slot, offset: finished.append(offset),
        on_abandoned=lambda: None,
        statements=BUILDER,
    )


def test_the_statement_is_published_in_the_verdict_s_group_and_finishes_with_it():
    publisher, finished = Recording(), []
    out = outputs(publisher, finished)
    slot = PartitionOffsets(TopicPartition("in.c", 0))
    jobs = [make_job(f"t{i}", slot=slot, offset=i, key=f"k{i}".encode()) for i in range(3)]
    for job in jobs:
        out.expect(job)
    out.conclude_all(jobs, [Scored({"sexual": 0.9}, "m"), Scored({"pii": 0.9}, "m"), Scored({"sexual": 0.0}, "m")])
    assert [[r.topic for r in g] for g in publisher.groups] == [
        ["v", "x", "moderation.statements-of-reasons", "v", "x", "v"]
    ]
    statement = json.loads(publisher.groups[0][2].value)
    assert statement["puid"] == json.loads(publisher.groups[0][0].value)["verdict_id"]
    assert publisher.groups[0][2].key == b"k0"
    assert finished == []
    publisher.acks[0]()
    assert sorted(finished) == [0, 1, 2]


def test_an_invalid_statement_dead_letters_the_input_beside_its_verdict():
    publisher, finished = Recording(), []
    out = outputs(publisher, finished)
    job = make_job("old", created_at="1990-01-01T00:00:00Z")
    out.expect(job)
    out.conclude(job, Scored({"sexual": 0.9}, "m"))
    (group,) = publisher.groups
    assert [r.topic for r in group] == ["v", "x", "d"]
    headers = dict(group[2].headers or [])
    assert headers[DeadLetterHeaders.STAGE] == b"statement"
    assert headers[DeadLetterHeaders.ERROR_TYPE] == b"invalid_statement"
    assert b"content_date 1990-01-01" in headers[DeadLetterHeaders.MESSAGE]
    publisher.acks[0]()
    assert finished == [0]


def test_a_degraded_review_is_published_without_a_statement():
    publisher, finished = Recording(), []
    out = outputs(publisher, finished)
    job = make_job("x")
    out.expect(job)
    out.conclude(job, Degraded(action="review", reason="down"))
    assert [[r.topic for r in g] for g in publisher.groups] == [["v", "x"]]


def test_the_forum_example_of_docs_dsa_md_is_a_complete_dsa_section():
    page = (Path(__file__).parents[2] / "docs" / "dsa.md").read_text(encoding="utf-8")
    block = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    policy = policy_with(yaml.safe_load(block)["dsa"])
    assert dsa_problem(policy) is None
    assert policy.dsa is not None and policy.dsa.territorial_scope.of("forum-de") == ["AT", "DE"]
