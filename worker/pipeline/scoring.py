"""Scoring stage: a batch of jobs -> one outcome per job, under the fail policy.

``Scorer.score`` calls the backend for one batch, at most ``max_concurrency`` batches at
once (whatever the backend: remote or local). The backend retries transient trouble
itself; when it gives up (``BackendUnavailable``, or any unexpected exception: a backend
bug must not kill the stream silently) the fail policy decides:

- ``wait``: try the batch again until it succeeds, the worker fails, or none of the
  batch's partitions is owned any more. Between tries it waits the backend's
  ``retry_in_s`` when given (an open circuit's next probe), else 1, 2, 5, 10, 30 s; but
  any batch succeeding meanwhile wakes every waiter at once (the backend answers again:
  moderation resumes without sleeping out the table). Nothing passes unmoderated and
  nothing is lost; reading pauses through the in-flight cap meanwhile.

  *Poison inputs.* A failed try after which the backend answered some other batch says
  the trouble is this batch, not the backend (an outage fails everything). Only calls
  started after the failure count (before a batch's first failure: started after its first
  try began): a call started earlier may have passed a cascade's first stage before an
  outage of that stage and finish, at its second stage, during it. Such a batch
  is split in halves, each scored (recursively) in turn, the results joined in order; so
  a failing input is soon alone. An input that fails alone, while the backend answers
  others, ``poison_attempts`` times gets ``Rejected`` (``error_type`` ``backend_failed``,
  the last error in the reason): it is dead-lettered instead of holding its partition's
  committed offset back for ever. An outage (no other batch succeeds) still waits.
  Calls made with that evidence run inside ``breaker.suspect_input()``: their failures do
  not count towards opening the circuit, so isolating one input never stalls the other
  batches. A call refused by an open circuit tested nothing: no split, no count; it waits.
  A batch the dedup cache answered alone is no evidence (``cache.watch_cache``): the
  backend was not asked. The evidence does not depend on other traffic: a batch that
  waited out its backoff with no success meanwhile *probes* its source with one input (the
  canary: the shortest input the source answered in its last call, so a probe costs few
  tokens; before the source's first answer, the waiting batch's own inputs in turn). The
  probe answering is evidence like any other success; the probe failing says outage, and
  the batch waits on. Concurrent waiters share one probe, so an outage costs at most one
  one-input call per wait per source, and an open circuit refuses those cheaply. After an
  open circuit's wait the probe is the circuit's trial call, so a batch holding a poison
  input (whose first, unsuspected call may have opened the circuit) cannot keep it open.
  So a poison input is dead-lettered even when the stream around it stops, also when every
  batch in flight holds one before anything was ever scored.
- ``review`` / ``allow``: every job of the batch gets a ``Degraded`` outcome with that
  action and the reason.
- ``fallback``: the ``fallback`` backend scores the batch; its ``Scored`` outcomes carry
  ``decided_by`` (the fallback's name) and ``degraded_reason``. When the fallback fails too,
  as under ``wait``. The primary is tried first for every batch (its circuit breaker makes
  that cheap while it is open), so it takes over again as soon as it answers.

*Evidence is per source.* A source is the kind (each kind has its own endpoint) and, for a
composite backend, the stage that failed. Only that source answering other inputs is
evidence against a failed batch, and only its answers wake the batch or answer its probe:
with the conversation endpoint down, content successes say nothing of the turns, which
wait as in an outage.

When a composite backend (the cascade) returns ``Unavailable`` for some inputs only, the
others keep their outcomes and the fail policy applies to those inputs alone: the retries
of ``wait`` re-send only them. The ``Unavailable`` names its stage (``source``): that
stage deciding other inputs meanwhile is the evidence, and the poison search above runs on
the left inputs (a poison input for the cascade's second stage is dead-lettered). Its
probe's canary is an input that stage decided last; before that stage's first answer, a
batch left with one input for it (no other input known to reach the stage) probes the
stage itself (``Backend.stage``) with the backend's canary. ``refused`` (the stage's
circuit is open) is no evidence, as above. An ``Unavailable`` naming no stage is never
blamed: it waits.

Contract: ``score`` returns one outcome per job, in order, or ``None`` when the batch was
given up (a fatal error reported through ``on_fatal``, the worker failed, or every job's
partition revoked): the caller then abandons the jobs (never commits them). It never
raises. ``BackendAuthError`` and a backend answering with the wrong number of results are
fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import structlog

from schemas import Kind, Turn
from worker.backends.base import (
    Backend,
    BackendAuthError,
    BackendUnavailable,
    Conversation,
    Outcome,
    Rejected,
    Scored,
    Unavailable,
)
from worker.backends.breaker import CircuitOpenError, suspect_input
from worker.backends.cache import watch_cache
from worker.config import FailPolicy
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.events import ConversationEvent, schema_turn, schema_turns
from worker.pipeline.types import Job

log = structlog.get_logger("worker.pipeline.scoring")

WAIT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class Degraded:
    """No scores could be had; the fail policy decided ``action`` (``review`` or ``allow``)."""

    action: str
    reason: str


Result = Outcome | Degraded

Source = tuple[Kind, str | None]
"""Whose answers are evidence about a failure: the kind (each has its own endpoint) and the
stage of a composite backend that failed (``None``: the backend as called)."""


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
        poison_attempts: int = 3,
        fallback: Backend | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self._fail_policy = fail_policy
        self._fallback = fallback if fail_policy == "fallback" else None
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self._on_fatal = on_fatal
        self._failed = failed
        self._poison_attempts = poison_attempts
        self._sleep = sleep
        self._calls = 0
        """Calls started so far: a call's ticket is this count when it starts."""
        self._answered_from: dict[Source, int] = {}
        """Per source, the latest-started call (its ticket) that source answered: a batch
        that noted the count of calls at its last failure and finds a call started since
        answered knows that source answered others after the failure. A call started before
        the failure says nothing: a cascade's first stage may have answered it before the
        outage that fails this batch, its second stage finishing the call during it."""
        self._woken: dict[Source, asyncio.Event] = {}
        """Per source, set (and replaced by a fresh one) whenever it answers: a batch waiting
        on the source it failed on wakes at once."""
        self._scored_last: dict[Source, Sequence[Job]] = {}
        """Per source, the inputs it answered in its last call: the probe's canary comes from
        them (chosen when a probe needs it, not on every batch)."""
        self._probes: dict[Source, asyncio.Future[None]] = {}
        """Per source, the probe in flight, shared by every batch waiting meanwhile."""

    async def score(self, kind: Kind, jobs: Sequence[Job]) -> list[Result] | None:
        """One result per job, in order; ``None`` when the batch is given up (see module doc)."""
        async with self._concurrency:
            return await self._score(kind, jobs)

    async def _score(self, kind: Kind, jobs: Sequence[Job], inherited: Source | None = None) -> list[Result] | None:
        waits = 0
        failed_alone = 0
        pauses = 0
        # A split half inherits its parent's evidence: its first failure on the same source
        # counts as one after which that source answered others.
        top_level = inherited is None
        started = self._calls  # this batch's first try: a call started since answering is evidence
        since: dict[Source, int] = {}  # per source, the first ticket after this batch last failed on it
        last: Source | None = inherited  # the source of the last failure
        evidence = inherited is not None
        results: list[Result | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))  # the jobs still without a result
        while True:
            batch = [jobs[i] for i in pending]
            source: Source = (kind, None)
            refused = False
            # Evidence in hand (the source the batch last failed on answered others since):
            # the call blames the batch, and its failures must not open the circuit.
            suspected = evidence or (last is not None and self._answered_since(last, since, started))
            ticket = self._ticket()
            try:
                with suspect_input() if suspected else contextlib.nullcontext(), watch_cache() as cache:
                    outcomes = await self._call(kind, batch)
            except BackendAuthError as err:
                self._on_fatal(err)
                return None
            except CircuitOpenError as err:
                # Refused by the circuit (opened by other calls, or by this one's own tries
                # before the API answered others): no evidence against this batch.
                reason, not_before, refused = str(err), err.retry_in_s, True
            except BackendUnavailable as err:
                reason = str(err)
                not_before = err.retry_in_s or 0.0
            except Exception as err:
                reason = f"unexpected backend error: {type(err).__name__}: {err}"
                not_before = 0.0
                if waits == 0 and failed_alone == 0 and top_level:  # the traceback once per batch, not per try
                    log.exception(Event.BACKEND_UNAVAILABLE, reason="unexpected backend error", batch=len(batch))
                else:
                    log.warning(Event.BACKEND_UNAVAILABLE, reason=reason, batch=len(batch))
            else:
                if len(outcomes) != len(batch):
                    self._on_fatal(
                        RuntimeError(
                            f"backend {self.backend.name} returned {len(outcomes)} results for {len(batch)} inputs"
                        )
                    )
                    return None
                if cache.backend_asked:  # answered from the dedup cache alone: no news of the backend
                    self._note_answers(kind, batch, outcomes, ticket)
                left = [(i, o) for i, o in zip(pending, outcomes, strict=True) if isinstance(o, Unavailable)]
                for i, outcome in zip(pending, outcomes, strict=True):
                    results[i] = outcome
                if not left:
                    return _filled(results)
                # A composite backend left some inputs Unavailable: the fail policy applies to
                # those only, and the poison search with the evidence of the stage that failed.
                pending = [i for i, _ in left]
                batch = [jobs[i] for i in pending]
                reason = left[0][1].reason
                not_before = max(o.retry_in_s or 0.0 for _, o in left)
                # A stage that does not name itself: no answer is evidence about it (it waits, as an outage).
                source = (kind, left[0][1].source or "")
                refused = all(o.refused for _, o in left)
            if self._fallback is not None and await self._score_with_fallback(kind, batch, pending, results, reason):
                return _filled(results)
            if self._fail_policy in ("review", "allow"):
                log.warning(Event.BACKEND_DEGRADED, reason=reason, action=self._fail_policy, batch=len(batch))
                for i in pending:
                    results[i] = Degraded(self._fail_policy, reason)
                return _filled(results)
            if self._failed():
                return None
            if not any(job.slot.owned for job in batch):
                if len(pending) == len(jobs):
                    return None
                # The rest was scored; these are abandoned by the outputs stage, which
                # publishes nothing for a partition no longer owned.
                for i in pending:
                    results[i] = Degraded("review", reason)
                return _filled(results)
            # Only the source that failed answering others is evidence: one kind's endpoint (or
            # a cascade's first stage) answering says nothing of another that is down.
            answered_others = (evidence and source == last) or self._answered_since(source, since, started)
            evidence, last = False, source
            since[source] = self._calls
            woken = self._woken_event(source)
            if refused:
                # A refused call tested nothing: neither split nor counted; it waits for the
                # probe (the circuit's trial call) or a success.
                log.warning(
                    Event.BACKEND_WAITING, reason=reason, retry_in_s=not_before, batch=len(batch), fail_policy="wait"
                )
                await self._pause(not_before, woken, probe=source, own=batch, turn=pauses)
                pauses += 1
                continue
            if answered_others:  # the source answered another batch since this one last failed
                if len(batch) > 1:
                    split = await self._split(kind, batch, reason, source)
                    if split is None:
                        return None
                    for i, result in zip(pending, split, strict=True):
                        results[i] = result
                    return _filled(results)
                failed_alone += 1
                if failed_alone >= self._poison_attempts:
                    results[pending[0]] = self._poisoned(batch[0], failed_alone, reason)
                    return _filled(results)
            delay = not_before if not_before > 0 else WAIT_BACKOFF_S[min(waits, len(WAIT_BACKOFF_S) - 1)]
            waits += 1
            log.warning(
                Event.BACKEND_WAITING, reason=reason, retry_in_s=delay, batch=len(batch), fail_policy=self._fail_policy
            )
            await self._pause(delay, woken, probe=source, own=batch, turn=pauses)
            pauses += 1

    async def _split(self, kind: Kind, jobs: Sequence[Job], reason: str, source: Source) -> list[Result] | None:
        """Score both halves of a batch that fails while ``source`` answers others, in order."""
        metrics.POISON_SPLITS.inc()
        log.warning(Event.BACKEND_BATCH_SPLIT, reason=reason, batch=len(jobs))
        half = len(jobs) // 2
        results: list[Result] = []
        for part in (jobs[:half], jobs[half:]):  # in turn: the concurrency bound holds
            scored = await self._score(kind, part, source)
            if scored is None:
                if self._failed() or any(job.slot.owned for job in part):
                    return None
                # Only revoked jobs in this half: the outputs stage abandons them (it publishes
                # nothing for a partition no longer owned); the other half is still owned.
                scored = [Degraded("review", reason)] * len(part)
            results.extend(scored)
        return results

    def _poisoned(self, job: Job, attempts: int, reason: str) -> Rejected:
        metrics.POISON_INPUTS.inc()
        record = job.record
        log.error(
            Event.BACKEND_POISON_INPUT,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            attempts=attempts,
            reason=reason,
        )
        return Rejected(
            reason=f"backend failed on this input alone {attempts} times while answering others; last error: {reason}",
            error_type="backend_failed",
        )

    def _ticket(self) -> int:
        """The ticket of a call starting now (see ``_answered_from``)."""
        ticket = self._calls
        self._calls += 1
        return ticket

    def _answered_since(self, source: Source, since: dict[Source, int], started: int) -> bool:
        """Whether ``source`` answered a call started after the batch last failed on it (or,
        before its first failure on it, after its first try began)."""
        return self._answered_from.get(source, -1) >= since.get(source, started)

    def _woken_event(self, source: Source) -> asyncio.Event:
        event = self._woken.get(source)
        if event is None:
            event = self._woken[source] = asyncio.Event()
        return event

    def _note_answers(self, kind: Kind, batch: Sequence[Job], outcomes: Sequence[Outcome], ticket: int) -> set[Source]:
        """Note the sources that answered the call ``ticket`` and wake their waiters; returns them.

        The backend as called answered every input not left ``Unavailable``; a stage of a
        composite answered those it decided (``Scored.decided_by``)."""
        answered: dict[Source, list[Job]] = {}
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Unavailable):
                continue
            answered.setdefault((kind, None), []).append(job)
            if isinstance(outcome, Scored) and outcome.decided_by is not None:
                answered.setdefault((kind, outcome.decided_by), []).append(job)
        for source, jobs in answered.items():
            self._scored_last[source] = jobs
            self._answered(source, ticket)
        return set(answered)

    def _answered(self, source: Source, ticket: int) -> None:
        """``source`` answered the call ``ticket``: note it and wake its waiters."""
        self._answered_from[source] = max(ticket, self._answered_from.get(source, -1))
        event = self._woken.pop(source, None)
        if event is not None:
            event.set()

    async def _probe(self, source: Source, own: Sequence[Job], turn: int) -> None:
        """Score the canary of ``source`` once (or join the probe in flight); its answer counts
        as that source answering. Before the source's first answer there is no canary: the
        waiting batch's own inputs take turns (``turn``), shortest first, so a batch holding
        a poison input finds one that answers, while in an outage every probe fails. A batch
        of one waiting on a composite's stage probes that stage directly instead, with the
        canary of the backend as called."""
        probe = self._probes.get(source)
        if probe is None or probe.done():
            stage: Backend | None = None
            scored = self._scored_last.get(source)
            if scored is not None:
                canary = min(scored, key=_probe_size)
            elif len(own) > 1:  # (a batch of one probing itself would only repeat its own try)
                canary = sorted(own, key=_probe_size)[turn % len(own)]
            elif (
                source[1]
                and (whole := self._scored_last.get((source[0], None))) is not None
                and (stage := self.backend.stage(source[1])) is not None
            ):
                # A composite's stage that never answered, failing on one input alone: no
                # input known to reach that stage is left, so probe the stage itself with
                # one the backend answered (else, at the in-flight cap, nothing would).
                canary = min(whole, key=_probe_size)
            else:
                return
            probe = self._probes[source] = asyncio.ensure_future(self._probe_once(source, canary, stage))
        await asyncio.shield(probe)

    async def _probe_once(self, source: Source, canary: Job, stage: Backend | None = None) -> None:
        """Call the backend (or ``stage`` of it directly) with ``canary``; note the answer."""
        kind = source[0]
        ticket = self._ticket()
        try:
            with watch_cache(bypass=True):  # the backend's own answer, never the cache's
                outcomes = await self._call(kind, [canary], backend=stage)
        except Exception as err:  # noqa: BLE001 - a failed probe is the answer: the backend is down
            metrics.BACKEND_PROBES.labels(result="failed").inc()
            log.debug(Event.BACKEND_PROBE, answered=False, error=f"{type(err).__name__}: {err}")
            return
        if stage is None:
            answered = len(outcomes) == 1 and source in self._note_answers(kind, [canary], outcomes, ticket)
        else:  # the stage's own answer; the canary stays no canary of it (it would not reach it)
            answered = len(outcomes) == 1 and isinstance(outcomes[0], Scored)
            if answered:
                self._answered(source, ticket)
        metrics.BACKEND_PROBES.labels(result="answered" if answered else "failed").inc()
        log.debug(Event.BACKEND_PROBE, answered=answered)

    async def _pause(
        self, delay: float, answered: asyncio.Event, *, probe: Source, own: Sequence[Job], turn: int
    ) -> None:
        """Sleep ``delay``, or less: until ``answered`` is set (``probe`` answered some batch).
        When the sleep ran out with no answer meanwhile, probe ``probe`` with its canary
        before the batch tries again: its answer is evidence, and after an open
        circuit's wait the probe (not a batch that may hold a poison input) is the
        circuit's trial call."""
        if answered.is_set():
            return
        sleeping = asyncio.ensure_future(self._sleep(delay))
        woken = asyncio.ensure_future(answered.wait())
        try:
            await asyncio.wait((sleeping, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()
        if not answered.is_set():
            await self._probe(probe, own, turn)

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
                msgspec.structs.replace(outcome, decided_by=self._fallback.name, degraded_reason=degraded_reason)
                if isinstance(outcome, Scored)
                else outcome
            )
        return True

    async def _call(self, kind: Kind, jobs: Sequence[Job], *, backend: Backend | None = None) -> list[Outcome]:
        backend = backend or self.backend
        if kind == "content":
            return await backend.score_texts([job.text for job in jobs])
        return await backend.score_conversations([conversation_of(job.event, job.context) for job in jobs])


def _probe_size(job: Job) -> int:
    """What a probe with ``job`` would send, roughly: the shortest input makes the cheapest probe."""
    return len(job.text) + sum(len(turn.content) for turn in job.judged_context)


def _filled(results: list[Result | None]) -> list[Result]:
    """``results`` once the loop gave every slot what the backend (or the fail policy) said;
    a backend that answers a non-outcome is a bug the outputs stage trips over, as before."""
    return cast(list[Result], results)


def conversation_of(event: ConversationEvent | object, context: tuple[Turn, ...] | None = None) -> Conversation:
    """What the backend judges for a conversation event: its context, then its turn last, as
    ``schemas.Turn`` models (built without validation: the event's values are valid).

    ``context`` (from the conversation state, ``Job.context``) replaces the event's own when set.
    """
    assert isinstance(event, ConversationEvent)
    turns = schema_turns(event.context) if context is None else context
    return Conversation(turn=schema_turn(event.role, event.content), context=turns)
