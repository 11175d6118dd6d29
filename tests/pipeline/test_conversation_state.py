"""Conversation state without a broker: context, replays, TTL, memory bound, restore."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies
from pydantic_core import to_json

from schemas import Turn
from worker.pipeline.conversation_state import (
    CONVERSATION_OVERHEAD_BYTES,
    REPLAY_MARGIN_TURNS,
    TURN_OVERHEAD_BYTES,
    Change,
    ConversationState,
)


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def state(clock: Clock | None = None, **overrides) -> ConversationState:
    options = {"max_turns": 10, "max_context_chars": 8_000, "ttl_s": 3_600.0, "max_bytes": 10_000_000}
    options.update(overrides)
    return ConversationState(clock=clock or Clock(), **options)


def pairs(context) -> list[tuple[str, str]]:
    return [(turn.role, turn.content) for turn in context]


def test_a_turn_is_judged_with_its_predecessors_oldest_first_both_roles():
    s = state()
    assert s.observe(0, "c", "t0", "user", "how do I do it?").context == ()
    second = s.observe(0, "c", "t1", "assistant", "like this")
    assert pairs(second.context) == [("user", "how do I do it?")]
    third = s.observe(0, "c", "t2", "user", "thanks")
    assert pairs(third.context) == [("user", "how do I do it?"), ("assistant", "like this")]
    # another conversation, and the same id in another partition, are separate
    assert s.observe(0, "other", "x0", "user", "hi").context == ()
    assert s.observe(1, "c", "t9", "user", "hi").context == ()
    assert s.conversations == 3


def test_context_is_bounded_by_turns_and_characters_and_the_judged_turn_is_never_cut():
    s = state(max_turns=3, max_context_chars=25)
    for i in range(6):
        s.observe(0, "c", f"t{i}", "user", f"turn-{i}-" + "x" * 6)  # 13 characters each
    judged = "y" * 100
    observed = s.observe(0, "c", "t6", "assistant", judged)
    # newest first until 25 characters: turn 5 whole (13), then the last 12 of turn 4
    assert pairs(observed.context) == [("user", "urn-4-xxxxxx"), ("user", "turn-5-xxxxxx")]
    assert sum(len(t.content) for t in observed.context) <= 25
    wide = state(max_turns=3, max_context_chars=1_000)
    for i in range(6):
        wide.observe(0, "c", f"t{i}", "user", f"turn {i}")
    assert [c for _, c in pairs(wide.observe(0, "c", "t6", "user", judged).context)] == ["turn 3", "turn 4", "turn 5"]


def test_a_replayed_turn_is_stored_once_and_judged_with_the_same_context():
    s = state()
    s.observe(0, "c", "t0", "user", "question")
    first = s.observe(0, "c", "t1", "assistant", "answer")
    s.observe(0, "c", "t2", "user", "follow-up")
    replay = s.observe(0, "c", "t1", "assistant", "answer")
    assert replay.change is None, "a replay changes nothing"
    assert pairs(replay.context) == pairs(first.context) == [("user", "question")]
    after = s.observe(0, "c", "t3", "assistant", "more")
    assert [c for _, c in pairs(after.context)] == ["question", "answer", "follow-up"]


def test_replays_keep_their_context_within_the_margin():
    s = state(max_turns=2)
    contexts = {}
    for i in range(2 + REPLAY_MARGIN_TURNS + 1):
        contexts[i] = pairs(s.observe(0, "c", f"t{i}", "user", f"m{i}").context)
    # the newest turn and up to REPLAY_MARGIN_TURNS before it replay with the same context
    newest = 2 + REPLAY_MARGIN_TURNS
    for i in range(newest - REPLAY_MARGIN_TURNS, newest + 1):
        assert pairs(s.observe(0, "c", f"t{i}", "user", f"m{i}").context) == contexts[i], i


def test_the_change_is_the_window_as_json_for_the_input_partition():
    clock = Clock(5_000.0)
    s = state(clock)
    s.observe(3, "conv", "t0", "user", "hello")
    change = s.observe(3, "conv", "t1", "assistant", "hi there").change
    assert change is not None and change.partition == 3 and change.conversation_id == "conv"
    value = json.loads(change.value)
    assert value["conversation_id"] == "conv" and value["updated_at"] == 5_000.0
    assert value["turns"] == [
        {"id": "t0", "role": "user", "content": "hello"},
        {"id": "t1", "role": "assistant", "content": "hi there"},
    ]


def test_idle_conversations_expire_after_the_ttl_with_a_tombstone():
    clock = Clock()
    s = state(clock, ttl_s=60.0)
    s.observe(0, "old", "a0", "user", "one")
    clock.now += 30
    s.observe(0, "fresh", "b0", "user", "two")
    clock.now += 31  # "old" idle 61 s, "fresh" 31 s
    assert s.expire() == 1
    assert s.conversations == 1
    assert [(c.conversation_id, c.value) for c in s.take_forgotten()] == [("old", None)]
    assert s.take_forgotten() == [], "tombstones are handed out once"
    # an expired conversation met again starts empty, even before a sweep
    clock.now += 61
    assert s.observe(0, "fresh", "b1", "user", "three").context == ()
    assert [c.conversation_id for c in s.take_forgotten()] == ["fresh"]


def test_memory_bound_forgets_least_recently_active_conversations_first():
    per_conversation = CONVERSATION_OVERHEAD_BYTES + 2 + TURN_OVERHEAD_BYTES + 2 + 100
    s = state(max_bytes=3 * per_conversation)
    for name in ("c1", "c2", "c3"):
        s.observe(0, name, "t0", "user", "x" * 100)
    assert s.conversations == 3 and s.bytes == 3 * per_conversation
    s.observe(0, "c1", "t1", "user", "y")  # c1 active again: c2 is now the least recent
    forgotten = [c.conversation_id for c in s.take_forgotten()]
    assert forgotten == ["c2"]
    s.observe(0, "c4", "t0", "user", "x" * 100)
    assert [c.conversation_id for c in s.take_forgotten()] == ["c3"]
    assert s.bytes <= s.max_bytes
    assert s.observe(0, "c2", "t1", "user", "back").context == (), "a forgotten conversation starts empty"


def test_a_single_conversation_larger_than_the_bound_is_kept():
    s = state(max_bytes=1_024)
    s.observe(0, "big", "t0", "user", "x" * 2_000)
    s.observe(0, "big", "t1", "user", "x" * 2_000)
    assert s.conversations == 1 and s.take_forgotten() == []


def test_restore_from_changelog_values_gives_the_same_context_and_skips_expired_and_invalid():
    clock = Clock()
    s = state(clock, ttl_s=100.0)
    s.observe(2, "c", "t0", "user", "question")
    change = s.observe(2, "c", "t1", "assistant", "answer").change
    s.observe(2, "gone", "g0", "user", "bye")
    gone = s.take_forgotten()
    assert gone == []
    old_value = s.observe(2, "stale", "s0", "user", "old").change
    assert change is not None and old_value is not None
    clock.now += 50

    restored = state(clock, ttl_s=100.0)
    values = {
        "c": change.value,
        "gone": None,  # a tombstone: nothing to restore
        "stale": json.dumps({"v": 1, "conversation_id": "stale", "updated_at": clock.now - 500, "turns": []}).encode(),
        "broken": b"{not json",
    }
    assert restored.load(2, values) == (1, 1)
    assert [c.conversation_id for c in restored.take_forgotten()] == ["stale"]
    nxt = restored.observe(2, "c", "t2", "user", "and then?")
    assert pairs(nxt.context) == [("user", "question"), ("assistant", "answer")]
    replay = restored.observe(2, "c", "t1", "assistant", "answer")
    assert replay.change is None and pairs(replay.context) == [("user", "question")]


def test_dropping_partitions_forgets_them_without_tombstones_and_frees_their_bytes():
    s = state()
    s.observe(0, "a", "t0", "user", "x" * 50)
    s.observe(1, "b", "t0", "user", "x" * 50)
    before = s.bytes
    s.drop([0])
    assert s.conversations == 1 and s.take_forgotten() == []
    assert 0 < s.bytes < before
    s.drop([1])
    assert s.bytes == 0


@pytest.mark.parametrize("max_context_chars", [5, 10])
def test_stored_content_is_cut_to_what_can_ever_be_sent(max_context_chars):
    s = state(max_context_chars=max_context_chars)
    change = s.observe(0, "c", "t0", "user", "0123456789abcdef").change
    assert change is not None
    assert json.loads(change.value)["turns"][0]["content"] == "0123456789abcdef"[-max_context_chars:]


def test_context_turns_equal_validated_turns():
    s = state()
    s.observe(0, "c", "t0", "assistant", "hello there")
    [built] = s.observe(0, "c", "t1", "user", "hi").context
    validated = Turn(role="assistant", content="hello there")
    assert built == validated and built.model_dump() == validated.model_dump()
    assert built.model_fields_set == validated.model_fields_set


def test_a_turn_with_its_own_context_changes_the_state_exactly_as_one_without():
    with_context, without = state(), state()
    turns = [("t0", "user", "first"), ("t1", "assistant", "second"), ("t2", "user", "third"), ("t1", "assistant", "x")]
    for turn_id, role, content in turns:
        given = with_context.observe(0, "c", turn_id, role, content)
        skipped = without.observe(0, "c", turn_id, role, content, with_context=False)
        assert skipped.context == ()
        assert skipped.change == given.change  # the replay of t1 too: no change
    assert without.bytes == with_context.bytes
    assert pairs(without.observe(0, "c", "t3", "user", "fourth").context) == [
        ("user", "first"),
        ("assistant", "second"),
        ("user", "third"),
    ]


_text = strategies.text(strategies.characters(exclude_categories=("Cs",)), max_size=40)  # no lone surrogates


@settings(max_examples=200, deadline=None)
@given(
    conversation_id=_text.filter(bool),
    turns=strategies.lists(
        strategies.tuples(_text, strategies.sampled_from(["user", "assistant"]), _text), min_size=1, max_size=20
    ),
    updated_at=strategies.floats(min_value=0, max_value=4e9, allow_nan=False),
    max_turns=strategies.integers(min_value=1, max_value=30),
)
def test_a_changelog_value_is_what_pydantic_core_writes_for_the_window_as_of_its_turn(
    conversation_id, turns, updated_at, max_turns
):
    """The structs msgspec writes give the bytes ``to_json`` gave for the same window as dicts,
    the window as it was right after the change's turn, even when the value is read after
    later turns changed the window (a small ``max_turns`` makes turns drop out of it)."""
    clock = Clock(updated_at)
    s = state(clock, max_turns=max_turns)
    written: list[tuple[Change, bytes]] = []
    for turn_id, role, content in turns:
        change = s.observe(0, conversation_id, turn_id, role, content).change
        (window,) = s._lru.values()
        expected = to_json(
            {
                "v": 1,
                "conversation_id": conversation_id,
                "updated_at": clock.now,
                "turns": [{"id": t.id, "role": t.role, "content": t.content} for t in window.turns],
            }
        )
        if change is not None:
            written.append((change, expected))
        clock.now += 0.25
    assert written, "the first turn always changes the state"
    for change, expected in written:
        assert change.value == expected
    restored = state(Clock(clock.now), max_turns=max_turns)
    assert restored.load(0, {conversation_id: written[-1][0].value}) == (1, 0)


def test_a_change_read_after_later_turns_still_holds_the_turns_they_pushed_out():
    s = state(max_turns=1)  # keeps 1 + 1 + REPLAY_MARGIN_TURNS turns
    first = s.observe(0, "c", "t0", "user", "first").change
    for i in range(1, 20):
        s.observe(0, "c", f"t{i}", "user", f"turn {i}")
    assert first is not None and first.value is not None
    assert [t["id"] for t in json.loads(first.value)["turns"]] == ["t0"]
