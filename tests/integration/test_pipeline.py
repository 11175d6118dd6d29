"""End to end on a real broker and a loopback Mistral server: the pipeline's guarantees.

Expected verdicts are derived independently of the worker's policy code: the loopback
server scores every category below 0.1 unless the text carries a marker such as
``<<sexual:0.93>>``, and the built-in policy's actions for the marked categories are
written out below. So a verdict's violations must be exactly the marked categories.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter, defaultdict
from pathlib import Path

import jsonschema
import pytest

from schemas import DeadLetterHeaders
from tests.conftest import worker_env
from tests.kafka_support import committed, produce, read_all, wait_for_count
from worker.app import ModerationWorker
from worker.backends import create_backend
from worker.config import load_settings
from worker.pipeline.policy import Policy

SCHEMAS = Path(__file__).parents[2] / "schemas" / "json"
DEFAULT_ACTIONS = {"sexual": "block", "selfharm": "review", "pii": "flag", "violence_and_threats": "block"}
SEVERITY = ["allow", "flag", "review", "block"]


def content(i: int, marks: dict[str, float] | None = None, **extra) -> dict:
    text = f"comment number {i} about the weather"
    for category, score in (marks or {}).items():
        text += f" <<{category}:{score}>>"
    return {"id": f"c-{i}", "text": text, "tenant": "acme", "author_id": f"u-{i % 7}", **extra}


def turn(conversation: str, i: int, marks: dict[str, float] | None = None) -> dict:
    text = f"turn {i} of {conversation}"
    for category, score in (marks or {}).items():
        text += f" <<{category}:{score}>>"
    return {
        "id": f"{conversation}-t{i}",
        "conversation_id": conversation,
        "role": "user" if i % 2 == 0 else "assistant",
        "content": text,
        "context": [{"role": "user", "content": f"earlier in {conversation}"}],
    }


def expected_action(marks: dict[str, float]) -> str:
    hits = [DEFAULT_ACTIONS[c] for c, s in marks.items() if s >= 0.5]
    return max(hits, key=SEVERITY.index) if hits else "allow"


async def run_worker_until(monkeypatch, env: dict[str, str], done) -> ModerationWorker:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    worker = ModerationWorker(settings, backend=create_backend(settings), policy=Policy.load(None))
    task = asyncio.create_task(worker.run())
    try:
        await done()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    return worker


async def test_mixed_stream_verdicts_violations_and_dead_letters(broker, topics, mistral, api_key, monkeypatch):
    bootstrap = broker.bootstrap_servers
    marks = {
        3: {"sexual": 0.93},
        8: {"pii": 0.7},
        11: {"selfharm": 0.81, "pii": 0.55},
        17: {"sexual": 0.49},  # just under the threshold: allowed
        25: {"violence_and_threats": 0.5},  # exactly at the threshold: a hit
    }
    contents = [content(i, marks.get(i)) for i in range(40)]
    conv_marks = {("conv-a", 2): {"selfharm": 0.9}, ("conv-b", 1): {"sexual": 0.95}}
    turns = [turn(c, i, conv_marks.get((c, i))) for i in range(6) for c in ("conv-a", "conv-b", "conv-c")]
    bad = {
        b"bad-utf8": (b"\xff\xfe not utf-8", "not_utf8"),
        b"bad-json": (b'{"id": "x", "text": ', "not_json"),
        b"bad-schema": (json.dumps({"text": "no id here"}).encode(), "schema"),
        b"bad-empty": (json.dumps({"id": "e", "text": "   "}).encode(), "empty_text"),
        b"bad-long": (json.dumps({"id": "l", "text": "x" * 3000}).encode(), "too_long"),
    }
    await produce(
        bootstrap,
        topics.content,
        [(e["id"].encode(), json.dumps(e).encode()) for e in contents[:20]]
        + [(k, v) for k, (v, _) in bad.items()]
        + [(e["id"].encode(), json.dumps(e).encode()) for e in contents[20:]],
    )
    await produce(
        bootstrap, topics.conversation, [(t["conversation_id"].encode(), json.dumps(t).encode()) for t in turns]
    )
    valid = len(contents) + len(turns)

    async def all_out():
        await wait_for_count(bootstrap, topics.verdict, valid)
        await wait_for_count(bootstrap, topics.dead_letter, len(bad))

    env = worker_env(broker, topics, mistral, api_key, MODWORKER_MAX_TEXT_CHARS="2000", MODWORKER_BATCH__MAX_SIZE="7")
    await run_worker_until(monkeypatch, env, all_out)

    verdicts = [json.loads(r.value) for r in await read_all(bootstrap, topics.verdict, expected=valid, idle_s=1)]
    violations = [json.loads(r.value) for r in await read_all(bootstrap, topics.violation, idle_s=1)]
    dead = await read_all(bootstrap, topics.dead_letter, expected=len(bad), idle_s=1)

    # one verdict per valid input, each valid against the published schema
    by_event = {v["event_id"]: v for v in verdicts}
    assert len(verdicts) == valid and len(by_event) == valid
    verdict_schema = json.loads((SCHEMAS / "verdict.schema.json").read_text())
    for verdict in verdicts:
        jsonschema.validate(verdict, verdict_schema)
        assert verdict["model"] == "mistral-moderation-2411" and verdict["backend"] == "mistral"
        assert set(verdict["scores"]) == {
            "sexual",
            "hate_and_discrimination",
            "violence_and_threats",
            "dangerous_and_criminal_content",
            "selfharm",
            "health",
            "financial",
            "law",
            "pii",
        }

    # exactly the violations the scores and policy imply
    expectations = {e["id"]: marks.get(i, {}) for i, e in enumerate(contents)}
    expectations |= {t["id"]: conv_marks.get((t["conversation_id"], int(t["id"].rsplit("t", 1)[1])), {}) for t in turns}
    for event_id, event_marks in expectations.items():
        verdict = by_event[event_id]
        hits = {h["category"]: h["score"] for h in verdict["violations"]}
        assert hits == {c: s for c, s in event_marks.items() if s >= 0.5}, event_id
        assert verdict["action"] == expected_action(event_marks), event_id
        assert verdict["flagged"] == (verdict["action"] != "allow")

    # a violation event for exactly the flagged verdicts, carrying the verdict's id
    flagged = {v["verdict_id"] for v in verdicts if v["flagged"]}
    assert {v["verdict_id"] for v in violations} == flagged and len(violations) == len(flagged)
    assert {v["event_id"] for v in verdicts if v["flagged"]} == {"c-3", "c-8", "c-11", "c-25", "conv-a-t2", "conv-b-t1"}
    # per-key order: each conversation's verdicts in input order
    order = defaultdict(list)
    for verdict in verdicts:
        if verdict["kind"] == "conversation":
            order[verdict["conversation_id"]].append(verdict["event_id"])
    for conversation, ids in order.items():
        assert ids == [f"{conversation}-t{i}" for i in range(6)]

    # malformed inputs: dead letters with the original bytes and a reason each
    assert len(dead) == len(bad)
    for record in dead:
        value, error_type = bad[record.key]
        headers = dict(record.headers)
        assert record.value == value
        assert headers[DeadLetterHeaders.ERROR_TYPE].decode() == error_type
        assert headers[DeadLetterHeaders.STAGE] == b"decode"
        assert headers[DeadLetterHeaders.ORIGIN_TOPIC].decode() == topics.content
        assert headers[DeadLetterHeaders.MESSAGE]

    # every request matched the API spec; everything read is committed
    assert mistral.violations == []
    assert mistral.request_count >= 2
    offsets = await committed(bootstrap, topics.group_id, topics.inputs)
    assert sum(offsets.values()) == len(contents) + len(bad) + len(turns)


async def test_verdict_ids_are_deterministic_across_reprocessing(broker, topics, mistral, api_key, monkeypatch):
    """Two groups judging the same input with the same policy and model agree on every id."""
    bootstrap = broker.bootstrap_servers
    events = [content(i, {"pii": 0.8} if i % 3 == 0 else None) for i in range(12)]
    await produce(bootstrap, topics.content, [(e["id"].encode(), json.dumps(e).encode()) for e in events])
    env = worker_env(broker, topics, mistral, api_key)
    await run_worker_until(monkeypatch, env, lambda: wait_for_count(bootstrap, topics.verdict, 12))
    env["MODWORKER_GROUP_ID"] = topics.group_id + "-again"
    await run_worker_until(monkeypatch, env, lambda: wait_for_count(bootstrap, topics.verdict, 24))
    ids = verdict_ids(await read_all(bootstrap, topics.verdict, expected=24, idle_s=1))
    assert len(ids) == 12 and all(len(v) == 1 for v in ids.values())


def verdict_ids(records) -> dict[str, set[str]]:
    """event id -> the verdict ids published for it (one id per event when ids are deterministic)."""
    ids: dict[str, set[str]] = defaultdict(set)
    for record in records:
        verdict = json.loads(record.value)
        ids[verdict["event_id"]].add(verdict["verdict_id"])
    return ids


async def verdicted_events(bootstrap: str, topic: str, total: int, timeout_s: float) -> set[str]:
    """Event ids with a verdict, read until ``total`` distinct ones (duplicates allowed) or timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen: set[str] = set()
    while len(seen) < total and loop.time() < deadline:
        seen = {json.loads(r.value)["event_id"] for r in await read_all(bootstrap, topic, idle_s=1)}
    return seen


