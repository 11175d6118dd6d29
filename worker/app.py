"""The worker: the consume loop and the wiring of the stages. Each stage is a file of
``worker/pipeline``; this module only connects them and owns the loop.

One record's way: ``source`` reads it -> the offset ``tracker`` tracks it in its
partition's slot -> ``decode`` makes a ``Job`` (or a dead letter) -> ``conversation_stage``
gives a conversation turn its context and records its state change -> ``outputs.expect``
holds its place in its key's line -> ``batching`` gathers jobs into calls -> ``scoring``
scores a batch under the fail policy -> ``outputs.conclude`` publishes verdict, violation
or dead letter through the ``sink`` in key order -> the broker's ack finishes the offset
-> ``commit`` commits finished prefixes. A record of the reviews topic (reviews on) skips
batching and scoring: ``reviews`` judges it at once and ``outputs.supersede`` publishes the
superseding verdict (or ``outputs.dead_letter`` the refused decision).

Guarantees (the README's "Delivery guarantees" states them for users), and the unit that
keeps each:

- At-least-once (``offsets``, ``outputs``, ``commit``). A message's offset is committed only
  once it and every message before it in its partition is *finished*: its verdict (and
  violation, if flagged) or its dead letter acknowledged by the broker with acks=all. A
  crash replays from the last commit.
- Exactly-once (``transactions``, with ``MODWORKER_DELIVERY=exactly_once``). Each input
  partition's outputs (verdicts, violations, dead letters, conversation state changes) and
  its next offset commit in one transaction of that partition's own producer, at the commit
  interval or count; no consumer commit is made. For readers with
  ``isolation_level=read_committed``, each input has its outputs once, whatever crashes,
  rebalances or zombies do: a new owner's producer fences the old one's. The shadow topic
  stays outside. A finished message stays in flight until its transaction commits.
- Per-key order (``ordering``). Verdicts for one key (one input partition) are published
  in input order, even though backend calls run concurrently.
- Bounded memory (``backpressure``, ``span_guard``). At most ``max_in_flight`` messages and
  about ``max_in_flight_bytes`` of input values are read and unfinished; at either cap all
  partitions are paused, and resumed once both halved (a single larger record passes
  alone). A partition whose uncommitted span (offsets from its lowest unfinished one on)
  passes ``max_uncommitted_span`` is paused on its own until it halves.
- Rebalance (here). Revoked partitions are not read any more; their queued work is
  dispatched and may finish within ``revoke_timeout_s``; what finished is committed; the
  rest is abandoned (its results are never published or committed by this member) and
  the new owner processes it again. Outputs of theirs still queued in the sink are
  dropped unsent, and those already sent are waited for (``Sink.settle``), so nothing is
  published for them once the listener returned.
- Shutdown (here; ``stop()``, wired to SIGTERM/SIGINT): stop reading, dispatch what is
  queued, wait up to ``drain_timeout_s`` for in-flight work, commit; drop the outputs still
  queued in the sink (their offsets stay uncommitted: the next owner redoes them), close
  the sink, then leave the group: nothing is published once this member left.
- Backend outage (``scoring``). The fail policy decides once the backend gives up: ``wait``
  retries the batch until it succeeds, ``review``/``allow`` publish degraded verdicts.
  ``BackendAuthError`` and an undeliverable output stop the worker (``WorkerFatal``)
  without committing the affected messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.structs import TopicPartition

from schemas import Kind
from worker.backends.base import Backend
from worker.config import Settings
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.backpressure import InFlight
from worker.pipeline.batching import MicroBatcher
from worker.pipeline.commit import CommitPolicy, Committer
from worker.pipeline.conversation_stage import ConversationStage
from worker.pipeline.decode import Decoder
from worker.pipeline.offsets import OffsetTracker
from worker.pipeline.outputs import Outputs
from worker.pipeline.policy import Policy
from worker.pipeline.reviews import ReviewRefused, ReviewStage
from worker.pipeline.scoring import Scorer
from worker.pipeline.shadow import Shadow
from worker.pipeline.sink import Sink
from worker.pipeline.source import Source, access_denied, authentication_failure, make_producer
from worker.pipeline.span_guard import SpanGuard
from worker.pipeline.statements import StatementBuilder
from worker.pipeline.topic_limits import output_limit
from worker.pipeline.transactions import TransactionalSink, TransactionsUnavailable
from worker.pipeline.types import DecodeFailure, Job, PartitionOffsets, Record
from worker.pipeline.verdict_data import Verdict
from worker.pipeline.verdicts import VerdictBuilder, unscored_action

log = structlog.get_logger("worker.app")

_POLL_TIMEOUT_MS = 100
_PRODUCER_BATCH_BYTES = 512 * 1024
"""Record batch size of the output producer. aiokafka keeps one produce request in flight
per broker, holding at most one batch per partition: at its default of 16 KB (~23
verdicts) publishing fell behind the pipeline, and verdicts waited in the sink for up to
~0.6 s (docs/benchmarks.md). 512 KB stays under Kafka's default 1 MB max.message.bytes."""


