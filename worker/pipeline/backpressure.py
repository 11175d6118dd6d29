"""Backpressure: count what is in flight, in messages and bytes; pause reading at either cap,
resume once both have halved.

A message is *in flight* from the moment it is read until it is finished (outputs
acknowledged) or abandoned (its partition was revoked, or the worker gave it up: it is
processed again by the next owner). ``InFlight`` is the one counter of messages, against
``cap`` (``MODWORKER_MAX_IN_FLIGHT``); the bytes in flight are the input values read and
not yet finished of the owned partitions (``PartitionOffsets.pending_bytes``, summed by the
``held_bytes`` callable), against ``max_bytes`` (``MODWORKER_MAX_IN_FLIGHT_BYTES``).
``apply`` pauses the source when either reaches its cap and resumes it once both are at
most half their cap, so memory stays bounded by ``cap`` messages and about ``max_bytes`` of
input whatever the backend does.

Bytes are known only once a record is polled: ``room`` sizes the next poll by the bytes
left and the mean record size seen (``observe``), and the consume loop accepts a poll's
records only while ``byte_budget`` is positive, sending the partitions of the rest back to
their first unaccepted offset (read again after the pause). So the input bytes in flight
stay under the cap plus one record. A record larger than the whole byte cap still passes:
it is accepted when the budget is positive (with nothing in flight it always is), is in
flight alone or nearly, and pauses reading until it finishes. Nothing is stuck behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import structlog

from worker.ops.logs import Event

log = structlog.get_logger("worker.pipeline.backpressure")

_MEAN_WEIGHT = 1 / 16
"""Weight of each new record in the running mean size: a few polls to follow a change."""


class Pausable(Protocol):
    """What backpressure needs of the source."""

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


def _no_bytes() -> int:
    return 0


class InFlight:
    """Messages (and their input bytes) read and not yet finished or abandoned, against caps.

    ``max_bytes`` None: no byte cap. ``held_bytes``: the input bytes in flight now.
    """

    __slots__ = ("_held_bytes", "cap", "count", "max_bytes", "mean_size")

    def __init__(self, cap: int, *, max_bytes: int | None = None, held_bytes: Callable[[], int] = _no_bytes) -> None:
        self.cap = cap
        self.count = 0
        self.max_bytes = max_bytes
        self._held_bytes = held_bytes
        self.mean_size = 0.0
        """Running mean of the input bytes of the records read (0 before the first)."""

    @property
    def bytes(self) -> int:
        """Input bytes of the messages in flight."""
        return self._held_bytes()

    def observe(self, size: int) -> None:
        """One record of ``size`` input bytes was read (for ``room``'s estimate)."""
        self.mean_size = size if self.mean_size == 0.0 else self.mean_size + (size - self.mean_size) * _MEAN_WEIGHT

    @property
    def room(self) -> int:
        """How many more messages may be read now: what the count cap leaves, and what the
        byte cap leaves at the mean record size; at least 1, so a poll is never empty-sized."""
        room = self.cap - self.count
        if self.max_bytes is not None and self.mean_size >= 1.0:
            room = min(room, int((self.max_bytes - self.bytes) // self.mean_size))
        return max(1, room)

    def byte_budget(self) -> int | None:
        """Input bytes the consume loop may still accept from the records of this poll (None:
        no byte cap). It accepts records while the budget is positive, so with nothing in
        flight a record larger than the cap is accepted, alone, and the rest wait."""
        return None if self.max_bytes is None else self.max_bytes - self.bytes

    def apply(self, source: Pausable) -> None:
        """Pause ``source`` at either cap; resume it once both are at most half drained."""
        count = self.count
        if not source.paused:
            if count >= self.cap:
                source.pause()
                log.info(Event.CONSUMPTION_PAUSED, in_flight=count, cap=self.cap, cause="messages")
            elif self.max_bytes is not None and (held := self.bytes) >= self.max_bytes:
                source.pause()
                log.info(
                    Event.CONSUMPTION_PAUSED,
                    in_flight=count,
                    in_flight_bytes=held,
                    max_bytes=self.max_bytes,
                    cause="bytes",
                )
        elif count <= self.cap // 2 and (self.max_bytes is None or self.bytes <= self.max_bytes // 2):
            source.resume()
            log.info(Event.CONSUMPTION_RESUMED, in_flight=count, cap=self.cap)
