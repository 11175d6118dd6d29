"""The dedup cache in front of a backend (a real Mistral backend on a loopback server)."""

from __future__ import annotations

from collections.abc import Callable

from schemas import Turn
from tests.backends.conftest import started
from worker.backends.base import Conversation, Rejected, Scored
from worker.backends.cache import CachingBackend, watch_cache
from worker.backends.mistral import MistralBackend
from worker.config import Settings
from worker.testing import Fault, MistralServer, fake_scores, when_input_contains

SettingsFor = Callable[..., Settings]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cached(
    settings: Settings, *, max_entries: int = 1_000, ttl_s: float = 60.0, clock: FakeClock | None = None
) -> CachingBackend:
    return CachingBackend(MistralBackend(settings), max_entries=max_entries, ttl_s=ttl_s, clock=clock or FakeClock())


def sent_inputs(server: MistralServer) -> list[str]:
    return [text for body in server.bodies for text in body["input"]]


async def test_repeats_cost_no_call_and_every_input_still_gets_an_outcome(
    mistral: MistralServer, settings_for: SettingsFor
) -> None:
    backend = cached(settings_for(mistral))
    async with started(backend):
        first = await backend.score_texts(["a", "b", "a", "c"])
        second = await backend.score_texts(["b", "a", "c"])

    assert sent_inputs(mistral) == ["a", "b", "c"], "each distinct text sent once; the second batch not at all"
    assert mistral.request_count == 1
    assert [o.scores for o in first if isinstance(o, Scored)] == [fake_scores(t) for t in ["a", "b", "a", "c"]]
    assert len(second) == 3 and all(isinstance(o, Scored) for o in second)
    stats = backend.cache_stats()
    assert (stats.hits, stats.misses, stats.size) == (4, 3, 3)
    assert stats.hit_ratio == 4 / 7


async def test_look_alike_spellings_never_share_an_entry(mistral: MistralServer, settings_for: SettingsFor) -> None:
    """A fullwidth or math-alphanumeric spelling, or other spacing, can score differently:
    each is sent and gets its own scores, never the plain text's."""
    variants = ["free money", "ｆｒｅｅ ｍｏｎｅｙ", "𝐟𝐫𝐞𝐞 𝐦𝐨𝐧𝐞𝐲", "free  money", " free money", "FREE money"]
    backend = cached(settings_for(mistral))
    async with started(backend):
        outcomes = await backend.score_texts(variants)
        again = await backend.score_texts(list(reversed(variants)))
    assert sent_inputs(mistral) == variants, "every distinct string sent once, none merged"
    assert [o.scores for o in outcomes if isinstance(o, Scored)] == [fake_scores(t) for t in variants]
    assert [o.scores for o in again if isinstance(o, Scored)] == [fake_scores(t) for t in reversed(variants)]


async def test_entries_expire_after_the_ttl(mistral: MistralServer, settings_for: SettingsFor) -> None:
    clock = FakeClock()
    backend = cached(settings_for(mistral), ttl_s=10, clock=clock)
    async with started(backend):
        await backend.score_texts(["a"])
        clock.now = 9.0
        await backend.score_texts(["a"])
        clock.now = 10.5
        await backend.score_texts(["a"])
    assert mistral.request_count == 2


async def test_the_cache_is_bounded_lru(mistral: MistralServer, settings_for: SettingsFor) -> None:
    backend = cached(settings_for(mistral), max_entries=2)
    async with started(backend):
        await backend.score_texts(["a", "b"])
        await backend.score_texts(["a"])  # a is now the most recently used
        await backend.score_texts(["c"])  # evicts b
        await backend.score_texts(["a", "b"])
        assert backend.cache_stats().size == 2
    assert sent_inputs(mistral) == ["a", "b", "c", "b"]


async def test_models_and_endpoints_never_share_entries(mistral: MistralServer, settings_for: SettingsFor) -> None:
    moderation = cached(settings_for(mistral))
    other_model = cached(settings_for(mistral, mistral={"model": "mistral-moderation-2411"}))
    assert moderation.namespace != other_model.namespace
    async with started(moderation), started(other_model):
        await moderation.score_texts(["same text"])
        await other_model.score_texts(["same text"])
    assert mistral.request_count == 2


async def test_rejections_are_not_cached(api_key: str, settings_for: SettingsFor) -> None:
    with MistralServer(api_key=api_key, fault_plan=when_input_contains("BAD", Fault(status=400))) as server:
        backend = cached(settings_for(server))
        async with started(backend):
            (first,) = await backend.score_texts(["BAD"])
            (again,) = await backend.score_texts(["BAD"])
        assert server.request_count == 2
    assert isinstance(first, Rejected) and isinstance(again, Rejected)


async def test_conversations_are_keyed_on_every_message(mistral: MistralServer, settings_for: SettingsFor) -> None:
    def conv(context: str) -> Conversation:
        return Conversation(turn=Turn(role="assistant", content="ok"), context=(Turn(role="user", content=context),))

    backend = cached(settings_for(mistral))
    async with started(backend):
        await backend.score_conversations([conv("question one"), conv("question one")])
        await backend.score_conversations([conv("question two"), conv("ｑuestion one")])
    assert mistral.request_count == 2
    assert [len(body["input"]) for body in mistral.bodies] == [1, 2], "context differing in one letter's form: a miss"


async def test_watch_cache_says_whether_the_backend_was_asked_and_bypass_asks_it(
    mistral: MistralServer, settings_for: SettingsFor
) -> None:
    backend = cached(settings_for(mistral))
    async with started(backend):
        with watch_cache() as use:
            await backend.score_texts(["a", "b"])
        assert (use.forwarded, use.answered_alone, use.backend_asked) == (1, 0, True)
        with watch_cache() as use:
            await backend.score_texts(["b", "a"])
        assert (use.forwarded, use.answered_alone, use.backend_asked) == (0, 1, False)
        with watch_cache(bypass=True) as use:
            again = await backend.score_texts(["a"])
        assert (use.forwarded, use.backend_asked) == (1, True)

    assert sent_inputs(mistral) == ["a", "b", "a"], "the bypassing call went to the API although cached"
    assert isinstance(again[0], Scored) and again[0].scores == fake_scores("a")
