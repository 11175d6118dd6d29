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

from collections import deque
from collections.abc import Iterable

from aiokafka.structs import TopicPartition


class PartitionOffsets:
    """Per-partition state for one assignment period. Not thread-safe (event loop only)."""

    __slots__ = ("_committed", "_done", "_next", "_order", "owned", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.owned = True
        self._order: deque[int] = deque()  # tracked offsets in arrival (= offset) order
        self._done: set[int] = set()  # finished offsets not yet at the head
        self._next: int | None = None  # one past the highest offset tracked
        self._committed: int | None = None

    def track(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            raise ValueError(f"{self.tp}: offset {offset} tracked after {self._next - 1}; offsets must increase")
        self._order.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        order = self._order
        if order and order[0] == offset:
            order.popleft()
            done = self._done
            while order and order[0] in done:
                done.remove(order.popleft())
        else:
            self._done.add(offset)

    @property
    def pending(self) -> int:
        """Messages tracked and not yet finished."""
        return len(self._order) - len(self._done)

    def committable(self) -> int | None:
        """The offset to commit now, or None when nothing new is complete."""
        position = self._order[0] if self._order else self._next
        if position is None or position == self._committed:
            return None
        return position

    def mark_committed(self, offset: int) -> None:
        self._committed = offset


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

    def slot(self, tp: TopicPartition) -> PartitionOffsets:
        """The current state of an owned partition (assigning it if the listener lagged)."""
        state = self._partitions.get(tp)
        if state is None:
            state = self._partitions[tp] = PartitionOffsets(tp)
        return state

    def owned(self) -> list[TopicPartition]:
        return list(self._partitions)

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
