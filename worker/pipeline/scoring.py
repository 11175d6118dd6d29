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

Contract: ``score`` returns one outcome per job, in order, or ``None`` when the batch was
given up (a fatal error reported through ``on_fatal``, the worker failed, or every job's
partition revoked): the caller then abandons the jobs (never commits them). It never
raises. ``BackendAuthError`` and a backend answering with the wrong number of results are
fatal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from schemas import ConversationEvent, Kind, Turn
from worker.backends.base import Backend, BackendAuthError, BackendUnavailable, Conversation, Outcome
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
    ) -> None:
        self.backend = backend
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
        waits = 0
        while True:
            try:
                outcomes = await self._call(kind, jobs)
            except BackendAuthError as err:
                self._on_fatal(err)
                return None
            except BackendUnavailable as err:
                reason = str(err)
                not_before = err.retry_in_s or 0.0
            except Exception as err:
                log.exception(Event.BACKEND_UNAVAILABLE, reason="unexpected backend error", batch=len(jobs))
                reason = f"unexpected backend error: {type(err).__name__}: {err}"
                not_before = 0.0
            else:
                if len(outcomes) != len(jobs):
                    self._on_fatal(
                        RuntimeError(
                            f"backend {self.backend.name} returned {len(outcomes)} results for {len(jobs)} inputs"
                        )
                    )
                    return None
                return list(outcomes)
            if self._fail_policy != "wait":
                log.warning(Event.BACKEND_DEGRADED, reason=reason, action=self._fail_policy, batch=len(jobs))
                return [Degraded(self._fail_policy, reason)] * len(jobs)
            if self._failed() or not any(job.slot.owned for job in jobs):
                return None
            delay = max(not_before, WAIT_BACKOFF_S[min(waits, len(WAIT_BACKOFF_S) - 1)])
            waits += 1
            log.warning(Event.BACKEND_WAITING, reason=reason, retry_in_s=delay, batch=len(jobs), fail_policy="wait")
            await self._sleep(delay)

    async def _call(self, kind: Kind, jobs: Sequence[Job]) -> list[Outcome]:
        if kind == "content":
            return await self.backend.score_texts([job.text for job in jobs])
        return await self.backend.score_conversations([conversation_of(job.event, job.context) for job in jobs])


def conversation_of(event: ConversationEvent | object, context: tuple[Turn, ...] | None = None) -> Conversation:
    """What the backend judges for a conversation event: its context, then its turn last.

    ``context`` (from the conversation state, ``Job.context``) replaces the event's own when set.
    """
    assert isinstance(event, ConversationEvent)
    turns = tuple(event.context) if context is None else context
    return Conversation(turn=Turn(role=event.role, content=event.content), context=turns)
