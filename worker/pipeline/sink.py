"""Sink stage: the one producer; publishes output records in order, acknowledged.

``publish`` enqueues a group of records; a single task takes everything queued at once,
appends it in enqueue order to one record batch per output partition
(``create_batch``/``send_batch``: one future per batch, not one ``send`` per record) and
calls each group's ``on_acked`` once the broker acknowledged every batch of that round
(acks=all). Records of one partition keep their enqueue order (a full batch is sent
before the next one is started), so the per-key order that ``ordering.KeySequencer``
establishes survives into Kafka. Keyed records go where aiokafka's ``DefaultPartitioner``
would put them (murmur2 of the key, as the Java client does); unkeyed ones at random.
A record the producer cannot deliver after its own retries is fatal (``on_error``): the
message stays uncommitted and is processed again after restart.

Revoked partitions: a group published with an ``origin`` slot is dropped unsent when the
slot is no longer owned by the time its round takes it (``on_dropped`` is called instead
of ``on_acked``, with the number of input messages the group concluded: the new owner
redoes them). ``settle`` waits for the rounds
already sent to be acknowledged; the revoke listener calls it after detaching the
revoked slots, so once the listener returns nothing more is published for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas import OUTPUT_HEADERS, DeadLetterHeaders
from worker.pipeline.partitioner import Partitioner
from worker.pipeline.types import Headers, OutRecord, PartitionOffsets, Record

__all__ = ["OutRecord", "Sink", "dead_letter_record", "record_size"]

_Group = tuple[list[OutRecord], Callable[[], None], PartitionOffsets | None, int]
"""Records published together, the callback for their acknowledgement, their input's
slot, and how many input messages they conclude."""

_BATCH_OVERHEAD_BYTES = 61 + 21
"""A v2 record batch's header plus one record's own framing, at most (varints at full width)."""
_HEADER_OVERHEAD_BYTES = 10


def record_size(record: OutRecord) -> int:
    """Bytes ``record`` takes alone in a record batch: what the broker's ``max.message.bytes``
    limits. An upper bound, a few bytes generous."""
    size = _BATCH_OVERHEAD_BYTES + len(record.key or b"") + len(record.value or b"")
    headers = record.headers
    if headers is OUTPUT_HEADERS:  # every verdict's and violation's: no generator per message
        return size + _OUTPUT_HEADERS_BYTES
    if headers:
        size += _headers_size(headers)
    return size


def _headers_size(headers: Headers) -> int:
    return sum(_HEADER_OVERHEAD_BYTES + len(k.encode()) + len(v) for k, v in headers)


_OUTPUT_HEADERS_BYTES = _headers_size(OUTPUT_HEADERS)


def dead_letter_record(
    record: Record, *, topic: str, stage: str, error_type: str, message: str, max_bytes: int | None = None
) -> OutRecord:
    """The original key, value and headers, plus the reason headers (see ``DeadLetterHeaders``).

    With ``max_bytes``, a record that would be bigger (``record_size``) is made to fit: the
    value is cut to a prefix, and the original headers dropped if that is not enough; the
    ``TRUNCATED`` and ``ORIGINAL_SIZE`` headers say so. Never raises for a size.
    """
    reason: Headers = [
        (DeadLetterHeaders.STAGE, stage.encode()),
        (DeadLetterHeaders.ERROR_TYPE, error_type.encode()),
        (DeadLetterHeaders.MESSAGE, message[:1000].encode("utf-8", "replace")),
        (DeadLetterHeaders.ORIGIN_TOPIC, record.topic.encode()),
        (DeadLetterHeaders.ORIGIN_PARTITION, str(record.partition).encode()),
        (DeadLetterHeaders.ORIGIN_OFFSET, str(record.offset).encode()),
    ]
    original = [(k, v) for k, v in (record.headers or ()) if k not in DeadLetterHeaders.ALL]
    value = record.value if record.value is not None else b""
    out = OutRecord(topic, record.key, value, original + reason)
    if max_bytes is None or record_size(out) <= max_bytes:
        return out
    reason += [(DeadLetterHeaders.TRUNCATED, b"value"), (DeadLetterHeaders.ORIGINAL_SIZE, str(len(value)).encode())]
    room = max_bytes - record_size(OutRecord(topic, record.key, b"", original + reason))
    if room < 0:  # the original headers alone are too big: drop them as well
        reason[-2] = (DeadLetterHeaders.TRUNCATED, b"value,headers")
        original = []
        room = max(0, max_bytes - record_size(OutRecord(topic, record.key, b"", reason)))
    return OutRecord(topic, record.key, value[:room], original + reason)


class Sink:
    """The one producer of the worker, with ordered, acknowledged publishing."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        on_error: Callable[[BaseException], None],
        on_dropped: Callable[[int], None] = lambda messages: None,
    ) -> None:
        self._producer = producer
        self._on_error = on_error
        self._on_dropped = on_dropped
        self._queue: asyncio.Queue[_Group | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._unacked = 0
        self._sending = False  # a round is being appended and sent
        self._acks: set[asyncio.Future[object]] = set()  # sent rounds not yet acknowledged

    async def start(self) -> None:
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="sink-publisher")

    def publish(
        self,
        records: list[OutRecord],
        on_acked: Callable[[], None],
        origin: PartitionOffsets | None = None,
        messages: int = 1,
    ) -> None:
        """Enqueue records (sent in call order); ``on_acked`` runs when all are acknowledged.

        The sink takes ``records``: the list is emptied once they are in their batches.

        With ``origin`` (the input partition's slot), the group is dropped unsent if the
        slot is no longer owned when its round takes it (see the module docstring);
        ``on_dropped(messages)`` then says how many input messages the group concluded.
        """
        self._unacked += 1
        self._queue.put_nowait((records, on_acked, origin, messages))

    async def settle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until every round already taken is sent and acknowledged.

        Returns False when the time ran out first. Groups still queued are not waited for:
        those of unowned slots are dropped when taken.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._sending:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        pending = [ack for ack in self._acks if not ack.done()]
        if pending:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            _, still = await asyncio.wait(pending, timeout=remaining)
            return not still
        return True

    @property
    def unacked(self) -> int:
        """Groups published but not yet acknowledged."""
        return self._unacked

    async def close(self) -> None:
        """Send what is queued, wait for acknowledgements, stop the producer.

        Groups of slots no longer owned are dropped, as in every round: at shutdown the app
        detaches every slot first, so only groups without ``origin`` are still sent."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
        await self._producer.flush()
        await self._producer.stop()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            taken = [await queue.get()]
            while not queue.empty() and len(taken) < _MAX_GROUPS_PER_ROUND:
                taken.append(queue.get_nowait())
            closing = None in taken
            groups = [group for group in taken[: taken.index(None) if closing else len(taken)] if group is not None]
            dropped = [group for group in groups if group[2] is not None and not group[2].owned]
            if dropped:  # their partition was revoked: the new owner publishes them
                groups = [group for group in groups if group[2] is None or group[2].owned]
                self._unacked -= len(dropped)
                for group in dropped:
                    self._on_dropped(group[3])
            if groups:
                self._sending = True
                try:
                    futures = await self._send_round(groups)
                except Exception as err:  # noqa: BLE001 - any send failure is fatal to the worker
                    self._unacked -= len(groups)
                    self._on_error(err)
                else:
                    acked = self._acked_callback([group[1] for group in groups])
                    if not futures:  # groups without records: nothing to wait for
                        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                        done.set_result(None)
                    else:
                        done = futures[0] if len(futures) == 1 else asyncio.gather(*futures)  # type: ignore[assignment]
                    self._acks.add(done)
                    done.add_done_callback(self._acks.discard)
                    done.add_done_callback(acked)
                finally:
                    self._sending = False
            if closing:
                return

    async def _send_round(self, groups: list[_Group]) -> list[asyncio.Future[Any]]:
        """Append every record to its partition's open batch, in order; send full and last batches."""
        producer = self._producer
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], Any] = {}  # aiokafka BatchBuilder per output partition
        futures: list[asyncio.Future[Any]] = []
        for records, *_ in groups:
            for record in records:
                topic = record.topic
                choices = partitions.get(topic)
                if choices is None:  # also for explicit partitions: it loads the topic's leaders
                    choices = partitions[topic] = sorted(await producer.partitions_for(topic))
                partition = record.partition
                if partition is None:
                    partition = _partition_of(record.key, choices)
                slot = (topic, partition)
                batch = batches.get(slot)
                if batch is None:
                    batch = batches[slot] = producer.create_batch()
                if batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))  # full
                    batch = batches[slot] = producer.create_batch()
                    batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers)
            # In their batches now. ``send_batch`` waits for each partition's previous batch,
            # so a round of up to 2,000 groups would otherwise hold its values until it ends.
            records.clear()
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

_partition_of = Partitioner()
"""aiokafka's ``DefaultPartitioner`` choice at a fraction of its CPU (``partitioner``)."""
