"""Oversized inputs and outputs through the whole worker on the broker.

Two limits: the worker's own (``MODWORKER_MAX_OUTPUT_BYTES``), and the output topics'
``max.message.bytes``, which Apache Kafka enforces and the worker reads at start-up.
Every output record is checked against the limit in force.
"""

from __future__ import annotations

import json
import signal

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from schemas import DeadLetterHeaders
from tests.conftest import worker_env
from tests.kafka_support import log_events, produce, read_all, set_topic_configs, wait_for_count
from worker.config import KafkaSettings
from worker.pipeline.sink import record_size
from worker.pipeline.topic_limits import OutputLimit, output_limit
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


BROKER_LIMIT = 16_384


async def test_the_output_topics_max_message_bytes_is_read_and_every_output_fits_it(
    broker, topics, mistral, api_key, spawn_worker
) -> None:
    """The worker's own limit left at its 1 MB default; the broker's is 16 KB on each output
    topic. The worker reads it, and what would not fit is trimmed or truncated, never fatal."""
    if broker.embedded:
        pytest.skip("Tansu enforces no max.message.bytes")
    await set_topic_configs(broker.bootstrap_servers, topics.outputs, {"max.message.bytes": str(BROKER_LIMIT)})
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    limit = await output_limit(kafka, topics.outputs, 1_048_588)
    assert limit == OutputLimit(BROKER_LIMIT, f"max.message.bytes of {sorted(topics.outputs)[0]}")
    assert (await output_limit(kafka, topics.outputs, 8_192)).max_bytes == 8_192, "the smaller limit wins"
    # The limit is real: a record over it is refused by the broker itself.
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, max_request_size=4 * BROKER_LIMIT)
    await producer.start()
    try:
        with pytest.raises(MessageSizeTooLargeError):
            await producer.send_and_wait(topics.verdict, b"v" * (2 * BROKER_LIMIT))
    finally:
        await producer.stop()

    not_json = b"{" + b"x" * 40_000
    big_metadata = {"id": "big", "text": "hello", "metadata": {"blob": "m" * 40_000}}
    await produce(
        broker.bootstrap_servers, topics.content, [(b"bad", not_json), (b"big", json.dumps(big_metadata).encode())]
    )
    worker = spawn_worker(worker_env(broker, topics, mistral, api_key))
    [verdict] = await wait_for_count(broker.bootstrap_servers, topics.verdict, 1, timeout_s=60)
    [letter] = await wait_for_count(broker.bootstrap_servers, topics.dead_letter, 1, timeout_s=60)
    assert worker.stop(signal.SIGTERM) == 0, "the broker's limit is never fatal"
    assert [e["max_bytes"] for e in log_events(worker.log(), "outputs.limit")] == [BROKER_LIMIT]
    assert json.loads(verdict.value)["trimmed"] is True
    assert dict(letter.headers)[DeadLetterHeaders.TRUNCATED] == b"value"
    for record in (verdict, letter):
        assert record_size(OutRecord(record.topic, record.key, record.value, list(record.headers))) <= BROKER_LIMIT
