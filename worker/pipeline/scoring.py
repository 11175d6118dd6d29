"""Scoring stage: a batch of jobs -> one outcome per job, under the fail policy.

``Scorer.score`` calls the backend for one batch, at most ``max_concurrency`` batches at
once (whatever the backend: remote or local). The backend retries transient trouble
itself; when it gives up (``BackendUnavailable``, or any unexpected exception: a backend
bug must not kill the stream silently) the fail policy decides:

- ``wait``: try the batch again, backing off (1, 2, 5, 10, 30 s, never sooner than the
  backend's ``retry_in_s``), until it succeeds, the worker fails, or none of the batch's
  partitions is owned any more. Nothing passes unmoderated and nothing is lost; reading
  pauses through the in-flight cap meanwhile.
- ``review`` / ``allow``: every job of the batch gets a ``Degraded`` outcome with that
  action and the reason.
- ``fallback``: the ``fallback`` backend scores the batch; its ``Scored`` outcomes carry
  ``decided_by`` (the fallback's name) and ``degraded_reason``. When the fallback fails too,
  as under ``wait``. The primary is tried first for every batch (its circuit breaker makes
  that cheap while it is open), so it takes over again as soon as it answers.

When a composite backend (the cascade) returns ``Unavailable`` for some inputs only, the
others keep their outcomes and the fail policy applies to those inputs alone: the retries
of ``wait`` re-send only them.

Contract: ``score`` returns one outcome per job, in order, or ``None`` when the batch was
given up (a fatal error reported through ``on_fatal``, the worker failed, or every job's
partition revoked): the caller then abandons the jobs (never commits them). It never
raises. ``BackendAuthError`` and a backend answering with the wrong number of results are
fatal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from schemas import ConversationEvent, Kind, Turn
from worker.backends.base import (
    Backend,
    BackendAuthError,
    BackendUnavailable,
    Conversation,
    Outcome,
    Scored,
    Unavailable,
)
from worker.config import FailPolicy
from worker.ops.logs import Event
from worker.pipeline.types import Job

log = structlog.get_logger("worker.pipeline.scoring")

WAIT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class Degraded:
    """No scores could be had; the fail policy decided ``action`` (``review`` or ``allow``)."""

    action: str
    reason: str


Result = Outcome | Degraded


class Scorer:
    """Scores batches on one backend, bounded in concurrency, under one fail policy."""

    def __init__(
        self,
        backend: Backend,
        *,
        fail_policy: FailPolicy,
        max_concurrency: int,
        on_fatal: Callable[[BaseException], None],
        failed: Callable[[], bool],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        fallback: Backend | None = None,
    ) -> None:
        self.backend = backend
        self._fallback = fallback if fail_policy == "fallback" else None
        self._fail_policy = fail_policy
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self._on_fatal = on_fatal
        self._failed = failed
        self._sleep = sleep

    async def score(self, kind: Kind, jobs: Sequence[Job]) -> list[Result] | None:
        """One result per job, in order; ``None`` when the batch is given up (see module doc)."""
        async with self._concurrency:
            return await self._score(kind, jobs)

    async def _score(self, kind: Kind, jobs: Sequence[Job]) -> list[Result] | None:
        results: list[Result | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))  # the jobs still without a result
        waits = 0
        while True:
            batch = [jobs[i] for i in pending]
            try:
                outcomes = await self._call(kind, batch)
            except BackendAuthError as err:
                self._on_fatal(err)
                return None
            except BackendUnavailable as err:
                reason = str(err)
                not_before = err.retry_in_s or 0.0
            except Exception as err:
                log.exception(Event.BACKEND_UNAVAILABLE, reason="unexpected backend error", batch=len(batch))
                reason = f"unexpected backend error: {type(err).__name__}: {err}"
                not_before = 0.0
            else:
                if len(outcomes) != len(batch):
                    self._on_fatal(
                        RuntimeError(
                            f"backend {self.backend.name} returned {len(outcomes)} results for {len(batch)} inputs"
                        )
                    )
                    return None
                # A composite backend may leave some inputs Unavailable: the fail policy
                # applies to those only (worker.backends.base).
                unavailable = [(i, o) for i, o in zip(pending, outcomes, strict=True) if isinstance(o, Unavailable)]
                for i, outcome in zip(pending, outcomes, strict=True):
                    results[i] = outcome
                if not unavailable:
                    return results  # type: ignore[return-value]  # every slot is filled
                pending = [i for i, _ in unavailable]
                batch = [jobs[i] for i in pending]
                reason = unavailable[0][1].reason
                not_before = max(o.retry_in_s or 0.0 for _, o in unavailable)
            if self._fallback is not None and await self._score_with_fallback(kind, batch, pending, results, reason):
                return results  # type: ignore[return-value]
            if self._fail_policy in ("review", "allow"):
                log.warning(Event.BACKEND_DEGRADED, reason=reason, action=self._fail_policy, batch=len(batch))
                for i in pending:
                    results[i] = Degraded(self._fail_policy, reason)
                return results  # type: ignore[return-value]
            if self._failed():
                return None
            if not any(job.slot.owned for job in batch):
                if len(pending) == len(jobs):
                    return None
                # The rest of the batch was scored and is published; these are abandoned by
                # the outputs stage, which publishes nothing for a revoked partition.
                for i in pending:
                    results[i] = Degraded("review", reason)
                return results  # type: ignore[return-value]
            delay = max(not_before, WAIT_BACKOFF_S[min(waits, len(WAIT_BACKOFF_S) - 1)])
            waits += 1
            log.warning(
                Event.BACKEND_WAITING, reason=reason, retry_in_s=delay, batch=len(batch), fail_policy=self._fail_policy
            )
            await self._sleep(delay)

    async def _score_with_fallback(
        self, kind: Kind, batch: list[Job], pending: list[int], results: list[Result | None], reason: str
    ) -> bool:
        """Fail policy ``fallback``: the fallback backend scores ``batch`` (the jobs at
        ``pending``); True when it did. Its verdicts are degraded, naming the primary's
        failure; when the fallback is down too, the caller waits as under ``wait``."""
        assert self._fallback is not None
        try:
            outcomes = await self._call(kind, batch, backend=self._fallback)
        except BackendAuthError as err:
            self._on_fatal(err)
            return False
        except Exception as err:  # noqa: BLE001 - a broken fallback must not end the primary's waiting
            log.warning(Event.FALLBACK_FAILED, reason=reason, error=f"{type(err).__name__}: {err}", batch=len(batch))
            return False
        if len(outcomes) != len(batch) or any(isinstance(o, Unavailable) for o in outcomes):
            return False
        log.warning(Event.BACKEND_FALLBACK, reason=reason, fallback=self._fallback.name, batch=len(batch))
        degraded_reason = f"scored by fallback backend {self._fallback.name}: {reason}"
        for i, outcome in zip(pending, outcomes, strict=True):
            results[i] = (
                replace(outcome, decided_by=self._fallback.name, degraded_reason=degraded_reason)
                if isinstance(outcome, Scored)
                else outcome
            )
        return True

    async def _call(self, kind: Kind, jobs: Sequence[Job], *, backend: Backend | None = None) -> list[Outcome]:
        backend = backend or self.backend
        if kind == "content":
            return await backend.score_texts([job.text for job in jobs])
        return await backend.score_conversations([conversation_of(job.event) for job in jobs])


def conversation_of(event: ConversationEvent | object) -> Conversation:
    """What the backend judges for a conversation event: its context, then its turn last."""
    assert isinstance(event, ConversationEvent)
    return Conversation(turn=Turn(role=event.role, content=event.content), context=tuple(event.context))
