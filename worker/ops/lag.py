"""Consumer lag of this member: per assigned partition, highwater minus position.

``highwater`` is the offset the broker will give the next record of the partition, as the
last fetch response reported it; ``position`` is the offset of the next record the
consumer will hand to the worker. Their difference is what this member still has to read
(records already read but not yet finished are ``moderation_worker_in_flight_messages``).

Both come from the consumer itself: no request to the broker, so sampling is cheap. The
broker-side ``end_offsets()`` is not used on purpose: the embedded test broker reports it
wrongly, and the fetch response's highwater is what the consumer acts on anyway.

``LagSampler.sample()`` is awaited by ``worker.ops.health`` before each scrape (so
``moderation_worker_consumer_lag`` is as fresh as the scrape) and by the liveness check
(a partition with lag whose position does not move is a stalled consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition

from worker.ops import metrics
from worker.ops.status import PartitionView


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One assigned partition at one moment."""

    position: int
    highwater: int | None
    """``None`` until the first fetch response for the partition arrived."""
    paused: bool

    @property
    def lag(self) -> int | None:
        if self.highwater is None:
            return None
        return max(0, self.highwater - self.position)


class LagSampler:
    """Reads positions and highwaters of the source's assigned partitions.

    ``position_timeout_s`` bounds the wait for a partition whose position is being reset
    (right after an assignment): such a partition is left out of that sample.
    """

    def __init__(self, source: PartitionView, *, position_timeout_s: float = 0.5) -> None:
        self._source = source
        self._position_timeout_s = position_timeout_s
        self._reported: set[TopicPartition] = set()

    async def sample(self) -> dict[TopicPartition, PartitionLag]:
        """Every assigned partition with a known position. Never raises for a rebalance race."""
        source = self._source
        paused = source.paused_partitions()
        out: dict[TopicPartition, PartitionLag] = {}
        for tp in sorted(source.assignment()):
            try:
                position = await asyncio.wait_for(source.position(tp), self._position_timeout_s)
                highwater = source.highwater(tp)
            except (TimeoutError, IllegalStateError, AssertionError):
                continue  # revoked meanwhile, or its position is being reset: next sample
            out[tp] = PartitionLag(position=position, highwater=highwater, paused=tp in paused)
        return out

    async def refresh_metric(self) -> dict[TopicPartition, PartitionLag]:
        """Sample, set ``moderation_worker_consumer_lag`` and drop partitions no longer assigned."""
        lags = await self.sample()
        assigned = self._source.assignment()
        for tp in self._reported - assigned:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        self._reported &= assigned
        for tp, state in lags.items():
            lag = state.lag
            if lag is not None:  # a partition not sampled this time keeps its last value
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
                self._reported.add(tp)
        return lags
