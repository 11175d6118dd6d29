"""A deterministic world for the real ``ModerationWorker``: an in-memory broker, scripted
backends and a virtual clock, driven one step at a time from a seed.

The worker's own stages run unchanged. Only its seams to the outside are replaced:

- ``MemoryConsumer`` stands in for the ``AIOKafkaConsumer`` under ``Source`` (fetch,
  pause/resume, commit, seek) over the ``Broker``'s partition logs and committed offsets;
  rebalances call the worker's own listener methods.
- ``MemoryProducer`` stands in for the ``AIOKafkaProducer`` under ``Sink``; a sent batch
  waits until the world acknowledges it, or fails it (a failed send or a failed ack).
- ``Endpoint``: one kind's API of one backend stage. Every call waits until the world
  answers it: scored, failed by input (a poison input fails every call it is in), or failed
  by that endpoint's outage. Each kind (content events, conversation turns) has its own
  endpoint, with its own outage. A seed runs the worker either on one ``ScriptedBackend``,
  or on the real ``CascadeBackend`` over two of them (inputs marked ``UNSURE`` or
  ``POISON2`` escalate; ``POISON2`` fails the second stage only). Most cascade seeds pool
  the escalated inputs of concurrent batches (the pool's timer sleeps on the virtual clock).
- ``MemoryChangelog`` stands in for the conversation state's changelog: a restore reads
  back the changelog records the broker acknowledged. Every input is shadowed, by the
  real ``Shadow`` on ``ShadowBackend``; half the cascade seeds run on ``STACKED_POLICY``.
- ``VirtualClock`` replaces the scorer's sleeps, and the cascade pool's: they end when the
  world advances time.

A seed makes the input logs and a *script*: one ``Step`` per action, each with its own
number that seeds every choice inside it. ``World.step`` runs one step, then checks every
invariant (``World.check``); ``World.drain`` ends with a fault-free tail that must bring
every partition to its end. Because a step's choices do not depend on the steps before it,
the script replays with steps removed: ``shrink`` keeps the fewest that still break the
same invariant. A failure raises ``InvariantBroken`` with the seed, the trace and the
command that replays it.

Faults: backend outages per endpoint, poison inputs (for the one stage, or the cascade's
second), malformed inputs, eager rebalances, offset resets, failed commits, failed
publishes (fatal to the worker, as designed: it shuts down and a new worker starts from
the committed offsets) and SIGTERM (the worker's graceful shutdown, then a new worker).

Reviews: a share of the seeds turns the worker's review stage on, with a reviews partition
that starts empty. A ``review`` step appends one record to it: a ``ReviewDecision`` on a
verdict the world saw published (or on an event it never saw), or a refusal in the making
(malformed, an unknown category, an invalid action, a repeated ``review_id``, an unknown
``verdict_id``). The partition takes every fault the others take. ``ReviewMemory`` models
what the stage's documented, bounded memories hold per worker process, so the world knows
which answer each delivery must get.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import CommitFailedError, KafkaTimeoutError
from aiokafka.structs import TopicPartition

import worker.app
from schemas import DeadLetterHeaders, Kind, Turn, Verdict
from worker.app import ModerationWorker
from worker.backends.base import Backend, BackendUnavailable, Conversation, Outcome, Scored
from worker.backends.cascade import CascadeBackend, UncertaintyBands
from worker.config import Settings, load_settings
from worker.pipeline.policy import Policy
from worker.pipeline.scoring import Scorer
from worker.pipeline.shadow import Shadow
from worker.pipeline.sink import Sink
from worker.pipeline.types import Job, OutRecord, PartitionOffsets

CONTENT = "ugc.content"
CONVERSATIONS = "ugc.conversations"
TOPICS: dict[str, Kind] = {CONTENT: "content", CONVERSATIONS: "conversation"}
REVIEWS = "moderation.reviews"
POISON = "POISON1"
"""Fails every call it is in, at the (first) stage."""
POISON2 = "POISON2"
"""Cascade seeds: uncertain at the first stage, fails every call of the second stage it is in."""
UNSURE = "UNSURE"
"""Cascade seeds: the first stage's score lies in the uncertainty band, so it escalates."""
NEAR = "NEAR"
"""Cascade seeds: the first stage scores 0.11, near the threshold of 0.1 that only the
stacked overrides of ``STACKED_POLICY`` make (tenant ``kids`` from source ``chat``)."""

STACKED_POLICY = {
    "categories": {"sexual": {"threshold": 0.5, "action": "allow"}},
    "overrides": [
        {"match": {"tenant": "kids"}, "categories": {"sexual": {"action": "block"}}},
        {"match": {"source": "chat"}, "categories": {"sexual": {"threshold": 0.1}}},
    ],
}
"""The policy of some cascade seeds: a threshold of 0.1 for ``sexual`` exists only where
both overrides match one input."""
BAND = 0.05
"""The cascade's uncertainty band on each side of every threshold."""

Input = tuple[str, int, int]
"""An input by position: topic, partition, offset."""


class InvariantBroken(AssertionError):
    """An invariant failed; the message names it, the seed and the steps that led there.

    ``invariant`` is the invariant's name (what ``shrink`` keeps failing)."""

    def __init__(self, message: str, *, invariant: str, seed: int, kept: list[int]) -> None:
        super().__init__(message)
        self.invariant = invariant
        self.seed = seed
        self.kept = kept


# -- the broker -------------------------------------------------------------------------


@dataclass
class Broker:
    """What outlives one worker: the input logs and the group's committed offsets."""

    logs: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    changelog: dict[int, list[tuple[bytes, bytes | None]]] = field(default_factory=dict)
    """The conversation state's changelog: per partition, the acknowledged (key, value)s."""
    restored: int = 0
    """Changelog records read back by restores."""
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)


