"""Human review decisions through the worker on the test broker (``MODWORKER_REVIEWS__ENABLED``):
machine verdicts first, then decisions on some of them; each applied decision gives a
superseding verdict (with its violation and statement of reasons), each bad one a dead letter,
and every decision's offset is committed (in exactly-once mode, in its transaction)."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime

import jsonschema
import pytest

from schemas import DeadLetterHeaders
from schemas.export import strict_json_schema
from tests.conftest import worker_env
from tests.integration.test_statements_pipeline import forum_policy
from tests.kafka_support import committed, create_topics, produce, read_all, wait_for_count
from worker.pipeline.verdicts import human_verdict_id

pytestmark = [pytest.mark.slow]


def post(i: int, marker: str = "") -> dict:
    return {"id": f"c-{i}", "text": f"forum post {i} {marker}".strip(), "tenant": "acme-de", "author_id": f"u-{i}"}


def decision(event: str, verdict_id: str, review_id: str, action: str, categories: list[str]) -> dict:
    return {
        "review_id": review_id,
        "verdict_id": verdict_id,
        "event_id": event,
        "tenant": "acme-de",
        "author_id": "u-" + event.removeprefix("c-"),
        "reviewer_id": "reviewer-7",
        "action": action,
        "categories": categories,
        "decided_at": datetime.now(UTC).isoformat(),
    }


@pytest.mark.parametrize("delivery", ["at_least_once", pytest.param("exactly_once", marks=pytest.mark.real_kafka)])
async def test_review_decisions_supersede_machine_verdicts_and_bad_ones_are_dead_lettered(
    broker, topics, mistral, api_key, spawn_worker, tmp_path, delivery
):
    bootstrap = broker.bootstrap_servers
    reviews_topic, statements_topic = topics.content + ".reviews", topics.verdict + ".sor"
    await create_topics(bootstrap, [reviews_topic, statements_topic])
    posts = [post(0, "<<sexual:0.9>>"), post(1, "<<selfharm:0.8>>"), *(post(i) for i in range(2, 6))]
    await produce(bootstrap, topics.content, [(p["id"].encode(), json.dumps(p).encode()) for p in posts])
    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_REVIEWS__ENABLED="true",
        MODWORKER_REVIEWS__TOPIC=reviews_topic,
        MODWORKER_DSA__ENABLED="true",
        MODWORKER_DSA__TOPIC=statements_topic,
        MODWORKER_POLICY_FILE=str(forum_policy(tmp_path)),
        MODWORKER_DELIVERY=delivery,
    )
    worker = spawn_worker(env)
    machine_records = await wait_for_count(bootstrap, topics.verdict, len(posts))
    machine = {json.loads(r.value)["event_id"]: (r, json.loads(r.value)) for r in machine_records}
    assert machine["c-0"][1]["action"] == "block" and machine["c-1"][1]["action"] == "review"

    def record(body: dict) -> tuple[bytes, bytes]:
        return body["event_id"].encode(), json.dumps(body).encode()

    confirm = decision("c-1", machine["c-1"][1]["verdict_id"], "r-confirm", "review", ["selfharm"])
    reviews = [
        record(decision("c-0", machine["c-0"][1]["verdict_id"], "r-overturn", "allow", [])),
        record(confirm),
        (b"c-2", b'{"review_id": "r-broken", '),
        record({**confirm, "decided_at": datetime.now(UTC).isoformat()}),  # the same review_id again
        record(decision("c-3", "no-such-verdict", "r-unknown", "block", ["sexual"])),
        record(decision("c-4", machine["c-4"][1]["verdict_id"], "r-astro", "block", ["astrology"])),
    ]
    await produce(bootstrap, reviews_topic, reviews[:2])
    await asyncio.sleep(0.5)  # the duplicate comes after the decision it repeats (same key: same partition anyway)
    await produce(bootstrap, reviews_topic, reviews[2:])

    verdict_records = await wait_for_count(bootstrap, topics.verdict, len(posts) + 2)
    dead = await wait_for_count(bootstrap, topics.dead_letter, 4)
    await asyncio.sleep(1.0)  # a commit interval or more: the decisions' offsets committed
    offsets = await committed(bootstrap, topics.group_id, [reviews_topic])
    assert worker.stop(signal.SIGTERM) == 0
    violations = [json.loads(r.value) for r in await read_all(bootstrap, topics.violation, idle_s=1.0)]
    statements = [json.loads(r.value) for r in await read_all(bootstrap, statements_topic, idle_s=1.0)]
    dead = await read_all(bootstrap, topics.dead_letter, idle_s=0.5)  # and any extra

    human = {}
    for r in verdict_records:
        verdict = json.loads(r.value)
        if verdict.get("decided_by") == "human":
            human[verdict["event_id"]] = (r, verdict)
    assert set(human) == {"c-0", "c-1"}, "exactly the two good decisions were applied"
    schema = strict_json_schema("verdict")
    for event, (r, verdict) in human.items():
        jsonschema.validate(verdict, schema)
        machine_record, machine_verdict = machine[event]
        assert verdict["supersedes"] == machine_verdict["verdict_id"]
        assert verdict["reviewer_id"] == "reviewer-7" and verdict["policy_version"] == machine_verdict["policy_version"]
        assert (r.key, r.partition) == (machine_record.key, machine_record.partition), "not beside the machine's"
        assert verdict["input"]["topic"] == reviews_topic
        assert (verdict["tenant"], verdict["author_id"]) == ("acme-de", machine_verdict["author_id"])

    overturn = human["c-0"][1]
    assert overturn["verdict_id"] == human_verdict_id("r-overturn")
    assert (overturn["action"], overturn["flagged"], overturn["violations"]) == ("allow", False, [])
    confirmed = human["c-1"][1]
    assert confirmed["verdict_id"] == human_verdict_id("r-confirm")
    (hit,) = confirmed["violations"]
    machine_hit = machine["c-1"][1]["violations"][0]
    assert (hit["category"], hit["action"], hit["score"]) == ("selfharm", "review", machine_hit["score"])

    human_violations = [v for v in violations if v["verdict_id"] in {overturn["verdict_id"], confirmed["verdict_id"]}]
    assert [v["verdict_id"] for v in human_violations] == [confirmed["verdict_id"]], "an allow has no violation"
    by_puid = {s["puid"]: s for s in statements}
    assert overturn["verdict_id"] not in by_puid
    statement = by_puid[confirmed["verdict_id"]]
    jsonschema.validate(statement, strict_json_schema("statement_of_reasons"))
    assert statement["automated_decision"] == "AUTOMATED_DECISION_PARTIALLY"
    assert statement["territorial_scope"] == ["AT", "DE"]
    assert by_puid[machine["c-1"][1]["verdict_id"]]["automated_decision"] == "AUTOMATED_DECISION_FULLY"

    letters = {}
    for letter in dead:
        headers = dict(letter.headers)
        letters[letter.key] = (headers[DeadLetterHeaders.STAGE], headers[DeadLetterHeaders.ERROR_TYPE])
        assert headers[DeadLetterHeaders.ORIGIN_TOPIC] == reviews_topic.encode()
    assert letters == {
        b"c-2": (b"decode", b"not_json"),
        b"c-1": (b"review", b"duplicate_review"),
        b"c-3": (b"review", b"unknown_verdict"),
        b"c-4": (b"review", b"unknown_category"),
    }
    duplicate = next(r for r in dead if r.key == b"c-1")
    assert json.loads(duplicate.value)["review_id"] == "r-confirm", "the dead letter keeps the original value"

    assert sum(offsets.values()) == len(reviews), f"every decision finished and committed: {offsets}"
