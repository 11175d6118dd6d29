"""Oversized inputs and outputs through the whole worker on the broker.

The embedded broker enforces no ``max.message.bytes``, so the worker's own limit
(``MODWORKER_MAX_OUTPUT_BYTES``) is set low and every output record is checked against it.
"""

from __future__ import annotations

import json
import signal

import pytest

from schemas import DeadLetterHeaders
from tests.conftest import worker_env
from tests.kafka_support import produce, read_all, wait_for_count
from worker.pipeline.sink import record_size
from worker.pipeline.types import OutRecord

pytestmark = pytest.mark.slow

LIMIT = 8_192


async def test_oversized_dead_letters_are_truncated_and_oversized_verdicts_trimmed_never_fatal(
    broker, topics, mistral, api_key, spawn_worker
) -> None:
    not_json = b"{" + b"x" * 20_000  # dead-lettered as not_json: its copy would exceed the limit
    big_metadata = {"id": "big", "text": "hello", "metadata": {"blob": "m" * 20_000}}
    small = {"id": "small", "text": "hello again", "metadata": {"a": 1}}
    await produce(
        broker.bootstrap_servers,
        topics.content,
        [(b"bad", not_json), (b"big", json.dumps(big_metadata).encode()), (b"small", json.dumps(small).encode())],
    )
    worker = spawn_worker(worker_env(broker, topics, mistral, api_key, MODWORKER_MAX_OUTPUT_BYTES=str(LIMIT)))
    verdicts = await wait_for_count(broker.bootstrap_servers, topics.verdict, 2, timeout_s=60)
    dead = await wait_for_count(broker.bootstrap_servers, topics.dead_letter, 1, timeout_s=60)
    assert worker.stop(signal.SIGTERM) == 0, "an oversized output is never fatal"

    [letter] = dead
    headers = {key: value.decode() for key, value in letter.headers}
    assert headers[DeadLetterHeaders.ERROR_TYPE] == "not_json"
    assert headers[DeadLetterHeaders.TRUNCATED] == "value"
    assert headers[DeadLetterHeaders.ORIGINAL_SIZE] == str(len(not_json))
    assert not_json.startswith(letter.value)
    by_id = {json.loads(r.value)["event_id"]: json.loads(r.value) for r in verdicts}
    assert by_id["big"]["trimmed"] is True and by_id["big"]["metadata"] is None
    assert by_id["small"]["trimmed"] is False and by_id["small"]["metadata"] == {"a": 1}
    for topic in topics.outputs:
        for record in await read_all(broker.bootstrap_servers, topic, idle_s=0.5):
            out = OutRecord(topic, record.key, record.value, list(record.headers))
            assert record_size(out) <= LIMIT, f"a record over the limit on {topic}"
