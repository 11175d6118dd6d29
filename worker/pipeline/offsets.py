"""Offset tracking: which offsets of each owned partition are safe to commit.

A message is *finished* when all its outputs (verdict + violation, or dead letter) have
been acknowledged by the broker, or when it is dropped for good. The committable offset
of a partition is the lowest offset not yet finished (Kafka commits "the next offset to
read"), or one past the highest offset seen when everything is finished. Messages finish
out of order; the committable offset only moves past a contiguous finished prefix.

Ownership: ``assign`` creates a fresh ``PartitionOffsets`` for a partition and ``revoke``
detaches it. Jobs hold the ``PartitionOffsets`` they were tracked in, so a result that
arrives after its partition was revoked (or revoked and assigned again) updates a
detached object and can never be committed by this member.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka.structs import TopicPartition

from worker.pipeline.types import PartitionOffsets

__all__ = ["OffsetTracker", "PartitionOffsets"]


class OffsetTracker:
    """All partitions this member owns. The app is the only caller."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            if tp not in self._partitions:
                self._partitions[tp] = PartitionOffsets(tp)

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Detach these partitions: later results for them are never committed here."""
        for tp in tps:
            state = self._partitions.pop(tp, None)
            if state is not None:
                state.owned = False

    def reset(self, tp: TopicPartition) -> PartitionOffsets:
        """Detach ``tp``'s state (as ``revoke``) and start a fresh one (an offset reset)."""
        self.revoke([tp])
        state = self._partitions[tp] = PartitionOffsets(tp)
        return state

    def slot(self, tp: TopicPartition) -> PartitionOffsets:
        """The current state of an owned partition (assigning it if the listener lagged)."""
        state = self._partitions.get(tp)
        if state is None:
            state = self._partitions[tp] = PartitionOffsets(tp)
        return state

    def owned(self) -> list[TopicPartition]:
        return list(self._partitions)

    def slots(self) -> list[PartitionOffsets]:
        """The state of every owned partition."""
        return list(self._partitions.values())

    def pending_bytes(self) -> int:
        """Input bytes of the offsets tracked and not finished, over every owned partition
        (a revoked or reset slot's work is abandoned: it no longer counts)."""
        return sum(state.pending_bytes for state in self._partitions.values())

    def pending(self, tps: Iterable[TopicPartition] | None = None) -> int:
        states = (
            self._partitions.values() if tps is None else (self._partitions[tp] for tp in tps if tp in self._partitions)
        )
        return sum(state.pending for state in states)

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets to commit for owned partitions (optionally only ``tps``) that moved."""
        selected = (
            self._partitions.items()
            if tps is None
            else ((tp, self._partitions[tp]) for tp in tps if tp in self._partitions)
        )
        out = {}
        for tp, state in selected:
            offset = state.committable()
            if offset is not None:
                out[tp] = offset
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.mark_committed(offset)
