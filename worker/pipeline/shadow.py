"""Shadow evaluation: a candidate backend and/or policy judges a sample of live traffic.

``MODWORKER_SHADOW__SAMPLE`` (a fraction) with ``MODWORKER_SHADOW__BACKEND`` (a candidate
backend; ``MODWORKER_SHADOW__MODEL`` picks its model) and/or
``MODWORKER_SHADOW__POLICY_FILE`` (a candidate policy). After a live verdict is built,
``Shadow.offer`` takes a sampled copy of the input (a conversation turn with the context
the live backend judged it with, the conversation state's when it supplied one); a task of
its own scores it with the
candidate backend (or reuses the live scores when only the policy is shadowed), applies the
candidate policy (or the live one), publishes a ``ShadowVerdict`` with the live action
beside it to ``MODWORKER_SHADOW__TOPIC`` and counts agreement in Prometheus:

- ``moderation_worker_shadow_decisions_total{live_action, shadow_action}``;
- ``moderation_worker_shadow_categories_total{category, outcome}``, outcome ``both``,
  ``live_only`` or ``shadow_only`` (a category neither found is not counted);
- ``moderation_worker_shadow_dropped_total`` (queue full) and
  ``moderation_worker_shadow_failures_total{stage}`` (``score``, ``decide``, ``publish``).

Contract: the shadow never delays, blocks or changes the live path. ``offer`` is
synchronous, O(1) and never raises: it samples by a hash of the event id (the same inputs
are shadowed on every replica and every replay), skips verdicts without scores (a fail
policy decided them), and drops (counted) when its bounded queue is full. The shadow has
its own producer: its failures are logged and counted, never fatal, and its records are
never part of the live offsets (at-most-once: a crash loses the queued ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from schemas import OUTPUT_HEADERS, Kind, ShadowVerdict
from worker.backends.base import Backend, Conversation, Outcome, Scored
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.events import ContentEvent
from worker.pipeline.policy import Policy
from worker.pipeline.scoring import conversation_of
from worker.pipeline.types import Job
from worker.pipeline.verdict_data import Verdict, to_contract

if TYPE_CHECKING:
    from worker.config import Settings

log = structlog.get_logger("worker.pipeline.shadow")

PublishFunction = Callable[[str, bytes, bytes], Awaitable[None]]
"""``publish(topic, key, value)``: resolves once the broker acknowledged, raises on failure."""

_HASH_SPACE = float(2**64)


def sampled(event_id: str, fraction: float) -> bool:
    """Deterministic sampling: True for about ``fraction`` of all event ids, always the same ones."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE < fraction


@dataclass(frozen=True, slots=True)
class ShadowItem:
    """What the shadow keeps of a live input: no record, no offsets."""

    kind: Kind
    key: bytes
    text: str
    conversation: Conversation | None
    tenant: str | None
    source: str | None
    live: Verdict


