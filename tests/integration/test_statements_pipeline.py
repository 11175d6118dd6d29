"""Statements of reasons through the worker on the test broker (``MODWORKER_DSA__ENABLED=true``):
one schema-valid statement per restricting verdict, published with it; in exactly-once mode,
committed in the verdict's transaction."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

from schemas import DeadLetterHeaders
from schemas.export import strict_json_schema
from tests.conftest import worker_env
from tests.kafka_support import create_topics, produce, read_all
from tests.pipeline.test_statements import FORUM_DSA
from worker.pipeline.policy import Policy

pytestmark = [pytest.mark.slow]

COMMITTED = "read_committed"


def content(i: int, marks: dict[str, float] | None = None, **extra) -> dict:
    text = f"forum post {i} about gardening"
    for category, score in (marks or {}).items():
        text += f" <<{category}:{score}>>"
    return {"id": f"c-{i}", "text": text, "tenant": "acme-de" if i % 2 else "acme", **extra}


def forum_policy(tmp_path: Path) -> Path:
    document = Policy.load(None).document()
    document["dsa"] = FORUM_DSA
    path = tmp_path / "forum-policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def marks_of(i: int) -> dict[str, float] | None:
    """Every 5th post blocked, every 7th hidden for review (selfharm), every 11th flagged only."""
    if i % 5 == 0:
        return {"sexual": 0.9}
    if i % 7 == 0:
        return {"selfharm": 0.8}
    if i % 11 == 0:
        return {"pii": 0.9}
    return None


def restricting(verdicts: list[dict]) -> dict[str, dict]:
    return {v["verdict_id"]: v for v in verdicts if v["action"] in ("block", "review") and v["violations"]}


async def test_each_restricting_verdict_gets_one_valid_statement_and_a_bad_one_is_a_dead_letter(
    broker, topics, mistral, api_key, spawn_worker, tmp_path
):
    bootstrap = broker.bootstrap_servers
    statements_topic = topics.verdict + ".sor"
    await create_topics(bootstrap, [statements_topic])
    total = 60
    events = [content(i, marks_of(i)) for i in range(total)]
    events.append(content(total, {"sexual": 0.95}, created_at="1990-05-01T10:00:00Z"))  # the API refuses the date
    await produce(bootstrap, topics.content, [(e["id"].encode(), json.dumps(e).encode()) for e in events])
    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_DSA__ENABLED="true",
        MODWORKER_DSA__TOPIC=statements_topic,
        MODWORKER_POLICY_FILE=str(forum_policy(tmp_path)),
    )
    worker = spawn_worker(env)
    verdicts = [json.loads(r.value) for r in await read_all(bootstrap, topics.verdict, expected=len(events))]
    assert worker.stop(signal.SIGTERM) == 0
    statements = [json.loads(r.value) for r in await read_all(bootstrap, statements_topic, idle_s=1.0)]
    dead = await read_all(bootstrap, topics.dead_letter, idle_s=1.0)

    assert len(verdicts) == len(events)
    restricted = restricting(verdicts)
    assert len(restricted) == 12 + 7 + 1  # 12 blocked, 7 reviews hidden, the old post
    by_puid = {s["puid"]: s for s in statements}
    assert len(statements) == len(by_puid) == len(restricted) - 1
    old_post = next(v["verdict_id"] for v in verdicts if v["event_id"] == f"c-{total}")
    assert set(by_puid) == set(restricted) - {old_post}
    schema = strict_json_schema("statement_of_reasons")
    for puid, statement in by_puid.items():
        jsonschema.validate(statement, schema)
        verdict = restricted[puid]
        expected_scope = ["AT", "DE"] if verdict["tenant"] == "acme-de" else None
        if expected_scope is not None:
            assert statement["territorial_scope"] == expected_scope
        else:
            assert len(statement["territorial_scope"]) == 27
        if verdict["action"] == "block":
            assert statement["decision_visibility"] == ["DECISION_VISIBILITY_CONTENT_REMOVED"]
            assert statement["category"] == "STATEMENT_CATEGORY_PROTECTION_OF_MINORS"
        else:
            assert statement["decision_visibility"] == ["DECISION_VISIBILITY_CONTENT_DISABLED"]
            assert statement["category"] == "STATEMENT_CATEGORY_OTHER_VIOLATION_TC"  # dsa.default
    (letter,) = dead
    headers = dict(letter.headers)
    assert headers[DeadLetterHeaders.STAGE] == b"statement"
    assert b"content_date 1990-05-01" in headers[DeadLetterHeaders.MESSAGE]
    assert json.loads(letter.value)["id"] == f"c-{total}"


@pytest.mark.real_kafka
async def test_in_exactly_once_mode_statements_commit_in_their_verdicts_transactions(
    broker, topics, mistral, api_key, spawn_worker, tmp_path
):
    """Killed mid-stream and restarted: what a read_committed reader sees of the statements is
    exactly the committed restricting verdicts', each once."""
    bootstrap = broker.bootstrap_servers
    statements_topic = topics.verdict + ".sor"
    await create_topics(bootstrap, [statements_topic])
    total = 400
    await produce(
        bootstrap,
        topics.content,
        [(f"c-{i}".encode(), json.dumps(content(i, marks_of(i))).encode()) for i in range(total)],
    )
    mistral.latency_s = 0.2  # one slow call at a time: the kill lands mid-stream
    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_DELIVERY="exactly_once",
        MODWORKER_DSA__ENABLED="true",
        MODWORKER_DSA__TOPIC=statements_topic,
        MODWORKER_POLICY_FILE=str(forum_policy(tmp_path)),
        MODWORKER_BATCH__MAX_SIZE="8",
        MODWORKER_SCORING__MAX_CONCURRENCY="1",
    )
    first = spawn_worker(env)
    await read_all(bootstrap, topics.verdict, expected=60, idle_s=0.0, isolation_level=COMMITTED)
    first.stop(signal.SIGKILL)
    before = await read_all(bootstrap, topics.verdict, idle_s=0.5, isolation_level=COMMITTED)
    assert len(before) < total, "the kill came too late to interrupt the stream"
    # What the killed worker left committed already pairs each restricting verdict with its statement.
    early = restricting([json.loads(r.value) for r in before])
    early_statements = await read_all(bootstrap, statements_topic, idle_s=0.5, isolation_level=COMMITTED)
    assert {json.loads(r.value)["puid"] for r in early_statements} == set(early)

    mistral.latency_s = 0.0
    second = spawn_worker(env)
    await read_all(bootstrap, topics.verdict, expected=total, idle_s=0.0, isolation_level=COMMITTED)
    assert second.stop(signal.SIGTERM) == 0
    verdicts = [json.loads(r.value) for r in await read_all(bootstrap, topics.verdict, isolation_level=COMMITTED)]
    statements = [json.loads(r.value) for r in await read_all(bootstrap, statements_topic, isolation_level=COMMITTED)]
    assert Counter(v["event_id"] for v in verdicts).most_common(1)[0][1] == 1
    restricted = restricting(verdicts)
    puids = Counter(s["puid"] for s in statements)
    assert set(puids) == set(restricted)
    assert max(puids.values()) == 1, "a statement was committed twice"
    assert len(restricted) == sum(1 for i in range(total) if marks_of(i) and "pii" not in (marks_of(i) or {}))


def test_enabling_dsa_with_a_policy_lacking_the_section_stops_start_up_with_one_line(broker, topics, mistral, api_key):
    env = worker_env(broker, topics, mistral, api_key, MODWORKER_DSA__ENABLED="true")
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "MODWORKER_DSA__ENABLED=true" in lines[0] and "has no 'dsa' section" in lines[0]
