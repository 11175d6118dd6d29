"""Batching stage: gather jobs across partitions into backend calls.

``MicroBatcher`` keeps one open batch per kind (text and conversation batches go to
different endpoints, so they never mix). A batch is handed to ``on_batch`` as soon as it
reaches ``max_size`` jobs or ``max_bytes`` bytes, or ``max_wait_s`` after its first job
arrived, whichever comes first. Jobs keep their arrival order inside a batch.

Contract: ``add`` never blocks and never drops; ``on_batch`` is called synchronously from
``add``, from the wait timer, or from ``flush``; it must not raise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from schemas import Kind
from worker.ops import metrics
from worker.pipeline.types import Job

BatchCallback = Callable[[Kind, list[Job]], None]


class _Lane:
    __slots__ = ("jobs", "opened_at", "size", "timer")

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.opened_at = 0.0  # monotonic time of the open batch's first job


class MicroBatcher:
    """Count-, byte- and time-bounded batches, one lane per kind."""

    def __init__(self, *, max_size: int, max_bytes: int, max_wait_s: float, on_batch: BatchCallback) -> None:
        self._max_size = max_size
        self._max_bytes = max_bytes
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._lanes: dict[Kind, _Lane] = {"content": _Lane(), "conversation": _Lane()}

    def add(self, job: Job) -> None:
        lane = self._lanes[job.kind]
        if lane.jobs and lane.size + job.size > self._max_bytes:
            self._flush(job.kind)  # the new job would overflow: send what we have first
        if not lane.jobs:
            lane.opened_at = time.monotonic()
        lane.jobs.append(job)
        lane.size += job.size
        if len(lane.jobs) >= self._max_size or lane.size >= self._max_bytes:
            self._flush(job.kind)
        elif lane.timer is None:
            if self._max_wait_s <= 0:
                self._flush(job.kind)
            else:
                lane.timer = asyncio.get_running_loop().call_later(self._max_wait_s, self._flush, job.kind)

    @property
    def queued(self) -> int:
        return sum(len(lane.jobs) for lane in self._lanes.values())

    def flush(self) -> None:
        """Send every open batch now (shutdown)."""
        for kind in self._lanes:
            self._flush(kind)

    def _flush(self, kind: Kind) -> None:
        lane = self._lanes[kind]
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        if not lane.jobs:
            return
        jobs, lane.jobs, lane.size = lane.jobs, [], 0
        metrics.batch_wait(kind).observe(time.monotonic() - lane.opened_at)
        self._on_batch(kind, jobs)
