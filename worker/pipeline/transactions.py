"""Transactions stage (``MODWORKER_DELIVERY=exactly_once``): each input partition's outputs
and its next offset commit together, in one Kafka transaction, or not at all.

``TransactionalSink`` stands where ``sink.Sink`` stands in at-least-once mode (the same
``publish``/``settle``/``close``), with one transactional ``AIOKafkaProducer`` per owned
input partition. Its transactional id is stable per (group id, topic, partition)
(``transactional_id``), so the next owner's ``init_transactions`` fences this member's
producer of that partition, and aborts its open transaction. One producer per partition,
because aiokafka's TxnOffsetCommit is v0: no KIP-447 fencing by group generation, so a
zombie can only be fenced by its transactional id (Kafka's pre-2.5 design, also Faust's).

Contract:

- ``publish(records, on_acked, origin)`` takes a group of one input partition (its slot
  ``origin``) into that partition's buffer, in call order, and calls ``on_acked`` at once:
  the message is *finished* (``offsets``) when its outputs are in its partition's buffer.
  Nothing is sent yet. A group whose slot is not owned, or whose partition is lost (fenced,
  or its transaction failed), is dropped (``on_dropped``). Groups without ``origin`` (tombstones of forgotten
  conversations) go to the buffer of the conversation partition they name, or nowhere.
- A *seal* is a point of a partition's buffer where every finished offset of the slot lies
  below its ``position`` (``PartitionOffsets.finished_ahead == 0``): the buffer up to
  there holds exactly the outputs of the offsets below ``position``. Only sealed prefixes
  are committed, so a transaction never holds an output of an offset it does not commit
  (outputs finish out of order; a replay from the committed offset redoes exactly the rest).
- ``commit(offsets)`` (the ``Committer``'s commit function; only the keys of ``offsets``
  count) starts, per named partition without one under way, a background task: under
  the partition's lock (never two transactional calls at once on one producer: aiokafka
  #1098), one transaction: begin, the sealed records in buffer order,
  ``send_offsets_to_transaction`` of the seal's position, commit; no consumer commit.
  The transaction is bounded by ``call_timeout_s`` (aiokafka #1145: a transaction can hang
  for good when a broker goes away; seen here too when a produce meets a leader not yet
  ready). Returns at once: one stuck partition holds up neither the consume loop nor the
  others.
- A failed transaction (an error: aborted, bounded; a timeout: the producer is stuck and
  only dropped, stopped in the background) *loses* the partition: its buffer is dropped,
  nothing more is published for it, and ``on_lost(tp)`` tells the app, which holds it and
  asks the group to rebalance. It is never retried here with a fresh producer: a member
  cannot tell on its own whether it still owns the partition (after a pause past the
  session timeout, its stuck transaction times out before its heartbeat learns that the
  group moved on), and a fresh producer's init would fence the rightful owner and commit
  outputs judged before it. The only place a producer starts is ``assigned``, after which
  the app reads from the committed offsets as they stand then: whatever this member
  commits was read after its producer fenced every earlier one. (aiokafka's
  TxnOffsetCommit is v0, without the group generation that would let the broker refuse a
  stale member's offsets.) Whether the failed transaction committed or not, the new owner
  reads from the committed offset: nothing is lost or written twice.
- ``flush(tps, timeout_s)`` (revoke, shutdown): waits for the partitions' transactions
  under way, then commits what is sealed now, within ``timeout_s``.
- Fenced (``ProducerFenced``): the partition's producer is a zombie. The partition is lost
  as above, counted (``transactions_total{outcome="fenced"}``) and logged once. Never raised.
- ``on_settled(n)``: ``n`` finished messages left the buffers (committed, or dropped on
  revoke, loss or close); until then they count as in flight (backpressure).
- ``assigned(tps)`` starts the producers of new partitions (init_transactions fences the
  previous owner and waits for its transaction to end); raises ``TransactionsUnavailable``
  when that cannot be done in time. The app then re-reads the committed offsets, which
  only now are stable. ``revoked(tps)`` drops what was not committed and closes their
  producers (bounded); the revoke listener commits what finished before calling it.

Outside the transactions: the shadow topic (``shadow``, its own producer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced
from aiokafka.structs import TopicPartition

from worker.config import KafkaSettings
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.source import make_producer
from worker.pipeline.types import OutRecord, PartitionOffsets

log = structlog.get_logger("worker.pipeline.transactions")

_FENCED = (ProducerFenced, InvalidProducerEpoch)
_PRODUCER_BATCH_BYTES = 512 * 1024


class TransactionsUnavailable(Exception):
    """A partition's transactional producer could not be started (init_transactions)."""