class MemoryConsumer:
    """What ``Source`` needs of ``AIOKafkaConsumer``, over the broker's logs."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.rng = random.Random(0)  # the world sets each step's own
        self.assigned: set[TopicPartition] = set()
        self.paused_tps: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.commit_failure_rate = 0.0
        self.left = False  # stop() left the group
        self.on_commit: Any = None  # the world's check of every commit that lands

    async def getmany(
        self, *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        room = max_records
        for tp in sorted(self.assigned - self.paused_tps):
            if room <= 0:
                break
            position = self.positions.get(tp, 0)
            records = self.broker.logs[tp][position : position + min(room, self.rng.randint(1, 4))]
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
        if self.left:
            raise CommitFailedError("simulated: this member left the group")
        if self.rng.random() < self.commit_failure_rate:
            raise CommitFailedError("simulated: the group is rebalancing")
        if self.on_commit is not None:
            self.on_commit(offsets)
        self.broker.committed.update(offsets)
        self.broker.commits.append(dict(offsets))

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.broker.committed.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def stop(self) -> None:
        self.left = True
        self.assigned = set()


class MemoryBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any) -> object:
        self.records.append((key, value, list(headers or ())))
        return object()


@dataclass
class Sent:
    topic: str
    partition: int
    batch: MemoryBatch
    future: asyncio.Future[None]


class MemoryProducer:
    """What ``Sink`` needs of ``AIOKafkaProducer``; the world acknowledges each sent batch.

    ``fail_next``: ``"send"`` makes the next ``send_batch`` raise, ``"ack"`` the next
    acknowledgement fail (as after the producer's own retries)."""

    def __init__(self) -> None:
        self.unacked: list[Sent] = []
        self.fail_next: str | None = None
        self.failed = False  # a failure was injected
        self.on_send: Any = None
        self.on_ack: Any = None

    async def start(self) -> None:
        pass

    async def flush(self) -> None:
        while self.unacked:  # delivered before the producer stops
            self.ack(0)

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> MemoryBatch:
        return MemoryBatch()

    async def send_batch(self, batch: MemoryBatch, topic: str, *, partition: int) -> asyncio.Future[None]:
        if self.fail_next == "send":
            self.fail_next, self.failed = None, True
            raise KafkaTimeoutError("simulated: the batch could not be sent")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sent = Sent(topic, partition, batch, future)
        if self.on_send is not None:
            self.on_send(sent)
        self.unacked.append(sent)
        return future

    def ack(self, index: int) -> None:
        sent = self.unacked.pop(index)
        if self.fail_next == "ack":
            self.fail_next, self.failed = None, True
            sent.future.set_exception(KafkaTimeoutError("simulated: the batch was not acknowledged"))
            return
        if self.on_ack is not None:
            self.on_ack(sent)
        sent.future.set_result(None)


class GatedQueue(asyncio.Queue[Any]):
    """The sink's queue: its task takes a round only when the world opens the gate, so
    groups can wait queued while a revoke or an offset reset happens. ``opened`` for good
    once the sink closes."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.opened = False

    async def get(self) -> Any:
        if not self.opened:
            await self.gate.wait()
            self.gate.clear()
        return await super().get()


# -- the backends and the clock ---------------------------------------------------------


@dataclass
class Call:
    endpoint: Endpoint
    texts: list[str]
    future: asyncio.Future[list[Outcome]] = field(repr=False)


class Endpoint:
    """One kind's API of one backend stage: its calls wait for ``World.answer``."""

    def __init__(
        self,
        name: str,
        poison: str,
        scores: Callable[[str], dict[str, float]],
        outage_failures: dict[str, set[tuple[str, int]]],
    ) -> None:
        self.name = name
        self.poison = poison
        self.scores = scores
        self.outage = False
        self.outages = 0  # how many began
        self.outage_failures = outage_failures
        """Per input text, the outages (endpoint, number) that failed a call holding it."""

    def answer(self, call: Call) -> None:
        if call.future.done():  # its caller was cancelled
            return
        if self.outage:
            for text in call.texts:
                self.outage_failures.setdefault(text, set()).add((self.name, self.outages))
            call.future.set_exception(BackendUnavailable(f"simulated outage of {self.name}"))
        elif any(self.poison in text for text in call.texts):
            call.future.set_exception(BackendUnavailable("simulated: the API fails on one of these inputs"))
        else:
            call.future.set_result([Scored(self.scores(text), "sim-model") for text in call.texts])


class ScriptedBackend(Backend):
    """A backend (or a cascade's stage) with one ``Endpoint`` per kind; calls go to
    ``calls``, shared by the world, until it answers them."""

    name = "one"

    def __init__(
        self,
        endpoints: dict[Kind, Endpoint],
        calls: list[Call],
        contexts: dict[str, set[tuple[Turn, ...]]],
        called: list[str] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.calls = calls
        self.contexts = contexts
        """Per turn, every context it was judged with (shared by the world)."""
        self.called = called if called is not None else []
        """Every text a call carried, in call order (shared by the world)."""

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        return await self._call("content", list(texts))

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        for conversation in conversations:
            self.contexts.setdefault(conversation.turn.content, set()).add(conversation.context)
        return await self._call("conversation", [c.turn.content for c in conversations])

    async def _call(self, kind: Kind, texts: list[str]) -> list[Outcome]:
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self.called += texts
        self.calls.append(Call(self.endpoints[kind], texts, future))
        return await future


class FirstStage(ScriptedBackend):
    name = "first"


class SecondStage(ScriptedBackend):
    name = "then"


def _clear(text: str) -> dict[str, float]:
    return {"sexual": 0.01}


def _first_stage(text: str) -> dict[str, float]:
    if UNSURE in text or POISON2 in text:
        return {"sexual": 0.5}  # the base threshold
    return {"sexual": 0.11 if NEAR in text else 0.01}


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


class MemoryChangelog:
    """What ``ConversationStage`` needs of ``StateChangelog``: the changelog records the
    broker acknowledged (``Broker.changelog``), the latest value per key."""

    def __init__(self, topic: str, broker: Broker) -> None:
        self.topic = topic
        self.broker = broker

    async def ensure(self) -> None:
        pass

    async def read(self, partitions: list[int]) -> tuple[dict[int, dict[str, bytes | None]], int]:
        latest: dict[int, dict[str, bytes | None]] = {p: {} for p in partitions}
        read = 0
        for p in partitions:
            for key, value in self.broker.changelog.get(p, []):
                latest[p][key.decode()] = value
                read += 1
        self.broker.restored += read
        return latest, read


class ShadowBackend(Backend):
    """The shadow's candidate: answers at once, noting the conversations it was given."""

    name = "shadow"

    def __init__(self) -> None:
        self.judged: list[Conversation] = []
        self.texts: list[str] = []  # the content texts it scored

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        self.texts += texts
        return [Scored(_clear(text), "shadow-model") for text in texts]

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        self.judged += conversations
        return [Scored(_clear(c.turn.content), "shadow-model") for c in conversations]


# -- the script -------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """How often each fault is chosen (per step, or per input for the input faults); 0
    turns it off."""

    outage: float = 0.04
    poison: float = 0.04
    malformed: float = 0.05
    unsure: float = 0.25
    rebalance: float = 0.03
    offset_reset: float = 0.03
    commit_failure: float = 0.1
    publish_failure: float = 0.004
    sigterm: float = 0.004
    cascade: float = 0.5
    """The share of seeds whose worker runs on the cascade."""
    reviews: float = 0.5
    """The share of seeds with a reviews partition (the worker's review stage on)."""
    review: float = 0.06
    """In those seeds, the share of steps that append a review decision to it."""
    reset_above_committed: bool = True
    """Let an offset reset move the position back to above the committed offset (as a
    truncation with a reset to ``latest`` can), not only to at most the committed offset."""
    bug: str | None = None
    """A defect put into the world on purpose, to show the simulation (and ``shrink``)
    working: ``"dropped_group_counts_one"`` makes a dropped sink group stop counting one
    message in flight, whatever its size."""


_ACTIONS = ("poll", "poll", "flush", "answer", "answer", "sink", "ack", "ack", "advance")


@dataclass(frozen=True)
class Step:
    """One action of the script; ``choice`` seeds every choice made inside it."""

    action: str
    choice: int

    def __str__(self) -> str:
        return self.action


def script(seed: int, steps: int, faults: Faults) -> list[Step]:
    """The seed's steps, in order. Each is drawn on its own, so any subset replays.

    Swarm testing: each seed runs every fault at its rate, a fifth of it, or not at all, so
    some seeds hold an outage through a long calm, others rebalance through it. In the
    seeds with reviews (``reviewing``), some steps append a review decision instead, drawn
    apart so that the other seeds' scripts stay as they are."""
    rng = random.Random(f"script-{seed}")
    arrivals = random.Random(f"review-steps-{seed}") if reviewing(seed, faults)[0] else None
    rates = {
        "rebalance": faults.rebalance,
        "offset_reset": faults.offset_reset,
        "outage": faults.outage,
        "publish_failure": faults.publish_failure,
        "sigterm": faults.sigterm,
    }
    weights = {fault: rate * rng.choice([0.0, 0.2, 1.0, 1.0]) for fault, rate in rates.items()}
    down: list[Kind] = rng.choice([["content"], ["conversation"], ["content", "conversation"]])  # whose endpoints
    out = []
    for _ in range(steps):
        roll = rng.random()
        action = rng.choice(_ACTIONS)
        for fault, weight in weights.items():
            if roll < weight:
                action = fault if fault != "outage" else f"outage:{rng.choice(down)}"
                break
            roll -= weight
        if arrivals is not None and arrivals.random() < faults.review:
            action = "review"
        out.append(Step(action, rng.getrandbits(32)))
    return out


def reviewing(seed: int, faults: Faults) -> tuple[bool, int, int]:
    """Whether the seed has a reviews partition, and the review stage's bounds: events
    remembered, review ids remembered (the defaults, or small enough to be passed)."""
    swarm = random.Random(f"reviews-{seed}")
    on = swarm.random() < faults.reviews
    return on, swarm.choice([100_000, 6]), swarm.choice([100_000, 3])


def _records(
    tp: TopicPartition, count: int, rng: random.Random, faults: Faults, cascade: bool, seed: int
) -> list[ConsumerRecord[bytes, bytes]]:
    origins = random.Random(f"origins-{seed}-{tp.topic}-{tp.partition}")
    out = []
    for offset in range(count):
        key = f"k{rng.randint(0, 3)}".encode()
        roll = rng.random()
        if roll < faults.malformed:
            value = rng.choice([b"{nope", b"[" * 6_000 + b"]" * 6_000, b'{"id": "x"}'])
        else:
            text = f"text {tp.topic}/{tp.partition}-{offset}"
            if roll < faults.malformed + faults.poison:
                text = f"{rng.choice([POISON, POISON2]) if cascade else POISON} {text}"
            elif cascade and rng.random() < faults.unsure:
                text = f"{UNSURE} {text}"
            elif cascade and origins.random() < faults.unsure:
                text = f"{NEAR} {text}"
            event_id = f"{tp.topic}/{tp.partition}-{offset}"
            origin = {"tenant": origins.choice(["kids", "adults"]), "source": origins.choice(["chat", "web"])}
            if tp.topic == CONTENT:
                value = json.dumps({"id": event_id, "text": text, **origin}).encode()
            else:
                event = {"id": event_id, "conversation_id": key.decode(), "role": "user", "content": text, **origin}
                value = json.dumps(event).encode()
        out.append(ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, key, value, None, len(key), len(value), []))
    return out


# -- reviews ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeenVerdict:
    """A machine verdict the world saw published: what a reviewer decides on."""

    kind: str
    event_id: str
    verdict_id: str
    key: bytes | None
    conversation_id: str | None
    tenant: str | None
    source: str | None


@dataclass(frozen=True)
class WrittenReview:
    """A record the world appended to the reviews partition."""

    shape: str
    """What it was made as: ``valid``, ``unseen`` (an event never seen), ``duplicate`` (an
    earlier decision sent again), ``unknown_verdict``, ``unknown_category``, ``invalid`` or
    ``malformed``."""
    decision: dict[str, Any] | None
    """The decision as written; None when the record does not decode."""


REVIEW_SHAPES = ("valid",) * 5 + ("unseen", "duplicate", "unknown_verdict", "unknown_category", "invalid", "malformed")
MALFORMED_REVIEWS: tuple[bytes | None, ...] = (b"{nope", b'{"review_id": "r"}', None, b"\xff\xfe")


class ReviewMemory:
    """What one worker process's review stage remembers, by its documented contract
    (``worker/pipeline/reviews.py``): per (kind, event id) the last verdict ids it built and,
    apart, the others (superseding ones, ids named by decisions), at most 8 of each, for at
    most ``events`` events (least recently remembered out first); each applied
    ``review_id`` with its position, at most ``reviews``. Fed with every verdict the process
    builds (``remember``) and every decision it applies (``apply``); ``answer`` gives the
    answer the stage's rules give a decision, in their order."""

    PER_EVENT = 8

    def __init__(self, events: int, reviews: int) -> None:
        self.events = events
        self.reviews = reviews
        self.verdicts: OrderedDict[tuple[str, str], list[tuple[str, bool]]] = OrderedDict()
        """Per event: (verdict id, built by this process), oldest first."""
        self.applied: OrderedDict[str, Input] = OrderedDict()

    def remember(self, kind: str, event_id: str, verdict_id: str, *, built: bool = True) -> None:
        key = (kind, event_id)
        known = self.verdicts.get(key)
        if known is None:
            self.verdicts[key] = [(verdict_id, built)]
            if len(self.verdicts) > self.events:
                self.verdicts.popitem(last=False)
            return
        self.verdicts.move_to_end(key)
        known[:] = [v for v in known if v[0] != verdict_id]
        known.append((verdict_id, built))
        same = [v for v in known if v[1] == built]
        if len(same) > self.PER_EVENT:
            known.remove(same[0])

    def answer(self, decision: dict[str, Any], position: Input, categories: frozenset[str]) -> str:
        """``applied``, or the error type of the refusal."""
        named = decision["categories"]
        if any(name not in categories for name in named):
            return "unknown_category"
        if (decision["action"] == "allow") == bool(named):
            return "invalid_review"
        first = self.applied.get(decision["review_id"])
        if first is not None and first != position:
            return "duplicate_review"
        known = self.verdicts.get((decision["kind"], decision["event_id"]), [])
        if any(built for _, built in known) and decision["verdict_id"] not in {v for v, _ in known}:
            return "unknown_verdict"
        return "applied"

    def apply(self, decision: dict[str, Any], position: Input, superseding_id: str) -> None:
        self.applied[decision["review_id"]] = position
        self.applied.move_to_end(decision["review_id"])
        if len(self.applied) > self.reviews:
            self.applied.popitem(last=False)
        kind, event_id = decision["kind"], decision["event_id"]
        known = {v for v, _ in self.verdicts.get((kind, event_id), [])}
        if decision["verdict_id"] not in known:  # the superseded id too, so a later decision on it is not refused
            self.remember(kind, event_id, decision["verdict_id"], built=False)
        self.remember(kind, event_id, superseding_id, built=False)


def _text_of(value: bytes | None) -> str | None:
    """The text an input's value carries for the backend, if it is an event at all."""
    try:
        event = json.loads(value or b"{}")
    except (ValueError, RecursionError):  # the malformed ones
        return None
    text = event.get("text", event.get("content")) if isinstance(event, dict) else None
    return text if isinstance(text, str) else None


def _decision(rng: random.Random, review_id: str, on: SeenVerdict, categories: Sequence[str]) -> dict[str, Any]:
    """A valid decision on ``on``: any action, with one or two of ``categories`` unless allow."""
    action = rng.choice(["allow", "flag", "review", "block"])
    named = [] if action == "allow" else rng.sample(categories, min(len(categories), rng.randint(1, 2)))
    return {
        "review_id": review_id,
        "verdict_id": on.verdict_id,
        "event_id": on.event_id,
        "kind": on.kind,
        "conversation_id": on.conversation_id,
        "tenant": on.tenant,
        "source": on.source,
        "reviewer_id": "reviewer-1",
        "action": action,
        "categories": named,
        "decided_at": "2026-01-02T03:04:05Z",
    }


# -- the world --------------------------------------------------------------------------


class World:
    """The worker in its simulated surroundings; ``step`` and ``check`` (see the module doc)."""

    def __init__(
        self,
        seed: int,
        *,
        partitions: int = 2,
        records: int = 20,
        faults: Faults | None = None,
        kept: list[int] | None = None,
    ) -> None:
        self.seed = seed
        self.faults = faults or Faults()
        self.kept = kept  # the script's steps this run replays (None: all)
        rng = random.Random(seed)
        self.cascade = rng.random() < self.faults.cascade
        self.tps = [TopicPartition(topic, p) for topic in TOPICS for p in range(partitions)]
        logs = {tp: _records(tp, records, rng, self.faults, self.cascade, seed) for tp in self.tps}
        self.reviews, recent_events, recent_reviews = reviewing(seed, self.faults)
        self.reviews_tp = TopicPartition(REVIEWS, 0)
        if self.reviews:  # it starts empty: ``review`` steps append to it
            self.tps.append(self.reviews_tp)
            logs[self.reviews_tp] = []
        stacked = self.cascade and random.Random(f"policy-{seed}").random() < 0.5
        pooling = random.Random(f"pool-{seed}")
        self.pool_size = pooling.choice([2, 4, 8])
        """Cascade seeds: the second stage's batch size; its pool waits on the virtual clock."""
        self.pool_wait_s = pooling.choice([0.0, 0.02, 0.02])
        self.policy = Policy.from_mapping(STACKED_POLICY) if stacked else Policy.load(None)
        self.broker = Broker(logs)
        self.poison: set[Input] = set()
        self.malformed: set[Input] = set()
        for tp, log in logs.items():
            for r in log:
                value = r.value or b""
                if POISON.encode() in value or POISON2.encode() in value:
                    self.poison.add((tp.topic, tp.partition, r.offset))
                elif not value.startswith(b'{"id": "ugc'):
                    self.malformed.add((tp.topic, tp.partition, r.offset))
        self.settings: Settings = load_settings(
            kafka={"bootstrap_servers": "127.0.0.1:1", "max_poll_records": 6},
            require_backend=False,
            content_topic=CONTENT,
            conversation_topic=CONVERSATIONS,
            conversation={"enabled": True, "max_turns": 3},
            shadow={"sample": 1.0},
            batch={"max_size": 4, "max_wait_ms": 3_600_000},
            max_in_flight=rng.choice([12, 32]),  # at the cap often, or seldom
            commit_every=3,
            commit_interval_ms=3_600_000,
            revoke_timeout_s=0,
            scoring={"poison_attempts": rng.choice([2, 3])},
            drain_timeout_s=0,  # the drain's wait is the world's steps between SIGTERM and the shutdown
            reviews={
                "enabled": self.reviews,
                "topic": REVIEWS,
                "recent_events": recent_events,
                "recent_reviews": recent_reviews,
            },
        )
        self.calls: list[Call] = []
        self.endpoints: dict[tuple[str, Kind], Endpoint] = {}
        self.outage_failures: dict[str, set[tuple[str, int]]] = {}
        self.contexts: dict[str, set[tuple[Turn, ...]]] = {}  # per turn, the live contexts
        self.shadow_backend = ShadowBackend()
        self._shadow_checked = 0
        self._contexts_checked: set[tuple[str, tuple[Turn, ...]]] = set()
        self.conversation_of: dict[str, tuple[int, bytes | None]] = {}  # turn text -> (partition, key)
        for tp, log in logs.items():
            for r in log if tp.topic == CONVERSATIONS else ():
                try:
                    content = json.loads(r.value or b"{}").get("content")
                except (ValueError, RecursionError):  # the malformed ones
                    continue
                if isinstance(content, str):
                    self.conversation_of[content] = (tp.partition, r.key)
        self.input_texts = {
            text for tp, log in logs.items() for r in log if (text := _text_of(r.value)) is not None
        }  # what a backend may be called with: the texts of the inputs, nothing else
        self._texts_checked = 0
        self._shadow_texts_checked = 0
        self.called: list[str] = []  # every text the backends were called with
        self.categories = frozenset(self.policy.category_descriptions())
        self.seen_verdicts: dict[str, SeenVerdict] = {}  # machine verdicts acknowledged, by verdict id
        self.written: list[WrittenReview] = []  # per offset of the reviews partition
        self.memory = ReviewMemory(recent_events, recent_reviews)  # the current process's
        self.superseding: dict[Input, str] = {}  # per review record, its superseding verdict id
        self.review_answers: list[tuple[Input, str, str]] = []  # (position, shape, answer), every delivery
        for stage in ("first", "then") if self.cascade else ("one",):
            for kind in ("content", "conversation"):
                poison = POISON2 if stage == "then" else POISON
                scores = _first_stage if stage == "first" else _clear
                self.endpoints[(stage, kind)] = Endpoint(f"{stage}/{kind}", poison, scores, self.outage_failures)
        self.clock = VirtualClock()
        self.trace: list[str] = []
        self.step_rng = random.Random(0)
        self.acked: dict[Input, int] = {}  # outputs (verdict or dead letter) acknowledged, all workers
        self.dead_letters: list[tuple[Input, str]] = []
        self.restarts = 0
        self.failure: tuple[str, str] | None = None  # (invariant, what was seen)
        self._published: dict[tuple[int, Input], int] = {}  # (slot, input) -> outputs published
        self._last_published: dict[tuple[int, bytes | None], int] = {}
        self._slots: dict[int, PartitionOffsets] = {}
        self._stopping: int | None = None  # steps left of the SIGTERM drain
        self._scorers: list[Scorer] = []  # every worker's, for their probes at the end
        self._new_worker()

    def _new_worker(self) -> None:
        def stage(kind: type[ScriptedBackend]) -> ScriptedBackend:
            endpoints = {k: self.endpoints[(kind.name, k)] for k in TOPICS.values()}
            return kind(endpoints, self.calls, self.contexts, self.called)

        policy = self.policy
        backend: Backend
        if self.cascade:
            bands = UncertaintyBands(policy, default_band=BAND)
            backend = CascadeBackend(
                stage(FirstStage),
                stage(SecondStage),
                bands,
                batch_size=self.pool_size,
                max_wait_s=self.pool_wait_s,
                sleep=self.clock.sleep,
            )
        else:
            backend = stage(ScriptedBackend)
        shadow = Shadow(self.settings, policy=policy, backend=self.shadow_backend, publish=self._shadow_publish)
        self.worker = ModerationWorker(self.settings, backend=backend, policy=policy, shadow=shadow)
        self._scorers.append(self.worker._scorer)
        if self.reviews:  # a new process remembers nothing
            reviews = self.settings.reviews
            self.memory = ReviewMemory(reviews.recent_events, reviews.recent_reviews)
            outputs = self.worker._outputs
            hook = outputs._on_verdict
            assert hook is not None, "the shadow and the review stage see every verdict"

            def on_verdict(job: Job, verdict: Verdict) -> None:
                self.memory.remember(verdict.kind, verdict.event_id, verdict.verdict_id)
                hook(job, verdict)

            outputs._on_verdict = on_verdict
        self.worker._conversations.changelog = MemoryChangelog(  # type: ignore[assignment]
            self.settings.conversation.changelog_topic, self.broker
        )
        self.consumer = MemoryConsumer(self.broker)
        self.consumer.on_commit = self._check_commit
        self.producer = MemoryProducer()
        self.producer.on_send = self._check_send
        self.producer.on_ack = self._acked
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
        w._conversations._publish = checked_publish
        assert w.shadow is not None
        await w.shadow.start()
        sink._queue = self.sink_queue
        if self.faults.bug == "dropped_group_counts_one":
            sink._on_dropped = lambda messages: w._abandon(1)
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
        if w.shadow is not None:
            await w.shadow.close()
        await w._conversations.close()
        probes = [p for scorer in self._scorers for p in scorer._probes.values() if not p.done()]
        for probe in probes:  # a probe waiting on a call nobody answers any more
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    # -- actions --------------------------------------------------------------------

    async def _assign(self, tps: list[TopicPartition]) -> None:
        self.consumer.assigned = set(tps)
        self.consumer.paused_tps = set()  # as in aiokafka: a new assignment starts unpaused
        for tp in tps:
            self.consumer.positions[tp] = self.broker.committed.get(tp, 0)
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
        keep = [tp for tp in self.tps if self.step_rng.random() < 0.7]
        await self._assign(keep)

    def offset_reset(self) -> None:
        owned = sorted(self.consumer.assigned)
        if not owned:
            return
        tp = self.step_rng.choice(owned)
        position = self.consumer.positions.get(tp, 0)
        highest = position if self.faults.reset_above_committed else self.broker.committed.get(tp, 0)
        back = self.step_rng.randint(0, min(position, highest))
        self.consumer.seek(tp, back)

    def review(self) -> str:
        """Append one record to the reviews partition (``REVIEW_SHAPES``); returns its shape."""
        rng = self.step_rng
        log = self.broker.logs[self.reviews_tp]
        offset = len(log)
        shape = rng.choice(REVIEW_SHAPES)
        earlier = [r for r, w in zip(log, self.written, strict=True) if w.decision is not None]
        if shape == "duplicate" and earlier:  # an earlier decision sent again, as it was
            again = rng.choice(earlier)
            self._append_review(again.key, again.value, WrittenReview(shape, self.written[again.offset].decision))
            return shape
        if shape == "malformed":
            self._append_review(
                f"k{rng.randint(0, 3)}".encode(), rng.choice(MALFORMED_REVIEWS), WrittenReview(shape, None)
            )
            return shape
        if shape == "duplicate" or not self.seen_verdicts:
            shape = "unseen"
        if shape == "unseen":  # an event this world never saw judged: applied as it stands
            on = SeenVerdict("content", f"gone-{offset}", f"machine-{offset}", b"k0", None, "adults", "web")
        else:
            on = rng.choice(list(self.seen_verdicts.values()))
        categories = sorted(self.categories)
        decision = _decision(rng, f"review-{offset}", on, categories)
        if shape == "unknown_verdict":
            decision["verdict_id"] = f"no-such-verdict-{offset}"
        elif shape == "unknown_category":
            decision.update(action="block", categories=[*decision["categories"][:1], "no_such_category"])
        elif shape == "invalid":
            decision.update(
                rng.choice([{"action": "allow", "categories": categories[:1]}, {"action": "block", "categories": []}])
            )
        self._append_review(on.key, json.dumps(decision).encode(), WrittenReview(shape, decision))
        return shape

    def _append_review(self, key: bytes | None, value: bytes | None, written: WrittenReview) -> None:
        log = self.broker.logs[self.reviews_tp]
        size = (len(key) if key is not None else 0, len(value) if value is not None else 0)
        log.append(ConsumerRecord(REVIEWS, 0, len(log), 0, 0, key, value, None, *size, []))
        self.written.append(written)

    def answer(self, index: int) -> None:
        call = self.calls.pop(index)
        call.endpoint.answer(call)

    def sigterm(self) -> None:
        """``stop()`` as the signal handler calls it; the consume loop ends at once (no more
        polls) and the shutdown flushes the batcher. The world goes on stepping through
        the drain's wait, then runs the rest of the shutdown (``_finish_shutdown``)."""
        if self._stopping is not None:
            return
        self.worker.stop()
        self.worker._batcher.flush()
        self._stopping = self.step_rng.randint(0, 12)

    async def _finish_shutdown(self) -> None:
        """The worker's own shutdown (commit what finished) and close (leave the group, send
        what is queued), then a new worker from the committed offsets."""
        w = self.worker
        self.sink_queue.opened = True
        self.sink_queue.gate.set()
        await w._shutdown()
        await w._close_quietly()
        self.trace.append("restart")
        self.restarts += 1
        self._stopping = None
        self._new_worker()
        await self.start()

    async def step(self, step: Step) -> None:
        """One step of the script, then every invariant."""
        self.step_rng = rng = random.Random(step.choice)
        self.consumer.rng = rng
        self.consumer.commit_failure_rate = self.faults.commit_failure
        action = step.action
        if action == "rebalance":
            await self.rebalance()
        elif action == "offset_reset":
            self.offset_reset()
        elif action.startswith("outage:"):
            kind = action.removeprefix("outage:")
            endpoint = self.endpoints[rng.choice(sorted(e for e in self.endpoints if e[1] == kind))]
            endpoint.outage = not endpoint.outage
            endpoint.outages += endpoint.outage
            action = f"outage:{endpoint.name}={endpoint.outage}"
        elif action == "publish_failure":
            self.producer.fail_next = rng.choice(["send", "ack"])
            action = f"publish_failure:{self.producer.fail_next}"
        elif action == "sigterm":
            self.sigterm()
        elif action == "poll":
            if self._stopping is None:
                await self.poll()
        elif action == "flush":
            self.worker._batcher.flush()
        elif action == "answer" and self.calls:
            self.answer(rng.randrange(len(self.calls)))
        elif action == "ack" and self.producer.unacked:
            self.producer.ack(rng.randrange(len(self.producer.unacked)))
        elif action == "sink":
            self.sink_queue.gate.set()
        elif action == "advance":
            self.clock.advance()
        elif action == "review":
            action = f"review:{self.review()}"
        self.trace.append(action)
        await self._settle()
        self.check()
        await self._maybe_restart()

    async def _maybe_restart(self) -> None:
        """A worker failed by a failed publish shuts down as ``run()`` does, and a new one
        starts; a SIGTERM's drain wait ends after its steps."""
        if self.worker._fatal is not None and self.producer.failed:
            await self._finish_shutdown()
        elif self._stopping is not None:
            self._stopping -= 1
            if self._stopping < 0:
                await self._finish_shutdown()
        else:
            return
        await self._settle()
        self.check()

    async def _settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def drain(self, max_rounds: int = 400) -> None:
        """Faults off, every partition back, everything answered and acknowledged: each
        partition must be committed to its end within ``max_rounds``."""
        for endpoint in self.endpoints.values():
            endpoint.outage = False
        self.producer.fail_next = None
        self.step_rng = self.consumer.rng = random.Random(0)
        self.consumer.commit_failure_rate = 0.0
        self.trace.append("drain")
        if self._stopping is not None or self.worker._fatal is not None:
            await self._finish_shutdown()
        if set(self.consumer.assigned) != set(self.tps):
            owned = sorted(self.consumer.assigned)
            if owned:
                await self.worker._on_revoked(owned)
            await self._assign(self.tps)
        for _ in range(max_rounds):
            await self.poll()
            self.worker._batcher.flush()
            await self._settle()
            while self.calls:
                self.answer(0)
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
            if self._drained():  # with every commit checked: every input has an acknowledged output
                return
        ends = {f"{tp.topic}-{tp.partition}": len(self.broker.logs[tp]) for tp in self.tps}
        committed = {f"{tp.topic}-{tp.partition}": self.broker.committed.get(tp) for tp in self.tps}
        w = self.worker
        state = {
            "in_flight": w.in_flight,
            "unfinished": {f"{s.tp.topic}-{s.tp.partition}": list(s._order)[:5] for s in w._tracker.slots()},
            "paused": sorted(f"{tp.topic}-{tp.partition}" for tp in self.consumer.paused()),
            "tasks": len(w._tasks),
            "sleeping": self.clock.sleeping,
        }
        self.fail("drained", f"not drained within {max_rounds} rounds: committed {committed}, ends {ends}, {state}")

    def _drained(self) -> bool:
        ends = all(self.broker.committed.get(tp) == len(self.broker.logs[tp]) for tp in self.tps)
        return ends and self.worker.in_flight == 0

    # -- invariants -----------------------------------------------------------------

    def problem(self, invariant: str, seen: str) -> None:
        """Note a broken invariant seen inside a callback of the worker (raised by ``check``:
        raising there would only fail the worker's own stage)."""
        if self.failure is None:
            self.failure = (invariant, seen)

    def fail(self, invariant: str, seen: str) -> None:
        self.failure = (invariant, seen)
        steps = len(self.kept) if self.kept is not None else None
        replay = f"python -m tests.simulation --seed {self.seed}"
        if self.kept is not None:
            replay += f" --keep {','.join(map(str, self.kept))}"
        if self.faults.bug is not None:
            replay += f" --bug {self.faults.bug}"
        raise InvariantBroken(
            f"seed {self.seed} ({'cascade' if self.cascade else 'one backend'}): [{invariant}] {seen}\n"
            f"  after {len(self.trace)} actions{'' if steps is None else f' ({steps} script steps kept)'}: "
            f"{' '.join(self.trace[-60:])}\n"
            f"  replay: {replay}",
            invariant=invariant,
            seed=self.seed,
            kept=self.kept or [],
        )

    def check(self) -> None:
        """The invariants that hold after every step."""
        w = self.worker
        if self.failure is not None:
            self.fail(*self.failure)
        self._check_backend_inputs()
        self._check_contexts()
        if w._fatal is not None:
            if not self.producer.failed:
                self.fail("worker-alive", f"the worker failed: {w._fatal}")
            return  # failed as designed by a failed publish: it shuts down next, counts and all
        owned_pending = sum(slot.pending for slot in w._tracker.slots())
        if w.in_flight < owned_pending:
            self.fail("in-flight", f"in-flight count {w.in_flight} below the owned unfinished inputs {owned_pending}")
        quiet = not self.calls and not w._tasks and self.sink.unacked == 0 and w._batcher.queued == 0
        if quiet and w.in_flight != owned_pending:
            self.fail(
                "in-flight",
                f"nothing in flight, yet the in-flight count is {w.in_flight} (unfinished: {owned_pending})",
            )
        for position, error_type in self.dead_letters:
            if position[0] == REVIEWS:  # checked as each is published (``_check_review``)
                continue
            if error_type == "backend_failed" and position not in self.poison and not self._flapped(position):
                self.fail("outage-dead-letters", f"a healthy input {position} was dead-lettered as backend_failed")
            if error_type != "backend_failed" and position not in self.malformed:
                self.fail("outage-dead-letters", f"a valid input {position} was dead-lettered as {error_type}")

    def _check_backend_inputs(self) -> None:
        """Every text a backend (live or shadow) is called with is an input's own text: no
        review decision, nor anything else, ever reaches a backend."""
        shadowed = [c.turn.content for c in self.shadow_backend.judged[self._shadow_checked :]]
        shadowed += self.shadow_backend.texts[self._shadow_texts_checked :]
        for text in self.called[self._texts_checked :] + shadowed:
            if text not in self.input_texts:
                self.fail("backend-inputs", f"a backend was called with {text[:200]!r}, no input's text")
        self._texts_checked = len(self.called)
        self._shadow_texts_checked = len(self.shadow_backend.texts)

    def _check_contexts(self) -> None:
        """A turn is judged with earlier turns of its own conversation only, at most
        ``max_turns``; the shadow judges it with a context the live backend judged it with."""
        limit = self.settings.conversation.max_turns
        for text, contexts in self.contexts.items():
            for context in contexts:
                if (text, context) in self._contexts_checked:
                    continue
                self._contexts_checked.add((text, context))
                own = self.conversation_of.get(text)
                strangers = [t.content for t in context if self.conversation_of.get(t.content) != own]
                if strangers or len(context) > limit:
                    self.fail("context", f"turn {text!r} judged with {[t.content for t in context]}")
        judged = self.shadow_backend.judged
        for conversation in judged[self._shadow_checked :]:
            text = conversation.turn.content
            if conversation.context not in self.contexts.get(text, ()):
                live = [[t.content for t in c] for c in self.contexts.get(text, ())]
                shadowed = [t.content for t in conversation.context]
                self.fail("shadow-context", f"the shadow judged {text!r} with {shadowed}, the live backend with {live}")
        self._shadow_checked = len(judged)

    def _flapped(self, position: Input) -> bool:
        """Whether outages failed this input in more than one outage (of its endpoints, or
        one endpoint down, up and down again). Three failures alone, each after the failing
        source answered others, is the scorer's evidence of a poison input; an endpoint that
        comes back between the failures gives it for a healthy input too, as designed.
        Within one outage the endpoint answers nothing: no evidence can come from it."""
        topic, partition, offset = position
        record = self.broker.logs[TopicPartition(topic, partition)][offset]
        event = json.loads(record.value or b"{}")
        text = event.get("text", event.get("content", ""))
        return len(self.outage_failures.get(text, ())) > 1

    def _origin(self, value: bytes | None, headers: list[tuple[str, bytes]]) -> Input | None:
        found = dict(headers)
        if DeadLetterHeaders.ORIGIN_OFFSET in found:
            return (
                found[DeadLetterHeaders.ORIGIN_TOPIC].decode(),
                int(found[DeadLetterHeaders.ORIGIN_PARTITION]),
                int(found[DeadLetterHeaders.ORIGIN_OFFSET]),
            )
        try:
            position = json.loads(value or b"{}")["input"]
        except (ValueError, KeyError):
            return None
        return position["topic"], int(position["partition"]), int(position["offset"])

    def _outputs(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]
    ) -> list[tuple[Input, bytes | None, list[tuple[str, bytes]]]]:
        if topic not in (self.settings.verdict_topic, self.settings.dead_letter_topic):
            return []
        out = []
        for key, value, headers in records:
            origin = self._origin(value, headers)
            if origin is not None:
                out.append((origin, key, headers))
        return out

    def _check_send(self, sent: Sent) -> None:
        owned = set(self.worker._tracker.owned()) if not self.consumer.left else set()
        for (topic, partition, offset), _key, headers in self._outputs(sent.topic, sent.batch.records):
            if TopicPartition(topic, partition) not in owned:
                self.problem(
                    "revoked-silent",
                    f"an output of {topic}-{partition}@{offset} was sent after its partition was revoked"
                    + (" (the worker had left the group)" if self.consumer.left else ""),
                )
            found = dict(headers)
            if DeadLetterHeaders.ERROR_TYPE in found:
                self.dead_letters.append(((topic, partition, offset), found[DeadLetterHeaders.ERROR_TYPE].decode()))

    def _check_publish(self, records: list[OutRecord], origin: PartitionOffsets | None) -> None:
        """Per ownership episode (the input's slot): one output per input, and per-key order
        (the sink sends in publish order, so one key's verdicts are published with rising
        offsets). Every verdict and dead letter names the slot it finishes, so that a revoke
        can drop it unsent."""
        if origin is None:
            outputs = (self.settings.verdict_topic, self.settings.dead_letter_topic)
            if any(record.topic in outputs for record in records):
                self.problem("output-slot", f"outputs to {[r.topic for r in records]} published without their slot")
            return
        self._slots.setdefault(id(origin), origin)  # keeps the id unique
        reviewed = None
        for record in records:
            if record.topic not in (self.settings.verdict_topic, self.settings.dead_letter_topic):
                continue
            found = self._origin(record.value, list(record.headers or ()))
            if found is None:
                continue
            once = (id(origin), found)
            self._published[once] = self._published.get(once, 0) + 1
            if self._published[once] > 1:
                self.problem("one-output", f"input {found} had {self._published[once]} outputs in one ownership")
            if found[0] == REVIEWS:
                reviewed = found
            if record.topic != self.settings.verdict_topic:
                continue
            if found[0] != REVIEWS:
                self._check_decided_by(json.loads(record.value or b"{}"))
            line = (id(origin), record.key)
            last = self._last_published.get(line)
            if last is not None and found[2] <= last:
                self.problem(
                    "key-order",
                    f"key {record.key!r} of {origin.tp}: verdict of offset {found[2]} published after {last}",
                )
            self._last_published[line] = found[2]
        if reviewed is not None:
            self._check_review(reviewed, records)

    def _saw(self, verdict: dict[str, Any], key: bytes | None) -> None:
        """Note an acknowledged machine verdict, for reviewers to decide on."""
        if not {"kind", "event_id", "verdict_id"} <= verdict.keys():  # a test's fragment of one
            return
        self.seen_verdicts[verdict["verdict_id"]] = SeenVerdict(
            verdict["kind"],
            verdict["event_id"],
            verdict["verdict_id"],
            key,
            verdict.get("conversation_id"),
            verdict.get("tenant"),
            verdict.get("source"),
        )

    def _check_review(self, position: Input, records: list[OutRecord]) -> None:
        """A review record's answer is one group: its superseding verdict (``decided_by``
        human, ``supersedes`` the named verdict, the decision's action and categories) with a
        violation iff it is flagged, or the record as one dead letter at stage ``decode`` or
        ``review``; and the one that the stage's rules give for what this process remembers
        (``ReviewMemory``). Every delivery of one record gives the same superseding verdict id."""
        written = self.written[position[2]]
        decision = written.decision
        expected = "decode" if decision is None else self.memory.answer(decision, position, self.categories)
        topics = [record.topic for record in records]
        s = self.settings
        if topics == [s.dead_letter_topic]:
            headers = {k: v.decode() for k, v in records[0].headers or ()}
            stage, error = headers[DeadLetterHeaders.STAGE], headers[DeadLetterHeaders.ERROR_TYPE]
            answer = {"decode": "decode", "review": error}.get(stage, f"{stage}:{error}")
            self.review_answers.append((position, written.shape, error))
            if answer != expected:
                self.problem(
                    "review-answer",
                    f"review {position} ({written.shape}) was dead-lettered at stage {stage} as {error}; "
                    f"expected {expected}",
                )
            return
        verdict = json.loads(records[0].value or b"{}") if topics[0] == s.verdict_topic else {}
        flagged = verdict.get("action") != "allow"
        shown = {k: verdict.get(k) for k in ("decided_by", "supersedes", "action")}
        self.review_answers.append((position, written.shape, "applied"))
        if topics != [s.verdict_topic] + [s.violation_topic] * flagged:
            self.problem("review-answer", f"review {position} answered with {topics} ({shown})")
        elif decision is None or expected != "applied":
            self.problem("review-answer", f"review {position} ({written.shape}) was applied; expected {expected}")
        elif (
            verdict.get("decided_by") != "human"
            or verdict.get("supersedes") != decision["verdict_id"]
            or verdict.get("action") != decision["action"]
            or sorted(hit["category"] for hit in verdict.get("violations", ())) != sorted(set(decision["categories"]))
            or (flagged and json.loads(records[1].value or b"{}").get("verdict_id") != verdict.get("verdict_id"))
        ):
            self.problem("review-answer", f"review {position}: its verdict {shown} does not answer {decision}")
        else:
            first = self.superseding.setdefault(position, verdict["verdict_id"])
            if first != verdict["verdict_id"]:
                self.problem(
                    "review-redelivery", f"review {position} superseded as {verdict['verdict_id']}, earlier as {first}"
                )
            self.memory.apply(decision, position, verdict["verdict_id"])

    async def _shadow_publish(self, topic: str, key: bytes, value: bytes) -> None:
        pass

    def _check_decided_by(self, verdict: dict[str, Any]) -> None:
        """The cascade's first stage decides only where its scores are clear of every
        boundary of the input's own rules: the action would not change with any score within
        the band (found with ``Policy.decide`` for the input's tenant and source, not with
        the cascade's own bands)."""
        if verdict.get("decided_by") != "first":
            return
        scores, who = verdict["scores"], {"tenant": verdict.get("tenant"), "source": verdict.get("source")}
        actions = {
            self.policy.decide({k: min(1.0, max(0.0, v + shift)) for k, v in scores.items()}, **who).action
            for shift in (-BAND + 1e-6, 0.0, BAND)
        }
        if len(actions) > 1:
            self.problem(
                "cascade-band",
                f"the first stage decided {verdict['input']} ({scores}, {who}) though a score within "
                f"{BAND} of it decides {sorted(actions)}",
            )

    def _acked(self, sent: Sent) -> None:
        if sent.topic == self.settings.conversation.changelog_topic:
            log = self.broker.changelog.setdefault(sent.partition, [])
            log += [(key or b"", value) for key, value, _ in sent.batch.records]
        for position, _, _ in self._outputs(sent.topic, sent.batch.records):
            self.acked[position] = self.acked.get(position, 0) + 1
        if self.reviews and sent.topic == self.settings.verdict_topic:  # what a reviewer can see
            for key, value, _ in sent.batch.records:
                verdict = json.loads(value or b"{}")
                if verdict.get("decided_by") != "human":
                    self._saw(verdict, key)

    def _check_commit(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            for earlier in range(offset):
                if (tp.topic, tp.partition, earlier) not in self.acked:
                    self.problem(
                        "commit-acked",
                        f"committed {tp.topic}-{tp.partition}@{offset} past {earlier}, "
                        "whose output was never acknowledged",
                    )


async def simulate(
    seed: int, *, steps: int = 200, faults: Faults | None = None, keep: list[int] | None = None
) -> World:
    """Run one seed: its script's ``steps`` (only those at the indices ``keep``, if given),
    then the drain. Raises ``InvariantBroken``."""
    faults = faults or Faults()
    world = World(seed, faults=faults, kept=keep)
    full = script(seed, steps, faults)
    chosen = full if keep is None else [full[i] for i in keep]
    saved = worker.app._SETTLE_MIN_S
    worker.app._SETTLE_MIN_S = 0.0  # the revoke's wait for acks: the world acknowledges only in its own steps
    try:
        await world.start()
        for step in chosen:
            await world.step(step)
        await world.drain()
    finally:
        worker.app._SETTLE_MIN_S = saved
        await world.close()
    return world


async def shrink(
    seed: int, *, steps: int = 200, faults: Faults | None = None, max_runs: int = 300
) -> tuple[InvariantBroken, InvariantBroken] | None:
    """Delta debugging over a failing seed's script: drop chunks of steps (halves, then
    quarters, ...) as long as the run still breaks the same invariant. Returns the original
    failure and the smallest found (its ``kept``: the script's step indices to replay), or
    None when the seed does not fail. At most ``max_runs`` replays."""
    try:
        await simulate(seed, steps=steps, faults=faults)
    except InvariantBroken as err:
        original = err
    else:
        return None
    smallest = original
    kept = list(range(steps))
    runs = 0

    async def still_fails(candidate: list[int]) -> InvariantBroken | None:
        try:
            await simulate(seed, steps=steps, faults=faults, keep=candidate)
        except InvariantBroken as err:
            return err if err.invariant == original.invariant else None
        return None

    chunks = 2
    while len(kept) >= 2 and runs < max_runs:
        size = -(-len(kept) // chunks)
        for start in range(0, len(kept), size):
            candidate = kept[:start] + kept[start + size :]
            runs += 1
            found = await still_fails(candidate)
            if found is not None:
                kept, smallest = candidate, found
                chunks = max(chunks - 1, 2)
                break
            if runs >= max_runs:
                break
        else:
            if chunks >= len(kept):
                break
            chunks = min(chunks * 2, len(kept))
    if smallest is original:  # every step was needed: name them all for the replay
        original.kept = kept
    return original, smallest