class Shadow:
    """The shadow queue and its task. ``start`` before ``offer``; ``close`` at shutdown.

    ``backend`` None: reuse the live scores. ``policy``: the candidate policy (the live one
    when only the backend is shadowed). ``publish`` is given by tests; by default ``start``
    opens a producer of its own from ``settings.kafka``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        policy: Policy,
        backend: Backend | None,
        publish: PublishFunction | None = None,
    ) -> None:
        self._settings = settings
        self._sample = settings.shadow.sample
        self._topic = settings.shadow.topic
        self._batch_size = settings.shadow.batch_size
        self._queue: asyncio.Queue[ShadowItem] = asyncio.Queue(maxsize=settings.shadow.queue_size)
        self.policy = policy
        self.backend = backend
        self._publish = publish
        self._producer: object | None = None
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        """Shadow verdicts acknowledged since start (for tests)."""

    # -- live side ------------------------------------------------------------------

    def offer(self, job: Job, verdict: Verdict) -> None:
        """Maybe enqueue a copy of ``job`` and its live verdict. Never blocks, never raises."""
        try:
            if verdict.model is None or not sampled(verdict.event_id, self._sample):
                return
            event = job.event
            item = ShadowItem(
                kind=job.kind,
                key=job.key,
                text=job.text,
                conversation=None if isinstance(event, ContentEvent) else conversation_of(event, job.context),
                tenant=event.tenant,
                source=event.source,
                live=verdict,
            )
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            metrics.SHADOW_DROPPED.inc()
        except Exception as err:  # noqa: BLE001 - the live path must never see a shadow failure
            metrics.shadow_failures("offer").inc()
            log.warning(Event.SHADOW_FAILED, stage="offer", error=f"{type(err).__name__}: {err}")

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the shadow backend, the producer (unless ``publish`` was given) and the task.

        A shadow that cannot start is logged and left off: it must not stop the worker.
        """
        try:
            if self.backend is not None:
                await self.backend.start()
            if self._publish is None:
                self._publish = await self._open_producer()
        except Exception as err:  # noqa: BLE001 - see the docstring
            metrics.shadow_failures("start").inc()
            log.warning(Event.SHADOW_FAILED, stage="start", error=f"{type(err).__name__}: {err}")
            self._sample = 0.0
            return
        self._task = asyncio.create_task(self._run(), name="shadow")
        log.info(
            Event.SHADOW_STARTED,
            sample=self._sample,
            backend=self.backend.name if self.backend else None,
            policy_version=self.policy.version,
            topic=self._topic,
        )

    async def close(self) -> None:
        """Stop the task (queued items are dropped) and release the backend and producer."""
        self._sample = 0.0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.close()
        producer = self._producer
        if producer is not None:
            self._producer = None
            with contextlib.suppress(Exception):
                await producer.stop()  # type: ignore[attr-defined]

    async def _open_producer(self) -> PublishFunction:
        from worker.pipeline.source import make_producer

        producer = make_producer(self._settings.kafka)
        await producer.start()
        self._producer = producer

        async def publish(topic: str, key: bytes, value: bytes) -> None:
            await producer.send_and_wait(topic, value, key=key, headers=OUTPUT_HEADERS)

        return publish

    # -- the task -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self._batch_size and not self._queue.empty():
                items.append(self._queue.get_nowait())
            for kind in ("content", "conversation"):
                group = [item for item in items if item.kind == kind]
                if group:
                    await self._judge(group)

    async def _judge(self, items: Sequence[ShadowItem]) -> None:
        try:
            outcomes = await self._score(items)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - logged and counted only, see the module docstring
            metrics.shadow_failures("score").inc(len(items))
            log.warning(Event.SHADOW_FAILED, stage="score", error=f"{type(err).__name__}: {err}", batch=len(items))
            return
        backend_name = self.backend.name if self.backend is not None else None
        sends = []
        for item, outcome in zip(items, outcomes, strict=True):
            if not isinstance(outcome, Scored):
                metrics.shadow_failures("score").inc()
                continue
            try:
                shadow = self.judge(item, outcome, backend_name or item.live.backend)
            except ValueError as err:
                metrics.shadow_failures("decide").inc()
                log.warning(Event.SHADOW_FAILED, stage="decide", error=str(err), event_id=item.live.event_id)
                continue
            sends.append(self._send(item, shadow))
        await asyncio.gather(*sends)

    async def _score(self, items: Sequence[ShadowItem]) -> list[Outcome]:
        if self.backend is None:
            return [Scored(dict(item.live.scores), item.live.model or "") for item in items]
        if items[0].kind == "content":
            outcomes = await self.backend.score_texts([item.text for item in items])
        else:
            outcomes = await self.backend.score_conversations([item.conversation for item in items])  # type: ignore[misc]
        if len(outcomes) != len(items):
            raise RuntimeError(f"shadow backend returned {len(outcomes)} results for {len(items)} inputs")
        return outcomes

    def judge(self, item: ShadowItem, scored: Scored, backend: str) -> ShadowVerdict:
        """The shadow verdict for ``item`` and count the agreement. Raises ``ValueError`` on bad scores."""
        decision = self.policy.decide(scored.scores, tenant=item.tenant, source=item.source)
        live = item.live
        metrics.shadow_decisions(live.action, decision.action).inc()
        live_categories = {hit.category for hit in live.violations}
        shadow_categories = {hit.category for hit in decision.violations}
        for category in live_categories | shadow_categories:
            outcome = (
                "both"
                if category in live_categories and category in shadow_categories
                else "live_only"
                if category in live_categories
                else "shadow_only"
            )
            metrics.shadow_categories(category, outcome).inc()
        return ShadowVerdict(
            event_id=live.event_id,
            kind=live.kind,
            live_verdict_id=live.verdict_id,
            live_action=live.action,
            live_violations=sorted(live_categories),
            live_backend=live.backend,
            live_policy_version=live.policy_version,
            action=decision.action,
            violations=to_contract(decision.violations),
            scores=dict(scored.scores),
            model=scored.model or None,
            backend=backend,
            policy_version=self.policy.version,
            agree=decision.action == live.action,
            decided_at=datetime.now(UTC),
        )

    async def _send(self, item: ShadowItem, shadow: ShadowVerdict) -> None:
        assert self._publish is not None
        try:
            await self._publish(self._topic, item.key, shadow.model_dump_json().encode())
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - logged and counted only
            metrics.shadow_failures("publish").inc()
            log.warning(Event.SHADOW_FAILED, stage="publish", error=f"{type(err).__name__}: {err}")
            return
        self.published += 1


def create_shadow(settings: Settings, live_policy: Policy) -> Shadow | None:
    """The shadow the settings ask for, or None (``MODWORKER_SHADOW__SAMPLE`` 0, or neither a
    shadow backend nor a shadow policy set). Raises ``PolicyError`` for a bad shadow policy."""
    if not settings.shadow.enabled:
        return None
    policy = Policy.load(settings.shadow.policy_file) if settings.shadow.policy_file else live_policy
    backend = None
    if settings.shadow.backend is not None:
        from worker.backends import create_named

        shadow_settings = settings
        if settings.shadow.model is not None:
            section = getattr(settings, settings.shadow.backend)
            shadow_settings = settings.model_copy(
                update={settings.shadow.backend: section.model_copy(update={"model": settings.shadow.model})}
            )
        backend = create_named(shadow_settings, settings.shadow.backend)
    return Shadow(settings, policy=policy, backend=backend)
