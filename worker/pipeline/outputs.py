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

Contract: ``conclude`` never raises for any outcome; a job whose partition is no longer
owned is not published (``on_abandoned`` is called instead: the new owner redoes it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import structlog
from aiokafka.structs import TopicPartition

from schemas import Verdict
from worker.backends.base import Outcome, Rejected, Scored
from worker.config import Settings
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.acks import VerdictGroup
from worker.pipeline.encode import verdict_bytes, violation_bytes
from worker.pipeline.ordering import KeySequencer
from worker.pipeline.scoring import Degraded
from worker.pipeline.sink import dead_letter_record
from worker.pipeline.types import Job, OutRecord, PartitionOffsets, Record
from worker.pipeline.verdicts import VerdictBuilder

log = structlog.get_logger("worker.pipeline.outputs")

FinishFunction = Callable[[PartitionOffsets, int], None]


class Publisher(Protocol):
    """What outputs need of the sink: publish records in call order, call back on ack."""

    def publish(self, records: list[OutRecord], on_acked: Callable[[], None]) -> None: ...


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
    ) -> None:
        self._verdict_topic = settings.verdict_topic
        self._violation_topic = settings.violation_topic
        self._dead_letter_topic = settings.dead_letter_topic
        self._sink = sink
        self._verdicts = verdicts
        self._on_finished = on_finished
        self._on_abandoned = on_abandoned
        self._sequencer = KeySequencer()
        self._group: VerdictGroup | None = None  # set while conclude_all runs

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
                    job.slot, job.record, stage="backend", error_type=rejected.error_type, message=rejected.reason
                ),
            )
        else:
            self._verdict(job, self._verdicts.degraded(job, action=outcome.action, reason=outcome.reason))

    def conclude_all(self, jobs: Sequence[Job], outcomes: Sequence[Outcome | Degraded]) -> None:
        """``conclude`` each job in order (one backend call's results). The verdicts released
        meanwhile, these jobs' and earlier ones of their keys that waited for them, go to the
        sink as one group with one acknowledgement callback, in release order."""
        group = self._group = VerdictGroup(self._on_finished)
        try:
            for job, outcome in zip(jobs, outcomes, strict=True):
                self.conclude(job, outcome)
        finally:
            self._group = None
        if group.records:
            self._sink.publish(group.records, group.acked)

    def dead_letter(self, slot: PartitionOffsets, record: Record, *, stage: str, error_type: str, message: str) -> None:
        """Publish ``record`` unchanged to the dead-letter topic with the reason headers."""
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
            record, topic=self._dead_letter_topic, stage=stage, error_type=error_type, message=message
        )
        offset = record.offset
        self._sink.publish([out], lambda: self._on_finished(slot, offset))

    # -- verdicts -------------------------------------------------------------------

    def _verdict(self, job: Job, verdict: Verdict) -> None:
        key = job.key
        records = [OutRecord(self._verdict_topic, key, verdict_bytes(verdict))]
        violation = self._verdicts.violation(verdict)
        if violation is not None:
            records.append(OutRecord(self._violation_topic, key, violation_bytes(violation)))
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

    def _release(self, records: list[OutRecord], job: Job, verdict: Verdict) -> None:
        """Publish a verdict whose turn has come: into the group of the ``conclude_all`` under
        way (one sink group and one ack callback for all of it), else as a group of its own."""
        group = self._group
        if group is not None:
            group.add(records, job, verdict)
            return
        group = VerdictGroup(self._on_finished)
        group.add(records, job, verdict)
        self._sink.publish(group.records, group.acked)
