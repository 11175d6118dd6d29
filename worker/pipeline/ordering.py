"""Per-key ordering: results leave in the order their inputs were read, per key.

Backend calls run concurrently and finish in any order. ``KeySequencer`` holds each
(input partition, key) line: a job enters its line when it is accepted (in input order,
before batching) and its result is released only when every earlier job of the same line
has been released. Verdicts for one key are therefore published in input order.

Contract: ``enter`` is called in input order; ``complete`` runs ``release`` now or later,
exactly once, unless the job's partition is ``drop``ped first (then never).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from aiokafka.structs import TopicPartition

from worker.pipeline.types import Job


class KeySequencer:
    """Releases completed jobs of one (partition, key) strictly in the order they entered."""

    def __init__(self) -> None:
        self._queues: dict[tuple[TopicPartition, bytes], deque[Job]] = {}
        self._ready: dict[Job, Callable[[], None]] = {}
        self._waiting: set[Job] = set()  # entered, not yet released or dropped: O(1) membership

    def enter(self, job: Job) -> None:
        """Record the job's place in line. Call in input order, before it is batched."""
        key = (job.tp, job.key)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(job)
        self._waiting.add(job)

    def complete(self, job: Job, release: Callable[[], None]) -> None:
        """``release`` runs once every earlier job of the same key has been released."""
        if job not in self._waiting:
            release()  # not sequenced (its partition was dropped): nothing to wait for
            return
        key = (job.tp, job.key)
        queue = self._queues[key]
        self._ready[job] = release
        while queue and queue[0] in self._ready:
            head = queue.popleft()
            self._waiting.discard(head)
            self._ready.pop(head)()
        if not queue:
            del self._queues[key]

    def drop(self, tps: Iterable[TopicPartition]) -> int:
        """Forget the lines of revoked partitions; return how many completed jobs were
        waiting in them (never released: the caller stops counting them as in flight)."""
        revoked = set(tps)
        waiting = 0
        for key in [k for k in self._queues if k[0] in revoked]:
            for job in self._queues.pop(key):
                self._waiting.discard(job)
                waiting += self._ready.pop(job, None) is not None
        return waiting

    def __len__(self) -> int:
        return len(self._waiting)
