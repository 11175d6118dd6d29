"""Commit timing and committing: what is finished is committed, soon, but not per message.

``CommitPolicy`` is the timing as a small value object (as in arroyo's ``commit.py``): a
commit is due once ``every`` messages finished since the last one, or ``interval_s`` passed.
``Committer`` applies it: it asks the offset tracker what is committable (only contiguous
finished prefixes of owned partitions, see ``offsets``), commits that through the
source, and records it. A failed commit (a rebalance in progress) or one that outlasts
``COMMIT_TIMEOUT_S`` (the coordinator unreachable) is counted and logged;
the next commit catches up, so at-least-once holds either way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.offsets import OffsetTracker

log = structlog.get_logger("worker.pipeline.commit")

COMMIT_TIMEOUT_S = 10.0
"""Bound on one commit. aiokafka retries a commit for as long as the group coordinator is
unreachable; unbounded, a broker outage would hold the loop (and SIGTERM) forever."""

CommitFunction = Callable[[dict[TopicPartition, int]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CommitPolicy:
    """Commit after ``every`` finished messages or ``interval_s`` seconds, whichever first."""

    every: int
    interval_s: float

    def due(self, finished: int, elapsed_s: float) -> bool:
        return finished >= self.every or elapsed_s >= self.interval_s


class Committer:
    """Commits the tracker's committable offsets when the policy says so (or when asked)."""

    def __init__(
        self,
        policy: CommitPolicy,
        tracker: OffsetTracker,
        commit: CommitFunction,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = COMMIT_TIMEOUT_S,
    ) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.tracker = tracker
        self._commit = commit
        self._clock = clock
        self._finished = 0
        self._last = clock()

    def finished(self) -> None:
        """One more message finished since the last commit."""
        self._finished += 1

    async def maybe_commit(self) -> None:
        """Commit if the policy says it is due."""
        if self.policy.due(self._finished, self._clock() - self._last):
            await self.commit()

    async def commit(self, tps: list[TopicPartition] | None = None) -> None:
        """Commit what is committable now (optionally only ``tps``). Never raises ``KafkaError``."""
        self._last = self._clock()
        self._finished = 0
        offsets = self.tracker.committable(tps)
        if not offsets:
            return
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._commit(offsets), self.timeout_s)
        except (KafkaError, TimeoutError) as err:  # e.g. a rebalance in progress: the next commit catches up
            metrics.COMMIT_FAILURES.inc()
            log.warning(Event.COMMIT_FAILED, error=f"{type(err).__name__}: {err}", partitions=len(offsets))
            return
        metrics.COMMIT_LATENCY.observe(time.perf_counter() - started)
        self.tracker.mark_committed(offsets)
        log.debug(Event.OFFSETS_COMMITTED, offsets={f"{tp.topic}-{tp.partition}": o for tp, o in offsets.items()})
