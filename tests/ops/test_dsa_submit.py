"""``modworker dsa submit`` without a broker: the stand-in DSA Transparency Database answers as
the API documents, the submitter reads those answers right, commits only past what has an
outcome, and its settings refuse what the API cannot take, in one line, the token never shown."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from tests.pipeline.test_statements import BUILDER, valid_body, verdict_for
from worker.config import ConfigError, effective_settings, load_settings
from worker.ops import logs
from worker.ops.dsa_submit import _item, done_offsets, existing_puids, refused_statements
from worker.pipeline.statements import statement_bytes
from worker.testing.dsa_server import (
    MULTIPLE_PATH,
    NOT_UNIQUE_MULTIPLE,
    SINGLE_PATH,
    DsaTransparencyServer,
    rate_limited,
)
from worker.testing.faults import first

TOKEN = "X|dsa-test-token-7d1c0e"


def post(server: DsaTransparencyServer, path: str, body: Any, token: str = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=10)


@pytest.fixture
def server():
    with DsaTransparencyServer(api_key=TOKEN) as srv:
        yield srv


# --- the stand-in speaks the API -------------------------------------------------------------


def test_a_statement_the_worker_writes_is_stored_and_answered_201_with_its_links(server):
    job, verdict = verdict_for({"sexual": 0.9})
    statement = json.loads(statement_bytes(BUILDER.statement(job, verdict)))
    answer = post(server, MULTIPLE_PATH, {"statements": [statement]})
    assert answer.status_code == 201, answer.text
    created = answer.json()["statements"][0]
    assert created["puid"] == verdict.verdict_id
    assert {"uuid", "created_at", "platform_name", "permalink", "self"} <= set(created)
    assert server.accepted_puids == [verdict.verdict_id]


def test_a_call_with_a_bad_statement_stores_none_and_names_it_by_position_with_the_api_s_words(server):
    bodies = [
        valid_body(puid="a"),
        valid_body(puid="b", content_date="1990-01-01", decision_ground="GROUND_X"),
        valid_body(puid="c"),
        valid_body(puid="d", category="STATEMENT_CATEGORY_NONSENSE"),
    ]
    answer = post(server, MULTIPLE_PATH, {"statements": bodies})
    assert answer.status_code == 422
    errors = answer.json()["errors"]
    assert set(errors) == {"statement_1", "statement_3"}
    assert errors["statement_1"]["decision_ground"] == ["The selected decision ground is invalid."]
    assert errors["statement_1"]["content_date"] == [
        "The content date field must be a date after or equal to 2000-01-01."
    ]
    assert errors["statement_3"] == {"category": ["The selected category is invalid."]}
    assert server.accepted == []  # all or nothing


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"puid": None}, "puid", "The puid field is required."),
        ({"puid": "has space"}, "puid", "The puid format is invalid."),
        ({"decision_visibility": None}, "decision_visibility", "required when none of decision monetary"),
        ({"incompatible_content_ground": None}, "incompatible_content_ground", "required when decision ground is"),
        ({"territorial_scope": ["US"]}, "territorial_scope", "The selected territorial scope is invalid."),
        ({"decision_facts": "x" * 5001}, "decision_facts", "must not be greater than 5000 characters"),
        ({"application_date": "2025-1-2"}, "application_date", "does not match the format YYYY-MM-DD"),
        ({"automated_decision": "Yes"}, "automated_decision", "The selected automated decision is invalid."),
    ],
)
def test_the_stand_in_refuses_a_field_as_the_api_does(server, change, field, message):
    answer = post(server, MULTIPLE_PATH, {"statements": [valid_body(**change)]})
    assert answer.status_code == 422
    assert any(message in text for text in answer.json()["errors"]["statement_0"][field])


def test_a_known_or_repeated_puid_refuses_the_whole_call_listing_it(server):
    server.preload([valid_body(puid="old")])
    answer = post(server, MULTIPLE_PATH, {"statements": [valid_body(puid="new"), valid_body(puid="old")]})
    assert answer.status_code == 422
    assert answer.json() == {
        "message": NOT_UNIQUE_MULTIPLE,
        "errors": {"puid": [NOT_UNIQUE_MULTIPLE], "existing_puids": ["old"]},
    }
    again = post(server, MULTIPLE_PATH, {"statements": [valid_body(puid="x"), valid_body(puid="x")]})
    assert again.status_code == 422 and again.json()["errors"]["existing_puids"] == ["x"]
    single = post(server, SINGLE_PATH, valid_body(puid="old"))
    assert single.status_code == 422 and single.json()["existing"] == {"puid": "old"}
    assert server.accepted == [] and server.duplicates_refused == ["old", "old"]


def test_more_than_100_statements_a_wrong_token_and_scripted_429_are_the_api_s_answers():
    with DsaTransparencyServer(api_key=TOKEN, fault_plan=first(1, rate_limited(3))) as server:
        limited = post(server, MULTIPLE_PATH, {"statements": [valid_body()]})
        assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
        assert limited.text == "Limit Reached. Please do not overload the API"
        many = post(server, MULTIPLE_PATH, {"statements": [valid_body(puid=f"p{i}") for i in range(101)]})
        assert many.status_code == 422 and "between 1 and 100" in many.json()["message"]
        assert post(server, MULTIPLE_PATH, {"statements": [valid_body()]}, token="wrong").status_code == 401
        assert server.accepted == []


def test_an_answer_lost_after_storing_is_a_502_and_the_retry_a_duplicate():
    with DsaTransparencyServer(api_key=TOKEN, lose_answer=lambda request: request.index == 0) as server:
        assert post(server, MULTIPLE_PATH, {"statements": [valid_body(puid="p")]}).status_code == 502
        retry = post(server, MULTIPLE_PATH, {"statements": [valid_body(puid="p")]})
        assert retry.status_code == 422 and retry.json()["errors"]["existing_puids"] == ["p"]
        assert server.accepted_puids == ["p"]


# --- the submitter reads the answers ---------------------------------------------------------

DOCUMENTED_REFUSAL = {  # "Errors when Creating Multiple Statements of Reason", as documented
    "errors": {
        "statement_0": {
            "decision_monetary": ["The selected decision monetary is invalid."],
            "automated_detection": ["The automated detection field is required."],
        },
        "statement_2": {"decision_provision": ["The selected decision provision is invalid."]},
    }
}


def test_refusals_are_read_per_position_with_every_field_s_message():
    assert refused_statements(DOCUMENTED_REFUSAL, 3) == {
        0: "decision_monetary: The selected decision monetary is invalid.; "
        "automated_detection: The automated detection field is required.",
        2: "decision_provision: The selected decision provision is invalid.",
    }
    assert refused_statements(DOCUMENTED_REFUSAL, 1) == {0: refused_statements(DOCUMENTED_REFUSAL, 3)[0]}
    assert refused_statements({"message": "x", "errors": {"statements": ["x"]}}, 3) == {}
    assert refused_statements("Limit Reached", 3) == {}


def test_existing_puids_are_read_from_either_endpoint_s_duplicate_answer():
    multiple = {"message": NOT_UNIQUE_MULTIPLE, "errors": {"puid": [NOT_UNIQUE_MULTIPLE], "existing_puids": ["a", "b"]}}
    assert existing_puids(multiple) == {"a", "b"}
    assert existing_puids({"errors": {"puid": ["..."]}, "existing": {"puid": "c", "uuid": "u"}}) == {"c"}
    assert existing_puids(DOCUMENTED_REFUSAL) == set()


def record(partition: int, offset: int, value: bytes | None = b"{}") -> ConsumerRecord:
    return ConsumerRecord("sor", partition, offset, 0, 0, None, value, None, 0, len(value or b""), [])


def test_offsets_commit_past_records_with_an_outcome_up_to_the_first_without():
    items = [_item(record(p, o)) for p, o in [(0, 10), (0, 11), (0, 12), (1, 5), (1, 6), (2, 0)]]
    for item, outcome in zip(items, ["accepted", None, "duplicate", "dead_lettered", "accepted", None], strict=True):
        item.outcome = outcome
    assert done_offsets(items) == {TopicPartition("sor", 0): 11, TopicPartition("sor", 1): 7}


def test_a_value_that_is_no_json_object_is_marked_for_the_dead_letter_topic():
    assert _item(record(0, 0, b"[1, 2]")).problem == "the value is JSON list, not a statement object"
    assert _item(record(0, 0, b"\xff")).statement is None
    assert _item(record(0, 0, None)).problem is not None
    assert _item(record(0, 0, b'{"puid": "p"}')).puid == "p"


# --- settings ----------------------------------------------------------------------------------


@pytest.fixture
def dsa_env(monkeypatch):
    for name in ("MODWORKER_DSA__API_TOKEN", "MODWORKER_DSA__BATCH_SIZE", "MODWORKER_DSA__API_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    # As in a fresh process: an earlier in-process test may have set JSON logging, which
    # sends the exit line through structlog instead of the plain stderr line checked here.
    monkeypatch.setattr(logs, "_json_mode", False)
    return monkeypatch


@pytest.mark.parametrize(
    ("name", "value"),
    [("MODWORKER_DSA__BATCH_SIZE", "101"), ("MODWORKER_DSA__BATCH_SIZE", "0"), ("MODWORKER_DSA__API_URL", "dsa.eu")],
)
def test_a_bad_submit_setting_is_one_line_naming_it(dsa_env, name, value):
    dsa_env.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings(require_backend=False)
    assert len(str(refused.value).splitlines()) == 1 and name in str(refused.value)


def test_submit_without_a_token_stops_at_start_up_with_one_line(dsa_env, capsys):
    from worker import cli

    assert cli.main(["dsa", "submit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MODWORKER_DSA__API_TOKEN is not set" in err


def test_the_token_is_a_secret_masked_in_config_and_never_echoed(dsa_env, capsys):
    from worker import cli

    dsa_env.setenv("MODWORKER_DSA__API_TOKEN", TOKEN)
    settings = load_settings(require_backend=False)
    assert TOKEN not in repr(settings) and TOKEN in cli.secrets_of(settings)
    assert ("MODWORKER_DSA__API_TOKEN", "********", False) in effective_settings(settings)
    assert cli.main(["config"]) == 0
    assert TOKEN not in capsys.readouterr().out
    dsa_env.delenv("MODWORKER_DSA__API_TOKEN")
    dsa_env.setenv("MODWORKER_DSA", json.dumps({"api_token": [TOKEN]}))  # not a string: refused
    with pytest.raises(ConfigError) as refused:
        load_settings(require_backend=False)
    assert "MODWORKER_DSA__API_TOKEN" in str(refused.value) and TOKEN not in str(refused.value)
