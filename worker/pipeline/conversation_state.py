"""Conversation state: each conversation's recent turns, per input partition, bounded.

Chat platforms publish one event per turn without resending the history. The worker keeps
each conversation's recent turns itself so that a turn published without ``context`` is
judged with its predecessors. This module is the state alone (no Kafka): what is kept,
the context a turn gets, and the bounds. ``worker.pipeline.conversation_stage`` wires it
to the pipeline and to its changelog topic.

What is kept, per conversation: its last ``max_turns + 1 + REPLAY_MARGIN_TURNS`` turns
(``{id, role, content}``, content cut to its last ``max_context_chars`` characters since
more is never sent) and its last activity (wall-clock, so that it survives a restart).

Contract of ``observe`` (one call per decoded turn, in input order per partition):

- A new turn is judged with the turns stored before it: the newest ``max_turns``, oldest
  first, both roles, together at most ``max_context_chars`` characters (the oldest one
  given is cut to its end to fit; the judged turn itself is never cut). It then enters the
  state, whatever its verdict will be, and ``Observed.change`` carries the new window for
  the changelog: a snapshot (the window's turns as of this turn, by reference), encoded
  only when its value is read, so that a turn waiting for its verdict holds ~300 bytes
  instead of its window's JSON, and later turns of its conversation do not change it.
- A turn whose id is already stored (a replay after a crash or rebalance) changes nothing
  and is judged with the turns stored before it: the same context as the first time,
  hence the same verdict id, as long as at most ``REPLAY_MARGIN_TURNS`` later turns of
  its conversation were stored meanwhile.
- A conversation idle longer than ``ttl_s`` is forgotten (a tombstone for the changelog);
  when the state's approximate size exceeds ``max_bytes`` the least recently active
  conversations are forgotten (tombstones too) until it fits. Forgotten changes are
  collected in ``take_forgotten``.

One LRU (ordered by last activity) holds every owned partition's conversations, keyed by
(input partition, conversation id), so that the memory bound is global; ``drop`` forgets
the partitions a rebalance takes away, ``load`` restores them from changelog values.
Not thread-safe: the event loop only.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from pydantic_core import from_json, to_json

from schemas import Turn
from schemas.models import Role
from worker.ops import metrics
from worker.pipeline.events import schema_turn

REPLAY_MARGIN_TURNS = 5
"""Turns stored beyond ``max_turns``: a replayed turn finds the context it was first judged
with while at most this many later turns of its conversation were stored (a crash replays
what finished since the last commit, normally well under a second of traffic)."""

TURN_OVERHEAD_BYTES = 160
"""Approximate memory of one stored turn besides its text (objects, deque slot)."""
CONVERSATION_OVERHEAD_BYTES = 600
"""Approximate memory of one conversation besides its turns (window, LRU and index entries)."""

CHANGELOG_VERSION = 1
_ROLES = frozenset(("user", "assistant"))


class StoredTurn(msgspec.Struct, frozen=True, gc=False):
    """One stored turn (a struct without a GC header, 40 bytes: restore builds hundreds of
    thousands of them); written to the changelog as ``{"id", "role", "content"}``."""

    id: str
    role: Role
    content: str


class _ChangelogValue(msgspec.Struct, gc=False):
    """A changelog value's layout (``_encode``), the fields in the order they are written."""

    v: int
    conversation_id: str
    updated_at: float
    turns: tuple[StoredTurn, ...]


_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Change:
    """A state change for the changelog: the conversation's window as of one turn, or a
    tombstone (``turns`` None: forgotten)."""

    partition: int
    conversation_id: str
    turns: tuple[StoredTurn, ...] | None
    """The window's turns right after the turn was stored (immutable: the window moves on,
    this does not)."""
    updated_at: float = 0.0
    """The conversation's last activity as of that turn."""

    @property
    def value(self) -> bytes | None:
        """The changelog value (None: a tombstone), encoded at each read (~2 µs for 16
        turns): the same bytes whenever it is read."""
        return None if self.turns is None else _encode(self.conversation_id, self.updated_at, self.turns)