def _content_records(n: int) -> list[tuple[bytes, bytes]]:
    return [(f"c-{i}".encode(), json.dumps(content(i)).encode()) for i in range(n)]


@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_leaves_no_input_without_verdict(
    broker, topics, mistral, api_key, spawn_worker
):
    bootstrap = broker.bootstrap_servers
    total = 600
    await produce(bootstrap, topics.content, _content_records(total))
    # One slow call at a time (75 calls x 200 ms): the stream lasts 15 s, so the kill
    # lands mid-stream however fast the worker publishes and however late the test sees 80.
    mistral.latency_s = 0.2
    env = worker_env(
        broker, topics, mistral, api_key, MODWORKER_BATCH__MAX_SIZE="8", MODWORKER_SCORING__MAX_CONCURRENCY="1"
    )
    first = spawn_worker(env)
    await wait_for_count(bootstrap, topics.verdict, 80)
    first.stop(signal.SIGKILL)
    assert first.process.returncode == -signal.SIGKILL
    before = {json.loads(r.value)["event_id"] for r in await read_all(bootstrap, topics.verdict, idle_s=0.5)}
    assert len(before) < total, "the kill came too late to interrupt the stream"

    mistral.latency_s = 0.0
    second = spawn_worker(env)
    assert await verdicted_events(bootstrap, topics.verdict, total, timeout_s=90) == {f"c-{i}" for i in range(total)}
    assert second.stop(signal.SIGTERM) == 0
    ids = verdict_ids(await read_all(bootstrap, topics.verdict, idle_s=1))
    assert all(len(v) == 1 for v in ids.values()), "a reprocessed input must keep its verdict id"


