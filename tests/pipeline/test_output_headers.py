"""Every verdict and violation record says what it is: content type and contract version;
and what the worker writes holds to the declared fields (the strict schema)."""

from __future__ import annotations

import json

import jsonschema

from schemas import OUTPUT_HEADERS
from schemas.export import strict_json_schema
from tests.pipeline.test_outputs import Harness
from worker.backends.base import Scored


def test_verdicts_and_violations_carry_the_content_type_and_contract_headers():
    h = Harness()
    h.outputs.conclude(h.job(0, key=b"clean"), Scored({"sexual": 0.01}, "m"))
    h.outputs.conclude(h.job(1, key=b"flagged"), Scored({"sexual": 0.99}, "m"))
    records = [record for records, _ in h.publisher.published for record in records]
    assert [r.topic for r in records] == ["v", "v", "x"]
    for record in records:
        assert dict(record.headers or ()) == {"content-type": b"application/json", "modworker-contract": b"2"}
        assert record.headers is OUTPUT_HEADERS  # shared: no list built per record


def test_the_worker_writes_only_the_declared_fields():
    h = Harness()
    h.outputs.conclude(h.job(0, key=b"flagged"), Scored({"sexual": 0.99, "other": 0.1}, "m"))
    verdict, violation = h.publisher.published[0][0]
    jsonschema.validate(json.loads(verdict.value), strict_json_schema("verdict"))
    jsonschema.validate(json.loads(violation.value), strict_json_schema("violation"))
