"""The bench's own Kafka I/O: topics, filling the inputs, paced input, reading outputs, commits.

Written around the embedded broker's gaps (BROKER.md): no reliance on end offsets
(reads stop at an expected count), committed offsets asked for named partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from worker.offline.bench.workload import BenchEvent


@dataclass(frozen=True)
class Cluster:
    """Where the bench runs: bootstrap servers, and whether the producer may be idempotent."""

    bootstrap: str
    idempotence: bool
    partitions: int = 4

    def producer(self, **overrides) -> AIOKafkaProducer:
        options = {
            "bootstrap_servers": self.bootstrap,
            "acks": "all",
            "enable_idempotence": self.idempotence,
            "linger_ms": 5,
            **overrides,
        }
        return AIOKafkaProducer(**options)


async def create_topics(cluster: Cluster, names: Iterable[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=cluster.partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def delete_topics(cluster: Cluster, names: Iterable[str]) -> None:
    """Best effort: a broker that cannot delete keeps them (the embedded one keeps the memory anyway)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(Exception):
            await admin.delete_topics(list(names))
    finally:
        await admin.close()


async def fill(
    cluster: Cluster,
    topic_of: Callable[[BenchEvent], str],
    events: Iterable[BenchEvent],
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Publish ``events`` (acks=all, keyed) before the consumer starts: the backlog."""
    producer = cluster.producer(linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    count = 0
    try:
        futures = []
        for event in events:
            futures.append(await producer.send(topic_of(event), event.value, key=event.key))
            count += 1
            if len(futures) >= 5_000:
                await asyncio.gather(*futures)
                futures.clear()
                if on_progress is not None:
                    on_progress(count)
        await asyncio.gather(*futures)
        if on_progress is not None:
            on_progress(count)
    finally:
        await producer.stop()
    return count


async def committed_total(cluster: Cluster, group: str, topics: Sequence[str]) -> int:
    """Sum of the group's committed offsets over the topics' partitions (0 when none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(cluster.partitions)]
        result = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return sum(meta.offset for meta in result.values() if meta is not None and meta.offset > 0)


@dataclass
class OutputReader:
    """Reads an output topic from the start, keeping each record's broker timestamp.

    ``read(expected)`` returns once ``expected`` records arrived (or ``timeout_s``); the
    consumer stays open and positioned at the end, so a later ``read`` sees only newer
    records. ``receive`` streams records with their arrival time for latency phases.
    """

    cluster: Cluster
    topic: str
    consumer: AIOKafkaConsumer | None = None
    timestamps_ms: list[int] = field(default_factory=list)

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.cluster.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            max_poll_records=5_000,
        )
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    async def read(self, expected: int, *, timeout_s: float) -> list[int]:
        """Broker timestamps (ms) of the next ``expected`` records, in arrival order."""
        assert self.consumer is not None
        stamps: list[int] = []
        deadline = time.monotonic() + timeout_s
        while len(stamps) < expected and time.monotonic() < deadline:
            batches = await self.consumer.getmany(timeout_ms=200)
            for records in batches.values():
                stamps.extend(r.timestamp for r in records)
        return stamps

    async def receive(self, on_record: Callable[[bytes, int, float], None], *, stop: asyncio.Event) -> None:
        """``on_record(value, timestamp_ms, time.time())`` for each new record until ``stop`` is set."""
        assert self.consumer is not None
        while not stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=20)
            now = time.time()
            for records in batches.values():
                for record in records:
                    on_record(record.value, record.timestamp, now)


async def paced(
    cluster: Cluster,
    topic_of: Callable[[BenchEvent], str],
    events: Sequence[BenchEvent],
    *,
    rate: float,
    on_sent: Callable[[BenchEvent, float], None],
) -> float:
    """Publish ``events`` at ``rate`` per second, each stamped with the time it was due.

    Every 5 ms the events due by then are sent; ``on_sent(event, t)`` records ``t``
    (``time.time()``), the event's Kafka timestamp. Returns the achieved rate.
    """
    producer = cluster.producer(linger_ms=0)
    await producer.start()
    started = time.time()
    try:
        futures = []
        sent = 0
        while sent < len(events):
            due = min(len(events), int((time.time() - started) * rate) + 1)
            now = time.time()
            for event in events[sent:due]:
                futures.append(
                    await producer.send(topic_of(event), event.value, key=event.key, timestamp_ms=int(now * 1000))
                )
                on_sent(event, now)
            sent = due
            await asyncio.sleep(0.005)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    elapsed = time.time() - started
    return len(events) / elapsed if elapsed > 0 else 0.0
