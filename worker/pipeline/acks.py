"""Acknowledging verdicts by the group: one sink callback for everything one call released.

Per verdict the worker used to build a closure with its own metric children, hand the sink
one group of records and get one callback back. ``VerdictGroup`` collects every verdict
(and violation) released while one backend call's results are concluded, so the sink gets
one group and one callback; on acknowledgement it finishes each message's offset, counts
verdicts and violations once per label set, and observes each message's end-to-end
latency. The metrics mean what they meant per verdict (same counts, same latencies).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.ops import metrics
from worker.pipeline.types import Job, OutRecord, PartitionOffsets
from worker.pipeline.verdict_data import CategoryHit, Verdict

FinishFunction = Callable[[PartitionOffsets, int], None]

_Entry = tuple[PartitionOffsets, int, int | None, str, str, bool, list[CategoryHit]]


class VerdictGroup:
    """Records to publish as one group, and what their acknowledgement must do.

    ``add`` appends a verdict's records (its key's order is the caller's: add in release
    order). ``acked`` is the sink's callback: it runs once, when every record is acknowledged.
    """

    __slots__ = ("_entries", "_finished", "records")

    def __init__(self, finished: FinishFunction) -> None:
        self._finished = finished
        self._entries: list[_Entry] = []
        self.records: list[OutRecord] = []

    def add(self, records: list[OutRecord], job: Job, verdict: Verdict) -> None:
        record = job.record
        self.records += records
        self._entries.append(
            (job.slot, record.offset, record.timestamp, job.kind, verdict.action, verdict.degraded, verdict.violations)
        )

    @property
    def messages(self) -> int:
        """Input messages the group concludes (what a dropped group stops counting in flight)."""
        return len(self._entries)

    def acked(self) -> None:
        """Finish every message of the group; count and time its verdicts."""
        finished = self._finished
        counts: dict[tuple[str, str, bool], int] = {}
        hits: dict[str, int] = {}
        now = time.time()
        latency = metrics.end_to_end_latency
        for slot, offset, timestamp_ms, kind, action, degraded, violations in self._entries:
            finished(slot, offset)
            labels = (kind, action, degraded)
            counts[labels] = counts.get(labels, 0) + 1
            for hit in violations:
                hits[hit.category] = hits.get(hit.category, 0) + 1
            if timestamp_ms is not None and timestamp_ms >= 0:  # -1: a record without a timestamp
                latency(kind).observe(max(0.0, now - timestamp_ms / 1000))
        for (kind, action, degraded), count in counts.items():
            metrics.verdicts(kind, action, "true" if degraded else "false").inc(count)
        for category, count in hits.items():
            metrics.violations(category).inc(count)
