"""A rebalance on the broker: once the revoke listener returned, the old owner publishes
nothing more for the partitions that moved to the new member.

Worker A (in-process, watched) has a backlog flowing through its sink when worker B (a
process) joins; the revoke timeout is 0, so A's listener does not wait for its work. Every
round A's sink sends is checked against A's ownership at that moment. A guard of the
invariant under a real rebalance: on the embedded broker the sink's queue is usually
empty by the time the listener's commit returned, so this did not catch the old
behaviour; ``test_sink_revoke.py`` shows the mechanism (queued outputs dropped, sent ones
waited for) deterministically.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from tests.conftest import worker_env
from tests.kafka_support import produce, wait_for_count
from worker.app import ModerationWorker
from worker.backends import create_backend
from worker.config import load_settings
from worker.pipeline.policy import Policy

pytestmark = pytest.mark.slow


async def test_no_output_of_a_moved_partition_is_sent_after_the_revoke_listener_returned(
    broker, topics, mistral, api_key, spawn_worker, monkeypatch
) -> None:
    bootstrap = broker.bootstrap_servers
    total = 3_000
    await produce(
        bootstrap,
        topics.content,
        [(f"k-{i}".encode(), json.dumps({"id": f"c-{i}", "text": f"text {i}"}).encode()) for i in range(total)],
    )
    env = worker_env(broker, topics, mistral, api_key, MODWORKER_REVOKE_TIMEOUT_S="0", MODWORKER_BATCH__MAX_SIZE="8")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    a = ModerationWorker(settings, backend=create_backend(settings), policy=Policy.load(None))

    sends: list[tuple[float, set[TopicPartition]]] = []
    send_round = a._sink._send_round

    async def watched_send_round(groups: list[Any]) -> Any:
        inputs = set()
        for records, *_ in groups:
            for record in records:
                if record.topic == topics.verdict:
                    position = json.loads(record.value)["input"]
                    inputs.add(TopicPartition(position["topic"], position["partition"]))
        sends.append((time.monotonic(), inputs))
        return await send_round(groups)

    ownership: list[tuple[float, str, set[TopicPartition]]] = []  # (when, "assigned"/"revoked", partitions)
    on_revoked, on_assigned = a._on_revoked, a._on_assigned

    async def watched_on_revoked(revoked: list[TopicPartition]) -> None:
        await on_revoked(revoked)
        ownership.append((time.monotonic(), "revoked", set(revoked)))

    async def watched_on_assigned(assigned: list[TopicPartition]) -> None:
        ownership.append((time.monotonic(), "assigned", set(assigned)))
        await on_assigned(assigned)

    a._sink._send_round = watched_send_round  # type: ignore[method-assign]
    a.source._listener._on_revoke = watched_on_revoked
    a.source._listener._on_assign = watched_on_assigned

    running = asyncio.create_task(a.run())
    try:
        await wait_for_count(bootstrap, topics.verdict, 200)
        b = spawn_worker(env)
        b.wait_for_log('"partitions.assigned"', timeout_s=60)
        await wait_for_count(bootstrap, topics.verdict, total, timeout_s=120)
    finally:
        a.stop()
        await asyncio.wait_for(running, 60)
    assert b.stop(signal.SIGTERM) == 0

    assert any(event == "revoked" for _, event, _ in ownership), "no rebalance was tested"

    def owned_at(tp: TopicPartition, when: float) -> bool:
        """Whether A owned ``tp`` at ``when``: the last ownership event before it decides."""
        events = [event for t, event, tps in ownership if t <= when and tp in tps]
        return bool(events) and events[-1] == "assigned"

    late = [(t, tp) for t, tps in sends for tp in tps if not owned_at(tp, t)]
    assert late == [], f"outputs sent for partitions A no longer owned (revoke listener had returned): {late[:5]}"
