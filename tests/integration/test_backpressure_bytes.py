"""The byte cap on in-flight work, on a real broker: large inputs pause reading long before
the message cap, and a record larger than the whole byte cap still passes."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import worker_env
from tests.kafka_support import produce, read_all, wait_for_count
from worker.app import ModerationWorker
from worker.backends import create_backend
from worker.config import load_settings
from worker.pipeline.policy import Policy
from worker.testing import MistralServer

BOUND = 64 * 1024
BIG = 30_000
"""Characters of each large input: a few fill the byte cap."""
LARGER_THAN_THE_BOUND = 90_000


async def test_large_inputs_pause_reading_at_the_byte_cap_and_every_one_is_judged(
    broker, topics, api_key, monkeypatch
) -> None:
    events = [{"id": f"big-{i}", "text": f"{i} " + "x" * BIG} for i in range(24)]
    events.insert(12, {"id": "huge", "text": "h" * LARGER_THAN_THE_BOUND})
    records = [(e["id"].encode(), json.dumps(e).encode()) for e in events]
    largest = max(len(value) for _, value in records)
    await produce(broker.bootstrap_servers, topics.content, records)
    with MistralServer(api_key=api_key, latency_s=0.05) as server:
        env = worker_env(
            broker,
            topics,
            server,
            api_key,
            MODWORKER_MAX_IN_FLIGHT="5000",
            MODWORKER_MAX_IN_FLIGHT_BYTES=str(BOUND),
            MODWORKER_BATCH__MAX_SIZE="2",
            MODWORKER_SCORING__MAX_CONCURRENCY="1",
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        worker = ModerationWorker(settings, backend=create_backend(settings), policy=Policy.load(None))
        task = asyncio.create_task(worker.run())
        held: list[int] = []
        paused_with_few = False
        try:
            done = asyncio.create_task(wait_for_count(broker.bootstrap_servers, topics.verdict, len(events), 120))
            while not done.done():
                held.append(worker.in_flight_bytes)
                if worker.source.paused and worker.in_flight < 10:
                    paused_with_few = True
                await asyncio.sleep(0.005)
            await done
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)
    verdicts = await read_all(broker.bootstrap_servers, topics.verdict, expected=len(events), idle_s=1)
    assert {json.loads(r.value)["event_id"] for r in verdicts} == {e["id"] for e in events}, "one stuck or lost"
    assert paused_with_few, "reading never paused on bytes (fewer than 10 of 5000 messages in flight)"
    assert max(held) > BOUND // 2, "the cap was never approached: the test measures nothing"
    assert max(held) <= BOUND + largest, f"{max(held)} bytes in flight, cap {BOUND} plus one record {largest}"
