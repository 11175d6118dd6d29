"""Commit timing and committing, against an offset tracker and a recording commit function."""

from __future__ import annotations

from aiokafka.errors import RebalanceInProgressError
from aiokafka.structs import TopicPartition

from worker.pipeline.commit import CommitPolicy, Committer
from worker.pipeline.offsets import OffsetTracker

TP = TopicPartition("in.c", 0)


def test_a_commit_is_due_by_count_or_by_time():
    policy = CommitPolicy(every=100, interval_s=1.0)
    assert not policy.due(99, 0.5)
    assert policy.due(100, 0.0)
    assert policy.due(0, 1.0)


class Recorder:
    def __init__(self, fail_times: int = 0) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail_times = fail_times

    async def __call__(self, offsets: dict[TopicPartition, int]) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise RebalanceInProgressError()
        self.commits.append(dict(offsets))


async def test_only_a_finished_prefix_is_committed_and_only_when_it_moved():
    tracker = OffsetTracker()
    slot = tracker.slot(TP)
    for offset in (0, 1, 2):
        slot.track(offset)
    recorder = Recorder()
    committer = Committer(CommitPolicy(every=1, interval_s=60), tracker, recorder, clock=lambda: 0.0)
    slot.finish(1)
    await committer.commit()
    assert recorder.commits == [{TP: 0}]
    await committer.commit()
    assert recorder.commits == [{TP: 0}], "committed an offset that had not moved"
    slot.finish(0)
    await committer.commit()
    assert recorder.commits == [{TP: 0}, {TP: 2}]


async def test_maybe_commit_waits_for_the_policy():
    tracker = OffsetTracker()
    slot = tracker.slot(TP)
    slot.track(0)
    slot.finish(0)
    now = [0.0]
    recorder = Recorder()
    committer = Committer(CommitPolicy(every=2, interval_s=5), tracker, recorder, clock=lambda: now[0])
    committer.finished()
    await committer.maybe_commit()
    assert recorder.commits == []
    committer.finished()
    await committer.maybe_commit()
    assert recorder.commits == [{TP: 1}]
    slot.track(1)
    slot.finish(1)
    now[0] = 4.9
    await committer.maybe_commit()
    assert len(recorder.commits) == 1
    now[0] = 5.0
    await committer.maybe_commit()
    assert recorder.commits[-1] == {TP: 2}


async def test_a_failed_commit_is_retried_by_the_next_one():
    tracker = OffsetTracker()
    slot = tracker.slot(TP)
    slot.track(0)
    slot.finish(0)
    recorder = Recorder(fail_times=1)
    committer = Committer(CommitPolicy(every=1, interval_s=60), tracker, recorder)
    await committer.commit()
    assert recorder.commits == []
    await committer.commit()
    assert recorder.commits == [{TP: 1}]


async def test_a_commit_that_never_returns_is_given_up_and_retried_by_the_next():
    """aiokafka retries a commit for as long as the coordinator is away: bounded here."""
    import asyncio

    tracker = OffsetTracker()
    slot = tracker.slot(TP)
    slot.track(0)
    slot.finish(0)
    hanging = asyncio.Event()

    async def never(offsets: dict[TopicPartition, int]) -> None:
        await hanging.wait()

    committer = Committer(CommitPolicy(every=1, interval_s=60), tracker, never, timeout_s=0.05)
    await asyncio.wait_for(committer.commit(), 5)
    assert tracker.committable() == {TP: 1}, "not marked committed: the next commit tries again"
