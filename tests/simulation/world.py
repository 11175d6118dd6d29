"""A deterministic world for the real ``ModerationWorker``: an in-memory broker, a scripted
backend and a virtual clock, driven one step at a time from a seed.

The worker's own stages run unchanged. Only its seams to the outside are replaced:

- ``MemoryConsumer`` stands in for the ``AIOKafkaConsumer`` under ``Source`` (fetch,
  pause/resume, commit, seek); rebalances call the worker's own listener methods.
- ``MemoryProducer`` stands in for the ``AIOKafkaProducer`` under ``Sink``; a sent batch
  waits until the world acknowledges (or fails) it.
- ``ScriptedBackend`` holds every call until the world answers it: scored, failed by
  input (a poison input fails every call it is in), or failed by an outage.
- ``VirtualClock`` replaces the scorer's sleeps: they end when the world advances time.

``World.step()`` takes one action chosen by the seeded generator and then checks every
invariant (``World.check``). ``World.run`` ends with a fault-free tail that must drain
every partition. A failure raises ``InvariantBroken`` with the seed and the trace.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import CommitFailedError
from aiokafka.structs import TopicPartition

import worker.app
from schemas import DeadLetterHeaders
from worker.app import ModerationWorker
from worker.backends.base import Backend, BackendUnavailable, Conversation, Outcome, Scored
from worker.config import load_settings
from worker.pipeline.policy import Policy
from worker.pipeline.sink import Sink
from worker.pipeline.types import OutRecord, PartitionOffsets

TOPIC = "ugc.content"
POISON = "POISON"


class InvariantBroken(AssertionError):
    """An invariant failed; the message names it, the seed and the steps that led there."""


# -- the broker -------------------------------------------------------------------------


class MemoryConsumer:
    """What ``Source`` needs of ``AIOKafkaConsumer``, over in-memory partition logs."""

    def __init__(self, logs: dict[TopicPartition, list[ConsumerRecord]], rng: random.Random) -> None:
        self.logs = logs
        self.rng = rng
        self.assigned: set[TopicPartition] = set()
        self.paused_tps: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.commit_failure_rate = 0.0
        self.commits: list[dict[TopicPartition, int]] = []
        self.on_commit: Any = None  # the world's check of every commit that lands

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        out: dict[TopicPartition, list[ConsumerRecord]] = {}
        room = max_records
        for tp in sorted(self.assigned - self.paused_tps):
            if room <= 0:
                break
            position = self.positions.get(tp, 0)
            records = self.logs[tp][position : position + min(room, self.rng.randint(1, 4))]
            if records:
                out[tp] = records
                self.positions[tp] = position + len(records)
                room -= len(records)
        return out

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_tps |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_tps -= set(tps)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps & self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.rng.random() < self.commit_failure_rate:
            raise CommitFailedError("simulated: the group is rebalancing")
        if self.on_commit is not None:
            self.on_commit(offsets)
        self.committed_offsets.update(offsets)
        self.commits.append(dict(offsets))

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offsets.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def stop(self) -> None:
        pass


class MemoryBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any) -> object:
        self.records.append((key, value, list(headers or ())))
        return object()


@dataclass
class Sent:
    topic: str
    batch: MemoryBatch
    future: asyncio.Future[None]


class MemoryProducer:
    """What ``Sink`` needs of ``AIOKafkaProducer``; the world acknowledges each sent batch."""

    def __init__(self) -> None:
        self.unacked: list[Sent] = []
        self.on_send: Any = None
        self.on_ack: Any = None

    async def start(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> MemoryBatch:
        return MemoryBatch()

    async def send_batch(self, batch: MemoryBatch, topic: str, *, partition: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sent = Sent(topic, batch, future)
        if self.on_send is not None:
            self.on_send(sent)
        self.unacked.append(sent)
        return future

    def ack(self, index: int) -> None:
        sent = self.unacked.pop(index)
        if self.on_ack is not None:
            self.on_ack(sent)
        sent.future.set_result(None)


class GatedQueue(asyncio.Queue[Any]):
    """The sink's queue: its task takes a round only when the world opens the gate, so
    groups can wait queued while a revoke or an offset reset happens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def get(self) -> Any:
        await self.gate.wait()
        self.gate.clear()
        return await super().get()


# -- the backend and the clock ----------------------------------------------------------


@dataclass
class Call:
    texts: list[str]
    future: asyncio.Future[list[Outcome]] = field(repr=False)


