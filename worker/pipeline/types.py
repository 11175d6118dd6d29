"""The core types every stage shares: what travels through the pipeline.

- ``PartitionOffsets``: one owned input partition during one assignment period (the
  *slot*): which of its offsets are tracked and finished, and whether it is still owned.
- ``Job``: one decoded input (a ``worker.pipeline.events`` Struct) with its record and its
  slot, from decode to the sink.
- ``Review``: one decoded human review decision with its record and its slot (it skips
  the backend: ``worker.pipeline.reviews``).
- ``DecodeFailure``: a record that could not become a ``Job``; it is dead-lettered.
- ``OutRecord``: one record for an output topic; ``PendingRecord``: one whose value is
  written only when it is published.

No stage owns these; stages import them from here, so data flows one way.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import msgspec
from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from schemas import Kind, ReviewDecision, Turn
from worker.pipeline.events import ContentEvent, ConversationEvent, schema_turns

Record: TypeAlias = ConsumerRecord[bytes, bytes]
"""An input record as aiokafka delivers it (``key`` and ``value`` may also be None)."""

Headers = list[tuple[str, bytes]]


class PartitionOffsets:
    """Per-partition state for one assignment period. Not thread-safe (event loop only).

    A message is *finished* when all its outputs are acknowledged (or it is dropped for
    good). ``committable`` is the lowest unfinished offset, or one past the highest
    tracked offset when all are finished: messages finish out of order, the committable
    offset only moves past a contiguous finished prefix. ``owned`` turns False when the
    partition is revoked: later results for it must never be committed by this member.
    """

    __slots__ = ("_committed", "_done", "_next", "_order", "_sizes", "finished_total", "owned", "pending_bytes", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.owned = True
        self._order: deque[int] = deque()  # tracked offsets in arrival (= offset) order
        self._done: set[int] = set()  # finished offsets not yet at the head
        self._next: int | None = None  # one past the highest offset tracked
        self._committed: int | None = None
        self._sizes: dict[int, int] = {}  # unfinished offsets tracked with a size -> that size
        self.finished_total = 0
        """Messages finished in this slot so far (``worker.pipeline.transactions`` counts by it)."""
        self.pending_bytes = 0
        """Sizes (``track``'s) of the offsets tracked and not yet finished: input bytes in flight."""

    def track(self, offset: int, size: int = 0) -> None:
        """Record an offset as read, with its input's ``size`` in bytes (for the byte cap of
        backpressure). Offsets must increase (raises ``ValueError`` otherwise)."""
        if self._next is not None and offset < self._next:
            raise ValueError(f"{self.tp}: offset {offset} tracked after {self._next - 1}; offsets must increase")
        self._order.append(offset)
        self._next = offset + 1
        if size:
            self._sizes[offset] = size
            self.pending_bytes += size

    def finish(self, offset: int) -> None:
        """Mark a tracked offset finished (its outputs are acknowledged)."""
        self.finished_total += 1
        if self._sizes:
            self.pending_bytes -= self._sizes.pop(offset, 0)
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

    @property
    def span(self) -> int:
        """Offsets held from the lowest unfinished one on (finished or not): what the
        tracker keeps in memory and a restart would replay."""
        return len(self._order)

    @property
    def lowest_unfinished(self) -> int | None:
        """The offset the committed position is waiting for, if any."""
        return self._order[0] if self._order else None

    @property
    def finished_ahead(self) -> int:
        """Finished offsets beyond the lowest unfinished one: 0 when everything finished
        lies below ``position`` (a prefix with nothing finished after it)."""
        return len(self._done)

    @property
    def position(self) -> int | None:
        """The offset a commit now would name (lowest unfinished, else one past the
        highest tracked); None before anything was tracked."""
        return self._order[0] if self._order else self._next

    def committable(self) -> int | None:
        """The offset to commit now, or None when nothing new is complete."""
        position = self._order[0] if self._order else self._next
        if position is None or position == self._committed:
            return None
        return position

    def mark_committed(self, offset: int) -> None:
        self._committed = offset


@dataclass(slots=True, eq=False)
class Job:
    """One decoded input travelling through batcher, backend, policy and sink."""

    record: Record
    slot: PartitionOffsets
    """The offset state of the partition (and assignment period) the record was read in."""
    kind: Kind
    event: ContentEvent | ConversationEvent
    """The decoded input, as ``worker.pipeline.events`` holds it (``kind`` says which)."""
    size: int
    """Bytes of the record value: a cheap upper bound of the text the backend will see."""
    context: tuple[Turn, ...] | None = None
    """Context given by the conversation state (``worker.pipeline.conversation_stage``) to a
    turn published without any; None: the event's own ``context`` is used."""
    changelog: PendingRecord | None = None
    """The conversation state change this turn made, published with its outcome (so its
    offset is committed only once the change is acknowledged); None: no change."""

    @property
    def tp(self) -> TopicPartition:
        return self.slot.tp

    @property
    def text(self) -> str:
        """The judged text: a content item's text or a conversation turn's content."""
        event = self.event
        return event.text if isinstance(event, ContentEvent) else event.content

    @property
    def judged_context(self) -> tuple[Turn, ...]:
        """The turns a conversation turn is judged with (oldest first); empty for content."""
        if self.context is not None:
            return self.context
        event = self.event
        return () if isinstance(event, ContentEvent) else schema_turns(event.context)

    @property
    def key(self) -> bytes:
        """Kafka key for outputs: the input's key, else the id that key should have been."""
        key: bytes | None = self.record.key
        if key is not None:
            return key
        event = self.event
        return (event.id if isinstance(event, ContentEvent) else event.conversation_id).encode()


@dataclass(frozen=True, slots=True)
class Review:
    """One human review decision read from the reviews topic, tracked in ``slot``."""

    record: Record
    slot: PartitionOffsets
    decision: ReviewDecision

    @property
    def key(self) -> bytes:
        """Kafka key for its outputs: the record's key, else the key the machine verdict has."""
        key: bytes | None = self.record.key
        if key is not None:
            return key
        decision = self.decision
        return (decision.conversation_id or decision.event_id).encode()


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    """Why a record could not become an event. Goes to the dead-letter topic."""

    record: Record
    error_type: str
    message: str


class OutRecord(msgspec.Struct, frozen=True):
    """One record for an output topic."""

    topic: str
    key: bytes | None
    value: bytes | None
    """None: a tombstone (compacted topics forget the key)."""
    headers: Headers | None = None
    partition: int | None = None
    """An explicit partition (a changelog's matches its input's); None: chosen by key hash."""


class PendingRecord(Protocol):
    """An output record written only when it is published: a conversation turn's state
    change (``worker.pipeline.conversation_stage.StateRecord``) holds references to its
    window's turns while the turn waits for its verdict, not the window's JSON."""

    def record(self) -> OutRecord:
        """The record to publish: the same bytes at every call."""
        ...
