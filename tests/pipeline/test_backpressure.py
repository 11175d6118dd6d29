"""Backpressure: pause at the cap, resume at half, never a poll of size 0."""

from __future__ import annotations

from worker.pipeline.backpressure import InFlight


class FakeSource:
    def __init__(self) -> None:
        self.paused = False
        self.events: list[str] = []

    def pause(self) -> None:
        self.paused = True
        self.events.append("pause")

    def resume(self) -> None:
        self.paused = False
        self.events.append("resume")


def test_reading_pauses_at_the_cap_and_resumes_once_half_drained():
    in_flight, source = InFlight(10), FakeSource()
    in_flight.count = 9
    in_flight.apply(source)
    assert source.events == []
    in_flight.count = 10
    in_flight.apply(source)
    assert source.events == ["pause"]
    in_flight.count = 6
    in_flight.apply(source)
    assert source.events == ["pause"], "resumed before half the cap drained"
    in_flight.count = 5
    in_flight.apply(source)
    assert source.events == ["pause", "resume"]


def test_room_is_what_the_cap_leaves_but_at_least_one():
    in_flight = InFlight(10)
    in_flight.count = 4
    assert in_flight.room == 6
    in_flight.count = 12
    assert in_flight.room == 1
