"""The cascade: a cheap first backend decides the clear cases, an expensive second one the rest.

``MODWORKER_BACKEND=cascade`` with ``MODWORKER_CASCADE__FIRST`` (e.g. ``local``) and
``MODWORKER_CASCADE__THEN`` (e.g. ``mistral``). For each batch:

1. every input is scored by the first stage;
2. an input is *confident* when, for every category the first stage scored, the score
   lies outside the uncertainty band around each threshold at which the policy could make
   that category a violation (``UncertaintyBands``): it is decided by the first stage's
   scores. An input the first stage rejected is not confident either;
3. the other inputs (*escalated*) go to the second stage, whose scores decide.

*The escalation pool.* The pipeline scores several batches at once, and each escalates
some inputs: sent per batch, nearly every batch would call the second stage. So escalated
inputs wait in a pool, one per kind (texts and conversations apart), until it holds
``MODWORKER_CASCADE__THEN_BATCH_SIZE`` inputs (unset: ``MODWORKER_BATCH__MAX_SIZE``) or its
oldest input has waited ``MODWORKER_CASCADE__MAX_WAIT_MS``; then one second-stage call
takes them (a batch escalating more than fits spans two calls), and each caller gets its
own outcomes back in its own order. A call never holds more than the batch size, and a
caller never waits longer than the max wait plus its calls. ``MAX_WAIT_MS=0`` turns the
pool off: one second-stage call per first-stage batch with any escalated input, at once.
Calls that must test their own inputs skip the pool: the scorer's poison search
(``suspect_input()``: pooled, a poison input would fail the other callers' inputs too) and
its probes (``watch_cache(bypass=True)``). A pooled call runs in a context of its own
(no caller's ``suspect_input()``), and its dedup-cache counts go to every contributor's
``watch_cache()``. A caller cancelled while its inputs wait takes them out of the pool; one
cancelled during the call just drops its rows. ``close`` resolves the inputs still waiting
(and any pooled call the closed stage leaves unanswered) as unavailable, ``refused``.
Metric ``cascade_then_call_size`` (histogram, per kind): inputs per second-stage call.

Outcomes, one per input in order: ``Scored`` with ``decided_by`` (the deciding stage's
backend name) and ``stages`` (the first stage's scores, and the second's where it ran);
``Rejected`` when the deciding stage rejected the input; ``Unavailable`` for the escalated
inputs when the second stage raised ``BackendUnavailable`` (pooled: for every contributing
caller's inputs in that call): the pipeline's fail policy then
applies to those inputs only, while the confident ones of the same batch are published.
Each such ``Unavailable`` names the second stage (``source``), and says whether its open
circuit refused the call (``refused``): the scorer's poison search then works on the
escalated inputs, with the second stage's answers to other inputs as its evidence
(``stage`` hands it either stage, to probe one directly).
Why per-input ``Unavailable`` rather than raising for the batch: raising would make the
fail policy degrade (or hold back) the confident inputs too, and a sub-batch exception
would need the same per-input bookkeeping in the scorer anyway.

The first stage raising ``BackendUnavailable`` (or either stage raising
``BackendAuthError``) propagates: nothing of the batch was scored. A pooled call raising
anything else, or answering with the wrong number of results (``RuntimeError``), raises in
every contributing caller.

Bands are per canonical category: ``(below, above)`` from the policy's ``cascade``
section (``modworker calibrate`` writes it), else ``MODWORKER_CASCADE__DEFAULT_BAND`` on
both sides. A category whose action is ``allow`` everywhere never escalates (it can never
be a violation). The bands see no tenant or source (backends do not), so every threshold
the category can have counts: under the base rules, and under every combination of
overrides that can match one input together, stacked as the policy applies them.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from schemas import Kind
from worker.backends.base import (
    Backend,
    BackendUnavailable,
    Conversation,
    Outcome,
    Scored,
    StageScores,
    Unavailable,
)
from worker.backends.breaker import CircuitOpenError, input_suspected
from worker.backends.cache import CacheUse, cache_use, watch_cache
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.policy import Policy

log = structlog.get_logger(__name__)

Item = TypeVar("Item")


class UncertaintyBands:
    """Which first-stage scores are too close to a decision boundary to trust.

    ``uncertain(scores)`` is True when some raw category's score ``s`` (merged through the
    policy's aliases, highest raw score per canonical category, as the policy does) satisfies
    ``t - below <= s < t + above`` for one of the category's thresholds ``t``.
    """

    def __init__(self, policy: Policy, *, default_band: float) -> None:
        self._policy = policy
        self._default = (default_band, default_band)
        self._intervals: dict[str, tuple[tuple[float, float], ...]] = {}

    def band(self, category: str) -> tuple[float, float]:
        """``(below, above)`` for a canonical category."""
        return self._policy.cascade_band(category) or self._default

    def intervals(self, category: str) -> tuple[tuple[float, float], ...]:
        """The uncertain score intervals ``[low, high)`` of a canonical category."""
        found = self._intervals.get(category)
        if found is None:
            below, above = self.band(category)
            found = tuple((t - below, t + above) for t in self._policy.thresholds(category) if below > 0 or above > 0)
            self._intervals[category] = found
        return found

    def uncertain(self, scores: Mapping[str, float]) -> bool:
        merged: dict[str, float] = {}
        canonical = self._policy.canonical
        for raw, score in scores.items():
            name = canonical(raw)
            merged[name] = max(score, merged.get(name, score))
        for name, score in merged.items():
            for low, high in self.intervals(name):
                if low <= score < high:
                    return True
        return False


class CascadeClosed(BackendUnavailable):
    """The cascade closed while escalated inputs waited in its pool: they were never sent."""


@dataclass(eq=False, slots=True)
class _Share:
    """One caller's escalated inputs in one pooled second-stage call, and their answer."""

    items: list[Any]
    future: asyncio.Future[list[Outcome]]
    cache: CacheUse | None
    """The caller's ``watch_cache()`` counts: the pooled call's are added to them."""


