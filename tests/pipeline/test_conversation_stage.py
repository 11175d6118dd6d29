"""The conversation stage without a broker: what it puts on jobs, publishes and holds."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiokafka.structs import TopicPartition
from pydantic_core import to_json

from tests.pipeline.conftest import CONVERSATION_TOPIC, DECODER, make_record
from worker.backends.base import Rejected, Scored
from worker.config import Settings
from worker.pipeline.conversation_stage import ConversationStage
from worker.pipeline.outputs import Outputs
from worker.pipeline.policy import Policy
from worker.pipeline.source import Source
from worker.pipeline.types import Job, OutRecord, PartitionOffsets
from worker.pipeline.verdicts import VerdictBuilder

SETTINGS = Settings(
    conversation_topic=CONVERSATION_TOPIC,
    conversation={"changelog_topic": "state", "ttl_s": 60.0, "max_turns": 4},
)


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.published: list[list[OutRecord]] = []
        self.held: list[TopicPartition] = []

    def publish(self, records, on_acked) -> None:
        self.published.append(records)
        on_acked()

    def hold(self, tps, reason) -> None:
        self.held += tps

    def release(self, tps, reason) -> None:
        self.held = [tp for tp in self.held if tp not in tps]


def stage(clock: Clock, recorder: Recorder, enabled: bool = True) -> ConversationStage:
    settings = SETTINGS.model_copy(
        update={"conversation": SETTINGS.conversation.model_copy(update={"enabled": enabled})}
    )
    return ConversationStage(settings, publish=recorder.publish, source=recorder, on_fatal=print, clock=clock)


def turn_job(
    conversation: str, i: int, *, partition: int = 2, offset: int = 0, slot: PartitionOffsets | None = None, **extra
) -> Job:
    value = {"id": f"{conversation}-{i}", "conversation_id": conversation, "role": "user", "content": f"m{i}", **extra}
    slot = slot or PartitionOffsets(TopicPartition(CONVERSATION_TOPIC, partition))
    slot.track(offset)
    raw = json.dumps(value).encode()
    job = DECODER.decode(make_record(raw, topic=CONVERSATION_TOPIC, partition=partition, offset=offset), slot)
    assert isinstance(job, Job)
    return job


def test_turns_get_context_and_carry_their_change_for_the_input_partition():
    recorder = Recorder()
    s = stage(Clock(), recorder)
    first, second = turn_job("c", 0), turn_job("c", 1, offset=1)
    s.accept(first)
    s.accept(second)
    assert first.context == () and [t.content for t in second.context] == ["m0"]
    assert second.changelog is not None
    change = second.changelog.record()
    assert change.topic == "state" and change.key == b"c" and change.partition == 2
    assert [t["id"] for t in json.loads(change.value)["turns"]] == ["c-0", "c-1"]
    assert recorder.published == [], "changes travel with their verdicts, not on their own"


def window_json(s: ConversationStage, partition: int, conversation: str) -> bytes:
    """The changelog value of the conversation's window now, written as dicts by ``to_json``."""
    window = s.state._lru[(partition, conversation)]
    return to_json(
        {
            "v": 1,
            "conversation_id": conversation,
            "updated_at": window.last_active,
            "turns": [{"id": t.id, "role": t.role, "content": t.content} for t in window.turns],
        }
    )


class RecordingSink:
    def __init__(self) -> None:
        self.published: list[list[OutRecord]] = []
        self.acks: list[Callable[[], None]] = []

    def publish(self, records, on_acked, origin=None, messages=1) -> None:
        self.published.append(list(records))
        self.acks.append(on_acked)


