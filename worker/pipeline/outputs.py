"""Outputs stage: what each job ends as, published in per-key order, finished on ack.

Every accepted record ends as exactly one of:

- a verdict (and a violation when flagged) for a scored or degraded job;
- a dead letter: a record that did not decode (``dead_letter``, published at once), or a
  job the backend refused or whose scores were unusable (``conclude`` with ``Rejected``).

Results of jobs are released through the ``KeySequencer`` (``expect`` at accept time, in
input order), so one key's outputs are published in input order. Each publication's
``on_acked`` (the sink calls it once the broker acknowledged every record of it) logs
nothing and costs little: it finishes the offset (``on_finished``) and updates the
verdict metrics. Log lines and metrics of outputs are declared here and nowhere else.

Headers: verdicts and violations carry ``OUTPUT_HEADERS`` (``content-type`` and the
``modworker-contract`` version), one shared list, so they cost no allocation per record.

Size: no output is bigger than ``max_output_bytes`` (the output topics'
``max.message.bytes``), since the broker would refuse it and the worker would stop on it
at every restart. A verdict over it is published without its pass-through fields
(``metadata``, ``text``) and with ``trimmed: true``; one still over it (an enormous id)
is dead-lettered as ``output_too_large``; a dead letter over it has its value truncated
(``sink.dead_letter_record``).

A conversation turn's state change (``Job.changelog``) is published in the same group as
its verdict or dead letter, so its offset finishes only once the change is acknowledged;
its value is encoded when the group is released (in key order), not before.
So is a restricting verdict's statement of reasons (DSA on, ``statements``), or, when that
statement is not valid, the input as a dead letter (stage ``statement``) beside the verdict.

A human review decision (``supersede``) is published at once, in input order (it waits for no
backend, and its partition holds only decisions): its superseding verdict, its violation when
it restricts, and its statement of reasons (DSA on) as one group that finishes the review
record's offset once acknowledged.

Contract: ``conclude`` never raises for any outcome; a job whose partition is no longer
owned is not published (``on_abandoned`` is called instead: the new owner redoes it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import msgspec
import structlog
from aiokafka.structs import TopicPartition

from schemas import OUTPUT_HEADERS, DeadLetterHeaders
from worker.backends.base import Outcome, Rejected, Scored, Unavailable
from worker.config import Settings
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.acks import VerdictGroup
from worker.pipeline.encode import verdict_bytes, violation_bytes
from worker.pipeline.ordering import KeySequencer
from worker.pipeline.reviews import Superseding
from worker.pipeline.scoring import Degraded
from worker.pipeline.sink import dead_letter_record, record_size
from worker.pipeline.statements import StatementBuilder, StatementRejected, statement_bytes
from worker.pipeline.types import Job, OutRecord, PartitionOffsets, PendingRecord, Record, Review
from worker.pipeline.verdict_data import Verdict
from worker.pipeline.verdicts import VerdictBuilder

log = structlog.get_logger("worker.pipeline.outputs")

FinishFunction = Callable[[PartitionOffsets, int], None]


class Publisher(Protocol):
    """What outputs need of the sink: publish records in call order, call back on ack."""

    def publish(
        self,
        records: list[OutRecord],
        on_acked: Callable[[], None],
        origin: PartitionOffsets | None = None,
        messages: int = 1,
    ) -> None: ...


class Outputs:
    """Turns outcomes into published records and acknowledgements into finished offsets."""

    def __init__(
        self,
        settings: Settings,
        *,
        sink: Publisher,
        verdicts: VerdictBuilder,
        on_finished: FinishFunction,
        on_abandoned: Callable[[], None],
        on_verdict: Callable[[Job, Verdict], None] | None = None,
        statements: StatementBuilder | None = None,
    ) -> None:
        self._verdict_topic = settings.verdict_topic
        self._violation_topic = settings.violation_topic
        self._dead_letter_topic = settings.dead_letter_topic
        self._statement_topic = settings.dsa.topic
        self._statements = statements
        """DSA on: a statement of reasons goes with each restricting verdict."""
        self._max_bytes = settings.max_output_bytes
        self._sink = sink
        self._verdicts = verdicts
        self._on_finished = on_finished
        self._on_abandoned = on_abandoned
        self._on_verdict = on_verdict
        """Sees every verdict once built (the shadow's ``offer``); must not block or raise."""
        self._sequencer = KeySequencer()
        self._groups: dict[int, tuple[PartitionOffsets, VerdictGroup]] | None = None  # while conclude_all runs

    @property
    def max_bytes(self) -> int:
        """The largest output record: ``MODWORKER_MAX_OUTPUT_BYTES``, or lower (``limit_bytes``)."""
        return self._max_bytes

    def limit_bytes(self, max_bytes: int) -> None:
        """Lower the output limit to what the output topics accept (``topic_limits``)."""
        self._max_bytes = min(self._max_bytes, max_bytes)

    # -- ordering -------------------------------------------------------------------

    def expect(self, job: Job) -> None:
        """Hold ``job``'s place in its key's line. Call in input order, before batching."""
        self._sequencer.enter(job)

    def forget(self, tps: Iterable[TopicPartition]) -> int:
        """Drop the lines of revoked partitions; return how many held results were dropped."""
        return self._sequencer.drop(tps)

    # -- outcomes -------------------------------------------------------------------

    def conclude(self, job: Job, outcome: Outcome | Degraded) -> None:
        """Publish what ``outcome`` means for ``job`` (after every earlier job of its key)."""
        if not job.slot.owned:  # revoked and abandoned: the new owner redoes it
            self._on_abandoned()
            return
        if isinstance(outcome, Scored):
            try:
                verdict = self._verdicts.scored(job, outcome)
            except ValueError as err:  # e.g. a NaN score: unjudgeable, but never a stuck offset
                outcome = Rejected(reason=f"backend returned unusable scores: {err}", error_type="invalid_scores")
            else:
                self._verdict(job, verdict)
                return
        if isinstance(outcome, Rejected):
            rejected = outcome
            self._sequencer.complete(
                job,
                lambda: self.dead_letter(
                    job.slot,
                    job.record,
                    stage="backend",
                    error_type=rejected.error_type,
                    message=rejected.reason,
                    also=job.changelog,
                ),
            )
        elif isinstance(outcome, Unavailable):  # the Scorer resolves these; never unmoderated if one slips by
            self._verdict(job, self._verdicts.degraded(job, action="review", reason=outcome.reason))
        else:
            self._verdict(job, self._verdicts.degraded(job, action=outcome.action, reason=outcome.reason))

    def conclude_all(self, jobs: Sequence[Job], outcomes: Sequence[Outcome | Degraded]) -> None:
        """``conclude`` each job in order (one backend call's results). The verdicts released
        meanwhile, these jobs' and earlier ones of their keys that waited for them, go to the
        sink as one group per input partition with one acknowledgement callback each, in
        release order (per partition, so that a revoke can still drop a partition's unsent
        outputs, ``Sink.publish``'s ``origin``)."""
        groups: dict[int, tuple[PartitionOffsets, VerdictGroup]] = {}
        self._groups = groups
        try:
            for job, outcome in zip(jobs, outcomes, strict=True):
                self.conclude(job, outcome)
        finally:
            self._groups = None
        for slot, group in groups.values():
            self._sink.publish(group.records, group.acked, slot, group.messages)
            group.records = []  # the sink holds them until sent; the callback needs only the entries

    def dead_letter(
        self,
        slot: PartitionOffsets,
        record: Record,
        *,
        stage: str,
        error_type: str,
        message: str,
        also: PendingRecord | None = None,
    ) -> None:
        """Publish ``record`` unchanged to the dead-letter topic with the reason headers
        (and ``also``, a conversation state change, in the same acknowledged group)."""
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
            record,
            topic=self._dead_letter_topic,
            stage=stage,
            error_type=error_type,
            message=message,
            max_bytes=self._max_bytes,
        )
        if out.headers and any(k == DeadLetterHeaders.TRUNCATED for k, _ in out.headers):
            metrics.outputs_trimmed("dead_letter").inc()
        offset = record.offset
        self._sink.publish(
            [out] if also is None else [out, also.record()], lambda: self._on_finished(slot, offset), slot
        )

    # -- review decisions -----------------------------------------------------------

    def supersede(self, review: Review, outcome: Superseding, on_acked: Callable[[], None]) -> None:
        """Publish a review decision's superseding verdict, its violation and (DSA on, when it
        restricts) its statement of reasons as one group; once acknowledged, finish the
        review's offset and call ``on_acked``. A group too big for the output limit is a dead
        letter (``output_too_large``) instead."""
        slot, record, verdict, key = review.slot, review.record, outcome.verdict, review.key
        records = [OutRecord(self._verdict_topic, key, verdict_bytes(verdict), OUTPUT_HEADERS)]
        violation = self._verdicts.violation(verdict)
        if violation is not None:
            records.append(OutRecord(self._violation_topic, key, violation_bytes(violation), OUTPUT_HEADERS))
        if any(record_size(out) > self._max_bytes for out in records):
            self.dead_letter(
                slot,
                record,
                stage="output",
                error_type="output_too_large",
                message=f"its verdict would exceed the output limit of {self._max_bytes} bytes",
            )
            return
        if self._statements is not None and self._statements.restricts(verdict):
            records.append(self._review_statement(review, outcome))
        log.info(
            Event.REVIEW_APPLIED,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            event_id=verdict.event_id,
            supersedes=verdict.supersedes,
            action=verdict.action,
            machine_action=outcome.machine.action if outcome.machine is not None else None,
        )
        offset = record.offset

        def acked() -> None:
            self._on_finished(slot, offset)
            on_acked()

        self._sink.publish(records, acked, slot)

    def _review_statement(self, review: Review, outcome: Superseding) -> OutRecord:
        """The superseding verdict's statement of reasons, or the decision as a dead letter
        (stage ``statement``) when it is not valid or too big: either way in its group."""
        assert self._statements is not None
        try:
            statement = self._statements.review_statement(
                outcome.verdict, content_date=outcome.content_date, confirmed=outcome.confirmed
            )
        except StatementRejected as err:
            reason = str(err)
        else:
            out = OutRecord(self._statement_topic, review.key, statement_bytes(statement), OUTPUT_HEADERS)
            if record_size(out) <= self._max_bytes:
                return out
            reason = f"its statement of reasons would exceed the output limit of {self._max_bytes} bytes"
        return self._invalid_statement(review.record, outcome.verdict, reason)

    def _invalid_statement(self, record: Record, verdict: Verdict, reason: str) -> OutRecord:
        log.warning(
            Event.MESSAGE_DEAD_LETTERED,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            stage="statement",
            error_type="invalid_statement",
            reason=reason,
            verdict_id=verdict.verdict_id,
        )
        metrics.dead_lettered(record.topic, "statement", "invalid_statement").inc()
        return dead_letter_record(
            record,
            topic=self._dead_letter_topic,
            stage="statement",
            error_type="invalid_statement",
            message=reason,
            max_bytes=self._max_bytes,
        )

    # -- verdicts -------------------------------------------------------------------

    def _verdict(self, job: Job, verdict: Verdict) -> None:
        key = job.key
        limit = self._max_bytes
        records = [OutRecord(self._verdict_topic, key, verdict_bytes(verdict), OUTPUT_HEADERS)]
        fits = record_size(records[0]) <= limit
        if not fits:  # pass-through fields made it too big: leave them out
            verdict = msgspec.structs.replace(verdict, metadata=None, text=None, trimmed=True)
            records = [OutRecord(self._verdict_topic, key, verdict_bytes(verdict), OUTPUT_HEADERS)]
            metrics.outputs_trimmed("verdict").inc()
            fits = record_size(records[0]) <= limit
        violation = self._verdicts.violation(verdict)
        if violation is not None:
            records.append(OutRecord(self._violation_topic, key, violation_bytes(violation), OUTPUT_HEADERS))
            fits = fits and record_size(records[1]) <= limit
        if fits and self._statements is not None and self._statements.restricts(verdict):
            records.append(self._statement(job, verdict))
        if not fits:  # e.g. an enormous id: cannot fit even trimmed
            message = f"its verdict would exceed the output limit of {self._max_bytes} bytes even without metadata"
            self._sequencer.complete(
                job,
                lambda: self.dead_letter(
                    job.slot,
                    job.record,
                    stage="output",
                    error_type="output_too_large",
                    message=message,
                    also=job.changelog,
                ),
            )
            return
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
        self._sequencer.complete(job, lambda: self._release(records, job, verdict))
        if self._on_verdict is not None:
            self._on_verdict(job, verdict)

    def _statement(self, job: Job, verdict: Verdict) -> OutRecord:
        """The statement of reasons of a restricting verdict, or, when it is not valid (or
        too big), the input as a dead letter with the reason: either way in the verdict's
        group, so the verdict is published and its offset finishes as usual."""
        assert self._statements is not None
        try:
            statement = self._statements.statement(job, verdict)
        except StatementRejected as err:
            reason = str(err)
        else:
            out = OutRecord(self._statement_topic, job.key, statement_bytes(statement), OUTPUT_HEADERS)
            if record_size(out) <= self._max_bytes:
                return out
            reason = f"its statement of reasons would exceed the output limit of {self._max_bytes} bytes"
        return self._invalid_statement(job.record, verdict, reason)

    def _release(self, records: list[OutRecord], job: Job, verdict: Verdict) -> None:
        """Publish a verdict whose turn has come: into its partition's group of the
        ``conclude_all`` under way, else as a group of its own."""
        if job.changelog is not None:  # the turn's state change: acknowledged before its offset finishes
            records.append(job.changelog.record())
        groups = self._groups
        if groups is not None:
            entry = groups.get(id(job.slot))
            if entry is None:
                entry = groups[id(job.slot)] = (job.slot, VerdictGroup(self._on_finished))
            entry[1].add(records, job, verdict)
            return
        group = VerdictGroup(self._on_finished)
        group.add(records, job, verdict)
        self._sink.publish(group.records, group.acked, job.slot, group.messages)
        group.records = []
