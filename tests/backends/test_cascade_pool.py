"""The cascade's escalation pool: escalated inputs of concurrent batches share full
second-stage calls (``CascadeBackend(batch_size=, max_wait_s=)``).

Scripted stages, no network: the first stage scores a text with ``?`` 0.5 on ``sexual``
(inside the band: escalated), others 0.01; the second stage answers each text with a model
id naming the text, so every row can be traced back. The pool's timer sleeps on a
``ManualClock`` unless a test wants real time. One test runs over the loopback servers.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from worker.backends import create_backend
from worker.backends.base import (
    Backend,
    BackendAuthError,
    BackendUnavailable,
    Conversation,
    Outcome,
    Scored,
    Unavailable,
)
from worker.backends.breaker import CircuitOpenError, suspect_input
from worker.backends.cascade import CascadeBackend, UncertaintyBands
from worker.config import load_settings
from worker.pipeline.policy import Policy
from worker.testing import MistralServer
from worker.testing.openai_server import OpenAIServer

POLICY = Policy.from_mapping({"categories": {"sexual": {"threshold": 0.5, "action": "block"}}})


class FirstStage(Backend):
    """Scores a text (or a conversation's turn) with ``?`` inside the band, others far below."""

    name = "first"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.batches.append(list(texts))
        await asyncio.sleep(0)
        return [Scored({"sexual": 0.5 if "?" in t else 0.01}, "first-model") for t in texts]

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        return await self.score_texts([c.turn.content for c in conversations])


class SecondStage(Backend):
    """Answers each text with model ``then:<text>``; raises ``errors`` in turn first; a set
    ``gate`` holds every call until it opens; ``short_by`` drops results."""

    name = "then"

    def __init__(self, *errors: BaseException, short_by: int = 0) -> None:
        self.errors = list(errors)
        self.short_by = short_by
        self.batches: list[list[str]] = []
        self.kinds: list[str] = []
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        return await self._answer("content", list(texts))

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        return await self._answer("conversation", [c.turn.content for c in conversations])

    async def _answer(self, kind: str, texts: list[str]) -> list[Outcome]:
        self.batches.append(texts)
        self.kinds.append(kind)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.errors:
            raise self.errors.pop(0)
        outcomes: list[Outcome] = [Scored({"sexual": 0.9}, f"then:{t}") for t in texts]
        return outcomes[: len(outcomes) - self.short_by]


class ManualClock:
    """The pool timer's sleep: it ends when the test calls ``fire``."""

    def __init__(self) -> None:
        self.sleepers: list[asyncio.Future[None]] = []

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append(future)
        await future

    @property
    def armed(self) -> int:
        return sum(not f.done() for f in self.sleepers)

    def fire(self) -> None:
        for future in self.sleepers:
            if not future.done():
                future.set_result(None)
        self.sleepers.clear()


def cascade(
    second: SecondStage | None = None,
    *,
    batch_size: int = 4,
    max_wait_s: float = 10.0,
    clock: ManualClock | None = None,
) -> CascadeBackend:
    return CascadeBackend(
        FirstStage(),
        second or SecondStage(),
        UncertaintyBands(POLICY, default_band=0.1),
        batch_size=batch_size,
        max_wait_s=max_wait_s,
        sleep=(clock or ManualClock()).sleep,
    )


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def answered_by(outcome: Outcome) -> str:
    """``first`` for a first-stage decision, else the text the second stage answered."""
    assert isinstance(outcome, Scored), outcome
    return "first" if outcome.decided_by == "first" else outcome.model.removeprefix("then:")


def batch(n: int, escalated: int) -> list[str]:
    """Caller ``n``'s batch: ``escalated`` uncertain texts, with a confident one between."""
    return [f"c{n} sure", *(f"c{n} unsure {i}?" for i in range(escalated))]


async def test_concurrent_callers_pool_into_ceil_total_over_batch_size_full_calls():
    clock = ManualClock()
    second = SecondStage()
    backend = cascade(second, batch_size=4, clock=clock)
    batches = [batch(n, 2) for n in range(5)]  # 10 escalated inputs
    callers = [asyncio.create_task(backend.score_texts(b)) for b in batches]
    await settle()
    assert [len(b) for b in second.batches] == [4, 4], "full pools go at once, without waiting"
    assert not any(c.done() for c in callers[4:]), "the last caller's inputs wait for more"
    clock.fire()  # the oldest waiting input's max wait
    results = await asyncio.gather(*callers)

    assert [len(b) for b in second.batches] == [4, 4, 2]
    assert len(second.batches) == math.ceil(10 / 4)
    assert sorted(t for b in second.batches for t in b) == sorted(t for b in batches for t in b if "?" in t)
    for texts, outcomes in zip(batches, results, strict=True):
        assert [answered_by(o) for o in outcomes] == ["first", *texts[1:]], "own rows, in own order"
    assert (backend.escalated, backend.decided_first, backend.then_calls) == (10, 5, 3)


async def test_max_wait_expiry_sends_a_partial_pool_in_real_time():
    second = SecondStage()
    backend = CascadeBackend(
        FirstStage(), second, UncertaintyBands(POLICY, default_band=0.1), batch_size=32, max_wait_s=0.02
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    outcomes = await asyncio.wait_for(backend.score_texts(["sure", "unsure?"]), timeout=5)
    waited = loop.time() - began
    assert second.batches == [["unsure?"]]
    assert [answered_by(o) for o in outcomes] == ["first", "unsure?"]
    assert 0.015 <= waited < 2.0, waited


async def test_a_caller_split_across_two_calls_gets_its_rows_back_in_order():
    clock = ManualClock()
    second = SecondStage()
    backend = cascade(second, batch_size=4, clock=clock)
    one = asyncio.create_task(backend.score_texts(batch(1, 2)))
    await settle()
    mixed = ["m0?", "sure m", "m1?", "m2?", "m3?", "m4?"]  # 5 escalated: 2 fill the pool, 3 wait
    two = asyncio.create_task(backend.score_texts(mixed))
    await settle()
    assert second.batches == [["c1 unsure 0?", "c1 unsure 1?", "m0?", "m1?"]]
    clock.fire()
    first_results, second_results = await asyncio.gather(one, two)
    assert second.batches[1] == ["m2?", "m3?", "m4?"]
    assert [answered_by(o) for o in first_results] == ["first", "c1 unsure 0?", "c1 unsure 1?"]
    assert [answered_by(o) for o in second_results] == ["m0?", "first", "m1?", "m2?", "m3?", "m4?"]
    for outcome in second_results:
        if outcome.decided_by == "then":  # type: ignore[union-attr]
            assert [s.stage for s in outcome.stages] == ["first", "then"]  # type: ignore[union-attr]


async def test_texts_and_conversations_pool_apart():
    from schemas import Turn

    clock = ManualClock()
    second = SecondStage()
    backend = cascade(second, batch_size=2, clock=clock)
    text = asyncio.create_task(backend.score_texts(["t?"]))
    turn = asyncio.create_task(backend.score_conversations([Conversation(turn=Turn(role="user", content="u?"))]))
    await settle()
    assert second.batches == [], "one of each kind: neither pool is full"
    clock.fire()
    await asyncio.gather(text, turn)
    assert sorted(zip(second.kinds, second.batches, strict=True)) == [("content", ["t?"]), ("conversation", ["u?"])]


@pytest.mark.parametrize("refused", [False, True])
async def test_a_second_stage_outage_makes_every_contributors_escalated_inputs_unavailable(refused):
    error = CircuitOpenError("then", 7.0) if refused else BackendUnavailable("then down")
    second = SecondStage(error)
    backend = cascade(second, batch_size=4)
    results = await asyncio.gather(*(backend.score_texts(batch(n, 2)) for n in range(2)))
    assert len(second.batches) == 1, "one pooled call"
    for outcomes in results:
        assert isinstance(outcomes[0], Scored) and outcomes[0].decided_by == "first"
        for outcome in outcomes[1:]:
            assert isinstance(outcome, Unavailable)
            assert outcome.source == "then" and outcome.refused is refused
            assert outcome.reason.startswith("cascade second stage then: ")
            assert outcome.retry_in_s == (7.0 if refused else None)


async def test_an_auth_error_of_the_pooled_call_reaches_every_contributor():
    second = SecondStage(BackendAuthError("then: API key refused; set MISTRAL_API_KEY"))
    backend = cascade(second, batch_size=6)
    results = await asyncio.gather(*(backend.score_texts(batch(n, 2)) for n in range(3)), return_exceptions=True)
    assert len(second.batches) == 1
    assert all(isinstance(r, BackendAuthError) and "MISTRAL_API_KEY" in str(r) for r in results), results


async def test_a_wrong_result_count_of_the_pooled_call_is_a_runtime_error_for_every_contributor():
    backend = cascade(SecondStage(short_by=1), batch_size=4)
    results = await asyncio.gather(*(backend.score_texts(batch(n, 2)) for n in range(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "returned 3 results for 4" in str(r) for r in results), results


async def test_a_caller_cancelled_while_waiting_leaves_the_pool_and_disturbs_no_one():
    clock = ManualClock()
    second = SecondStage()
    backend = cascade(second, batch_size=4, clock=clock)
    one = asyncio.create_task(backend.score_texts(batch(1, 1)))
    gone = asyncio.create_task(backend.score_texts(batch(2, 2)))
    await settle()
    gone.cancel()  # a revoke or shutdown
    await settle()
    three = asyncio.create_task(backend.score_texts(batch(3, 3)))  # 1 + 3 fill the pool
    await settle()
    assert second.batches == [["c1 unsure 0?", "c3 unsure 0?", "c3 unsure 1?", "c3 unsure 2?"]]
    assert [answered_by(o) for o in await one] == ["first", "c1 unsure 0?"]
    assert [answered_by(o) for o in await three] == ["first", "c3 unsure 0?", "c3 unsure 1?", "c3 unsure 2?"]
    assert gone.cancelled()
    assert clock.armed == 0, "an empty pool keeps no timer"


async def test_a_caller_cancelled_during_the_pooled_call_disturbs_no_one():
    clock = ManualClock()
    second = SecondStage()
    second.gate = asyncio.Event()
    backend = cascade(second, batch_size=4, clock=clock)
    callers = [asyncio.create_task(backend.score_texts(batch(n, 2))) for n in range(2)]
    await settle()
    assert len(second.batches) == 1, "sent, and held by the gate"
    callers[0].cancel()
    await settle()
    second.gate.set()
    assert [answered_by(o) for o in await callers[1]] == ["first", "c1 unsure 0?", "c1 unsure 1?"]
    assert callers[0].cancelled()


async def test_close_resolves_the_inputs_still_waiting_in_the_pool():
    clock = ManualClock()
    second = SecondStage()
    backend = cascade(second, batch_size=8, clock=clock)
    callers = [asyncio.create_task(backend.score_texts(batch(n, 2))) for n in range(2)]
    await settle()
    await backend.close()
    results = await asyncio.wait_for(asyncio.gather(*callers), timeout=5)
    assert second.batches == [] and second.closed
    for outcomes in results:
        assert isinstance(outcomes[0], Scored)
        assert all(isinstance(o, Unavailable) and o.refused and o.source == "then" for o in outcomes[1:])


async def test_close_resolves_a_pooled_call_the_closed_stage_never_answers():
    second = SecondStage()
    second.gate = asyncio.Event()  # never opens
    backend = cascade(second, batch_size=2)
    caller = asyncio.create_task(backend.score_texts(batch(1, 2)))
    await settle()
    assert len(second.batches) == 1
    await backend.close()
    outcomes = await asyncio.wait_for(caller, timeout=5)
    assert all(isinstance(o, Unavailable) and o.refused for o in outcomes[1:])


async def test_max_wait_zero_keeps_one_second_stage_call_per_first_stage_batch():
    clock = ManualClock()
    second = SecondStage()
    backend = cascade(second, batch_size=32, max_wait_s=0, clock=clock)
    results = await asyncio.gather(*(backend.score_texts(batch(n, 2)) for n in range(3)))
    assert sorted(second.batches) == [[f"c{n} unsure 0?", f"c{n} unsure 1?"] for n in range(3)]
    assert clock.sleepers == [], "nothing waits"
    assert [answered_by(o) for o in results[2]] == ["first", "c2 unsure 0?", "c2 unsure 1?"]


async def test_a_suspected_or_probing_call_tests_its_own_inputs_alone():
    """The scorer's poison search (``suspect_input()``) and probes (``watch_cache(bypass=True)``)
    must see the second stage's answer to their inputs alone: they skip the pool."""
    from worker.backends.cache import watch_cache

    clock = ManualClock()
    second = SecondStage()
    backend = cascade(second, batch_size=8, clock=clock)
    waiting = asyncio.create_task(backend.score_texts(batch(1, 1)))
    await settle()
    with suspect_input():
        suspected = await asyncio.wait_for(backend.score_texts(["alone?"]), timeout=5)
    with watch_cache(bypass=True):
        probed = await asyncio.wait_for(backend.score_texts(["probe?"]), timeout=5)
    assert second.batches == [["alone?"], ["probe?"]]
    assert answered_by(suspected[0]) == "alone?" and answered_by(probed[0]) == "probe?"
    assert not waiting.done()
    clock.fire()
    await waiting
    assert second.batches[-1] == ["c1 unsure 0?"]


async def test_a_pooled_calls_cache_use_is_counted_for_every_contributor():
    from worker.backends.cache import CachingBackend, watch_cache

    clock = ManualClock()
    second = SecondStage()
    backend = CascadeBackend(
        CachingBackend(FirstStage(), max_entries=100, ttl_s=60),
        CachingBackend(second, max_entries=100, ttl_s=60),
        UncertaintyBands(POLICY, default_band=0.1),
        batch_size=4,
        max_wait_s=10,
        sleep=clock.sleep,
    )
    await backend.first.score_texts(["n1?", "n2?"])  # the first stage's cache holds both

    async def watched(texts: list[str]) -> bool:
        with watch_cache() as use:
            await backend.score_texts(texts)
        return use.backend_asked

    # Each caller's first stage answers from its cache alone; the pooled call asks the second stage.
    clock_fired = asyncio.get_running_loop().call_later(0.01, clock.fire)
    asked = await asyncio.gather(watched(["n1?"]), watched(["n2?"]))
    clock_fired.cancel()
    assert second.batches == [["n1?", "n2?"]]
    assert asked == [True, True], "the second stage answered both callers"


async def test_the_settings_pool_escalations_of_concurrent_batches_over_the_loopback_apis():
    default = load_settings(kafka={"bootstrap_servers": "x:1"}, backend="cascade", require_backend=False)
    assert (default.cascade.then_batch_size, default.cascade.max_wait_ms) == (None, 20)
    batches = [[f"b{n} plain", f"b{n} unsure <<sexual:0.55>>", f"b{n} also <<sexual:0.45>>"] for n in range(3)]
    with OpenAIServer(api_key="k") as openai, MistralServer(api_key="k") as mistral:
        settings = load_settings(
            kafka={"bootstrap_servers": "127.0.0.1:9"},
            backend="cascade",
            cascade={"first": "openai", "then": "mistral", "then_batch_size": 3, "max_wait_ms": 200},
            openai={"api_key": "k", "base_url": openai.base_url},
            mistral={"api_key": "k", "base_url": mistral.base_url},
            cache={"enabled": False},
        )
        backend = create_backend(settings, POLICY)
        assert isinstance(backend, CascadeBackend) and backend.batch_size == 3
        await backend.start()
        try:
            results = await asyncio.gather(*(backend.score_texts(b) for b in batches))
        finally:
            await backend.close()
    sizes = sorted(len(r.body["input"]) for r in mistral.requests)
    assert sizes == [3, 3], "6 escalated inputs in ceil(6 / 3) calls"
    for outcomes in results:
        assert [o.decided_by for o in outcomes] == ["openai", "mistral", "mistral"]  # type: ignore[union-attr]
        assert [o.stages[0].scores["sexual"] for o in outcomes[1:]] == [0.55, 0.45]  # type: ignore[union-attr]


def test_the_second_stage_batch_size_defaults_to_the_batch_size():
    settings = load_settings(
        kafka={"bootstrap_servers": "x:1"},
        backend="cascade",
        cascade={"first": "openai", "then": "mistral"},
        openai={"api_key": "k"},
        mistral={"api_key": "k"},
        batch={"max_size": 24},
    )
    backend = create_backend(settings, POLICY)
    assert isinstance(backend, CascadeBackend)
    assert (backend.batch_size, backend.max_wait_s) == (24, 0.02)
