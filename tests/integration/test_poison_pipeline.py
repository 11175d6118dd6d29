"""One poison input in a live stream, through the whole worker on the broker and a loopback API.

The API fails every request that carries the poison input (a 5xx, a timeout, or an answer
in an unexpected shape) and answers all others. Under the default fail policy ``wait``
the worker must not retry that batch for ever: it splits it down to the poison input,
dead-letters that one as ``backend_failed`` with the last error, verdicts everything else
and commits past it.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
from aiokafka.structs import TopicPartition

from schemas import DeadLetterHeaders
from tests.conftest import worker_env
from tests.kafka_support import committed, event_record, produce, read_all, wait_for_count
from worker.testing import Fault, MistralServer, when_input_contains

pytestmark = pytest.mark.slow

POISON = "this one breaks the API"

FAULTS = {
    "5xx": Fault(status=500),
    "timeout": Fault(delay_s=1.5),
    "bad-shape": Fault(status=200, body={"id": "x", "model": "mistral-moderation-2411", "outcome": "?"}),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
async def test_a_poison_input_is_dead_lettered_as_backend_failed_and_the_stream_goes_on(
    broker, topics, api_key, spawn_worker, fault: str
) -> None:
    first = [{"id": f"p-{i}", "text": POISON if i == 37 else f"message {i}"} for i in range(100)]
    with MistralServer(api_key=api_key, fault_plan=when_input_contains(POISON, FAULTS[fault])) as server:
        await produce(broker.bootstrap_servers, topics.content, [event_record(e) for e in first])
        worker = spawn_worker(
            worker_env(
                broker,
                topics,
                server,
                api_key,
                MODWORKER_HTTP__RETRY_ATTEMPTS="2",
                MODWORKER_HTTP__RETRY_BASE_WAIT_S="0.05",
                MODWORKER_HTTP__READ_TIMEOUT_S="0.5",
                MODWORKER_BATCH__MAX_SIZE="16",
                MODWORKER_SCORING__POISON_ATTEMPTS="3",
            )
        )
        trickle: list[dict] = []
        done = asyncio.Event()

        async def stream() -> None:  # a live stream: the backend keeps answering other batches
            while not done.is_set():  # stopped between batches: each one is produced whole or not at all
                batch = [{"id": f"s-{len(trickle) + i}", "text": f"stream {len(trickle) + i}"} for i in range(4)]
                await produce(broker.bootstrap_servers, topics.content, [event_record(e) for e in batch])
                trickle.extend(batch)
                await asyncio.sleep(0.2)

        streaming = asyncio.create_task(stream())
        try:
            dead = await wait_for_count(broker.bootstrap_servers, topics.dead_letter, 1, timeout_s=120)
        finally:
            done.set()
            await asyncio.wait_for(streaming, 30)
        events = first + trickle
        verdicts = await wait_for_count(broker.bootstrap_servers, topics.verdict, len(events) - 1, timeout_s=120)
        assert worker.stop(signal.SIGTERM) == 0

    assert len(dead) == 1
    headers = {key: value.decode() for key, value in dead[0].headers}
    assert json.loads(dead[0].value)["id"] == "p-37"
    assert headers[DeadLetterHeaders.ERROR_TYPE] == "backend_failed"
    assert "failed on this input alone 3 times" in headers[DeadLetterHeaders.MESSAGE]
    assert {json.loads(r.value)["event_id"] for r in verdicts} == {e["id"] for e in events} - {"p-37"}
    assert '"backend.poison_input"' in worker.log()

    offsets = await committed(broker.bootstrap_servers, topics.group_id, [topics.content])
    poison_tp = TopicPartition(topics.content, int(headers[DeadLetterHeaders.ORIGIN_PARTITION]))
    assert offsets[poison_tp] > int(headers[DeadLetterHeaders.ORIGIN_OFFSET]), "committed past the poison input"
    assert await read_all(broker.bootstrap_servers, topics.dead_letter, idle_s=0.5) == dead
