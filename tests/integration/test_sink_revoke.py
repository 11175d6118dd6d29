"""The sink and revoked partitions, on the broker: nothing is published for a partition
once the revoke listener returned (``Sink.publish(..., origin=slot)`` and ``Sink.settle``)."""

from __future__ import annotations

import asyncio

from aiokafka.structs import TopicPartition

from tests import kafka_support
from tests.kafka_support import read_all
from worker.config import KafkaSettings
from worker.pipeline.sink import Sink
from worker.pipeline.source import make_producer
from worker.pipeline.types import OutRecord, PartitionOffsets


def sink_on(bootstrap: str, dropped: list[int], errors: list[BaseException]) -> Sink:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, enable_idempotence=kafka_support.IDEMPOTENT)
    return Sink(make_producer(kafka), on_error=errors.append, on_dropped=dropped.append)


async def test_outputs_queued_for_a_revoked_partition_are_dropped_unsent(broker, topics) -> None:
    revoked = PartitionOffsets(TopicPartition(topics.content, 0))
    kept = PartitionOffsets(TopicPartition(topics.content, 1))
    dropped: list[int] = []
    errors: list[BaseException] = []
    acked: list[bytes] = []
    sink = sink_on(broker.bootstrap_servers, dropped, errors)
    await sink.start()
    try:
        for i in range(5):  # queued, not yet taken by the sink's task (no await in between)
            for slot, name in ((revoked, b"old"), (kept, b"new")):
                value = name + b"-%d" % i
                sink.publish(
                    [OutRecord(topics.verdict, value, value)], lambda value=value: acked.append(value), origin=slot
                )
        revoked.owned = False  # the revoke listener detached the slot
        assert await sink.settle(timeout_s=10)
        while sink.unacked:
            await asyncio.sleep(0.01)
    finally:
        await sink.close()

    published = [r.value for r in await read_all(broker.bootstrap_servers, topics.verdict, idle_s=0.5)]
    assert sorted(published) == [b"new-%d" % i for i in range(5)], "nothing of the revoked partition was sent"
    assert sorted(acked) == sorted(published)
    assert len(dropped) == 5, "each dropped group reported, so the app stops counting it in flight"
    assert errors == []


async def test_settle_returns_only_once_outputs_already_sent_are_acknowledged(broker, topics) -> None:
    slot = PartitionOffsets(TopicPartition(topics.content, 0))
    dropped: list[int] = []
    errors: list[BaseException] = []
    acked: list[int] = []
    sink = sink_on(broker.bootstrap_servers, dropped, errors)
    await sink.start()
    try:
        for i in range(200):
            sink.publish([OutRecord(topics.verdict, b"k", b"v%d" % i)], lambda i=i: acked.append(i), origin=slot)
        await asyncio.sleep(0)  # the sink's task takes the round and starts sending it
        slot.owned = False
        assert await sink.settle(timeout_s=10)
        settled_with = len(acked)
        assert settled_with + len(dropped) == 200, "every group taken before the revoke is acknowledged on return"
    finally:
        await sink.close()
    assert errors == []
    published = await read_all(broker.bootstrap_servers, topics.verdict, idle_s=0.5)
    assert len(published) == settled_with, "nothing was published after settle returned"