@pytest.mark.slow
async def test_two_workers_split_partitions_and_verdict_everything_once(broker, topics, mistral, api_key, spawn_worker):
    bootstrap = broker.bootstrap_servers
    env = worker_env(broker, topics, mistral, api_key)
    workers = [spawn_worker(env), spawn_worker(env)]
    for w in workers:
        w.wait_for_log('"partitions.assigned"', timeout_s=60)
    # wait until the group settled: both members hold partitions
    await _until(
        lambda: (
            all(_assigned(w.log()) for w in workers)
            and len(_assigned(workers[0].log()) | _assigned(workers[1].log())) == 8
        ),
        timeout_s=60,
    )
    total = 400
    await produce(bootstrap, topics.content, _content_records(total))
    turns = [turn(f"conv-{i % 10}", i) for i in range(100)]
    await produce(
        bootstrap, topics.conversation, [(t["conversation_id"].encode(), json.dumps(t).encode()) for t in turns]
    )
    await wait_for_count(bootstrap, topics.verdict, total + len(turns))
    owned = [_assigned(w.log()) for w in workers]
    for w in workers:
        assert w.stop(signal.SIGTERM) == 0, w.log()[-3000:]

    assert owned[0] and owned[1] and not owned[0] & owned[1], owned
    assert owned[0] | owned[1] == {f"{t}-{p}" for t in topics.inputs for p in range(4)}
    verdicts = [
        json.loads(r.value) for r in await read_all(bootstrap, topics.verdict, expected=total + 100, idle_s=1.5)
    ]
    counts = Counter(v["event_id"] for v in verdicts)
    assert len(counts) == total + len(turns)
    assert max(counts.values()) == 1, "an input was verdicted twice: two owners processed it"
    offsets = await committed(bootstrap, topics.group_id, topics.inputs)
    assert sum(offsets.values()) == total + len(turns)


