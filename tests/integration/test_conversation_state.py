"""Conversation state end to end: turns published one event each, on a real broker, with
the loopback Mistral server recording every conversation it is asked to judge.

What the server received is the evidence: for each judged turn, the messages before it
in the request are the context the worker gave it.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import defaultdict

import pytest

from tests.conftest import worker_env
from tests.kafka_support import committed, create_topics, produce, read_all, wait_for_count
from worker.app import ModerationWorker, WorkerFatal
from worker.backends import create_backend
from worker.config import load_settings
from worker.pipeline.policy import Policy


def chat_turn(conversation: str, i: int, **extra) -> dict:
    """Turn ``i`` of a conversation, as a chat platform publishes it: no context."""
    return {
        "id": f"{conversation}-t{i}",
        "conversation_id": conversation,
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"turn {i} of {conversation}",
        **extra,
    }


def records(turns: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(t["conversation_id"].encode(), json.dumps(t).encode()) for t in turns]


def judged_with(mistral) -> dict[str, list[list[tuple[str, str]]]]:
    """Judged turn content -> the context of every request that judged it (oldest first)."""
    seen: dict[str, list[list[tuple[str, str]]]] = defaultdict(list)
    for request in mistral.requests:
        if request.path != "/v1/chat/moderations":
            continue
        for messages in request.body["input"]:
            *context, judged = messages
            seen[judged["content"]].append([(m["role"], m["content"]) for m in context])
    return seen


def predecessors(conversation: str, i: int, max_turns: int = 10) -> list[tuple[str, str]]:
    return [(t["role"], t["content"]) for t in (chat_turn(conversation, j) for j in range(max(0, i - max_turns), i))]


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


def verdict_ids(verdict_records) -> dict[str, set[str]]:
    ids: dict[str, set[str]] = defaultdict(set)
    for record in verdict_records:
        verdict = json.loads(record.value)
        ids[verdict["event_id"]].add(verdict["verdict_id"])
    return ids


async def test_turns_published_one_event_each_are_judged_with_their_predecessors(
    broker, topics, mistral, api_key, monkeypatch
):
    bootstrap = broker.bootstrap_servers
    conversations = ["conv-a", "conv-b", "conv-c"]
    turns = [chat_turn(c, i) for i in range(12) for c in conversations]
    given = chat_turn("conv-d", 1, context=[{"role": "user", "content": "context the platform sent"}])
    await produce(bootstrap, topics.conversation, records([*turns, chat_turn("conv-d", 0), given]))
    total = len(turns) + 2

    env = worker_env(broker, topics, mistral, api_key, MODWORKER_BATCH__MAX_SIZE="5")
    await run_worker_until(monkeypatch, env, lambda: wait_for_count(bootstrap, topics.verdict, total))

    seen = judged_with(mistral)
    for c in conversations:
        for i in range(12):
            contexts = seen[f"turn {i} of {c}"]
            assert contexts, f"{c} turn {i} was never sent to the backend"
            # the last 10 turns at most (MODWORKER_CONVERSATION__MAX_TURNS), both roles, oldest first
            assert all(ctx == predecessors(c, i) for ctx in contexts), (c, i, contexts)
    assert seen["turn 1 of conv-d"] == [[("user", "context the platform sent")]], "a given context is used as is"

    # every turn entered the changelog, in its input partition, keyed by conversation id
    inputs = {
        json.loads(r.value)["id"]: r.partition for r in await read_all(bootstrap, topics.conversation, idle_s=0.5)
    }
    changelog = await read_all(bootstrap, topics.conversation_state, idle_s=1)
    latest = {r.key.decode(): (r.partition, json.loads(r.value)) for r in changelog}
    for c in conversations:
        partition, window = latest[c]
        assert partition == inputs[f"{c}-t0"]
        assert [t["id"] for t in window["turns"]] == [f"{c}-t{i}" for i in range(12)]
    assert [t["id"] for t in latest["conv-d"][1]["turns"]] == ["conv-d-t0", "conv-d-t1"]
    offsets = await committed(bootstrap, topics.group_id, [topics.conversation])
    assert sum(offsets.values()) == total


async def test_a_replayed_turn_gets_the_same_context_and_verdict_id(broker, topics, mistral, api_key, monkeypatch):
    bootstrap = broker.bootstrap_servers
    turns = [chat_turn("conv-r", i) for i in range(3)]
    await produce(bootstrap, topics.conversation, records(turns))
    # the same turn again later in the stream (a producer retry, or a replay copied back)
    await produce(bootstrap, topics.conversation, records([turns[1], chat_turn("conv-r", 3)]))
    env = worker_env(broker, topics, mistral, api_key, MODWORKER_CACHE__ENABLED="false")
    await run_worker_until(monkeypatch, env, lambda: wait_for_count(bootstrap, topics.verdict, 5))

    ids = verdict_ids(await read_all(bootstrap, topics.verdict, expected=5, idle_s=1))
    assert len(ids["conv-r-t1"]) == 1, "the replayed turn must keep its verdict id"
    assert judged_with(mistral)["turn 1 of conv-r"] == [predecessors("conv-r", 1)] * 2
    # stored once: the next turn's context holds turn 1 once
    assert judged_with(mistral)["turn 3 of conv-r"] == [predecessors("conv-r", 3)]


@pytest.mark.slow
async def test_reply_after_sigkill_is_judged_with_the_user_turn_restored_from_the_changelog(
    broker, topics, mistral, api_key, spawn_worker
):
    bootstrap = broker.bootstrap_servers
    # No commits before the kill: the new process replays every earlier turn as well.
    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_COMMIT_INTERVAL_MS="600000",
        MODWORKER_COMMIT_EVERY="100000",
        MODWORKER_CACHE__ENABLED="false",
    )
    first = spawn_worker(env)
    earlier = [chat_turn("conv-k", i) for i in range(3)]  # user, assistant, user
    await produce(bootstrap, topics.conversation, records(earlier))
    await wait_for_count(bootstrap, topics.verdict, 3)
    await wait_for_count(bootstrap, topics.conversation_state, 3)
    first.stop(signal.SIGKILL)
    assert first.process.returncode == -signal.SIGKILL
    assert sum((await committed(bootstrap, topics.group_id, [topics.conversation])).values()) == 0
    before = verdict_ids(await read_all(bootstrap, topics.verdict, idle_s=0.5))

    reply = chat_turn("conv-k", 3)  # the assistant's reply, published on its own
    await produce(bootstrap, topics.conversation, records([reply]))
    second = spawn_worker(env)
    await wait_for_count(bootstrap, topics.verdict, 3 + 3 + 1)  # earlier turns replayed, then the reply
    second.wait_for_log('"conversation_state.restored"')
    assert second.stop(signal.SIGTERM) == 0, second.log()[-3000:]

    seen = judged_with(mistral)
    assert seen["turn 3 of conv-k"] == [predecessors("conv-k", 3)], "the reply lacks its earlier turns"
    assert predecessors("conv-k", 3)[-1] == ("user", "turn 2 of conv-k")
    for i in range(3):  # replays were judged with the context of their first judgement
        assert seen[f"turn {i} of conv-k"] == [predecessors("conv-k", i)] * 2
    after = verdict_ids(await read_all(bootstrap, topics.verdict, idle_s=1))
    for event_id, ids in before.items():
        assert after[event_id] == ids, f"{event_id} got another verdict id after the restart"
    restored = [json.loads(line) for line in second.log().splitlines() if '"conversation_state.restored"' in line]
    assert sum(entry["conversations"] for entry in restored) == 1


@pytest.mark.slow
async def test_two_workers_with_a_rebalance_amid_many_conversations(broker, topics, mistral, api_key, spawn_worker):
    bootstrap = broker.bootstrap_servers
    conversations = [f"conv-{n}" for n in range(60)]
    turns = [chat_turn(c, i) for i in range(10) for c in conversations]
    await produce(bootstrap, topics.conversation, records(turns))
    # One slow call at a time (120 calls x 500 ms, a minute): the second member joins and
    # restores its state mid-way even on a loaded machine; then the backend is made fast.
    mistral.latency_s = 0.5
    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_BATCH__MAX_SIZE="5",
        MODWORKER_SCORING__MAX_CONCURRENCY="1",
        MODWORKER_MAX_IN_FLIGHT="60",
        MODWORKER_CACHE__ENABLED="false",
    )
    first = spawn_worker(env)
    await wait_for_count(bootstrap, topics.verdict, 60)
    second = spawn_worker(env)
    second.wait_for_log('"conversation_state.restored"', timeout_s=60)
    first.wait_for_log('"partitions.revoked"', timeout_s=60)
    done = len(await read_all(bootstrap, topics.verdict, idle_s=0.2))
    assert done < len(turns), "the stream finished before the rebalance"

    mistral.latency_s = 0.0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    seen_events: set[str] = set()
    while len(seen_events) < len(turns) and loop.time() < deadline:
        seen_events = {json.loads(r.value)["event_id"] for r in await read_all(bootstrap, topics.verdict, idle_s=1)}
    assert seen_events == {t["id"] for t in turns}
    for w in (first, second):
        assert w.stop(signal.SIGTERM) == 0, w.log()[-3000:]

    seen = judged_with(mistral)
    wrong = [
        (c, i, ctx)
        for c in conversations
        for i in range(10)
        for ctx in seen[f"turn {i} of {c}"]
        if ctx != predecessors(c, i)
    ]
    assert not wrong, f"{len(wrong)} judgements lacked their predecessors, e.g. {wrong[:3]}"
    ids = verdict_ids(await read_all(bootstrap, topics.verdict, idle_s=1))
    assert all(len(v) == 1 for v in ids.values()), "a reprocessed turn must keep its verdict id"
    offsets = await committed(bootstrap, topics.group_id, [topics.conversation])
    assert sum(offsets.values()) == len(turns)


async def test_a_changelog_topic_that_cannot_hold_the_state_stops_the_worker_with_one_line(
    broker, topics, mistral, api_key, monkeypatch
):
    await create_topics(broker.bootstrap_servers, [topics.conversation_state], partitions=2)  # the input has 4
    for key, value in worker_env(broker, topics, mistral, api_key).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    worker = ModerationWorker(settings, backend=create_backend(settings), policy=Policy.load(None))
    with pytest.raises(WorkerFatal) as raised:
        await asyncio.wait_for(worker.run(), 60)
    message = str(raised.value)
    assert "\n" not in message
    assert topics.conversation_state in message and "2 partitions" in message and "has 4" in message


async def test_idle_and_least_recent_conversations_are_forgotten_with_tombstones(
    broker, topics, mistral, api_key, monkeypatch
):
    """TTL and the memory bound on a running worker: a forgotten conversation's next turn is
    judged alone, and the changelog gets a tombstone for it."""
    bootstrap = broker.bootstrap_servers
    published = 0

    async def publish_and_wait(*turns: dict) -> None:
        nonlocal published
        for t in turns:  # one at a time: the order the state sees them is the order written here
            await produce(bootstrap, topics.conversation, records([t]))
            published += 1
            await wait_for_count(bootstrap, topics.verdict, published)

    async def scenario() -> None:
        await publish_and_wait(chat_turn("idle", 0))
        await asyncio.sleep(2.5)  # past the 2 s TTL
        await publish_and_wait(chat_turn("idle", 1))
        # ~800 bytes per one-turn conversation against a 1,024-byte bound: each new
        # conversation pushes out the other one
        await publish_and_wait(
            chat_turn("mem-a", 0), chat_turn("mem-b", 0), chat_turn("mem-a", 1), chat_turn("mem-b", 1)
        )

    env = worker_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_CONVERSATION__TTL_S="2",
        MODWORKER_CONVERSATION__MAX_BYTES="1024",
        MODWORKER_BATCH__MAX_WAIT_MS="0",
    )
    await run_worker_until(monkeypatch, env, scenario)

    seen = judged_with(mistral)
    for conversation in ("idle", "mem-a", "mem-b"):
        assert seen[f"turn 1 of {conversation}"] == [[]], f"{conversation} was not forgotten"
    changelog = await read_all(bootstrap, topics.conversation_state, idle_s=1)
    tombstoned = {r.key.decode() for r in changelog if r.value is None}
    assert {"idle", "mem-a", "mem-b"} <= tombstoned
    idle = [r.value is not None for r in changelog if r.key == b"idle"]
    # turn 0, its TTL tombstone, turn 1 (after the tombstone), then pushed out by mem-a
    assert idle == [True, False, True, False]