@dataclass(eq=False)
class _Pool:
    """Escalated inputs of one kind waiting for their second-stage call."""

    kind: Kind
    call: Callable[[Sequence[Any]], Awaitable[list[Outcome]]]
    waiting: list[_Share] = field(default_factory=list)
    size: int = 0
    timer: asyncio.Task[None] | None = None
    """Flushes the pool ``max_wait`` after its oldest input came (armed while it holds any)."""

    def discard(self, share: _Share) -> None:
        if share in self.waiting:
            self.waiting.remove(share)
            self.size -= len(share.items)
            if not self.waiting and self.timer is not None:
                self.timer.cancel()
                self.timer = None


class CascadeBackend(Backend):
    """See the module docstring. Owns both stages: ``start`` and ``close`` reach them.

    ``batch_size``: inputs per pooled second-stage call, at most; ``max_wait_s``: the longest
    an escalated input waits for the pool to fill (0: no pool, one second-stage call per
    first-stage batch); ``sleep``: the pool timer's sleep (injectable for a virtual clock).
    """

    name = "cascade"

    def __init__(
        self,
        first: Backend,
        then: Backend,
        bands: UncertaintyBands,
        *,
        batch_size: int = 32,
        max_wait_s: float = 0.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"cascade second-stage batch size must be at least 1, not {batch_size}")
        self.first = first
        self.then = then
        self.bands = bands
        self.batch_size = batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._sleep = sleep
        self.escalated = 0
        """Inputs sent to the second stage since start (for tests and the eval)."""
        self.decided_first = 0
        self.then_calls = 0
        """Second-stage calls made since start, pooled or not (for tests and the eval)."""
        self._pools: dict[Kind, _Pool] = {
            "content": _Pool("content", then.score_texts),
            "conversation": _Pool("conversation", then.score_conversations),
        }
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        self._closed = False
        await self.first.start()
        await self.then.start()

    async def close(self) -> None:
        self._closed = True
        closed = CascadeClosed(f"cascade closed before second stage {self.then.name} was called")
        for pool in self._pools.values():
            waiting, pool.waiting, pool.size = pool.waiting, [], 0
            if pool.timer is not None:
                pool.timer.cancel()
                pool.timer = None
            for share in waiting:
                if not share.future.done():
                    share.future.set_exception(closed)
        for stage in (self.first, self.then):
            try:
                await stage.close()
            except Exception as err:  # noqa: BLE001 - the other stage must still close
                log.warning(Event.CASCADE_CLOSE_FAILED, backend=stage.name, error=f"{type(err).__name__}: {err}")
        for task in list(self._in_flight):  # a pooled call the closed stage never answered
            task.cancel()

    async def ready(self) -> bool:
        return await self.first.ready() and await self.then.ready()

    def stage(self, name: str) -> Backend | None:
        return self.then if name == self.then.name else self.first if name == self.first.name else None

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        return await self._cascade("content", texts, self.first.score_texts, self.then.score_texts)

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        return await self._cascade(
            "conversation", conversations, self.first.score_conversations, self.then.score_conversations
        )

    async def _cascade(
        self,
        kind: Kind,
        items: Sequence[Item],
        first: Callable[[Sequence[Item]], Awaitable[list[Outcome]]],
        then: Callable[[Sequence[Item]], Awaitable[list[Outcome]]],
    ) -> list[Outcome]:
        firsts = await first(items)
        if len(firsts) != len(items):
            raise RuntimeError(f"cascade first stage {self.first.name} returned {len(firsts)} results for {len(items)}")
        results: list[Outcome] = list(firsts)
        escalate = [i for i, outcome in enumerate(firsts) if not self._confident(outcome)]
        escalated = set(escalate)
        for i, outcome in enumerate(firsts):
            if isinstance(outcome, Scored) and i not in escalated:
                results[i] = Scored(
                    outcome.scores,
                    outcome.model,
                    decided_by=self.first.name,
                    stages=(StageScores("first", self.first.name, outcome.model, outcome.scores),),
                )
        self.decided_first += len(items) - len(escalate)
        metrics.cascade_inputs("first").inc(len(items) - len(escalate))
        if not escalate:
            return results
        self.escalated += len(escalate)
        thens = await self._second(kind, [items[i] for i in escalate], then)
        unavailable = 0
        for i, second in zip(escalate, thens, strict=True):
            if isinstance(second, BackendUnavailable):
                reason = f"cascade second stage {self.then.name}: {second}"
                refused = isinstance(second, CircuitOpenError | CascadeClosed)
                results[i] = Unavailable(reason, second.retry_in_s, source=self.then.name, refused=refused)
                unavailable += 1
            else:
                results[i] = self._decided_by_then(firsts[i], second)
        if unavailable:
            metrics.cascade_inputs("unavailable").inc(unavailable)
        if unavailable < len(escalate):
            metrics.cascade_inputs("then").inc(len(escalate) - unavailable)
        return results

    async def _second(
        self, kind: Kind, items: list[Item], then: Callable[[Sequence[Item]], Awaitable[list[Outcome]]]
    ) -> list[Outcome | BackendUnavailable]:
        """The second stage's outcome for each escalated input, in order, or the
        ``BackendUnavailable`` its call raised; any other error of a call raises here.

        Pooled with other callers' escalations unless pooling is off, or this call must test
        its own inputs: the scorer suspects them (``suspect_input()``: pooled, a poison input
        would fail the others' calls too, and its failures would count on their circuit) or
        probes with them (``watch_cache(bypass=True)``)."""
        use = cache_use()
        if self.max_wait_s <= 0 or self._closed or input_suspected() or (use is not None and use.bypass):
            try:
                thens = await self._call_then(kind, then, items)
            except BackendUnavailable as err:
                return [err] * len(items)
            return list(thens)
        pool = self._pools[kind]
        loop = asyncio.get_running_loop()
        shares: list[_Share] = []
        rest = items
        while rest:
            room = self.batch_size - pool.size
            share = _Share(rest[:room], loop.create_future(), use)
            rest = rest[room:]
            pool.waiting.append(share)
            pool.size += len(share.items)
            shares.append(share)
            if pool.size >= self.batch_size:
                self._flush(pool)
            elif pool.timer is None:
                pool.timer = asyncio.ensure_future(self._expire(pool))
        try:
            answers = await asyncio.gather(*(share.future for share in shares), return_exceptions=True)
        except asyncio.CancelledError:  # shutdown or revoke: the others' calls go on without these
            for share in shares:
                pool.discard(share)
            raise
        outcomes: list[Outcome | BackendUnavailable] = []
        for share, answer in zip(shares, answers, strict=True):
            if isinstance(answer, BackendUnavailable):
                outcomes += [answer] * len(share.items)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                outcomes += answer
        return outcomes

    async def _call_then(
        self, kind: Kind, then: Callable[[Sequence[Any]], Awaitable[list[Outcome]]], items: Sequence[Any]
    ) -> list[Outcome]:
        """One second-stage call: counted, and its result count checked."""
        self.then_calls += 1
        metrics.cascade_then_call_size(kind).observe(len(items))
        thens = await then(items)
        if len(thens) != len(items):
            raise RuntimeError(f"cascade second stage {self.then.name} returned {len(thens)} results for {len(items)}")
        return thens

    async def _expire(self, pool: _Pool) -> None:
        await self._sleep(self.max_wait_s)
        pool.timer = None
        self._flush(pool)

    def _flush(self, pool: _Pool) -> None:
        """Send what the pool holds as one second-stage call (in its own task)."""
        if pool.timer is not None and pool.timer is not asyncio.current_task():
            pool.timer.cancel()
        pool.timer = None
        shares = [share for share in pool.waiting if not share.future.done()]
        pool.waiting, pool.size = [], 0
        if not shares:
            return
        # A fresh context: no caller's suspect_input() or watch_cache() reaches the call; the
        # cache counts are handed to every contributor instead.
        task = asyncio.get_running_loop().create_task(self._pooled(pool, shares), context=contextvars.Context())
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _pooled(self, pool: _Pool, shares: list[_Share]) -> None:
        items = [item for share in shares for item in share.items]
        try:
            with watch_cache() as use:
                thens = await self._call_then(pool.kind, pool.call, items)
        except Exception as err:  # noqa: BLE001 - every contributor gets it: it failed their call
            for share in shares:
                if not share.future.done():
                    share.future.set_exception(err)
            return
        except BaseException:  # cancelled (the cascade closed): no contributor may wait for ever
            closed = CascadeClosed(f"cascade closed during a call of second stage {self.then.name}")
            for share in shares:
                if not share.future.done():
                    share.future.set_exception(closed)
            raise
        start = 0
        for share in shares:
            end = start + len(share.items)
            if share.cache is not None:
                share.cache.forwarded += use.forwarded
                share.cache.answered_alone += use.answered_alone
            if not share.future.done():  # (its caller was cancelled meanwhile)
                share.future.set_result(thens[start:end])
            start = end

    def _decided_by_then(self, first: Outcome, second: Outcome) -> Outcome:
        if not isinstance(second, Scored):
            return second
        stages = [StageScores("first", self.first.name, first.model, first.scores)] if isinstance(first, Scored) else []
        stages.append(StageScores("then", self.then.name, second.model, second.scores))
        return Scored(
            second.scores, second.model, decided_by=self.then.name, stages=tuple(stages), unscored=second.unscored
        )

    def _confident(self, outcome: Outcome) -> bool:
        if not isinstance(outcome, Scored) or outcome.unscored:
            return False  # rejected, unavailable or partly scored by the first stage: the second may judge it
        return not self.bands.uncertain(outcome.scores)