class ScriptedBackend(Backend):
    """Every call waits until the world answers it (``answer``)."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.outage = False

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self.calls.append(Call(list(texts), future))
        return await future

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        raise AssertionError("the simulation sends content only")

    def answer(self, index: int) -> None:
        call = self.calls.pop(index)
        if call.future.done():  # its caller was cancelled
            return
        if self.outage:
            call.future.set_exception(BackendUnavailable("simulated outage"))
        elif any(POISON in text for text in call.texts):
            call.future.set_exception(BackendUnavailable("simulated: the API fails on one of these inputs"))
        else:
            call.future.set_result([Scored({"spam": 0.01}, "sim-model") for _ in call.texts])


class VirtualClock:
    """The scorer's ``sleep``: a sleeper wakes when the world advances time past its end."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._count = 0

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._count += 1
        heapq.heappush(self._sleepers, (self.now + delay, self._count, future))
        await future

    @property
    def sleeping(self) -> int:
        return sum(not f.done() for _, _, f in self._sleepers)

    def advance(self) -> None:
        """Move to the earliest sleeper's end and wake every sleeper due by then."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        if not self._sleepers:
            return
        self.now = max(self.now, self._sleepers[0][0])
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


# -- the world --------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """How often each fault is chosen; 0 turns it off."""

    outage: float = 0.03
    poison: float = 0.04
    malformed: float = 0.05
    rebalance: float = 0.03
    offset_reset: float = 0.03
    commit_failure: float = 0.1
    reset_above_committed: bool = True
    """Let an offset reset move the position back to above the committed offset (as a
    truncation with a reset to ``latest`` can), not only to at most the committed offset."""


def _records(tp: TopicPartition, count: int, rng: random.Random, faults: Faults) -> list[ConsumerRecord]:
    out = []
    for offset in range(count):
        key = f"k{rng.randint(0, 3)}".encode()
        roll = rng.random()
        if roll < faults.malformed:
            value = rng.choice([b"{nope", b"[" * 6_000 + b"]" * 6_000, b'{"id": "x"}'])
        else:
            text = f"{POISON} text" if roll < faults.malformed + faults.poison else f"text {tp.partition}-{offset}"
            value = json.dumps({"id": f"{tp.partition}-{offset}", "text": text}).encode()
        out.append(ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, key, value, None, len(key), len(value), []))
    return out


class World:
    """The worker in its simulated surroundings; ``step`` and ``check`` (see the module doc)."""

    def __init__(self, seed: int, *, partitions: int = 2, records: int = 30, faults: Faults | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.trace: list[str] = []
        self.tps = [TopicPartition(TOPIC, p) for p in range(partitions)]
        self.logs = {tp: _records(tp, records, self.rng, self.faults) for tp in self.tps}
        self.poison = {
            (tp.partition, r.offset) for tp in self.tps for r in self.logs[tp] if POISON.encode() in (r.value or b"")
        }
        settings = load_settings(
            kafka={"bootstrap_servers": "127.0.0.1:1", "max_poll_records": 6},
            require_backend=False,
            content_topic=TOPIC,
            batch={"max_size": 4, "max_wait_ms": 3_600_000},
            max_in_flight=12,
            commit_every=3,
            commit_interval_ms=3_600_000,
            revoke_timeout_s=0,
        )
        self.settings = settings
        self.backend = ScriptedBackend()
        self.clock = VirtualClock()
        self.worker = ModerationWorker(settings, backend=self.backend, policy=Policy.load(None))
        self.consumer = MemoryConsumer(self.logs, self.rng)
        self.consumer.on_commit = self._check_commit
        self.producer = MemoryProducer()
        self.producer.on_send = self._check_send
        self.producer.on_ack = self._acked
        self.acked: dict[tuple[int, int], int] = {}  # (partition, offset) -> outputs acknowledged
        self.dead_letters: list[tuple[int, int, str]] = []
        self._last_published: dict[tuple[int, bytes | None], int] = {}
        self._slots: dict[int, PartitionOffsets] = {}
        self.failure: str | None = None
        sink = self.worker._sink
        assert isinstance(sink, Sink), "at-least-once delivery: the plain sink"
        self.sink = sink
        self.sink_queue = GatedQueue()

    async def start(self) -> None:
        w = self.worker
        await w.source._consumer.stop()
        w.source._consumer = self.consumer
        sink = self.sink
        await sink._producer.stop()
        sink._producer = self.producer
        w._scorer._sleep = self.clock.sleep
        publish = sink.publish

        def checked_publish(
            records: list[OutRecord],
            on_acked: Callable[[], None],
            origin: PartitionOffsets | None = None,
            messages: int = 1,
        ) -> None:
            self._check_publish(records, origin)
            publish(records, on_acked, origin, messages)

        sink.publish = checked_publish  # type: ignore[method-assign]
        sink._queue = self.sink_queue
        await sink.start()
        await self._assign(self.tps)

    async def close(self) -> None:
        w = self.worker
        for task in list(w._tasks):
            task.cancel()
        if w._tasks:
            await asyncio.gather(*w._tasks, return_exceptions=True)
        if self.sink._task is not None:
            self.sink._task.cancel()
            await asyncio.gather(self.sink._task, return_exceptions=True)

    # -- actions --------------------------------------------------------------------

    async def _assign(self, tps: list[TopicPartition]) -> None:
        self.consumer.assigned = set(tps)
        self.consumer.paused_tps = set()  # as in aiokafka: a new assignment starts unpaused
        for tp in tps:
            self.consumer.positions[tp] = self.consumer.committed_offsets.get(tp, 0)
        await self.worker._on_assigned(list(tps))

    async def poll(self) -> None:
        """One iteration of the consume loop's body (``ModerationWorker._consume``)."""
        w = self.worker
        records = await w.source.poll(timeout_ms=0, max_records=min(w._in_flight.room, 6))
        w._rewound.clear()
        for record in records:
            w._accept(record)
        w._in_flight.apply(w.source)
        w._span_guard.apply(w._tracker.slots(), w.source)
        await w._committer.maybe_commit()

    async def rebalance(self) -> None:
        """Eager: everything revoked, then a random subset assigned (the rest sits with nobody)."""
        owned = sorted(self.consumer.assigned)
        if owned:
            await self.worker._on_revoked(owned)
        self.consumer.assigned = set()
        keep = [tp for tp in self.tps if self.rng.random() < 0.7]
        await self._assign(keep)

    def offset_reset(self) -> None:
        owned = sorted(self.consumer.assigned)
        if not owned:
            return
        tp = self.rng.choice(owned)
        position = self.consumer.positions.get(tp, 0)
        highest = position if self.faults.reset_above_committed else self.consumer.committed_offsets.get(tp, 0)
        back = self.rng.randint(0, min(position, highest))
        self.consumer.seek(tp, back)

    async def step(self) -> None:
        """One action of the seeded generator, then every invariant."""
        rng, faults = self.rng, self.faults
        roll = rng.random()
        if roll < faults.rebalance:
            action = "rebalance"
            await self.rebalance()
        elif roll < faults.rebalance + faults.offset_reset:
            action = "offset_reset"
            self.offset_reset()
        elif roll < faults.rebalance + faults.offset_reset + faults.outage:
            self.backend.outage = not self.backend.outage
            action = f"outage={self.backend.outage}"
        else:
            action = rng.choice(["poll", "poll", "flush", "answer", "answer", "sink", "ack", "ack", "advance"])
            self.consumer.commit_failure_rate = faults.commit_failure
            if action == "poll":
                await self.poll()
            elif action == "flush":
                self.worker._batcher.flush()
            elif action == "answer" and self.backend.calls:
                self.backend.answer(rng.randrange(len(self.backend.calls)))
            elif action == "ack" and self.producer.unacked:
                self.producer.ack(rng.randrange(len(self.producer.unacked)))
            elif action == "sink":
                self.sink_queue.gate.set()
            elif action == "advance":
                self.clock.advance()
        self.trace.append(action)
        await self._settle()
        self.check()

    async def _settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def drain(self, max_rounds: int = 400) -> None:
        """Faults off, every partition back, everything answered and acknowledged: each
        partition must reach its end within ``max_rounds``."""
        self.backend.outage = False
        self.consumer.commit_failure_rate = 0.0
        self.trace.append("drain")
        if set(self.consumer.assigned) != set(self.tps):
            owned = sorted(self.consumer.assigned)
            if owned:
                await self.worker._on_revoked(owned)
            await self._assign(self.tps)
        for _ in range(max_rounds):
            await self.poll()
            self.worker._batcher.flush()
            await self._settle()
            while self.backend.calls:
                self.backend.answer(0)
                await self._settle()
            while not self.sink_queue.empty():
                self.sink_queue.gate.set()
                await self._settle()
            while self.producer.unacked:
                self.producer.ack(0)
            await self._settle()
            self.clock.advance()
            await self._settle()
            await self.worker._committer.commit()
            self.check()
            if self._drained():
                return
        ends = {tp.partition: len(self.logs[tp]) for tp in self.tps}
        committed = {tp.partition: self.consumer.committed_offsets.get(tp) for tp in self.tps}
        w = self.worker
        state = {
            "in_flight": w.in_flight,
            "unfinished": {s.tp.partition: list(s._order)[:5] for s in w._tracker.slots()},
            "paused": sorted(tp.partition for tp in self.consumer.paused()),
            "positions": {tp.partition: p for tp, p in self.consumer.positions.items()},
            "tasks": len(w._tasks),
            "sleeping": self.clock.sleeping,
        }
        self.fail(f"not drained within {max_rounds} rounds: committed {committed}, ends {ends}, {state}")

    def _drained(self) -> bool:
        return all(self.consumer.committed_offsets.get(tp) == len(self.logs[tp]) for tp in self.tps) and (
            self.worker.in_flight == 0
        )

    # -- invariants -----------------------------------------------------------------

    def problem(self, problem: str) -> None:
        """Note a broken invariant seen inside a callback of the worker (raised by ``check``:
        raising there would only fail the worker's own stage)."""
        if self.failure is None:
            self.failure = problem

    def fail(self, problem: str) -> None:
        self.failure = problem
        raise InvariantBroken(
            f"seed {self.seed}: {problem}\n  after {len(self.trace)} steps: {' '.join(self.trace[-60:])}\n"
            f"  replay: python -m tests.simulation --seed {self.seed}"
        )

    def check(self) -> None:
        """The invariants that hold after every step."""
        w = self.worker
        if self.failure is not None:
            self.fail(self.failure)
        if w._fatal is not None:
            self.fail(f"the worker failed: {w._fatal}")
        owned_pending = sum(slot.pending for slot in w._tracker.slots())
        if w.in_flight < owned_pending:
            self.fail(f"in-flight count {w.in_flight} below the owned unfinished inputs {owned_pending}")
        quiet = not self.backend.calls and not w._tasks and self.sink.unacked == 0 and w._batcher.queued == 0
        if quiet and w.in_flight != owned_pending:
            self.fail(f"nothing in flight, yet the in-flight count is {w.in_flight} (unfinished: {owned_pending})")
        for partition, offset, error_type in self.dead_letters:
            if error_type == "backend_failed" and (partition, offset) not in self.poison:
                self.fail(f"a healthy input {partition}-{offset} was dead-lettered as backend_failed")

    def _origin(self, value: bytes | None, headers: list[tuple[str, bytes]]) -> tuple[int, int] | None:
        found = dict(headers)
        if DeadLetterHeaders.ORIGIN_OFFSET in found:
            return int(found[DeadLetterHeaders.ORIGIN_PARTITION]), int(found[DeadLetterHeaders.ORIGIN_OFFSET])
        try:
            event_id = json.loads(value or b"{}")["event_id"]
        except (ValueError, KeyError):
            return None
        partition, offset = event_id.split("-")
        return int(partition), int(offset)

    def _outputs(self, sent: Sent) -> list[tuple[int, int, bytes | None, list[tuple[str, bytes]]]]:
        if sent.topic not in (self.settings.verdict_topic, self.settings.dead_letter_topic):
            return []
        out = []
        for key, value, headers in sent.batch.records:
            origin = self._origin(value, headers)
            if origin is not None:
                out.append((*origin, key, headers))
        return out

    def _check_send(self, sent: Sent) -> None:
        owned = {tp.partition for tp in self.worker._tracker.owned()}
        for partition, offset, _key, headers in self._outputs(sent):
            if partition not in owned:
                self.problem(f"an output of {partition}-{offset} was published after its partition was revoked")
            found = dict(headers)
            if DeadLetterHeaders.ERROR_TYPE in found:
                self.dead_letters.append((partition, offset, found[DeadLetterHeaders.ERROR_TYPE].decode()))

    def _check_publish(self, records: list[OutRecord], origin: PartitionOffsets | None) -> None:
        """Per-key order, per ownership episode (the input's slot): the sink sends in publish
        order, so the verdicts of one key must be published with rising offsets."""
        if origin is None:
            return
        self._slots.setdefault(id(origin), origin)  # keeps the id unique
        for record in records:
            if record.topic != self.settings.verdict_topic:
                continue
            found = self._origin(record.value, [])
            if found is None:
                continue
            line = (id(origin), record.key)
            last = self._last_published.get(line)
            if last is not None and found[1] <= last:
                self.problem(f"key {record.key!r} of {origin.tp}: verdict of offset {found[1]} published after {last}")
            self._last_published[line] = found[1]

    def _acked(self, sent: Sent) -> None:
        for partition, offset, _, _ in self._outputs(sent):
            self.acked[(partition, offset)] = self.acked.get((partition, offset), 0) + 1

    def _check_commit(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            for earlier in range(offset):
                if (tp.partition, earlier) not in self.acked:
                    self.problem(
                        f"committed {tp.partition}@{offset} past {earlier}, whose output was never acknowledged"
                    )


async def simulate(seed: int, *, steps: int = 200, faults: Faults | None = None) -> World:
    """Run one seed: ``steps`` random steps, then the drain. Raises ``InvariantBroken``."""
    world = World(seed, faults=faults)
    saved = worker.app._SETTLE_MIN_S
    worker.app._SETTLE_MIN_S = 0.0  # the revoke's wait for acks: the world acknowledges only in its own steps
    try:
        await world.start()
        for _ in range(steps):
            await world.step()
        await world.drain()
    finally:
        worker.app._SETTLE_MIN_S = saved
        await world.close()
    return world