def test_a_turns_change_is_its_window_as_of_that_turn_even_when_published_after_later_turns():
    """Every turn of a conversation is accepted (the window moves on, its oldest turns drop
    out) before any is concluded, the later ones first: each turn's changelog record still
    carries the bytes of the window right after its own turn, in input order, each in the
    group that finishes its offset."""
    clock, sink = Clock(), RecordingSink()
    s = stage(clock, Recorder())
    slot = PartitionOffsets(TopicPartition(CONVERSATION_TOPIC, 2))
    finished: list[int] = []
    outputs = Outputs(
        SETTINGS,
        sink=sink,
        verdicts=VerdictBuilder(policy=Policy.load(None), backend_name="test", include_text=False),
        on_finished=lambda slot, offset: finished.append(offset),
        on_abandoned=lambda: None,
    )
    jobs, expected = [], []
    for i in range(14):  # max_turns 4 keeps 10 turns: the first four drop out of the window
        clock.now += 1.5
        job = turn_job("c", i, offset=i, slot=slot)
        s.accept(job)
        outputs.expect(job)
        jobs.append(job)
        expected.append(window_json(s, 2, "c"))
    assert expected[-1] != expected[0]
    outcomes = [Rejected("API said 400") if i == 5 else Scored({"sexual": 0.0}, "m") for i in range(14)]
    for job, outcome in reversed(list(zip(jobs, outcomes, strict=True))):
        outputs.conclude(job, outcome)
    changes = [r for records in sink.published for r in records if r.topic == "state"]
    assert [r.value for r in changes] == expected, "a change was encoded from another turn's window"
    assert {(r.key, r.partition) for r in changes} == {(b"c", 2)}
    assert [[r.topic for r in records][-1] for records in sink.published] == ["state"] * 14
    assert [json.loads(r.value)["turns"][-1]["id"] for r in changes] == [f"c-{i}" for i in range(14)]
    assert finished == [], "no offset finishes before its group, state change included, is acknowledged"
    for on_acked in sink.acks:
        on_acked()
    assert sorted(finished) == list(range(14))


def test_a_turn_with_its_own_context_keeps_it_and_still_enters_the_state():
    s = stage(Clock(), Recorder())
    given = turn_job("c", 0, context=[{"role": "assistant", "content": "given"}])
    s.accept(given)
    assert given.context is None and [t.content for t in given.judged_context] == ["given"]
    assert given.changelog is not None
    later = turn_job("c", 1, offset=1)
    s.accept(later)
    assert [t.content for t in later.context] == ["m0"]


def test_expired_conversations_are_tombstoned_in_their_changelog_partition():
    clock, recorder = Clock(), Recorder()
    s = stage(clock, recorder)
    s.accept(turn_job("idle", 0, partition=1))
    clock.now += 61
    s.accept(turn_job("busy", 0, partition=3))
    [[tombstone]] = recorder.published
    assert (tombstone.topic, tombstone.key, tombstone.value, tombstone.partition) == ("state", b"idle", None, 1)


def test_disabled_stage_leaves_jobs_alone_and_holds_nothing():
    recorder = Recorder()
    s = stage(Clock(), recorder, enabled=False)
    job = turn_job("c", 0)
    s.accept(job)
    s.assigned([TopicPartition(CONVERSATION_TOPIC, 0)])
    assert job.context is None and job.changelog is None and recorder.held == []


class FakeConsumer:
    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.paused: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)


async def test_held_partitions_stay_paused_through_backpressure_until_released():
    held, other = TopicPartition(CONVERSATION_TOPIC, 0), TopicPartition("in.c", 0)
    source = Source(SETTINGS, on_assign=None, on_revoke=None, rebalance_timeout_ms=10_000)  # type: ignore[arg-type]
    consumer = source._consumer = FakeConsumer({held, other})  # type: ignore[assignment]
    source.hold([held], "restore")
    source.pause()
    source.resume()
    assert consumer.paused == {held}, "backpressure's resume must not resume a restoring partition"
    source.pause()
    source.release([held], "restore")
    assert consumer.paused == {held, other}, "released while everything is paused: it stays paused"
    source.resume()
    assert consumer.paused == set()


async def test_a_partition_held_for_two_reasons_resumes_only_when_both_released():
    held = TopicPartition(CONVERSATION_TOPIC, 0)
    source = Source(SETTINGS, on_assign=None, on_revoke=None, rebalance_timeout_ms=10_000)  # type: ignore[arg-type]
    consumer = source._consumer = FakeConsumer({held})  # type: ignore[assignment]
    source.hold([held], "conversation-restore")
    source.hold([held], "uncommitted-span")
    source.release([held], "conversation-restore")
    assert consumer.paused == {held}, "one reason's release resumed a partition another still holds"
    source.release([held], "uncommitted-span")
    assert consumer.paused == set()