_TRANSACTIONS_HOLD = "transactions-start"
_LOST_HOLD = "transactions-lost"

_SETTLE_MIN_S = 1.0
"""On revoke, at least this long for outputs already sent to be acknowledged, even when
the revoke timeout is spent (the rebalance timeout allows 5 s beyond it)."""


class WorkerFatal(Exception):
    """The worker cannot go on (bad credentials, outputs undeliverable). Exit non-zero."""


class ModerationWorker:
    """One worker process. ``await run()`` until ``stop()`` is called or a fatal error.

    Implements ``worker.ops.status.WorkerStatus`` for the probes and metrics.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend,
        policy: Policy,
        fallback: Backend | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.policy = policy
        self.fallback = fallback
        self.shadow = shadow
        self._decoder = Decoder(
            content_topic=settings.content_topic,
            conversation_topic=settings.conversation_topic,
            max_text_chars=settings.max_text_chars,
        )
        self._batcher = MicroBatcher(
            max_size=settings.batch.max_size,
            max_bytes=settings.batch.max_bytes,
            max_wait_s=settings.batch.max_wait_ms / 1000,
            on_batch=self._dispatch,
        )
        self._tracker = OffsetTracker()
        self._in_flight = InFlight(
            settings.max_in_flight, max_bytes=settings.max_in_flight_bytes, held_bytes=self._tracker.pending_bytes
        )
        self._span_guard = SpanGuard(settings.max_uncommitted_span)
        self._txns: TransactionalSink | None = None
        """Exactly-once only: the per-partition transactional publisher, in the sink's place."""
        self._sink: Sink | TransactionalSink
        if settings.delivery == "exactly_once":
            eos = settings.exactly_once
            self._sink = self._txns = TransactionalSink(
                settings.kafka,
                group_id=settings.group_id,
                prefix=eos.transactional_id_prefix,
                transaction_timeout_ms=eos.transaction_timeout_ms,
                call_timeout_s=eos.call_timeout_s,
                conversation_topic=settings.conversation_topic,
                on_settled=self._settled,
                on_lost=self._lost,
                on_dropped=self._abandon,
            )
        else:
            self._sink = Sink(
                make_producer(settings.kafka, max_batch_size=_PRODUCER_BATCH_BYTES),
                on_error=self._on_sink_error,
                on_dropped=self._abandon,
            )
        verdicts = VerdictBuilder(
            policy=policy,
            backend_name=backend.name,
            include_text=settings.include_text,
            unscored_action=unscored_action(settings.scoring.fail_policy),
        )
        self._reviews: ReviewStage | None = None
        """Reviews on: human review decisions become superseding verdicts (``reviews``)."""
        if settings.reviews.enabled:
            self._reviews = ReviewStage(
                policy=policy,
                verdicts=verdicts,
                recent_events=settings.reviews.recent_events,
                recent_reviews=settings.reviews.recent_reviews,
            )
        self._outputs = Outputs(
            settings,
            sink=self._sink,
            verdicts=verdicts,
            on_finished=self._finish,
            on_abandoned=self._abandon,
            on_verdict=_each(
                shadow.offer if shadow is not None else None,
                self._reviews.remember if self._reviews is not None else None,
            ),
            statements=StatementBuilder(policy.dsa) if settings.dsa.enabled and policy.dsa is not None else None,
        )
        self._scorer = Scorer(
            backend,
            fail_policy=settings.scoring.fail_policy,
            max_concurrency=settings.scoring.max_concurrency,
            on_fatal=self._fail,
            failed=lambda: self._fatal is not None,
            poison_attempts=settings.scoring.poison_attempts,
            fallback=fallback,
        )
        rebalance_timeout_ms = int(max(settings.kafka.session_timeout_ms, (settings.revoke_timeout_s + 5) * 1000))
        self.source = Source(
            settings,
            on_assign=self._on_assigned,
            on_revoke=self._on_revoked,
            rebalance_timeout_ms=rebalance_timeout_ms,
        )
        self._conversations = ConversationStage(
            settings, publish=self._sink.publish, source=self.source, on_fatal=self._fail
        )
        timing = CommitPolicy(every=settings.commit_every, interval_s=settings.commit_interval_ms / 1000)
        if self._txns is not None:  # it starts each partition's transaction and returns
            self._committer = Committer(timing, self._tracker, self._txns.commit)
        else:
            self._committer = Committer(timing, self._tracker, self.source.commit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rewound: set[TopicPartition] = set()
        self._decoded: dict[str, int] = {}
        """Records decoded per topic since the last poll: counted into the metric once a poll."""
        self._rewinds: dict[TopicPartition, tuple[PartitionOffsets, int]] = {}
        """Per partition, the slot and offset it was last sent back to (``_offset_reset``)."""
        """Partitions sent back to an earlier offset during this poll: its other records of
        them are read again from there (``_offset_reset``)."""
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._loop_error: Exception | None = None
        """What ended the consume loop other than ``stop()`` (reported after the drain)."""
        self.started = False
        self.draining = False
        self.last_loop_at = time.monotonic()
        """Monotonic time of the last consume-loop iteration (liveness)."""

    # -- status (worker.ops.status.WorkerStatus) ------------------------------------

    @property
    def in_flight(self) -> int:
        """Messages read and not yet finished."""
        return self._in_flight.count

    @property
    def in_flight_bytes(self) -> int:
        """Input bytes of the messages read and not yet finished (owned partitions)."""
        return self._in_flight.bytes

    @property
    def partitions(self) -> Source:
        return self.source

    @property
    def stuck_partitions(self) -> dict[TopicPartition, int]:
        """Partitions held by the span guard, with the offset each is stuck at."""
        return self._span_guard.stuck

    @property
    def held_partitions(self) -> dict[TopicPartition, tuple[str, ...]]:
        """Partitions held paused (``Source.hold``), with their reasons."""
        return self.source.holds()

    @property
    def policy_version(self) -> str:
        return self.policy.version

    # -- public surface -------------------------------------------------------------

    def stop(self) -> None:
        """Request a graceful shutdown (idempotent, safe from a signal handler)."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until ``stop()``; then drain, commit and close. Raises ``WorkerFatal``."""
        log.info(
            Event.WORKER_STARTING,
            backend=self.backend.name,
            policy_version=self.policy.version,
            group_id=self.settings.group_id,
            topics=[self.settings.content_topic, self.settings.conversation_topic]
            + ([self.settings.reviews.topic] if self._reviews is not None else []),
        )
        try:
            await self.backend.start()
            if self.fallback is not None:
                await self.fallback.start()
            if self.shadow is not None:
                await self.shadow.start()
            await self._start_kafka_clients()
            self.started = True
            log.info(Event.WORKER_READY)
            try:
                await self._consume()
            except Exception as err:  # noqa: BLE001 - whatever stops the loop, drain and commit first
                self._loop_error = err
                log.error(Event.CONSUME_FAILED, error=f"{type(err).__name__}: {err}")
            await self._shutdown()
        finally:
            await self._close_quietly()
        if self._fatal is not None:
            raise WorkerFatal(str(self._fatal))
        if self._loop_error is not None:
            error = self._loop_error
            reason = access_denied(error, self.settings) or f"{type(error).__name__}: {error}"
            raise WorkerFatal(f"consuming from Kafka failed: {reason}")
        log.info(Event.WORKER_STOPPED)

    async def _start_kafka_clients(self) -> None:
        """Start the producer and the consumer; refused credentials or ACLs become one
        ``WorkerFatal`` line naming what to fix."""
        try:
            await self._sink.start()
            await self.source.start()
            await self._fit_outputs_to_the_topics()
        except KafkaError as err:
            denied = access_denied(err, self.settings)
            if denied is None and isinstance(err, KafkaConnectionError):
                denied = await authentication_failure(self.settings.kafka)
            if denied is None:
                raise
            raise WorkerFatal(str(denied)) from None

    async def _fit_outputs_to_the_topics(self) -> None:
        """Lower the output limit to the output topics' ``max.message.bytes`` where smaller."""
        s = self.settings
        limit = await output_limit(
            s.kafka,
            [s.verdict_topic, s.violation_topic, s.dead_letter_topic, *([s.dsa.topic] if s.dsa.enabled else [])],
            s.max_output_bytes,
        )
        self._outputs.limit_bytes(limit.max_bytes)
        log.info(Event.OUTPUT_LIMIT, max_bytes=limit.max_bytes, source=limit.source, unread=limit.note)

    # -- the loop -------------------------------------------------------------------

    async def _consume(self) -> None:
        max_poll = self.settings.kafka.max_poll_records
        in_flight = self._in_flight
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                self.last_loop_at = time.monotonic()
                records = await self._poll_unless_stopped(stopping, min(in_flight.room, max_poll))
                self._rewound.clear()
                budget = in_flight.byte_budget()
                for index, record in enumerate(records):
                    if budget is not None:
                        if budget <= 0:  # the byte cap: the rest is read again after the pause
                            self._push_back(records[index:])
                            break
                        budget -= len(record.value) if record.value is not None else 0
                    self._accept(record)
                self._count_decoded()
                in_flight.apply(self.source)
                self._span_guard.apply(self._tracker.slots(), self.source)
                await self._committer.maybe_commit()
        finally:
            stopping.cancel()

    async def _poll_unless_stopped(self, stopping: asyncio.Future[Any], max_records: int) -> list[Record]:
        """One poll, given up when ``stop()`` is called: aiokafka's poll can wait without a
        timeout (during a rebalance), and SIGTERM must be acted on within the drain bound."""
        poll = asyncio.ensure_future(self.source.poll(timeout_ms=_POLL_TIMEOUT_MS, max_records=max_records))
        await asyncio.wait((poll, stopping), return_when=asyncio.FIRST_COMPLETED)
        if poll.done():
            return poll.result()
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll
        return []

    def _push_back(self, records: list[Record]) -> None:
        """Leave ``records`` unread: each partition's position goes back to the first of them
        (a partition sent back for an offset reset keeps that seek)."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            first.setdefault(TopicPartition(record.topic, record.partition), record.offset)
        for tp, offset in first.items():
            if tp not in self._rewound:
                self.source.seek(tp, offset)

    def _accept(self, record: Record) -> None:
        tp = TopicPartition(record.topic, record.partition)
        if tp in self._rewound:  # sent back to an earlier offset: this record comes again
            return
        slot = self._tracker.slot(tp)
        size = len(record.value) if record.value is not None else 0
        try:
            slot.track(record.offset, size)
        except ValueError:  # the consumer's position went backwards (an offset reset)
            reset = self._offset_reset(tp, slot, record.offset)
            if reset is None:
                return
            slot = reset
            slot.track(record.offset, size)
        self._in_flight.count += 1
        self._in_flight.observe(size)
        if self._reviews is not None and record.topic == self.settings.reviews.topic:
            self._accept_review(record, slot)
            return
        decoded = self._decoder.decode(record, slot)
        if isinstance(decoded, DecodeFailure):
            self._outputs.dead_letter(
                slot, record, stage="decode", error_type=decoded.error_type, message=decoded.message
            )
            return
        self._decoded[record.topic] = self._decoded.get(record.topic, 0) + 1
        self._conversations.accept(decoded)  # context from the conversation state, the turn into it
        self._outputs.expect(decoded)
        self._batcher.add(decoded)

    def _count_decoded(self) -> None:
        """Add the poll's decoded records to the metric: one increment per topic, not per record."""
        if self._decoded:
            for topic, count in self._decoded.items():
                metrics.decoded(topic).inc(count)
            self._decoded.clear()

    def _accept_review(self, record: Record, slot: PartitionOffsets) -> None:
        """A human review decision: no backend, its superseding verdict published now."""
        assert self._reviews is not None
        reviews = self._reviews
        review = self._decoder.decode_review(record, slot)
        if isinstance(review, DecodeFailure):
            self._outputs.dead_letter(
                slot, record, stage="decode", error_type=review.error_type, message=review.message
            )
            return
        self._decoded[record.topic] = self._decoded.get(record.topic, 0) + 1
        outcome = reviews.judge(review)
        if isinstance(outcome, ReviewRefused):
            self._outputs.dead_letter(
                slot, record, stage="review", error_type=outcome.error_type, message=outcome.message
            )
            return
        self._outputs.supersede(review, outcome, lambda: reviews.count(outcome))

    def _offset_reset(self, tp: TopicPartition, old: PartitionOffsets, offset: int) -> PartitionOffsets | None:
        """The partition's position moved back (log truncated, offsets reset): detach the
        slot so nothing read before the reset is committed over the new positions, and track
        afresh from ``offset``. Work in flight for the old slot is abandoned (it is read
        again), and its key lines are dropped: the records read again carry the same keys
        and must not wait behind jobs that are never released.

        A position moved back to above an offset the old slot has not finished (a reset to
        ``latest`` after a truncation) would skip that input for good: the position is sent
        back to it instead, and None returned (the rest of this poll of ``tp`` is read again).
        Only once: if the position lands above it again, that offset is gone from the log."""
        lowest = old.lowest_unfinished
        if lowest is not None and lowest < offset and self._rewinds.get(tp) != (old, lowest):
            log.warning(Event.OFFSET_RESET, partition=f"{tp.topic}-{tp.partition}", offset=offset, rewound_to=lowest)
            self._rewinds[tp] = (old, lowest)
            self._rewound.add(tp)
            self.source.seek(tp, lowest)
            return None
        self._rewinds.pop(tp, None)
        log.warning(
            Event.OFFSET_RESET, partition=f"{tp.topic}-{tp.partition}", offset=offset, pending_before=old.pending
        )
        slot = self._tracker.reset(tp)
        self._abandon(self._outputs.forget([tp]))
        return slot

    def _dispatch(self, kind: Kind, jobs: list[Job]) -> None:
        metrics.batch_size(kind).observe(len(jobs))
        task = asyncio.create_task(self._process(kind, jobs))
        self._tasks.add(task)
        task.add_done_callback(self._processed)

    def _processed(self, task: asyncio.Task[None]) -> None:
        """A batch task ended. One that raised (a bug: ``_process`` never raises by
        contract) fails the worker, so its messages are not stranded uncommitted behind a
        running loop: they are processed again after the restart."""
        self._tasks.discard(task)
        if task.cancelled() or (err := task.exception()) is None:
            return
        metrics.TASK_FAILURES.inc()
        log.error(Event.TASK_FAILED, error=f"{type(err).__name__}: {err}", exc_info=err)
        self._fail(
            WorkerFatal(f"processing a batch failed ({type(err).__name__}: {err}); its messages stay uncommitted")
        )

    async def _process(self, kind: Kind, jobs: list[Job]) -> None:
        results = await self._scorer.score(kind, jobs)
        if results is None:  # fatal, or every job abandoned while waiting: never committed here
            for _ in jobs:
                self._abandon()
            return
        self._outputs.conclude_all(jobs, results)

    def _finish(self, slot: PartitionOffsets, offset: int) -> None:
        slot.finish(offset)
        if self._txns is None:  # exactly-once: in flight until its transaction settles (``_settled``)
            self._in_flight.count -= 1
        self._committer.finished()

    def _settled(self, count: int) -> None:
        """Exactly-once: ``count`` finished messages were committed or dropped uncommitted."""
        self._in_flight.count -= count

    def _lost(self, tp: TopicPartition) -> None:
        """Exactly-once: this member can commit nothing more of ``tp`` (a newer owner fenced
        its producer, or a transaction failed). Read no more of it and let the group settle
        who owns it (a rebalance; if it comes back, a fresh producer and the committed offset)."""
        if tp in self.source.assignment():  # else the group already took it away
            self.source.hold([tp], _LOST_HOLD)
        self.source.request_rejoin()

    def _abandon(self, messages: int = 1) -> None:
        """Stop counting ``messages`` as in flight without finishing them: their offsets stay
        uncommitted here, so they are processed again (by the new owner, or after restart)."""
        self._in_flight.count -= messages

    # -- rebalance ------------------------------------------------------------------

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish or abandon the revoked partitions' work within the bound, commit."""
        owned = set(self._tracker.owned())
        revoked = [tp for tp in revoked if tp in owned]
        if not revoked:
            return
        metrics.rebalances("revoked").inc()
        self._batcher.flush()
        deadline = time.monotonic() + self.settings.revoke_timeout_s
        while self._tracker.pending(revoked) and time.monotonic() < deadline and self._fatal is None:
            await asyncio.sleep(0.01)
        if self._txns is not None:  # within the rebalance timeout (revoke timeout + 5 s)
            await self._txns.flush(revoked, max(_SETTLE_MIN_S, deadline - time.monotonic() + 4.0))
        else:
            await self._committer.commit(revoked)
        abandoned = self._tracker.pending(revoked)
        if abandoned:
            log.warning(Event.REVOKE_ABANDONED, abandoned=abandoned, partitions=_names(revoked))
        for _ in range(self._outputs.forget(revoked)):
            self._abandon()
        self._tracker.revoke(revoked)
        # Their queued outputs are now dropped unsent; wait for those already sent, so
        # that nothing is published for them after this listener returns.
        await self._sink.settle(max(_SETTLE_MIN_S, deadline - time.monotonic()))
        if self._txns is not None:  # what was not committed above is dropped: the new owner redoes it
            await self._txns.revoked(revoked)
            self.source.release(revoked, _LOST_HOLD)
        await self._conversations.revoked(revoked)
        log.info(Event.PARTITIONS_REVOKED, partitions=_names(revoked), abandoned=abandoned)

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        metrics.rebalances("assigned").inc()
        self._tracker.assign(assigned)
        if self.source.paused and assigned:
            self.source.pause(assigned)
        if self._txns is not None and assigned and not await self._start_transactions(assigned):
            return
        self._conversations.assigned(assigned)  # held until their state is restored
        log.info(Event.PARTITIONS_ASSIGNED, partitions=_names(assigned))

    async def _start_transactions(self, assigned: list[TopicPartition]) -> bool:
        """Exactly-once: start the assigned partitions' producers (fencing their previous
        owners), then read from the committed offsets as they stand once those owners'
        transactions ended. Held meanwhile. False (and the worker failed) when impossible."""
        assert self._txns is not None
        self.source.hold(assigned, _TRANSACTIONS_HOLD)
        try:
            await self._txns.assigned(assigned)
            await asyncio.wait_for(self.source.seek_to_committed(assigned), self.settings.exactly_once.call_timeout_s)
        except (TransactionsUnavailable, KafkaError, TimeoutError) as err:
            if not isinstance(err, TransactionsUnavailable):
                err = WorkerFatal(f"exactly-once: cannot read the committed offsets: {type(err).__name__}: {err}")
            self._fail(err)
            return False
        self.source.release(assigned, _TRANSACTIONS_HOLD)
        return True

    # -- shutdown -------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.draining = True
        log.info(Event.WORKER_STOPPING, in_flight=self.in_flight, fatal=self._fatal is not None)
        self._batcher.flush()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._unfinished() > 0 and time.monotonic() < deadline and self._fatal is None:
            await asyncio.sleep(0.01)
        if self._unfinished() > 0:
            log.warning(Event.DRAIN_TIMEOUT, abandoned=self.in_flight, drain_timeout_s=self.settings.drain_timeout_s)
        if self._txns is not None:
            await self._txns.flush(None, self.settings.exactly_once.call_timeout_s)
        else:
            await self._committer.commit()

    def _unfinished(self) -> int:
        """Messages in flight that are not yet finished (exactly-once: finished ones wait
        in their partition's transaction for the commit that follows the drain)."""
        return self.in_flight - (self._txns.uncommitted if self._txns is not None else 0)

    async def _close_quietly(self) -> None:
        self.draining = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Nothing more is committed: outputs still queued (after a drain cut short by its
        # timeout or a failed publish) are dropped unsent, as on revoke, and the sink closes
        # before the consumer leaves the group, so nothing is published for a partition
        # another member may own by then. The new owner redoes their inputs.
        owned = self._tracker.owned()
        for _ in range(self._outputs.forget(owned)):
            self._abandon()
        self._tracker.revoke(owned)
        # Nothing is pending any more: a revoke fired by leaving the group must not wait.
        self._tracker = self._committer.tracker = OffsetTracker()
        closers = [self._conversations.close, self._sink.close, self.source.stop, self.backend.close]
        closers += [part.close for part in (self.fallback, self.shadow) if part is not None]
        for close in closers:
            try:
                await close()
            except Exception as err:  # noqa: BLE001 - closing must go on whatever one part does
                log.warning(Event.WORKER_STOPPING, close_error=f"{type(err).__name__}: {err}")
            except asyncio.CancelledError:
                # aiokafka's fetcher, closed while a fetch to a dead broker backs off, lets
                # its task's CancelledError out of consumer.stop(): not ours unless we are
                # being cancelled ourselves.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                log.warning(Event.WORKER_STOPPING, close_error="CancelledError out of a Kafka client's close")

    def _fail(self, err: BaseException) -> None:
        if self._fatal is None:
            self._fatal = err
            log.error(Event.WORKER_FATAL, error=str(err))
        self._stopping.set()

    def _on_sink_error(self, err: BaseException) -> None:
        reason = access_denied(err, self.settings) or f"{type(err).__name__}: {err}"
        self._fail(WorkerFatal(f"could not publish to Kafka: {reason}"))


def _each(*hooks: Callable[[Job, Verdict], None] | None) -> Callable[[Job, Verdict], None] | None:
    """One ``on_verdict`` hook calling each given one in turn; None when none is given."""
    given = [hook for hook in hooks if hook]
    if len(given) <= 1:
        return given[0] if given else None

    def each(job: Job, verdict: Verdict) -> None:
        for hook in given:
            hook(job, verdict)

    return each


def _names(tps: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}-{tp.partition}" for tp in tps]
