"""The consumer's fetch bounds (``MODWORKER_KAFKA__MAX_PARTITION_FETCH_BYTES``,
``MODWORKER_KAFKA__FETCH_MAX_BYTES``) bound memory, not the largest record: a record batch
larger than both still comes, whole, in a later fetch (KIP-74: the broker returns the first
batch of the first non-empty partition whatever the bounds, and an empty set, not a partial
batch, for a later partition whose first batch does not fit). aiokafka shuffles the
partitions of each fetch, so every partition gets its turn first."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from tests.kafka_support import create_topics
from worker.config import Settings
from worker.pipeline.source import client_options, fetch_options

pytestmark = pytest.mark.real_kafka

LARGE = 300_000  # bytes: well above both bounds, below Kafka's default max.message.bytes (1 MiB)


async def test_records_larger_than_both_fetch_bounds_are_all_read_in_order(broker, topics):
    topic = topics.content + ".large"
    await create_topics(broker.bootstrap_servers, [topic], partitions=4)
    # Per partition: small, large, small, small, large, ... in offset order.
    values_sent = [
        (b"L" if i % 3 == 1 else b"s") + str(i).encode().rjust(7) * (LARGE // 7 if i % 3 == 1 else 20)
        for i in range(48)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, v, partition=i % 4) for i, v in enumerate(values_sent)])
    finally:
        await producer.stop()
    settings = Settings(
        kafka={
            "bootstrap_servers": broker.bootstrap_servers,
            "max_partition_fetch_bytes": 65_536,
            "fetch_max_bytes": 131_072,
        }
    )
    consumer = AIOKafkaConsumer(
        **client_options(settings.kafka), **fetch_options(settings.kafka), group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        read: dict[int, list[int]] = {p: [] for p in range(4)}
        values = []
        async with asyncio.timeout(60):
            while len(values) < len(values_sent):
                batches = await consumer.getmany(timeout_ms=500)  # raises RecordTooLargeError if one were cut
                for tp, got in batches.items():
                    read[tp.partition] += [r.offset for r in got]
                    values += [r.value for r in got]
    finally:
        await consumer.stop()
    assert sorted(values) == sorted(values_sent)  # every record, none cut or skipped
    for offsets in read.values():
        assert offsets == list(range(len(offsets)))  # each partition in offset order, no gap
    assert min(len(v) for v in values if v[:1] == b"L") > 2 * settings.kafka.fetch_max_bytes
    assert all(read.values())  # records in every partition
