"""The worker: wires source -> decode -> batcher -> backend -> policy -> sink, and offsets.

Guarantees (the README's "Delivery guarantees" states them for users):

- At-least-once. A message's offset is committed only once it and every message before
  it in its partition is *finished*: its verdict (and violation, if flagged) or its dead
  letter acknowledged by the broker with acks=all. A crash replays from the last commit.
- Per-key order. Verdicts for one key (one input partition) are published in input order
  (``KeySequencer``), even though backend calls run concurrently.
- Bounded memory. At most ``max_in_flight`` messages are read and unfinished; at the cap
  all partitions are paused, and resumed once half the cap has drained.
- Rebalance. Revoked partitions are not read any more; their queued work is dispatched and
  may finish within ``revoke_timeout_s``; what finished is committed; the rest is
  abandoned (its results are never published or committed by this member) and the new
  owner processes it again.
- Shutdown (``stop()``, wired to SIGTERM/SIGINT): stop reading, dispatch what is queued,
  wait up to ``drain_timeout_s`` for in-flight work, commit, leave the group.
- Backend outage. The backend retries; once it gives up (``BackendUnavailable``) the fail
  policy decides: ``wait`` retries the batch until it succeeds (consumption pauses through
  the in-flight cap: nothing passes unmoderated, nothing is lost), ``review``/``allow``
  publish degraded verdicts. ``BackendAuthError`` and an undeliverable output stop the
  worker (``WorkerFatal``) without committing the affected messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import structlog
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from schemas import ConversationEvent, Kind, Turn
from worker.backends.base import (
    Backend,
    BackendAuthError,
    BackendUnavailable,
    Conversation,
    Outcome,
    Rejected,
    Scored,
)
from worker.config import Settings
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.batching import MicroBatcher
from worker.pipeline.decode import DecodeFailure, Decoder, Job
from worker.pipeline.offsets import OffsetTracker, PartitionOffsets
from worker.pipeline.policy import Policy
from worker.pipeline.sink import KeySequencer, OutRecord, Sink, dead_letter_record
from worker.pipeline.source import Source, make_producer
from worker.pipeline.verdicts import VerdictBuilder

log = structlog.get_logger("worker.app")

_POLL_TIMEOUT_MS = 100
_WAIT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
_PRODUCER_BATCH_BYTES = 512 * 1024
"""Record batch size of the output producer. aiokafka keeps one produce request in flight
per broker, holding at most one batch per partition: at its default of 16 KB (~23
verdicts) publishing fell behind the pipeline, and verdicts waited in the sink for up to
~0.6 s (docs/benchmarks.md). 512 KB stays under Kafka's default 1 MB max.message.bytes."""


class WorkerFatal(Exception):
    """The worker cannot go on (bad credentials, outputs undeliverable). Exit non-zero."""


class _Degraded:
    __slots__ = ("action", "reason")

    def __init__(self, action: str, reason: str) -> None:
        self.action = action
        self.reason = reason


