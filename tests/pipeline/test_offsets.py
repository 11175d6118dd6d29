"""OffsetTracker: only a contiguous finished prefix is committable; ownership is respected."""

from aiokafka.structs import TopicPartition

from worker.pipeline.offsets import OffsetTracker

TP = TopicPartition("t", 0)


def test_out_of_order_finish_commits_only_the_contiguous_prefix():
    tracker = OffsetTracker()
    tracker.assign([TP])
    slot = tracker.slot(TP)
    for offset in (10, 11, 12, 13):
        slot.track(offset)
    slot.finish(12)
    slot.finish(11)
    assert tracker.committable() == {TP: 10}  # 10 is unfinished: nothing past it
    slot.finish(10)
    assert tracker.committable() == {TP: 13}
    slot.finish(13)
    assert tracker.committable() == {TP: 14}
    assert slot.pending == 0


def test_committable_is_reported_once_until_it_moves():
    tracker = OffsetTracker()
    slot = tracker.slot(TP)
    slot.track(0)
    slot.finish(0)
    offsets = tracker.committable()
    tracker.mark_committed(offsets)
    assert tracker.committable() == {}
    slot.track(5)  # gaps (compaction, markers) are fine
    slot.finish(5)
    assert tracker.committable() == {TP: 6}


def test_results_of_a_revoked_partition_are_never_committed():
    tracker = OffsetTracker()
    old = tracker.slot(TP)
    old.track(0)
    old.track(1)
    tracker.revoke([TP])
    assert not old.owned
    new = tracker.slot(TP)  # assigned again later: a fresh state
    new.track(0)
    old.finish(0)
    old.finish(1)  # late results land on the detached state
    assert tracker.committable() == {TP: 0}
    assert tracker.pending() == 1


def test_offsets_must_increase_within_an_assignment():
    tracker = OffsetTracker()
    slot = tracker.slot(TP)
    slot.track(3)
    try:
        slot.track(2)
    except ValueError as err:
        assert "must increase" in str(err)
    else:
        raise AssertionError("tracking a lower offset must fail")


def test_pending_and_committable_filter_by_partition():
    tracker = OffsetTracker()
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    tracker.assign([a, b])
    tracker.slot(a).track(0)
    tracker.slot(b).track(0)
    tracker.slot(b).finish(0)
    assert tracker.pending([a]) == 1 and tracker.pending([b]) == 0
    assert tracker.committable([b]) == {b: 1}


def test_a_reset_detaches_the_old_state_and_tracks_afresh_from_a_lower_offset():
    tracker = OffsetTracker()
    old = tracker.slot(TP)
    for offset in (50, 51):
        old.track(offset)
    new = tracker.reset(TP)
    assert not old.owned and new.owned and tracker.slot(TP) is new
    new.track(0)  # lower than anything tracked before: no error in the fresh state
    new.finish(0)
    old.finish(50)  # late results for the old positions are never committed
    assert tracker.committable() == {TP: 1}


def test_pending_bytes_count_the_sizes_of_unfinished_offsets_of_owned_partitions():
    tracker = OffsetTracker()
    a = tracker.slot(TopicPartition("t", 0))
    b = tracker.slot(TopicPartition("t", 1))
    a.track(0, 100)
    a.track(1, 50)
    a.track(2)  # no size given: counts no bytes
    b.track(7, 1_000)
    assert a.pending_bytes == 150 and tracker.pending_bytes() == 1_150
    a.finish(1)  # out of order
    a.finish(2)
    assert a.pending_bytes == 100
    tracker.revoke([TopicPartition("t", 1)])  # its work is abandoned: no longer in flight here
    assert tracker.pending_bytes() == 100
    a.finish(0)
    assert tracker.pending_bytes() == 0
