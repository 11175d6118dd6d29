"""Span guard: a partition whose committed offset is stuck is paused alone and named."""

from __future__ import annotations

from aiokafka.structs import TopicPartition

from worker.ops import metrics
from worker.pipeline.span_guard import SpanGuard
from worker.pipeline.types import PartitionOffsets

STUCK = TopicPartition("in.c", 0)
FLOWING = TopicPartition("in.c", 1)


class FakeSource:
    def __init__(self) -> None:
        self.held: set[TopicPartition] = set()

    def hold(self, tps: list[TopicPartition], reason: str) -> None:
        self.held.update(tps)

    def release(self, tps: list[TopicPartition], reason: str) -> None:
        self.held.difference_update(tps)


def stuck_offset_gauge(tp: TopicPartition) -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "moderation_worker_partition_stuck_offset", {"topic": tp.topic, "partition": str(tp.partition)}
    )


def test_a_partition_whose_head_never_finishes_is_held_alone_past_the_cap_and_released_at_half():
    stuck, flowing = PartitionOffsets(STUCK), PartitionOffsets(FLOWING)
    guard, source = SpanGuard(cap=10), FakeSource()
    for offset in range(100, 111):  # offset 100 never finishes; everything after it does
        stuck.track(offset)
        if offset > 100:
            stuck.finish(offset)
    for offset in range(50):  # the other partition finishes in order: its span stays 0
        flowing.track(offset)
        flowing.finish(offset)

    guard.apply([stuck, flowing], source)
    assert stuck.span == 11 and flowing.span == 0
    assert source.held == {STUCK}, "only the stuck partition is paused"
    assert guard.stuck == {STUCK: 100}
    assert stuck_offset_gauge(STUCK) == 100
    assert stuck_offset_gauge(FLOWING) is None

    stuck.finish(100)  # the head finally finishes: the whole span is committable
    guard.apply([stuck, flowing], source)
    assert source.held == set() and guard.stuck == {}
    assert stuck_offset_gauge(STUCK) is None


def test_at_or_under_the_cap_nothing_is_held():
    slot = PartitionOffsets(STUCK)
    for offset in range(10):
        slot.track(offset)
    guard, source = SpanGuard(cap=10), FakeSource()
    guard.apply([slot], source)
    assert source.held == set() and guard.stuck == {}


def test_a_held_partition_that_is_revoked_is_forgotten():
    slot = PartitionOffsets(STUCK)
    for offset in range(5):
        slot.track(offset)
    guard, source = SpanGuard(cap=2), FakeSource()
    guard.apply([slot], source)
    assert guard.stuck == {STUCK: 0}
    guard.apply([], source)  # no longer owned
    assert guard.stuck == {} and source.held == set()
    assert stuck_offset_gauge(STUCK) is None
