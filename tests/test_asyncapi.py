"""The AsyncAPI document: generated from the models, checked in, valid AsyncAPI 3.0.0,
and naming the topics, keys and headers the worker actually uses."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from schemas import OUTPUT_HEADERS, DeadLetterHeaders
from schemas.asyncapi import TOPICS, asyncapi_document, asyncapi_yaml
from worker.config import Settings

ROOT = Path(__file__).parents[1]
CHECKED_IN = ROOT / "schemas" / "asyncapi.yaml"
SPEC = Path(__file__).parent / "specs" / "asyncapi-3.0.0.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SPEC.read_text()))


def test_the_checked_in_document_is_the_models_output():
    assert CHECKED_IN.read_text() == asyncapi_yaml(), (
        "schemas/asyncapi.yaml is stale: run `modworker schemas asyncapi > schemas/asyncapi.yaml`"
    )


def test_the_document_is_valid_asyncapi_3(validator):
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}"
        for e in validator.iter_errors(yaml.safe_load(CHECKED_IN.read_text()))
    ]
    assert errors == []


def test_the_validator_rejects_what_asyncapi_3_does_not_allow(validator):
    # The vendored schema resolves its own references: a wrong value deep inside is caught.
    document = json.loads(json.dumps(asyncapi_document()))
    document["operations"]["publishVerdicts"]["action"] = "publish"  # AsyncAPI 2's word
    document["channels"]["verdicts"]["bindings"]["kafka"]["partitions"] = "many"
    assert len(list(validator.iter_errors(document))) >= 2


def test_topic_names_are_the_worker_s_defaults():
    settings = Settings()
    assert {
        "content": settings.content_topic,
        "conversation": settings.conversation_topic,
        "verdict": settings.verdict_topic,
        "violation": settings.violation_topic,
        "dead_letter": settings.dead_letter_topic,
        "shadow": settings.shadow.topic,
        "statements_of_reasons": settings.dsa.topic,
        "conversation_state": settings.conversation.changelog_topic,
        "reviews": settings.reviews.topic,
    } == TOPICS


def test_every_reference_resolves_and_every_output_declares_its_headers():
    document = asyncapi_document()

    def resolve(ref: str):
        node = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert len(refs) > 20
    for ref in refs:
        resolve(ref)
    messages = document["components"]["messages"]
    for name in ("Verdict", "Violation", "ShadowVerdict"):
        properties = messages[name]["headers"]["properties"]
        assert {k: v["const"] for k, v in properties.items()} == {k: v.decode() for k, v in OUTPUT_HEADERS}
    assert set(messages["DeadLetter"]["headers"]["properties"]) == set(DeadLetterHeaders.ALL)
    assert {c["address"] for c in document["channels"].values()} == set(TOPICS.values())