@pytest.mark.slow
async def test_sigterm_drains_commits_exits_zero_and_restart_repeats_nothing(
    broker, topics, mistral, api_key, spawn_worker
):
    bootstrap = broker.bootstrap_servers
    total = 500
    await produce(bootstrap, topics.content, _content_records(total))
    # One slow call at a time (50 calls x 200 ms) and a small in-flight cap keep most of the
    # stream unread when SIGTERM arrives, however fast the broker.
    mistral.latency_s = 0.2
    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_BATCH__MAX_SIZE="10",
        MODWORKER_MAX_IN_FLIGHT="40",
        MODWORKER_SCORING__MAX_CONCURRENCY="1",
    )
    first = spawn_worker(env)
    await wait_for_count(bootstrap, topics.verdict, 50)
    assert first.stop(signal.SIGTERM, timeout_s=60) == 0, first.log()[-3000:]
    log = first.log()
    assert '"worker.stopping"' in log and '"worker.stopped"' in log and '"drain.timeout"' not in log
    produced = len(await read_all(bootstrap, topics.verdict, idle_s=1))
    assert produced < total, "the stream finished before SIGTERM; nothing was in flight"
    offsets = await committed(bootstrap, topics.group_id, [topics.content])
    assert sum(offsets.values()) == produced, "drained work must be committed, and only that"

    mistral.latency_s = 0.0
    second = spawn_worker(env)
    await wait_for_count(bootstrap, topics.verdict, total)
    assert second.stop(signal.SIGTERM) == 0
    verdicts = [json.loads(r.value) for r in await read_all(bootstrap, topics.verdict, expected=total, idle_s=1.5)]
    counts = Counter(v["event_id"] for v in verdicts)
    assert len(counts) == total
    assert max(counts.values()) == 1, "a drained and committed input was processed again"


def _assigned(log: str) -> set[str]:
    """Partitions the worker holds at the end of its log (last assignment minus revokes)."""
    held: set[str] = set()
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "partitions.assigned":
            held |= set(entry["partitions"])
        elif entry.get("event") == "partitions.revoked":
            held -= set(entry["partitions"])
    return held


async def _until(condition, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_a_member_joining_mid_stream_loses_nothing(broker, topics, mistral, api_key, spawn_worker):
    """A rebalance with work in flight: every input ends with a verdict and is committed."""
    bootstrap = broker.bootstrap_servers
    total = 800
    await produce(bootstrap, topics.content, _content_records(total))
    mistral.latency_s = 0.05
    env = worker_env(broker, topics, mistral, api_key, MODWORKER_BATCH__MAX_SIZE="10", MODWORKER_MAX_IN_FLIGHT="100")
    first = spawn_worker(env)
    await wait_for_count(bootstrap, topics.verdict, 60)
    second = spawn_worker(env)
    second.wait_for_log('"partitions.assigned"', timeout_s=60)
    first.wait_for_log('"partitions.revoked"', timeout_s=60)
    assert await verdicted_events(bootstrap, topics.verdict, total, timeout_s=120) == {f"c-{i}" for i in range(total)}
    for w in (first, second):
        assert w.stop(signal.SIGTERM) == 0, w.log()[-3000:]
    assert _assigned(second.log()), "the second member never got partitions: no rebalance was tested"
    offsets = await committed(bootstrap, topics.group_id, [topics.content])
    assert sum(offsets.values()) == total
    ids = verdict_ids(await read_all(bootstrap, topics.verdict, idle_s=1))
    assert all(len(v) == 1 for v in ids.values()), "a reprocessed input must keep its verdict id"
