"""Fuzz target ``changelog``: restoring a conversation from any changelog value.

Property: ``ConversationState.load`` takes any value: it is loaded, skipped as invalid
or expired, never raises. A loaded conversation then gives a new turn a context of valid
turns, within the context limit, and the changelog value written for it restores the
same turns.
"""

from __future__ import annotations

from schemas import Turn
from worker.pipeline.conversation_state import ConversationState

NOW = 1_700_000_000.0
MAX_CONTEXT_CHARS = 40


def _state() -> ConversationState:
    return ConversationState(
        max_turns=3, max_context_chars=MAX_CONTEXT_CHARS, ttl_s=3600.0, max_bytes=1 << 20, clock=lambda: NOW
    )


def check(data: bytes) -> None:
    state = _state()
    loaded, invalid = state.load(0, {"c": data})
    assert (loaded, invalid) in ((1, 0), (0, 1), (0, 0)), f"load counted {(loaded, invalid)} for one value"
    if not loaded:
        return
    observed = state.observe(0, "c", "a-new-turn-id", "user", "the new turn")
    assert all(type(turn) is Turn and turn.role in ("user", "assistant") for turn in observed.context)
    assert sum(len(turn.content) for turn in observed.context) <= MAX_CONTEXT_CHARS, "context over its limit"
    if observed.change is None:  # the value held a turn of that id: a replay changes nothing
        return
    assert observed.change.value is not None, "a stored turn wrote a tombstone"
    restored = _state()
    assert restored.load(0, {"c": observed.change.value}) == (1, 0), "the written changelog value does not restore"
    replay = restored.observe(0, "c", "a-new-turn-id", "user", "the new turn")
    assert replay.context == observed.context, "the restored conversation gives another context"
