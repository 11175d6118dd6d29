"""The pure parts of the health server: stall detection and lag arithmetic.

The HTTP server, the probes and the metrics themselves are tested against a running
worker in ``test_metrics_health.py``; this covers the cases a live consumer cannot be
made to produce on demand (a partition with data whose position stops moving).
"""

from __future__ import annotations

from aiokafka.structs import TopicPartition

from worker.ops import metrics
from worker.ops.health import Check, StallDetector
from worker.ops.lag import PartitionLag

TP = TopicPartition("ugc.content", 0)
OTHER = TopicPartition("ugc.content", 1)


def waiting(position: int, *, highwater: int = 100, paused: bool = False) -> PartitionLag:
    return PartitionLag(position=position, highwater=highwater, paused=paused)


def test_a_partition_with_lag_that_stops_moving_is_stalled_after_the_bound():
    detector = StallDetector(bound_s=30)
    assert detector.observe({TP: waiting(10)}, now=0) == []
    assert detector.observe({TP: waiting(10)}, now=30) == []  # exactly the bound: not yet
    assert detector.observe({TP: waiting(10)}, now=31) == [TP]


def test_movement_restarts_the_watch():
    detector = StallDetector(bound_s=30)
    detector.observe({TP: waiting(10)}, now=0)
    assert detector.observe({TP: waiting(11)}, now=25) == []
    assert detector.observe({TP: waiting(11)}, now=50) == []
    assert detector.observe({TP: waiting(11)}, now=56) == [TP]


def test_paused_or_caught_up_partitions_are_never_stalled():
    detector = StallDetector(bound_s=30)
    for now in (0, 40, 80):
        assert detector.observe({TP: waiting(10, paused=True), OTHER: waiting(100, highwater=100)}, now=now) == []
    # a pause in between resets the watch: backpressure is not a stall
    assert detector.observe({TP: waiting(10)}, now=100) == []
    assert detector.observe({TP: waiting(10)}, now=120) == []


def test_unknown_highwater_is_not_lag():
    assert PartitionLag(position=5, highwater=None, paused=False).lag is None
    assert PartitionLag(position=7, highwater=5, paused=False).lag == 0  # highwater read before the fetch
    assert StallDetector(bound_s=1).observe({TP: PartitionLag(5, None, False)}, now=100) == []


def test_only_the_stuck_partition_is_named():
    detector = StallDetector(bound_s=10)
    detector.observe({TP: waiting(1), OTHER: waiting(1)}, now=0)
    assert detector.observe({TP: waiting(1), OTHER: waiting(2)}, now=11) == [TP]


def test_check_body_says_what_failed():
    assert (
        Check(False, "shutting down", {"draining": True}).body()
        == b'{"draining": true, "reason": "shutting down", "status": "fail"}\n'
    )
    assert Check(True).body() == b'{"status": "ok"}\n'


def test_label_cache_binds_each_child_once():
    counted = metrics.LabelCache(metrics.MESSAGES_CONSUMED)
    first = counted("label-cache-test")
    assert counted("label-cache-test") is first
    before = metrics.REGISTRY.get_sample_value(
        "moderation_worker_messages_consumed_total", {"topic": "label-cache-test"}
    )
    first.inc(3)
    after = metrics.REGISTRY.get_sample_value(
        "moderation_worker_messages_consumed_total", {"topic": "label-cache-test"}
    )
    assert after - before == 3


async def test_livez_fails_naming_a_stuck_partition_and_its_offset():
    from worker.config import Settings
    from worker.ops.health import HealthServer

    class Partitions:
        def assignment(self):
            return {TP}

        def paused_partitions(self):
            return {TP}

    class Worker:
        started, draining, in_flight, in_flight_bytes, policy_version = True, False, 0, 0, "v"
        partitions = Partitions()
        backend = type("B", (), {"name": "fake"})()

        def __init__(self) -> None:
            self.last_loop_at = 100.0
            self.stuck_partitions = {TP: 1234}
            self.held_partitions = {TP: ("uncommitted-span",)}

    server = HealthServer(Worker(), Settings(http_port=0), clock=lambda: 100.0)
    check = await server.liveness()
    assert not check.ok
    assert "ugc.content-0 at offset 1234" in check.reason
    assert check.details["stuck_partitions"] == {"ugc.content-0": 1234}


async def test_livez_names_the_held_and_the_paused_partitions_and_why():
    from worker.config import Settings
    from worker.ops.health import HealthServer

    restoring = TopicPartition("ugc.conversations", 3)

    class Partitions:
        def assignment(self):
            return {TP, OTHER, restoring}

        def paused_partitions(self):
            return {OTHER, restoring}

        async def position(self, tp):
            return 0

        def highwater(self, tp):
            return 0

    class Worker:
        started, draining, in_flight, in_flight_bytes, policy_version = True, False, 0, 0, "v"
        partitions = Partitions()
        backend = type("B", (), {"name": "fake"})()

        def __init__(self) -> None:
            self.last_loop_at = 100.0
            self.stuck_partitions: dict[TopicPartition, int] = {}
            self.held_partitions = {restoring: ("conversation-restore",)}

    check = await HealthServer(Worker(), Settings(http_port=0), clock=lambda: 100.0).liveness()
    assert check.ok, "a restore has its own bound: holding is not a liveness failure"
    assert check.details["held_partitions"] == {"ugc.conversations-3": ["conversation-restore"]}
    assert check.details["paused_partitions"] == ["ugc.content-1"]
