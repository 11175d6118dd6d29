"""What the operations side (metrics, probes, lag) may read of a running worker.

Small typed protocols instead of the whole worker: ``HealthServer`` and
``metrics.bind_worker`` see a ``WorkerStatus``; the lag sampler sees ``PartitionView``.
``worker.app.ModerationWorker`` and ``worker.pipeline.source.Source`` implement them.
"""

from __future__ import annotations

from typing import Protocol

from aiokafka.structs import TopicPartition


class PartitionView(Protocol):
    """The consumer's view of its partitions, read without a request to the broker."""

    def assignment(self) -> set[TopicPartition]: ...

    def paused_partitions(self) -> set[TopicPartition]: ...

    async def position(self, tp: TopicPartition) -> int: ...

    def highwater(self, tp: TopicPartition) -> int | None: ...


class BackendStatus(Protocol):
    @property
    def name(self) -> str: ...

    async def ready(self) -> bool: ...


class WorkerStatus(Protocol):
    """A running worker as probes and scrape-time gauges see it."""

    @property
    def started(self) -> bool:
        """Subscribed and consuming (the backend started)."""

    @property
    def draining(self) -> bool:
        """Shutting down: no new work is taken."""

    @property
    def last_loop_at(self) -> float:
        """``time.monotonic()`` of the last consume-loop iteration."""

    @property
    def in_flight(self) -> int:
        """Messages read and not yet finished."""

    @property
    def in_flight_bytes(self) -> int:
        """Input value bytes of the messages read and not yet finished."""

    @property
    def partitions(self) -> PartitionView: ...

    @property
    def stuck_partitions(self) -> dict[TopicPartition, int]:
        """Partitions paused because their committed offset is stuck, with that offset."""

    @property
    def held_partitions(self) -> dict[TopicPartition, tuple[str, ...]]:
        """Partitions kept paused whatever backpressure does (a state restore, a stuck span,
        a fenced producer), each with its reasons."""

    @property
    def backend(self) -> BackendStatus: ...

    @property
    def policy_version(self) -> str: ...
