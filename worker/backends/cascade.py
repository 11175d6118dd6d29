"""The cascade: a cheap first backend decides the clear cases, an expensive second one the rest.

``MODWORKER_BACKEND=cascade`` with ``MODWORKER_CASCADE__FIRST`` (e.g. ``local``) and
``MODWORKER_CASCADE__THEN`` (e.g. ``mistral``). For each batch:

1. every input is scored by the first stage;
2. an input is *confident* when, for every category the first stage scored, the score
   lies outside the uncertainty band around each threshold at which the policy could make
   that category a violation (``UncertaintyBands``): it is decided by the first stage's
   scores. An input the first stage rejected is not confident either;
3. the other inputs (*escalated*) go, as one call, to the second stage, whose scores decide.

Outcomes, one per input in order: ``Scored`` with ``decided_by`` (the deciding stage's
backend name) and ``stages`` (the first stage's scores, and the second's where it ran);
``Rejected`` when the deciding stage rejected the input; ``Unavailable`` for the escalated
inputs when the second stage raised ``BackendUnavailable``: the pipeline's fail policy then
applies to those inputs only, while the confident ones of the same batch are published.
Each such ``Unavailable`` names the second stage (``source``), and says whether its open
circuit refused the call (``refused``): the scorer's poison search then works on the
escalated inputs, with the second stage's answers to other inputs as its evidence
(``stage`` hands it either stage, to probe one directly).
Why per-input ``Unavailable`` rather than raising for the batch: raising would make the
fail policy degrade (or hold back) the confident inputs too, and a sub-batch exception
would need the same per-input bookkeeping in the scorer anyway.

The first stage raising ``BackendUnavailable`` (or either stage raising
``BackendAuthError``) propagates: nothing of the batch was scored.

Bands are per canonical category: ``(below, above)`` from the policy's ``cascade``
section (``modworker calibrate`` writes it), else ``MODWORKER_CASCADE__DEFAULT_BAND`` on
both sides. A category whose action is ``allow`` everywhere never escalates (it can never
be a violation). The bands see no tenant or source (backends do not), so every threshold
the category can have counts: under the base rules, and under every combination of
overrides that can match one input together, stacked as the policy applies them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import structlog

from worker.backends.base import (
    Backend,
    BackendUnavailable,
    Conversation,
    Outcome,
    Scored,
    StageScores,
    Unavailable,
)
from worker.backends.breaker import CircuitOpenError
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


class CascadeBackend(Backend):
    """See the module docstring. Owns both stages: ``start`` and ``close`` reach them."""

    name = "cascade"

    def __init__(self, first: Backend, then: Backend, bands: UncertaintyBands) -> None:
        self.first = first
        self.then = then
        self.bands = bands
        self.escalated = 0
        """Inputs sent to the second stage since start (for tests and the eval)."""
        self.decided_first = 0

    async def start(self) -> None:
        await self.first.start()
        await self.then.start()

    async def close(self) -> None:
        for stage in (self.first, self.then):
            try:
                await stage.close()
            except Exception as err:  # noqa: BLE001 - the other stage must still close
                log.warning(Event.CASCADE_CLOSE_FAILED, backend=stage.name, error=f"{type(err).__name__}: {err}")

    async def ready(self) -> bool:
        return await self.first.ready() and await self.then.ready()

    def stage(self, name: str) -> Backend | None:
        return self.then if name == self.then.name else self.first if name == self.first.name else None

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        return await self._cascade(texts, self.first.score_texts, self.then.score_texts)

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        return await self._cascade(conversations, self.first.score_conversations, self.then.score_conversations)

    async def _cascade(
        self,
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
        try:
            thens = await then([items[i] for i in escalate])
        except BackendUnavailable as err:
            reason = f"cascade second stage {self.then.name}: {err}"
            refused = isinstance(err, CircuitOpenError)
            for i in escalate:
                results[i] = Unavailable(reason, err.retry_in_s, source=self.then.name, refused=refused)
            metrics.cascade_inputs("unavailable").inc(len(escalate))
            return results
        metrics.cascade_inputs("then").inc(len(escalate))
        if len(thens) != len(escalate):
            raise RuntimeError(
                f"cascade second stage {self.then.name} returned {len(thens)} results for {len(escalate)}"
            )
        for i, second in zip(escalate, thens, strict=True):
            results[i] = self._decided_by_then(firsts[i], second)
        return results

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
