"""Static group membership (``MODWORKER_KAFKA__GROUP_INSTANCE_ID``) on a real broker.

Two workers in one group; one is stopped (SIGTERM's path: drain, commit, close) and a new
worker with the same instance id starts within the session timeout. With static
membership the broker keeps the member's partitions for it: the other worker's rebalance
listener is never called, its assignment is unchanged and it restores no conversation
state. Without it (the control) the stop and the start cost the group a rebalance (or two).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka.structs import TopicPartition

from tests.conftest import worker_env
from tests.kafka_support import produce, read_all, wait_for_count
from worker.app import ModerationWorker
from worker.backends import create_backend
from worker.config import load_settings
from worker.pipeline.policy import Policy

pytestmark = [pytest.mark.real_kafka, pytest.mark.slow]

SESSION_TIMEOUT_MS = 10_000


class Member:
    """A worker in this process, with its rebalance callbacks and restores counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        self.worker = ModerationWorker(settings, backend=create_backend(settings), policy=Policy.load(None))
        self.callbacks: list[tuple[str, list[TopicPartition]]] = []
        self.restored: list[TopicPartition] = []
        listener = self.worker.source._listener
        on_assign, on_revoke = listener._on_assign, listener._on_revoke

        async def assigned(tps: list[TopicPartition]) -> None:
            self.callbacks.append(("assigned", tps))
            await on_assign(tps)

        async def revoked(tps: list[TopicPartition]) -> None:
            self.callbacks.append(("revoked", tps))
            await on_revoke(tps)

        listener._on_assign, listener._on_revoke = assigned, revoked
        stage = self.worker._conversations
        restore = stage._restore

        async def counted_restore(tps: list[TopicPartition]) -> None:
            self.restored.extend(tps)
            await restore(tps)

        stage._restore = counted_restore  # type: ignore[method-assign]
        self.task = asyncio.create_task(self.worker.run())

    async def wait_assigned(self, timeout_s: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.callbacks or self.callbacks[-1][0] != "assigned":
            assert asyncio.get_running_loop().time() < deadline, "never assigned"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.worker.stop()
        await asyncio.wait_for(self.task, 60)


def turns(start: int, count: int) -> list[tuple[bytes, bytes]]:
    """Conversation turns without context over 16 conversations (every partition gets some)."""
    out = []
    for i in range(start, start + count):
        conversation = f"conv-{i % 16}"
        event = {"id": f"{conversation}-t{i}", "conversation_id": conversation, "role": "user", "content": f"turn {i}"}
        out.append((conversation.encode(), json.dumps(event).encode()))
    return out


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
async def test_a_member_restarted_within_the_session_timeout_rejoins_without_a_rebalance(
    broker, topics, mistral, api_key, monkeypatch, static: bool
):
    bootstrap = broker.bootstrap_servers
    await produce(bootstrap, topics.conversation, turns(0, 64))

    def env(instance: str) -> dict[str, str]:
        extra = {"MODWORKER_KAFKA__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS)}
        if static:
            extra["MODWORKER_KAFKA__GROUP_INSTANCE_ID"] = instance
        return worker_env(broker, topics, mistral, api_key, **extra)

    first = Member(monkeypatch, env("worker-0"))
    await first.wait_assigned()
    other = Member(monkeypatch, env("worker-1"))
    await other.wait_assigned()
    await wait_for_count(bootstrap, topics.verdict, 64)
    await asyncio.sleep(1)  # both members stable, offsets committed
    before = other.worker.source.assignment()
    assert before, "the other member owns partitions"
    callbacks, restored = len(other.callbacks), len(other.restored)

    await first.stop()
    restarted = Member(monkeypatch, env("worker-0"))
    await restarted.wait_assigned()
    await produce(bootstrap, topics.conversation, turns(64, 64))
    await wait_for_count(bootstrap, topics.verdict, 128)
    await asyncio.sleep(2)  # a rebalance triggered by the rejoin would have reached the other member by now

    try:
        if static:
            assert other.callbacks[callbacks:] == [], "the other member's rebalance listener was called"
            assert other.worker.source.assignment() == before, "the other member's partitions moved"
            assert other.restored[restored:] == [], "the other member restored conversation state"
            # The restarted member got back exactly what the stopped one owned and reloaded
            # the state of its own conversation partitions only (its memory went with it).
            assert restarted.worker.source.assignment() | before == {
                TopicPartition(t, p) for t in topics.inputs for p in range(4)
            }
            assert set(restarted.restored) == {
                tp for tp in restarted.worker.source.assignment() if tp.topic == topics.conversation
            }
        else:
            # The leave and the join (one rebalance when the join comes before the others
            # rejoined): the other member is revoked and restores its partitions again.
            assert [kind for kind, _ in other.callbacks[callbacks:]].count("revoked") >= 1, other.callbacks
            assert len(other.restored) > restored, "a dynamic member takes over and restores partitions"
    finally:
        await restarted.stop()
        await other.stop()
    verdicts = await read_all(bootstrap, topics.verdict, idle_s=1)
    judged = {json.loads(r.value)["event_id"] for r in verdicts}
    assert judged == {json.loads(v)["id"] for _, v in turns(0, 128)}