def transactional_id(prefix: str, group_id: str, tp: TopicPartition) -> str:
    """The transactional id of ``tp``'s producer: the same on every member of the group."""
    return f"{prefix}{group_id}-{tp.topic}-{tp.partition}"


@dataclass(eq=False)
class _Partition:
    """One owned input partition: its producer, its buffer of groups, its seal."""

    tp: TopicPartition
    producer: AIOKafkaProducer | None = None
    slot: PartitionOffsets | None = None
    groups: list[list[OutRecord]] = field(default_factory=list)
    sealed: int = 0
    """Groups of ``groups`` up to the seal."""
    sealed_offset: int | None = None
    sealed_total: int = 0
    """``slot.finished_total`` at the seal."""
    committed_offset: int | None = None
    committed_total: int = 0
    """``slot.finished_total`` already settled (committed or dropped)."""
    lost: bool = False
    """Fenced, or a transaction failed: this member commits nothing more of it."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    """The background commit of this partition (one at a time)."""
    again: bool = False
    """A commit was asked for while one was under way: the task commits once more after it."""

    @property
    def uncommitted(self) -> int:
        return (self.slot.finished_total if self.slot is not None else 0) - self.committed_total

    def take_all(self) -> int:
        """Drop the whole buffer; return the finished messages it held."""
        dropped = self.uncommitted
        self.groups.clear()
        self.sealed = 0
        self.sealed_total = self.committed_total = self.slot.finished_total if self.slot is not None else 0
        return dropped


class TransactionalSink:
    """Per-partition transactional publishing (see the module docstring)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        group_id: str,
        prefix: str,
        transaction_timeout_ms: int,
        call_timeout_s: float,
        conversation_topic: str,
        on_settled: Callable[[int], None],
        on_lost: Callable[[TopicPartition], None],
        on_dropped: Callable[[int], None] = lambda messages: None,
    ) -> None:
        self._kafka = kafka
        self._group_id = group_id
        self._prefix = prefix
        self._transaction_timeout_ms = transaction_timeout_ms
        self._timeout_s = call_timeout_s
        self._conversation_topic = conversation_topic
        self._on_settled = on_settled
        self._on_lost = on_lost
        self._on_dropped = on_dropped
        self._parts: dict[TopicPartition, _Partition] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    # -- the Sink's surface ---------------------------------------------------------

    async def start(self) -> None:
        """Nothing to start: producers come with assigned partitions."""

    def publish(
        self,
        records: list[OutRecord],
        on_acked: Callable[[], None],
        origin: PartitionOffsets | None = None,
        messages: int = 1,
    ) -> None:
        """Buffer a group for its partition's next transaction (see the module docstring);
        a dropped group calls ``on_dropped(messages)``."""
        if origin is None:
            self._publish_unowned(records, on_acked)
            return
        part = self._parts.get(origin.tp)
        if part is None or part.lost or not origin.owned:
            self._on_dropped(messages)
            return
        if part.slot is not origin:
            if part.slot is not None:  # an offset reset: what the old slot buffered is read again
                self._settle(part.take_all())
            part.slot = origin
            part.sealed_total = part.committed_total = origin.finished_total
        part.groups.append(records)
        on_acked()
        if origin.finished_ahead == 0:
            part.sealed = len(part.groups)
            part.sealed_offset = origin.position
            part.sealed_total = origin.finished_total

    def _publish_unowned(self, records: list[OutRecord], on_acked: Callable[[], None]) -> None:
        by_partition: dict[TopicPartition, list[OutRecord]] = {}
        for record in records:
            if record.partition is not None:
                by_partition.setdefault(TopicPartition(self._conversation_topic, record.partition), []).append(record)
        for tp, group in by_partition.items():
            part = self._parts.get(tp)
            if part is not None and not part.lost:
                # Not part of any seal's accounting: it rides with whichever transaction
                # commits past it (a lost tombstone only brings a conversation back).
                part.groups.append(group)
        on_acked()

    async def settle(self, timeout_s: float) -> bool:
        """Nothing is in flight outside ``commit``: True at once."""
        return True

    @property
    def unacked(self) -> int:
        return 0

    @property
    def uncommitted(self) -> int:
        """Finished messages of all partitions not yet committed (still in flight)."""
        return sum(part.uncommitted for part in self._parts.values())

    def lost(self) -> list[TopicPartition]:
        """Partitions this member can no longer commit (fenced, or a transaction failed)."""
        return [tp for tp, part in self._parts.items() if part.lost]

    async def close(self) -> None:
        """Drop what was not committed, close every producer (bounded)."""
        await self.revoked(list(self._parts))
        if self._stopping:
            await asyncio.wait(set(self._stopping))

    # -- rebalance ------------------------------------------------------------------

    async def assigned(self, tps: list[TopicPartition]) -> None:
        """Start the new partitions' producers, fencing their previous owners.

        Raises ``TransactionsUnavailable`` when one cannot start within the call timeout."""
        new = [tp for tp in tps if tp not in self._parts]
        for tp in new:
            self._parts[tp] = _Partition(tp)
        results = await asyncio.gather(*(self._start_producer(self._parts[tp]) for tp in new), return_exceptions=True)
        for tp, result in zip(new, results, strict=True):
            if isinstance(result, BaseException):
                raise TransactionsUnavailable(
                    f"exactly-once: cannot start the transactional producer of {tp.topic}-{tp.partition} "
                    f"(id {transactional_id(self._prefix, self._group_id, tp)!r}): {type(result).__name__}: {result}"
                ) from None

    async def revoked(self, tps: list[TopicPartition]) -> None:
        """Drop the uncommitted outputs of ``tps`` and close their producers (bounded)."""
        parts = [part for tp in tps if (part := self._parts.pop(tp, None)) is not None]
        await asyncio.gather(*(self._drop(part) for part in parts))

    async def _drop(self, part: _Partition) -> None:
        task = part.task
        if task is not None and not task.done():  # its producer is closed below: nothing to wait for
            task.cancel()
            await asyncio.wait({task})
        async with part.lock:  # a commit under way (the consume loop's) ends first
            self._settle(part.take_all())
            await self._stop_producer(part)

    # -- committing -----------------------------------------------------------------

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Start a transaction for each named partition that has none under way, in the
        background, and return: one stuck partition (aiokafka #1145) holds up neither the
        consume loop nor the other partitions. A failed one loses its partition."""
        for tp in offsets:
            part = self._parts.get(tp)
            if part is None:
                continue
            if part.task is not None and not part.task.done():
                part.again = True  # what was sealed meanwhile must not wait for new input
            else:
                part.task = asyncio.create_task(
                    self._commit_until_done(part), name=f"transaction-{tp.topic}-{tp.partition}"
                )

    async def flush(self, tps: list[TopicPartition] | None, timeout_s: float) -> bool:
        """Commit what is sealed in ``tps`` (default: all) now, waiting for transactions
        under way first; at most ``timeout_s``. True when every one committed (or had nothing
        this member can still commit: fenced or lost before)."""
        parts = [part for tp in (tps if tps is not None else list(self._parts)) if (part := self._parts.get(tp))]
        if not parts:
            return True
        try:
            results = await asyncio.wait_for(asyncio.gather(*(self._flush(part) for part in parts)), timeout_s)
        except TimeoutError:
            log.warning(Event.TRANSACTION_FAILED, stage="flush", timeout_s=timeout_s, partitions=_names(parts))
            return False
        return all(results)

    async def _flush(self, part: _Partition) -> bool:
        task = part.task
        if task is not None and not task.done():
            await asyncio.wait({task})
        return await self._commit(part)

    async def _commit_until_done(self, part: _Partition) -> None:
        """Commit, and again while more was sealed meanwhile; a failure loses the partition."""
        while self._parts.get(part.tp) is part and not part.lost:
            part.again = False
            try:
                if not await self._commit(part) or not part.again:
                    return
            except Exception as err:  # noqa: BLE001 - a bug must not leave the partition stranded silently
                log.error(Event.TRANSACTION_FAILED, partition=_names([part])[0], error=f"{type(err).__name__}: {err}")
                await self._stop_producer(part)
                self._lose(part)
                return

    async def _commit(self, part: _Partition) -> bool:
        """Commit ``part``'s sealed prefix. True when committed (or nothing to do, or fenced);
        False when the transaction failed (the partition is lost)."""
        async with part.lock:
            if part.lost or part.sealed_offset is None:
                return True
            if part.sealed == 0 and part.sealed_offset == part.committed_offset:
                return True
            producer = part.producer
            if producer is None:  # revoked meanwhile: its producer is gone with it
                return True
            # Publishing goes on while this transaction runs: it appends groups and moves
            # the seal, so what this transaction holds is fixed here.
            count, offset, total = part.sealed, part.sealed_offset, part.sealed_total
            try:
                await self._bounded(self._transaction(producer, part.tp, part.groups[:count], offset))
            except Exception as err:  # noqa: BLE001 - whatever failed, the transaction is fenced or aborted
                # A fence found by the producer's background sender shows up as whatever
                # the next step meets (IllegalOperation from send, an AssertionError of its
                # state machine): the sender's own end says what happened.
                if (fence := _fenced(producer, err)) is not None:
                    self._fence(part, fence)
                    return True
                await self._abort(part, err)
                self._lose(part)
                return False
            self._committed_up_to(part, count, offset, total)
            metrics.transactions("committed").inc()
            return True

    async def _transaction(
        self, producer: AIOKafkaProducer, tp: TopicPartition, groups: list[list[OutRecord]], offset: int
    ) -> None:
        await producer.begin_transaction()
        futures: list[asyncio.Future[Any]] = []
        for records in groups:
            for record in records:
                futures.append(
                    await producer.send(
                        record.topic, record.value, key=record.key, partition=record.partition, headers=record.headers
                    )
                )
        if futures:
            await asyncio.gather(*futures)
        await producer.send_offsets_to_transaction({tp: offset}, self._group_id)
        await producer.commit_transaction()

    def _committed_up_to(self, part: _Partition, count: int, offset: int, total: int) -> None:
        """The first ``count`` groups committed with ``offset``: out of the buffer."""
        del part.groups[:count]
        part.sealed -= count
        settled = total - part.committed_total
        part.committed_offset = offset
        part.committed_total = total
        self._settle(settled)

    async def _abort(self, part: _Partition, err: BaseException) -> None:
        """Abort the failed transaction and drop the producer. After a timeout the
        producer is stuck (aiokafka #1145: its abort and its stop would hang as well): it is
        only dropped; the next owner's init aborts the transaction broker-side, or waits for
        its commit to end, before that owner reads the committed offset."""
        metrics.transactions("aborted").inc()
        log.warning(
            Event.TRANSACTION_ABORTED,
            partition=f"{part.tp.topic}-{part.tp.partition}",
            error=f"{type(err).__name__}: {err}",
        )
        producer = part.producer
        stuck = isinstance(err, TimeoutError)
        if not stuck and producer is not None and producer._txn_manager is not None:  # no public state
            manager = producer._txn_manager
            if manager.is_in_transaction() or manager.state.name == "ABORTABLE_ERROR":
                try:
                    await self._bounded(producer.abort_transaction())
                except Exception as failed:  # noqa: BLE001 - the replacement producer's init aborts it
                    if (fence := _fenced(producer, failed)) is not None:
                        self._fence(part, fence)
                        return
        await self._stop_producer(part)

    # -- producers ------------------------------------------------------------------

    async def _start_producer(self, part: _Partition) -> None:
        producer = make_producer(
            self._kafka,
            enable_idempotence=True,
            transactional_id=transactional_id(self._prefix, self._group_id, part.tp),
            transaction_timeout_ms=self._transaction_timeout_ms,
            max_batch_size=_PRODUCER_BATCH_BYTES,
        )
        try:
            await self._bounded(producer.start())  # InitProducerId: fences the previous owner
        except BaseException:
            await _stop_quietly(producer, self._timeout_s)
            raise
        part.producer = producer

    async def _stop_producer(self, part: _Partition) -> None:
        """Drop ``part``'s producer and stop it in the background (bounded): a stuck one
        must not hold up the revoke listener or the retry; ``close`` waits for them."""
        producer, part.producer = part.producer, None
        if producer is not None:
            task = asyncio.create_task(_stop_quietly(producer, self._timeout_s), name="transactional-producer-stop")
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _fence(self, part: _Partition, err: BaseException) -> None:
        if part.lost:
            return
        dropped = part.uncommitted
        metrics.transactions("fenced").inc()
        log.warning(
            Event.PRODUCER_FENCED,
            partition=f"{part.tp.topic}-{part.tp.partition}",
            transactional_id=transactional_id(self._prefix, self._group_id, part.tp),
            dropped=dropped,
            error=type(err).__name__,
        )
        self._lose(part)

    def _lose(self, part: _Partition) -> None:
        """This member commits nothing more of ``part``: drop its buffer, tell the app."""
        if part.lost:
            return
        part.lost = True
        self._settle(part.take_all())
        self._on_lost(part.tp)

    def _settle(self, count: int) -> None:
        if count:
            self._on_settled(count)

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(call, self._timeout_s)


def _names(parts: list[_Partition]) -> list[str]:
    return [f"{part.tp.topic}-{part.tp.partition}" for part in parts]


def _fenced(producer: AIOKafkaProducer, err: BaseException) -> BaseException | None:
    """The fence ``err`` is or stands for (the producer's sender died of it: a newer
    producer with the same transactional id exists), else None."""
    if isinstance(err, _FENCED):
        fence: BaseException = err
        return fence
    task = producer._sender.sender_task  # aiokafka keeps the sender's fate only there
    cause: BaseException | None = (
        task.exception() if task is not None and task.done() and not task.cancelled() else None
    )
    return cause if isinstance(cause, _FENCED) else None


async def _stop_quietly(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop a producer that may hang (a broker gone, aiokafka #1145): bounded, never raises."""
    try:
        await asyncio.wait_for(producer.stop(), timeout_s)
    except Exception as err:  # noqa: BLE001 - a producer being discarded may fail in any way
        log.debug(Event.TRANSACTION_FAILED, stage="producer_stop", error=f"{type(err).__name__}: {err}")
    manager = producer._txn_manager
    if manager is not None:  # its fence or abort was told already: not "never retrieved" at exit
        waiter = manager.wait_for_transaction_end()
        if waiter is not None and waiter.done() and not waiter.cancelled():
            waiter.exception()


__all__ = [
    "TransactionalSink",
    "TransactionsUnavailable",
    "transactional_id",
]
