"""Dedup cache in front of any backend: the same input within a TTL costs no second call.

``CachingBackend(inner)`` is itself a ``Backend``. For each batch it looks every input up
by key, sends only the misses to ``inner`` (each distinct input once, even when it repeats
inside the batch), stores the ``Scored`` answers and returns one outcome per input, in
order: every input still gets its own verdict. ``Rejected`` outcomes are not cached (the
next occurrence is tried again); ``BackendUnavailable`` and ``BackendAuthError`` pass
through and cache nothing.

Key: ``blake2b(namespace, kind, exact input)`` where ``namespace`` is the inner backend's
``cache_namespace`` (backend, endpoint and configured model, e.g.
``mistral:moderation:mistral-moderation-latest``), so scores never cross models or
endpoints. The input is keyed exactly as sent, with no normalization: NFKC or whitespace
folding would merge a look-alike spelling (fullwidth, math alphanumerics) with the plain
text, which a model sees as different tokens and can score differently; the second
would then get the first's scores for up to ``ttl_s``. A conversation's key covers every
message (role and exact content), context included.

Bounded: at most ``max_entries`` (least recently used evicted first), each living
``ttl_s`` (``cachetools.TTLCache``). ``cache_stats()`` gives hits, misses, hit ratio and
size for metrics; the hit ratio is also logged every ``log_every`` lookups.

*Was the backend asked?* A batch answered wholly from the cache says nothing about the
backend's health, and the scorer's poison search must not take it as "the backend
answers others". A caller that needs to know makes its call inside ``watch_cache()``: the
yielded ``CacheUse`` counts the calls this cache forwarded to the backend and those it
answered alone (a mutable object in a context variable, so it sees calls made in child
tasks too). ``watch_cache(bypass=True)`` also skips the lookups: every input goes to the
backend (its answers are still stored), for a probe that must test the backend itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import structlog
from cachetools import TTLCache

from worker.backends.base import Backend, Conversation, Outcome, Scored
from worker.ops.logs import CacheEvent

log = structlog.get_logger(__name__)

Item = TypeVar("Item")


@dataclass(frozen=True)
class CacheStats:
    """Counters since start. A lookup is one input; a hit needed no backend call."""

    hits: int
    misses: int
    size: int
    max_entries: int

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass(slots=True)
class CacheUse:
    """What the caches did for the calls made inside one ``watch_cache()`` block."""

    bypass: bool = False
    forwarded: int = 0
    """Calls that sent at least one input on to the backend behind a cache."""
    answered_alone: int = 0
    """Calls a cache answered wholly, the backend not asked."""

    @property
    def backend_asked(self) -> bool:
        """False only when a cache answered every call on its own."""
        return self.forwarded > 0 or self.answered_alone == 0


_USE: ContextVar[CacheUse | None] = ContextVar("cache_use", default=None)


@contextmanager
def watch_cache(*, bypass: bool = False) -> Iterator[CacheUse]:
    """Count (and with ``bypass`` skip) the cache's answers for the calls made inside."""
    use = CacheUse(bypass=bypass)
    token = _USE.set(use)
    try:
        yield use
    finally:
        _USE.reset(token)


def cache_use() -> CacheUse | None:
    """The ``CacheUse`` of the innermost ``watch_cache()`` block around the caller, if any:
    the cascade adds a pooled second-stage call's counts to every contributing caller's."""
    return _USE.get()


def _from_cache(scored: Scored) -> Scored:
    """A cached answer, marked as such where it carries details (its tokens were spent earlier)."""
    if scored.details is None:
        return scored
    return msgspec.structs.replace(scored, details=scored.details.model_copy(update={"cached": True}))


class CachingBackend(Backend):
    """See the module docstring. ``clock`` is injectable for tests (default ``time.monotonic``)."""

    def __init__(
        self,
        inner: Backend,
        *,
        max_entries: int,
        ttl_s: float,
        log_every: int = 1_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]  # verdicts record the real backend's name
        self.namespace: str = getattr(inner, "cache_namespace", inner.name)
        self._cache: TTLCache[bytes, Scored] = TTLCache(maxsize=max_entries, ttl=ttl_s, timer=clock)
        self._max_entries = max_entries
        self._log_every = log_every
        self._hits = 0
        self._misses = 0
        self._next_log = log_every

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def ready(self) -> bool:
        return await self.inner.ready()

    def stage(self, name: str) -> Backend | None:
        return self.inner.stage(name)  # uncached: a probe wants the stage's own answer

    def cache_stats(self) -> CacheStats:
        return CacheStats(hits=self._hits, misses=self._misses, size=len(self._cache), max_entries=self._max_entries)

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        return await self._through_cache(list(texts), lambda text: ("text", text), self.inner.score_texts)

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        def identity(conversation: Conversation) -> Hashable:
            return ("chat", tuple((turn.role, turn.content) for turn in conversation.messages()))

        return await self._through_cache(list(conversations), identity, self.inner.score_conversations)

    async def _through_cache(
        self,
        items: list[Item],
        identity: Callable[[Item], Hashable],
        score: Callable[[list[Item]], Awaitable[list[Outcome]]],
    ) -> list[Outcome]:
        use = _USE.get()
        bypass = use is not None and use.bypass
        keys = [self._key(identity(item)) for item in items]
        outcomes: list[Outcome | None] = [None] * len(items)
        pending: dict[bytes, list[int]] = {}
        for index, key in enumerate(keys):
            cached = None if bypass else self._cache.get(key)
            if cached is not None:
                outcomes[index] = _from_cache(cached)
            else:
                pending.setdefault(key, []).append(index)
        if pending:
            firsts = [indexes[0] for indexes in pending.values()]
            answers = await score([items[i] for i in firsts])
            for indexes, answer in zip(pending.values(), answers, strict=True):
                for index in indexes:
                    outcomes[index] = answer
                if isinstance(answer, Scored) and not answer.unscored:  # a partial answer is asked again
                    self._cache[keys[indexes[0]]] = answer
        if use is not None:
            if pending:
                use.forwarded += 1
            else:
                use.answered_alone += 1
        self._misses += len(pending)
        self._hits += len(items) - len(pending)
        self._maybe_log()
        return [outcome for outcome in outcomes if outcome is not None]

    def _key(self, identity: Hashable) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(self.namespace.encode())
        digest.update(b"\x00")
        digest.update(repr(identity).encode("utf-8", "surrogatepass"))
        return digest.digest()

    def _maybe_log(self) -> None:
        lookups = self._hits + self._misses
        if lookups >= self._next_log:
            self._next_log = lookups + self._log_every
            stats = self.cache_stats()
            log.info(
                CacheEvent.STATS,
                backend=self.name,
                hits=stats.hits,
                misses=stats.misses,
                hit_ratio=round(stats.hit_ratio, 4),
                size=stats.size,
            )
