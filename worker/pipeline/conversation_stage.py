"""Conversation stage: turns get their context from the conversation state; the state
survives rebalances and restarts through its changelog topic.

Hooks the worker calls (``worker.app``), and what each guarantees:

- ``accept(job)`` after decode, before ordering and batching, in input order: a
  conversation turn without ``context`` gets ``Job.context`` from the state; every turn
  enters the state (``ConversationState.observe``), and the change goes on the job
  (``Job.changelog``, a ``StateRecord`` for changelog partition = the input's partition),
  which ``outputs`` encodes and publishes with the turn's verdict or dead letter: the
  input offset is committed only once the change is acknowledged. Until then the job holds
  the window as of its turn by reference (~300 bytes), not as JSON (~13 KB for 16 turns of
  750 characters). Forgotten conversations' tombstones are published at once (nothing
  waits for them: a lost tombstone only brings the conversation back until it is
  forgotten again).
- ``assigned(tps)`` (rebalance callback; must not block: aiokafka sends no heartbeats
  while it runs): holds the assigned conversation partitions (paused, whatever
  backpressure does) and restores their state from the changelog in a task; releases
  them when done. A restore that fails is fatal (``on_fatal``): turns would otherwise be
  judged without the context the worker promised.
- ``revoked(tps)``: stops their restore, forgets their state (the new owner restores it).
- ``close()``: stops restores.

With ``MODWORKER_CONVERSATION__ENABLED=false`` every hook does nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from aiokafka.structs import TopicPartition

from worker.config import Settings
from worker.ops import metrics
from worker.ops.logs import Event
from worker.pipeline.conversation_state import Change, ConversationState
from worker.pipeline.events import ConversationEvent
from worker.pipeline.state_changelog import StateChangelog
from worker.pipeline.types import Job, OutRecord

log = structlog.get_logger("worker.pipeline.conversation_stage")


class Holder(Protocol):
    """What the stage needs of the source: keep partitions paused while they restore."""

    def hold(self, tps: list[TopicPartition], reason: str) -> None: ...

    def release(self, tps: list[TopicPartition], reason: str) -> None: ...


PublishFunction = Callable[[list[OutRecord], Callable[[], None]], None]


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class StateRecord:
    """A state change for the changelog ``topic``, keyed by conversation id, in the input's
    partition; its value is encoded by ``record()`` (the change is a snapshot: the same
    bytes at every call, whatever later turns did to the window)."""

    topic: str
    change: Change

    def record(self) -> OutRecord:
        change = self.change
        return OutRecord(self.topic, change.conversation_id.encode(), change.value, partition=change.partition)


class ConversationStage:
    """The conversation state in the pipeline (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        publish: PublishFunction,
        source: Holder,
        on_fatal: Callable[[BaseException], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        config = settings.conversation
        self.enabled = config.enabled
        self.topic = settings.conversation_topic
        self.state = ConversationState(
            max_turns=config.max_turns,
            max_context_chars=config.max_context_chars,
            ttl_s=config.ttl_s,
            max_bytes=config.max_bytes,
            clock=clock,
        )
        self.changelog = StateChangelog(
            settings.kafka,
            topic=config.changelog_topic,
            source_topic=self.topic,
            read_committed=settings.delivery == "exactly_once",
            stall_timeout_s=config.restore_timeout_s,
        )
        self._publish = publish
        self._source = source
        self._on_fatal = on_fatal
        self._clock = clock
        self._sweep_every_s = min(config.ttl_s / 10, 60.0)
        self._next_sweep = clock() + self._sweep_every_s
        self._restores: dict[asyncio.Task[None], list[TopicPartition]] = {}
        if self.enabled:
            metrics.bind_conversation_state(self.state)

    # -- per turn -------------------------------------------------------------------

    def accept(self, job: Job) -> None:
        """Give a context-less turn its context and record the turn (see the module docstring)."""
        if not self.enabled or job.kind != "conversation":
            return
        event = job.event
        assert isinstance(event, ConversationEvent)
        partition = job.record.partition
        observed = self.state.observe(
            partition, event.conversation_id, event.id, event.role, event.content, with_context=not event.context
        )
        if not event.context:
            job.context = observed.context
        if observed.change is not None:
            job.changelog = StateRecord(self.changelog.topic, observed.change)
        if self._clock() >= self._next_sweep:
            self._next_sweep = self._clock() + self._sweep_every_s
            self.state.expire()
        self._publish_forgotten()

    def _publish_forgotten(self) -> None:
        forgotten = self.state.take_forgotten()
        if forgotten:
            self._publish([StateRecord(self.changelog.topic, change).record() for change in forgotten], _nothing)

    # -- rebalance ------------------------------------------------------------------

    def assigned(self, tps: list[TopicPartition]) -> None:
        """Hold the assigned conversation partitions and restore them in a task."""
        mine = [tp for tp in tps if tp.topic == self.topic]
        if not self.enabled or not mine:
            return
        self._source.hold(mine, "conversation-restore")
        task = asyncio.create_task(self._restore(mine), name="conversation-state-restore")
        self._restores[task] = mine
        task.add_done_callback(self._restore_done)

    def _restore_done(self, task: asyncio.Task[None]) -> None:
        self._restores.pop(task, None)

    async def _restore(self, tps: list[TopicPartition]) -> None:
        started = time.monotonic()
        partitions = [tp.partition for tp in tps]
        try:
            await self.changelog.ensure()
            latest, records = await self.changelog.read(partitions)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - any restore failure is fatal, reported as one line
            log.error(Event.STATE_CHANGELOG_UNAVAILABLE, topic=self.changelog.topic, error=str(err))
            self._on_fatal(err)
            return
        loaded = invalid = 0
        for partition, values in latest.items():
            count, bad = self.state.load(partition, values)
            loaded += count
            invalid += bad
        if invalid:
            log.warning(Event.STATE_RECORD_INVALID, topic=self.changelog.topic, skipped=invalid)
        self._publish_forgotten()
        seconds = time.monotonic() - started
        metrics.CONVERSATION_RESTORE.observe(seconds)
        log.info(
            Event.STATE_RESTORED,
            partitions=[f"{tp.topic}-{tp.partition}" for tp in tps],
            changelog=self.changelog.topic,
            records=records,
            conversations=loaded,
            seconds=round(seconds, 3),
        )
        self._source.release(tps, "conversation-restore")

    async def revoked(self, tps: list[TopicPartition]) -> None:
        """Stop restoring and forget the revoked conversation partitions."""
        mine = {tp for tp in tps if tp.topic == self.topic}
        if not self.enabled or not mine:
            return
        cancelled = [task for task, held in self._restores.items() if mine & set(held)]
        others: list[TopicPartition] = []
        for task in cancelled:
            task.cancel()
            held = self._restores[task]
            self._source.release([tp for tp in held if tp in mine], "conversation-restore")
            others += [tp for tp in held if tp not in mine]
        if cancelled:
            await asyncio.gather(*cancelled, return_exceptions=True)
        self.state.drop(tp.partition for tp in mine)
        if others:  # still ours (an incremental rebalance): restore them again
            self.assigned(others)

    async def close(self) -> None:
        tasks = list(self._restores)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
