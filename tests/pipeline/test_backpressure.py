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


class Bytes:
    """The input bytes in flight, as the offset tracker would report them."""

    def __init__(self) -> None:
        self.held = 0

    def __call__(self) -> int:
        return self.held


def test_reading_pauses_at_the_byte_cap_although_few_messages_are_in_flight():
    held = Bytes()
    in_flight, source = InFlight(10_000, max_bytes=1_000, held_bytes=held), FakeSource()
    in_flight.count, held.held = 3, 999
    in_flight.apply(source)
    assert source.events == []
    held.held = 1_000
    in_flight.apply(source)
    assert source.events == ["pause"]


def test_resuming_needs_both_caps_half_drained():
    held = Bytes()
    in_flight, source = InFlight(10, max_bytes=1_000, held_bytes=held), FakeSource()
    in_flight.count, held.held = 10, 1_000
    in_flight.apply(source)
    in_flight.count, held.held = 2, 501
    in_flight.apply(source)
    assert source.events == ["pause"], "resumed with the bytes above half their cap"
    in_flight.count, held.held = 6, 100
    in_flight.apply(source)
    assert source.events == ["pause"], "resumed with the messages above half their cap"
    in_flight.count = 5
    in_flight.apply(source)
    assert source.events == ["pause", "resume"]


def test_a_record_larger_than_the_byte_cap_passes_alone_and_never_sticks():
    held = Bytes()
    in_flight, source = InFlight(100, max_bytes=1_000, held_bytes=held), FakeSource()
    assert in_flight.room == 100, "nothing read yet: the count cap alone sizes the first poll"
    in_flight.observe(5_000)
    in_flight.count, held.held = 1, 5_000
    assert in_flight.room == 1
    in_flight.apply(source)
    assert source.events == ["pause"]
    in_flight.count, held.held = 0, 0  # it finished
    in_flight.apply(source)
    assert source.events == ["pause", "resume"]
    assert in_flight.room >= 1


def test_room_is_sized_by_the_bytes_left_at_the_mean_record_size():
    held = Bytes()
    in_flight = InFlight(10_000, max_bytes=100_000, held_bytes=held)
    for _ in range(20):
        in_flight.observe(1_000)
    held.held = 40_000
    assert in_flight.room == 60
    assert InFlight(10_000).room == 10_000, "no byte cap: only the count"


def test_the_byte_budget_is_what_the_cap_leaves_and_none_without_a_cap():
    held = Bytes()
    in_flight = InFlight(10, max_bytes=1_000, held_bytes=held)
    held.held = 300
    assert in_flight.byte_budget() == 700
    held.held = 0
    assert in_flight.byte_budget() == 1_000, "nothing in flight: positive, so any one record is accepted"
    assert InFlight(10).byte_budget() is None
