"""Span guard: a partition whose committed offset is stuck stops being read.

A partition's *uncommitted span* is the number of offsets tracked from its lowest
unfinished one on (``PartitionOffsets.span``): messages read after a message that does
not finish keep finishing, so the in-flight cap never pauses anything, while the offset
tracker holds every one of them (memory) and the committed offset cannot move (a restart
replays them all). The scorer's poison search normally ends such a wait; this is the
bound for whatever else could hold a message for ever.

``SpanGuard.apply`` is called once per consume-loop iteration. A partition whose span
exceeds ``cap`` is *held*: paused on its own (the other partitions go on), logged once,
and named with its stuck offset by ``stuck`` (``/livez`` fails naming it) and by the
gauge ``moderation_worker_partition_stuck_offset``. It is released once the span is at
most half the cap.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import structlog
from aiokafka.structs import TopicPartition

from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.types import PartitionOffsets

log = structlog.get_logger("worker.pipeline.span_guard")


class Holdable(Protocol):
    """What the guard needs of the source: pause and resume single partitions."""

    def hold(self, tps: list[TopicPartition], reason: str) -> None: ...

    def release(self, tps: list[TopicPartition], reason: str) -> None: ...


class SpanGuard:
    """Holds partitions whose uncommitted span passes ``cap``; see the module docstring."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: dict[TopicPartition, int] = {}

    @property
    def stuck(self) -> dict[TopicPartition, int]:
        """Held partitions and the offset each is stuck at (its lowest unfinished one)."""
        return dict(self._held)

    def apply(self, slots: Iterable[PartitionOffsets], source: Holdable) -> None:
        seen = set()
        for slot in slots:
            tp = slot.tp
            seen.add(tp)
            span = slot.span
            if tp in self._held:
                if span <= self.cap // 2:
                    self._release(tp, source, span)
                else:
                    self._note(tp, slot)
            elif span > self.cap:
                self._note(tp, slot)
                source.hold([tp], "uncommitted-span")
                log.error(
                    Event.PARTITION_STUCK,
                    topic=tp.topic,
                    partition=tp.partition,
                    stuck_offset=self._held[tp],
                    span=span,
                    cap=self.cap,
                )
        for tp in [tp for tp in self._held if tp not in seen]:  # revoked: no longer ours to hold
            del self._held[tp]
            metrics.PARTITION_STUCK_OFFSET.remove(tp.topic, str(tp.partition))
            source.release([tp], "uncommitted-span")

    def _note(self, tp: TopicPartition, slot: PartitionOffsets) -> None:
        offset = slot.lowest_unfinished
        if offset is not None and self._held.get(tp) != offset:
            self._held[tp] = offset
            metrics.PARTITION_STUCK_OFFSET.labels(tp.topic, str(tp.partition)).set(offset)

    def _release(self, tp: TopicPartition, source: Holdable, span: int) -> None:
        del self._held[tp]
        metrics.PARTITION_STUCK_OFFSET.remove(tp.topic, str(tp.partition))
        source.release([tp], "uncommitted-span")
        log.info(Event.PARTITION_UNSTUCK, topic=tp.topic, partition=tp.partition, span=span)