@dataclass(frozen=True, slots=True)
class Observed:
    """What ``observe`` decided for one turn."""

    context: tuple[Turn, ...]
    """The stored turns before it, bounded: what it is judged with when it carries none."""
    change: Change | None
    """The new window to write to the changelog; None when nothing changed (a replay)."""


class _Window:
    __slots__ = ("last_active", "size", "turns")

    def __init__(self, turns: deque[StoredTurn], last_active: float, size: int) -> None:
        self.turns = turns
        self.last_active = last_active
        self.size = size


class ConversationState:
    """The conversations of every owned input partition (see the module docstring)."""

    def __init__(
        self,
        *,
        max_turns: int,
        max_context_chars: int,
        ttl_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_turns = max_turns
        self.max_context_chars = max_context_chars
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._keep = max_turns + 1 + REPLAY_MARGIN_TURNS  # a turn, its context, and later turns
        self._lru: OrderedDict[tuple[int, str], _Window] = OrderedDict()
        self._by_partition: dict[int, set[str]] = {}
        self._forgotten: list[Change] = []
        self.bytes = 0
        """Approximate memory of everything held."""

    # -- reading and updating -------------------------------------------------------

    @property
    def conversations(self) -> int:
        return len(self._lru)

    def observe(
        self, partition: int, conversation_id: str, turn_id: str, role: Role, content: str, *, with_context: bool = True
    ) -> Observed:
        """Give the turn its context and store it (see the module docstring).

        ``with_context=False``: the turn brought its own context, so none is built
        (``Observed.context`` is empty); the state changes exactly as with it."""
        now = self._clock()
        key = (partition, conversation_id)
        window = self._lru.get(key)
        if window is not None and now - window.last_active > self.ttl_s:
            self._forget(key, "ttl")
            window = None
        if window is None:
            turns: deque[StoredTurn] = deque(maxlen=self._keep)
            window = _Window(turns, now, CONVERSATION_OVERHEAD_BYTES + len(conversation_id))
            self._lru[key] = window
            self._by_partition.setdefault(partition, set()).add(conversation_id)
            self.bytes += window.size
        stored = list(window.turns)
        for index, turn in enumerate(stored):
            if turn.id == turn_id:  # a replay: judged as the first time, stored once
                return Observed(self._context(stored[:index]) if with_context else (), None)
        context = self._context(stored) if with_context else ()
        kept = StoredTurn(turn_id, role, content[-self.max_context_chars :])
        if len(window.turns) == window.turns.maxlen:
            window.size -= _turn_size(window.turns[0])
            self.bytes -= _turn_size(window.turns[0])
        window.turns.append(kept)
        window.size += _turn_size(kept)
        self.bytes += _turn_size(kept)
        window.last_active = now
        self._lru.move_to_end(key)
        change = Change(partition, conversation_id, tuple(window.turns), now)
        self._fit(keep=key)
        return Observed(context, change)

    def _context(self, before: Sequence[StoredTurn]) -> tuple[Turn, ...]:
        picked: list[Turn] = []
        budget = self.max_context_chars
        for turn in reversed(before[-self.max_turns :]):
            if budget <= 0:
                break
            content = turn.content if len(turn.content) <= budget else turn.content[-budget:]
            picked.append(schema_turn(turn.role, content))
            budget -= len(content)
        picked.reverse()
        return tuple(picked)

    # -- bounds ---------------------------------------------------------------------

    def expire(self) -> int:
        """Forget every conversation idle longer than ``ttl_s``; return how many."""
        horizon = self._clock() - self.ttl_s
        expired = [key for key, window in self._lru.items() if window.last_active < horizon]
        for key in expired:
            self._forget(key, "ttl")
        return len(expired)

    def _fit(self, keep: tuple[int, str] | None = None) -> None:
        """Forget least recently active conversations until the state fits ``max_bytes``."""
        lru = self._lru
        while self.bytes > self.max_bytes and lru:
            key = next(iter(lru))
            if key == keep:  # the conversation just updated is never the one forgotten
                if len(lru) == 1:
                    return
                lru.move_to_end(key)
                continue
            self._forget(key, "memory")

    def _forget(self, key: tuple[int, str], reason: str) -> None:
        window = self._lru.pop(key)
        self.bytes -= window.size
        partition, conversation_id = key
        held = self._by_partition.get(partition)
        if held is not None:
            held.discard(conversation_id)
        self._forgotten.append(Change(partition, conversation_id, None))
        metrics.conversation_evictions(reason).inc()

    def take_forgotten(self) -> list[Change]:
        """Tombstones for the conversations forgotten since the last call (TTL or memory)."""
        forgotten, self._forgotten = self._forgotten, []
        return forgotten

    # -- partitions -----------------------------------------------------------------

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the partitions' conversations without tombstones (their new owner keeps them)."""
        for partition in partitions:
            for conversation_id in self._by_partition.pop(partition, ()):
                window = self._lru.pop((partition, conversation_id), None)
                if window is not None:
                    self.bytes -= window.size

    def load(self, partition: int, values: Mapping[str, bytes | None]) -> tuple[int, int]:
        """Restore a partition from its changelog: the latest value per conversation id.

        Conversations enter in the order of their last activity; those idle past the TTL
        are forgotten at once (tombstones). Returns (conversations loaded, values that did
        not decode and were skipped).
        """
        now = self._clock()
        windows: list[tuple[str, _Window]] = []
        invalid = 0
        for conversation_id, value in values.items():
            if value is None:
                continue
            try:
                window = self._decode(conversation_id, value)
            except (ValueError, TypeError, KeyError, OverflowError):  # OverflowError: an int beyond floats
                invalid += 1
                continue
            if now - window.last_active > self.ttl_s:
                self._forgotten.append(Change(partition, conversation_id, None))
                metrics.conversation_evictions("ttl").inc()
                continue
            windows.append((conversation_id, window))
        windows.sort(key=lambda item: item[1].last_active)
        held = self._by_partition.setdefault(partition, set())
        for conversation_id, window in windows:
            key = (partition, conversation_id)
            old = self._lru.pop(key, None)
            if old is not None:
                self.bytes -= old.size
            self._lru[key] = window
            held.add(conversation_id)
            self.bytes += window.size
        self._fit()
        return len(windows), invalid

    def _decode(self, conversation_id: str, value: bytes) -> _Window:
        data: Any = from_json(value)
        limit = self.max_context_chars
        stored = []
        for item in data["turns"][-self._keep :]:
            turn_id, role, content = item["id"], item["role"], item["content"]
            if role not in _ROLES or not isinstance(turn_id, str) or not isinstance(content, str):
                raise ValueError(f"not a stored turn: {item!r:.200}")
            stored.append(StoredTurn(turn_id, role, content if len(content) <= limit else content[-limit:]))
        turns = deque(stored, maxlen=self._keep)
        size = CONVERSATION_OVERHEAD_BYTES + len(conversation_id) + sum(map(_turn_size, turns))
        updated_at = float(data["updated_at"])
        if not math.isfinite(updated_at):  # would never expire, nor sort among the others
            raise ValueError(f"not a time of last activity: {updated_at!r}")
        return _Window(turns, updated_at, size)


def _turn_size(turn: StoredTurn) -> int:
    return TURN_OVERHEAD_BYTES + len(turn.id) + len(turn.content)


def _encode(conversation_id: str, updated_at: float, turns: tuple[StoredTurn, ...]) -> bytes:
    """The changelog value: the conversation's stored turns and last activity, as JSON.

    msgspec writes the structs straight (a third of building the dicts and ``to_json``'s
    CPU, once per turn for its whole window) and its result is copied to its own length (it
    keeps ~1.5x the output, held until the sink has sent it). A string msgspec will not
    write (a lone surrogate) goes through ``to_json``, as before."""
    try:
        value = _ENCODER.encode(_ChangelogValue(CHANGELOG_VERSION, conversation_id, updated_at, turns))
    except (msgspec.EncodeError, UnicodeEncodeError):
        pass
    else:
        return bytes(memoryview(value))
    return to_json(
        {
            "v": CHANGELOG_VERSION,
            "conversation_id": conversation_id,
            "updated_at": updated_at,
            "turns": [{"id": t.id, "role": t.role, "content": t.content} for t in turns],
        }
    )
