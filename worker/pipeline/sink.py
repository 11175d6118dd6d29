"""Sink stage: publish verdicts, violations and dead letters, in per-key input order.

Two parts:

- ``KeySequencer`` releases results per (input partition, key) in input order, whatever
  order the concurrent backend calls finish in. Verdicts for one key are therefore
  published in the order their inputs were read.
- ``Sink`` owns the one producer. ``publish`` enqueues a group of records; a single task
  takes everything queued at once, appends it in enqueue order to one record batch per
  output partition (``create_batch``/``send_batch``: one future per batch, not one
  ``send`` per record) and calls each group's ``on_acked`` once the broker acknowledged
  every batch of that round (acks=all). Records of one partition keep their enqueue order
  (a full batch is sent before the next one is started), so per-key order survives into
  Kafka. Keyed records go where the producer's default partitioner would put them
  (murmur2 of the key, as the Java client does); unkeyed ones are spread at random.
  A record the producer cannot deliver after its own retries is fatal (``on_error``):
  the message stays uncommitted and is processed again after restart.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition

from schemas import DeadLetterHeaders
from worker.pipeline.decode import Job

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None = None


def dead_letter_record(record: ConsumerRecord, *, topic: str, stage: str, error_type: str, message: str) -> OutRecord:
    """The original key, value and headers, plus the reason headers (see ``DeadLetterHeaders``)."""
    reason: Headers = [
        (DeadLetterHeaders.STAGE, stage.encode()),
        (DeadLetterHeaders.ERROR_TYPE, error_type.encode()),
        (DeadLetterHeaders.MESSAGE, message[:1000].encode("utf-8", "replace")),
        (DeadLetterHeaders.ORIGIN_TOPIC, record.topic.encode()),
        (DeadLetterHeaders.ORIGIN_PARTITION, str(record.partition).encode()),
        (DeadLetterHeaders.ORIGIN_OFFSET, str(record.offset).encode()),
    ]
    original = [(k, v) for k, v in (record.headers or ()) if k not in DeadLetterHeaders.ALL]
    return OutRecord(topic, record.key, record.value if record.value is not None else b"", original + reason)


class KeySequencer:
    """Releases completed jobs of one (partition, key) strictly in the order they entered."""

    def __init__(self) -> None:
        self._queues: dict[tuple[TopicPartition, bytes], deque[Job]] = {}
        self._ready: dict[Job, Callable[[], None]] = {}
        self._waiting: set[Job] = set()  # entered, not yet released or dropped: O(1) membership

    def enter(self, job: Job) -> None:
        """Record the job's place in line. Call in input order, before it is batched."""
        key = (job.tp, job.key)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(job)
        self._waiting.add(job)

    def complete(self, job: Job, release: Callable[[], None]) -> None:
        """``release`` runs once every earlier job of the same key has been released."""
        if job not in self._waiting:
            release()  # not sequenced (its partition was dropped): nothing to wait for
            return
        key = (job.tp, job.key)
        queue = self._queues[key]
        self._ready[job] = release
        while queue and queue[0] in self._ready:
            head = queue.popleft()
            self._waiting.discard(head)
            self._ready.pop(head)()
        if not queue:
            del self._queues[key]

    def drop(self, tps: Iterable[TopicPartition]) -> int:
        """Forget the lines of revoked partitions; return how many completed jobs were
        waiting in them (never released: the caller stops counting them as in flight)."""
        revoked = set(tps)
        waiting = 0
        for key in [k for k in self._queues if k[0] in revoked]:
            for job in self._queues.pop(key):
                self._waiting.discard(job)
                waiting += self._ready.pop(job, None) is not None
        return waiting

    def __len__(self) -> int:
        return len(self._waiting)


class Sink:
    """The one producer of the worker, with ordered, acknowledged publishing."""

    def __init__(self, producer: AIOKafkaProducer, *, on_error: Callable[[BaseException], None]) -> None:
        self._producer = producer
        self._on_error = on_error
        self._queue: asyncio.Queue[tuple[list[OutRecord], Callable[[], None]] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._unacked = 0

    async def start(self) -> None:
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="sink-publisher")

    def publish(self, records: list[OutRecord], on_acked: Callable[[], None]) -> None:
        """Enqueue records (sent in call order); ``on_acked`` runs when all are acknowledged."""
        self._unacked += 1
        self._queue.put_nowait((records, on_acked))

    @property
    def unacked(self) -> int:
        """Groups published but not yet acknowledged."""
        return self._unacked

    async def close(self) -> None:
        """Send what is queued, wait for acknowledgements, stop the producer."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
        await self._producer.flush()
        await self._producer.stop()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            groups = [await queue.get()]
            while not queue.empty() and len(groups) < _MAX_GROUPS_PER_ROUND:
                groups.append(queue.get_nowait())
            closing = None in groups
            if closing:
                groups = groups[: groups.index(None)]
            if groups:
                try:
                    futures = await self._send_round(groups)
                except Exception as err:  # noqa: BLE001 - any send failure is fatal to the worker
                    self._unacked -= len(groups)
                    self._on_error(err)
                else:
                    acked = self._acked_callback([on_acked for _, on_acked in groups])
                    if not futures:  # groups without records: nothing to wait for
                        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                        done.set_result(None)
                    else:
                        done = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
                    done.add_done_callback(acked)
            if closing:
                return

    async def _send_round(self, groups: list[tuple[list[OutRecord], Callable[[], None]]]) -> list[asyncio.Future]:
        """Append every record to its partition's open batch, in order; send full and last batches."""
        producer = self._producer
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], Any] = {}  # aiokafka BatchBuilder per output partition
        futures: list[asyncio.Future] = []
        for records, _ in groups:
            for record in records:
                topic = record.topic
                choices = partitions.get(topic)
                if choices is None:
                    choices = partitions[topic] = sorted(await producer.partitions_for(topic))
                partition = _partition_of(record.key, choices)
                slot = (topic, partition)
                batch = batches.get(slot)
                if batch is None:
                    batch = batches[slot] = producer.create_batch()
                if batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))  # full
                    batch = batches[slot] = producer.create_batch()
                    batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers)
        for (topic, partition), batch in batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures

    def _acked_callback(self, acked: list[Callable[[], None]]) -> Callable[[asyncio.Future[object]], None]:
        def callback(future: asyncio.Future[object]) -> None:
            self._unacked -= len(acked)
            if future.cancelled():
                self._on_error(asyncio.CancelledError("publish cancelled"))
            elif (err := future.exception()) is not None:
                self._on_error(err)
            else:
                for on_acked in acked:
                    on_acked()

        return callback


_MAX_GROUPS_PER_ROUND = 2_000
"""Groups taken from the queue per round: bounds a round's batches and its ack latency."""


def _partition_of(key: bytes | None, partitions: list[int]) -> int:
    """The default partitioner's choice (``aiokafka.partitioner.DefaultPartitioner``)."""
    if key is None:
        return random.choice(partitions)
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