class ModerationWorker:
    """One worker process. ``await run()`` until ``stop()`` is called or a fatal error."""

    def __init__(self, settings: Settings, *, backend: Backend, policy: Policy) -> None:
        self.settings = settings
        self.backend = backend
        self.policy = policy
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
        self._verdicts = VerdictBuilder(policy=policy, backend_name=backend.name, include_text=settings.include_text)
        self._tracker = OffsetTracker()
        self._sequencer = KeySequencer()
        self._sink = Sink(
            make_producer(settings.kafka, max_batch_size=_PRODUCER_BATCH_BYTES), on_error=self._on_sink_error
        )
        rebalance_timeout_ms = int(max(settings.kafka.session_timeout_ms, (settings.revoke_timeout_s + 5) * 1000))
        self.source = Source(settings, self, rebalance_timeout_ms=rebalance_timeout_ms)
        self._concurrency = asyncio.Semaphore(settings.http.max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._in_flight = 0
        self._finished_since_commit = 0
        self._last_commit = time.monotonic()
        self.started = False
        self.draining = False
        self.last_loop_at = time.monotonic()
        """Monotonic time of the last consume-loop iteration (liveness)."""

    # -- public surface -------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Messages read and not yet finished."""
        return self._in_flight

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
            topics=[self.settings.content_topic, self.settings.conversation_topic],
        )
        await self.backend.start()
        try:
            await self._sink.start()
            await self.source.start()
            self.started = True
            log.info(Event.WORKER_READY)
            await self._consume()
            await self._shutdown()
        finally:
            await self._close_quietly()
        if self._fatal is not None:
            raise WorkerFatal(str(self._fatal))
        log.info(Event.WORKER_STOPPED)

    # -- consume loop ---------------------------------------------------------------

    async def _consume(self) -> None:
        cap = self.settings.max_in_flight
        max_poll = self.settings.kafka.max_poll_records
        while not self._stopping.is_set():
            self.last_loop_at = time.monotonic()
            room = cap - self._in_flight
            records = await self.source.poll(timeout_ms=_POLL_TIMEOUT_MS, max_records=max(1, min(room, max_poll)))
            for record in records:
                self._accept(record)
            self._apply_backpressure()
            await self._maybe_commit()

    def _accept(self, record) -> None:
        slot = self._tracker.slot(TopicPartition(record.topic, record.partition))
        slot.track(record.offset)
        self._in_flight += 1
        decoded = self._decoder.decode(record)
        if isinstance(decoded, DecodeFailure):
            self._dead_letter(slot, record, stage="decode", error_type=decoded.error_type, message=decoded.message)
            return
        metrics.decoded(record.topic).inc()
        decoded.slot = slot
        self._sequencer.enter(decoded)
        self._batcher.add(decoded)

    def _apply_backpressure(self) -> None:
        cap = self.settings.max_in_flight
        if not self.source.paused and self._in_flight >= cap:
            self.source.pause()
            log.info(Event.CONSUMPTION_PAUSED, in_flight=self._in_flight, cap=cap)
        elif self.source.paused and self._in_flight <= cap // 2:
            self.source.resume()
            log.info(Event.CONSUMPTION_RESUMED, in_flight=self._in_flight, cap=cap)

    # -- backend dispatch -----------------------------------------------------------

    def _dispatch(self, kind: Kind, jobs: list[Job]) -> None:
        metrics.batch_size(kind).observe(len(jobs))
        task = asyncio.create_task(self._process(kind, jobs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, kind: Kind, jobs: list[Job]) -> None:
        async with self._concurrency:
            outcomes = await self._score(kind, jobs)
        if outcomes is None:  # fatal, or every job abandoned while waiting: never committed here
            for _ in jobs:
                self._abandon()
            return
        for job, outcome in zip(jobs, outcomes, strict=True):
            if not job.slot.owned:  # revoked and abandoned: the new owner redoes it
                self._abandon()
                continue
            if isinstance(outcome, Scored):
                try:
                    verdict = self._verdicts.scored(job, outcome)
                except ValueError as err:  # e.g. a NaN score: unjudgeable, but never a stuck offset
                    outcome = Rejected(reason=f"backend returned unusable scores: {err}", error_type="invalid_scores")
                else:
                    self._publish_verdict(job, verdict)
                    continue
            if isinstance(outcome, Rejected):
                self._sequencer.complete(
                    job,
                    lambda job=job, outcome=outcome: self._dead_letter(
                        job.slot, job.record, stage="backend", error_type=outcome.error_type, message=outcome.reason
                    ),
                )
            else:
                self._publish_verdict(job, self._verdicts.degraded(job, action=outcome.action, reason=outcome.reason))

    async def _score(self, kind: Kind, jobs: Sequence[Job]) -> list[Outcome | _Degraded] | None:
        fail_policy = self.settings.http.fail_policy
        waits = 0
        while True:
            try:
                if kind == "content":
                    outcomes = await self.backend.score_texts([job.text for job in jobs])
                else:
                    outcomes = await self.backend.score_conversations([_conversation(job.event) for job in jobs])
            except BackendAuthError as err:
                self._fail(err)
                return None
            except BackendUnavailable as err:
                reason = str(err)
                not_before = err.retry_in_s or 0.0
            except Exception as err:
                log.exception(Event.BACKEND_UNAVAILABLE, reason="unexpected backend error", batch=len(jobs))
                reason = f"unexpected backend error: {type(err).__name__}: {err}"
                not_before = 0.0
            else:
                if len(outcomes) != len(jobs):
                    self._fail(
                        RuntimeError(
                            f"backend {self.backend.name} returned {len(outcomes)} results for {len(jobs)} inputs"
                        )
                    )
                    return None
                return outcomes
            if fail_policy != "wait":
                log.warning(Event.BACKEND_DEGRADED, reason=reason, action=fail_policy, batch=len(jobs))
                return [_Degraded(fail_policy, reason)] * len(jobs)
            if self._fatal is not None or not any(job.slot.owned for job in jobs):
                return None
            delay = max(not_before, _WAIT_BACKOFF_S[min(waits, len(_WAIT_BACKOFF_S) - 1)])
            waits += 1
            log.warning(Event.BACKEND_WAITING, reason=reason, retry_in_s=delay, batch=len(jobs), fail_policy="wait")
            await asyncio.sleep(delay)

    # -- outputs --------------------------------------------------------------------

    def _publish_verdict(self, job: Job, verdict) -> None:
        settings = self.settings
        key = job.key
        records = [OutRecord(settings.verdict_topic, key, verdict.model_dump_json(exclude_none=False).encode())]
        violation = self._verdicts.violation(verdict)
        if violation is not None:
            records.append(OutRecord(settings.violation_topic, key, violation.model_dump_json().encode()))
        record = job.record
        if verdict.flagged:
            log.info(
                Event.MESSAGE_FLAGGED,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                event_id=verdict.event_id,
                action=verdict.action,
                degraded=verdict.degraded,
                categories=[hit.category for hit in verdict.violations],
            )
        else:
            log.debug(
                Event.MESSAGE_VERDICT,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                event_id=verdict.event_id,
                action=verdict.action,
            )
        on_acked = self._verdict_acked(job, verdict)
        self._sequencer.complete(job, lambda: self._sink.publish(records, on_acked))

    def _verdict_acked(self, job: Job, verdict) -> Callable[[], None]:
        """The sink's callback for a verdict: finish the message, count it, time it end to end."""
        slot, offset, timestamp_ms = job.slot, job.record.offset, job.record.timestamp
        counted = metrics.verdicts(job.kind, verdict.action, "true" if verdict.degraded else "false")
        hits = [metrics.violations(hit.category) for hit in verdict.violations]
        latency = metrics.end_to_end_latency(job.kind)

        def acked() -> None:
            self._finish(slot, offset)
            counted.inc()
            for hit in hits:
                hit.inc()
            if timestamp_ms is not None and timestamp_ms >= 0:  # -1: a record without a timestamp
                latency.observe(max(0.0, time.time() - timestamp_ms / 1000))

        return acked

    def _dead_letter(self, slot: PartitionOffsets, record, *, stage: str, error_type: str, message: str) -> None:
        log.warning(
            Event.MESSAGE_DEAD_LETTERED,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage=stage,
            error_type=error_type,
            reason=message,
        )
        metrics.dead_lettered(record.topic, stage, error_type).inc()
        out = dead_letter_record(
            record, topic=self.settings.dead_letter_topic, stage=stage, error_type=error_type, message=message
        )
        offset = record.offset
        self._sink.publish([out], lambda: self._finish(slot, offset))

    def _finish(self, slot: PartitionOffsets, offset: int) -> None:
        slot.finish(offset)
        self._in_flight -= 1
        self._finished_since_commit += 1

    def _abandon(self) -> None:
        """Stop counting a message as in flight without finishing it: its offset stays
        uncommitted here, so it is processed again (by the new owner, or after restart)."""
        self._in_flight -= 1

    # -- commits, rebalance, shutdown -----------------------------------------------

    async def _maybe_commit(self) -> None:
        due = (
            self._finished_since_commit >= self.settings.commit_every
            or time.monotonic() - self._last_commit >= self.settings.commit_interval_ms / 1000
        )
        if due:
            await self._commit()

    async def _commit(self, tps: list[TopicPartition] | None = None) -> None:
        self._last_commit = time.monotonic()
        self._finished_since_commit = 0
        offsets = self._tracker.committable(tps)
        if not offsets:
            return
        started = time.perf_counter()
        try:
            await self.source.commit(offsets)
        except KafkaError as err:  # e.g. a rebalance in progress: the next commit catches up
            metrics.COMMIT_FAILURES.inc()
            log.warning(Event.COMMIT_FAILED, error=f"{type(err).__name__}: {err}", partitions=len(offsets))
            return
        metrics.COMMIT_LATENCY.observe(time.perf_counter() - started)
        self._tracker.mark_committed(offsets)
        log.debug(Event.OFFSETS_COMMITTED, offsets={f"{tp.topic}-{tp.partition}": o for tp, o in offsets.items()})

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Rebalance listener: finish or abandon the revoked partitions' work, commit."""
        revoked = [tp for tp in revoked if tp in set(self._tracker.owned())]
        if not revoked:
            return
        metrics.rebalances("revoked").inc()
        self._batcher.flush()
        deadline = time.monotonic() + self.settings.revoke_timeout_s
        while self._tracker.pending(revoked) and time.monotonic() < deadline and self._fatal is None:
            await asyncio.sleep(0.01)
        await self._commit(revoked)
        abandoned = self._tracker.pending(revoked)
        if abandoned:
            log.warning(Event.REVOKE_ABANDONED, abandoned=abandoned, partitions=_names(revoked))
        for _ in range(self._sequencer.drop(revoked)):
            self._abandon()
        self._tracker.revoke(revoked)
        log.info(Event.PARTITIONS_REVOKED, partitions=_names(revoked), abandoned=abandoned)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        metrics.rebalances("assigned").inc()
        self._tracker.assign(assigned)
        if self.source.paused and assigned:
            self.source.pause(assigned)
        log.info(Event.PARTITIONS_ASSIGNED, partitions=_names(assigned))

    async def _shutdown(self) -> None:
        self.draining = True
        log.info(Event.WORKER_STOPPING, in_flight=self._in_flight, fatal=self._fatal is not None)
        self._batcher.flush()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._in_flight > 0 and time.monotonic() < deadline and self._fatal is None:
            await asyncio.sleep(0.01)
        if self._in_flight > 0:
            log.warning(Event.DRAIN_TIMEOUT, abandoned=self._in_flight, drain_timeout_s=self.settings.drain_timeout_s)
        await self._commit()

    async def _close_quietly(self) -> None:
        self.draining = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Nothing is pending any more: a revoke fired by leaving the group must not wait.
        self._tracker = OffsetTracker()
        for close in (self.source.stop, self._sink.close, self.backend.close):
            try:
                await close()
            except Exception as err:  # noqa: BLE001 - closing must go on whatever one part does
                log.warning(Event.WORKER_STOPPING, close_error=f"{type(err).__name__}: {err}")

    def _fail(self, err: BaseException) -> None:
        if self._fatal is None:
            self._fatal = err
            log.error(Event.WORKER_FATAL, error=str(err))
        self._stopping.set()

    def _on_sink_error(self, err: BaseException) -> None:
        self._fail(WorkerFatal(f"could not publish to Kafka: {type(err).__name__}: {err}"))


def _conversation(event: ConversationEvent) -> Conversation:
    return Conversation(turn=Turn(role=event.role, content=event.content), context=tuple(event.context))


def _names(tps: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}-{tp.partition}" for tp in tps]
