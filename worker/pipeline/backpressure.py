"""Backpressure: count what is in flight; pause reading at the cap, resume at half.

A message is *in flight* from the moment it is read until it is finished (outputs
acknowledged) or abandoned (its partition was revoked, or the worker gave it up: it is
processed again by the next owner). ``InFlight`` is the one counter; ``apply`` pauses the
source when the count reaches ``cap`` and resumes it once half the cap has drained, so
memory stays bounded by ``cap`` messages whatever the backend does.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from worker.ops.logs import Event

log = structlog.get_logger("worker.pipeline.backpressure")


class Pausable(Protocol):
    """What backpressure needs of the source."""

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class InFlight:
    """Messages read and not yet finished or abandoned, against a cap."""

    __slots__ = ("cap", "count")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0

    @property
    def room(self) -> int:
        """How many more messages may be read now (at least 1, so a poll is never empty-sized)."""
        return max(1, self.cap - self.count)

    def apply(self, source: Pausable) -> None:
        """Pause ``source`` at the cap; resume it once at most half the cap is in flight."""
        if not source.paused and self.count >= self.cap:
            source.pause()
            log.info(Event.CONSUMPTION_PAUSED, in_flight=self.count, cap=self.cap)
        elif source.paused and self.count <= self.cap // 2:
            source.resume()
            log.info(Event.CONSUMPTION_RESUMED, in_flight=self.count, cap=self.cap)
