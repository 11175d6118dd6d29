"""The message contracts: checked-in JSON Schemas match the models; readers ignore unknown
fields, and the worker's own outputs hold to the declared ones."""

from __future__ import annotations

import json
import typing
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import (
    ACTION_SEVERITY,
    CONTRACT_VERSION,
    OUTPUT_HEADERS,
    Action,
    CategoryHit,
    ContentEvent,
    ConversationEvent,
    DeadLetterHeaders,
    OutputHeaders,
    Verdict,
    Violation,
    export_json_schemas,
    json_schemas,
)
from schemas.export import CHECKED_IN_DIR, strict_json_schema

REGENERATE = "run `modworker schemas export schemas/json` and commit the result"


# --- drift -----------------------------------------------------------------------------------


def test_checked_in_json_schemas_are_exactly_the_models_output():
    generated = json_schemas()
    checked_in = {path.name: path.read_text(encoding="utf-8") for path in CHECKED_IN_DIR.glob("*.json")}
    assert sorted(checked_in) == sorted(generated), f"schema files differ from the models: {REGENERATE}"
    for name, text in generated.items():
        assert checked_in[name] == text, f"{name} drifted from the models: {REGENERATE}"


def test_export_writes_the_same_files_as_json_schemas(tmp_path):
    written = export_json_schemas(tmp_path / "out")
    assert {path.name: path.read_text(encoding="utf-8") for path in written} == json_schemas()


def test_json_schemas_are_deterministic_and_valid_json():
    first, second = json_schemas(), json_schemas()
    assert first == second
    for name, text in first.items():
        schema = json.loads(text)
        assert schema["$id"].endswith(f"/{name}")
        assert schema["type"] == "object"


def test_every_published_schema_allows_unknown_properties_at_every_level():
    # A consumer validating version 2 with these schemas must keep working when a field is
    # added within version 2: nothing in them may be closed.
    for name, text in json_schemas().items():
        assert '"additionalProperties": false' not in text, name


def test_every_published_schema_names_its_dialect_and_contract_version():
    for name, text in json_schemas().items():
        schema = json.loads(text)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert schema["$id"] == f"https://moderation-worker.dev/schemas/v{CONTRACT_VERSION}/{name}", name
        assert schema["x-contract-version"] == CONTRACT_VERSION


# --- inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", " ", "\n\t  "])
def test_a_content_event_with_blank_text_is_rejected(blank):
    with pytest.raises(ValidationError, match="non-whitespace"):
        ContentEvent.model_validate({"id": "c1", "text": blank})


@pytest.mark.parametrize("blank", ["", "   ", "\r\n"])
def test_a_conversation_event_with_blank_content_is_rejected(blank):
    with pytest.raises(ValidationError, match="non-whitespace"):
        ConversationEvent.model_validate({"id": "t1", "conversation_id": "c1", "role": "user", "content": blank})


@pytest.mark.parametrize(
    ("model", "document"),
    [
        (ContentEvent, {"text": "hello"}),
        (ContentEvent, {"id": "", "text": "hello"}),
        (ConversationEvent, {"id": "t1", "role": "user", "content": "hi"}),
        (ConversationEvent, {"id": "t1", "conversation_id": "c1", "role": "system", "content": "hi"}),
    ],
)
def test_inputs_still_require_their_own_fields(model, document):
    with pytest.raises(ValidationError):
        model.model_validate(document)


def test_a_content_event_ignores_unknown_fields():
    event = ContentEvent.model_validate(
        {"id": "c1", "text": "hello", "tenant": "t", "language": "en", "nested": {"a": 1}}
    )
    assert (event.id, event.text, event.tenant) == ("c1", "hello", "t")
    assert "language" not in event.model_dump()
    assert "nested" not in event.model_dump()


def test_a_conversation_event_ignores_unknown_fields_also_in_its_context():
    event = ConversationEvent.model_validate(
        {
            "id": "t2",
            "conversation_id": "c1",
            "role": "assistant",
            "content": "answer",
            "context": [{"role": "user", "content": "question", "ts": 3}],
            "channel": "web",
        }
    )
    assert event.context[0].content == "question"
    assert "ts" not in event.context[0].model_dump()
    assert "channel" not in event.model_dump()


# --- outputs ---------------------------------------------------------------------------------


def _verdict_fields() -> dict[str, Any]:
    return {
        "verdict_id": "v1",
        "event_id": "c1",
        "kind": "content",
        "action": "block",
        "flagged": True,
        "violations": [{"category": "sexual", "score": 0.9, "threshold": 0.5, "action": "block"}],
        "scores": {"sexual": 0.9},
        "model": "mistral-moderation-2411",
        "backend": "mistral",
        "policy_version": "0123456789ab",
        "input": {"topic": "ugc.content", "partition": 0, "offset": 7},
        "decided_at": datetime(2026, 1, 1, tzinfo=UTC),
    }


def _violation_fields() -> dict[str, Any]:
    return {
        "verdict_id": "v1",
        "event_id": "c1",
        "kind": "content",
        "action": "block",
        "violations": [{"category": "sexual", "score": 0.9, "threshold": 0.5, "action": "block"}],
        "decided_at": datetime(2026, 1, 1, tzinfo=UTC),
    }


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (Verdict, _verdict_fields),
        (Violation, _violation_fields),
        (CategoryHit, lambda: {"category": "sexual", "score": 0.9, "threshold": 0.5, "action": "block"}),
    ],
)
def test_outputs_ignore_unknown_fields_as_a_consumer_of_a_later_additive_change_must(model, fields):
    known = model.model_validate(fields())
    later = model.model_validate({**fields(), "added_in_a_later_release": {"x": 1}})
    assert later == known
    assert "added_in_a_later_release" not in later.model_dump()


def test_a_verdict_ignores_unknown_fields_in_nested_parts():
    fields = _verdict_fields()
    fields["input"] = {**fields["input"], "timestamp": 1}
    fields["violations"][0]["severity"] = "high"
    verdict = Verdict.model_validate(fields)
    assert verdict.input.offset == 7 and verdict.violations[0].category == "sexual"


def test_the_strict_schema_holds_the_worker_to_the_declared_fields():
    import jsonschema

    document = json.loads(Verdict.model_validate(_verdict_fields()).model_dump_json())
    strict = strict_json_schema("verdict")
    jsonschema.validate(document, strict)  # the declared fields pass
    jsonschema.validate({**document, "surprise": 1}, json.loads(json_schemas()["verdict.schema.json"]))
    with pytest.raises(jsonschema.ValidationError, match="surprise"):
        jsonschema.validate({**document, "surprise": 1}, strict)
    nested = {**document, "input": {**document["input"], "timestamp": 1}}
    with pytest.raises(jsonschema.ValidationError, match="timestamp"):
        jsonschema.validate(nested, strict)
    jsonschema.validate({**document, "scores": {"new_category": 0.5}}, strict)  # open maps stay open


def test_output_headers_carry_the_content_type_and_the_contract_version():
    assert dict(OUTPUT_HEADERS) == {"content-type": b"application/json", "modworker-contract": b"2"}
    assert OutputHeaders.CONTRACT == "modworker-contract" and CONTRACT_VERSION == "2"


def test_a_verdict_round_trips_through_json():
    verdict = Verdict.model_validate(_verdict_fields())
    assert Verdict.model_validate_json(verdict.model_dump_json()) == verdict


def test_an_output_action_outside_the_four_is_rejected():
    with pytest.raises(ValidationError):
        CategoryHit(category="x", score=0.9, threshold=0.5, action="ban")  # type: ignore[arg-type]


# --- names declared once -----------------------------------------------------------------


def test_action_severity_orders_exactly_the_action_values():
    assert list(ACTION_SEVERITY) == list(typing.get_args(Action))
    assert sorted(ACTION_SEVERITY, key=ACTION_SEVERITY.__getitem__) == ["allow", "flag", "review", "block"]


def test_dead_letter_header_names_are_distinct_and_prefixed():
    assert len(set(DeadLetterHeaders.ALL)) == len(DeadLetterHeaders.ALL) == 8
    assert all(name.startswith("x-modworker-dlq-") for name in DeadLetterHeaders.ALL)
