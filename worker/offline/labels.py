"""``modworker labels export --out LABELS.jsonl``: human review decisions joined with the
machine verdicts they decided on, as labelled JSONL.

    modworker labels export --out LABELS.jsonl [--reviews-topic TOPIC] \\
        [--config FILE] [-b HOST:PORT]

Reads the review topic (``ReviewDecision``, ``MODWORKER_REVIEWS__TOPIC``) and then the verdict topic
(``MODWORKER_VERDICT_TOPIC``) from the beginning to the end offsets they had when the
command started, and stops: a bounded read, with the same Kafka settings as ``modworker
run`` (``KAFKA_BOOTSTRAP_SERVERS``, ``MODWORKER_KAFKA__*``, ``--config``, ``-b``). Both are
read with ``isolation_level=read_committed``, so a verdict of an aborted transaction never
becomes a label.

The join, by ``verdict_id``:

- Of several decisions on one verdict the newest ``decided_at`` wins (a tie: the one read
  last; decisions on one verdict share its key, so one partition, so read in order). A
  repeated ``review_id`` is a duplicate and counted as such.
- The machine side is a verdict the worker decided: verdicts with ``decided_by: human``
  or ``supersedes`` set (the worker's answers to review decisions) are skipped.
- Only the verdicts some decision names are kept in memory while the verdict topic is read.

One line per reviewed input (``LabelledReview``), in the text-record shape ``modworker
train``, ``eval`` and ``calibrate`` read (``worker.offline.labelled``): ``text`` (only when
the verdict carried it, ``MODWORKER_INCLUDE_TEXT=true``; else absent, and ``event_id`` is
there for the platform to join its own text), ``labels: {"review": [categories]}`` (the
reviewer's categories; empty: negative for every category), and beside them the machine's
``scores``, ``machine_action``, the ``human_action``, ``policy_version``, ``tenant`` and
``source`` (the policy's overrides match on them); a conversation turn's line holds the
judged turn only (its context is not on the verdict). ``train`` and ``eval`` skip, and count,
lines without text; ``calibrate --labels`` needs only the scores.

The counts go to stderr as one line: ``joined``, ``without_verdict`` (decisions naming a
verdict not on the topic: expired, or another topic), ``without_text``, ``superseded``
(older decisions on a verdict that got a newer one), ``duplicates``, ``human_verdicts``
skipped and ``unreadable`` records of each topic. Raises ``CommandError`` when a topic does
not exist or Kafka cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas import Action, Kind, ReviewDecision, Verdict

if TYPE_CHECKING:
    from worker.config import Settings

LABEL_TARGET = "review"
"""The key of the reviewer's categories under ``labels`` (the labelled format's target)."""
IDLE_TIMEOUT_S = 15.0
"""A read that makes no progress for this long stops (and says which partitions fell short)."""


class LabelledReview(BaseModel):
    """One line of the export: a reviewed input, the machine's view of it and the human's."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(default=None, description="The judged text, when the verdict carried it.")
    labels: dict[str, list[str]] = Field(description='{"review": the reviewer\'s categories}; empty: negative.')
    event_id: str
    kind: Kind = "content"
    conversation_id: str | None = None
    tenant: str | None = None
    source: str | None = None
    verdict_id: str
    review_id: str
    reviewer_id: str
    scores: dict[str, float] = Field(description="The machine verdict's raw scores.")
    machine_action: Action
    human_action: Action
    policy_version: str = Field(description="The policy the machine verdict was decided with.")
    model: str | None = None
    backend: str
    decided_at: datetime = Field(description="When the reviewer decided.")

    @property
    def categories(self) -> frozenset[str]:
        """The reviewer's categories (all targets merged, ``safe`` is no category)."""
        return frozenset(c for group in self.labels.values() for c in group) - {"safe"}

    def line(self) -> str:
        """The JSONL line (no trailing newline); fields that are None are left out."""
        return self.model_dump_json(exclude_none=True)


class LabelsFileError(Exception):
    """A labels file cannot be read; the message names the line and the fix."""


def read_reviews(path: Path) -> list[LabelledReview]:
    """Every line of an exported labels file. Raises ``LabelsFileError`` naming the line."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise LabelsFileError(f"{path}: cannot open it ({err.strerror})") from None
    reviewed = []
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                reviewed.append(LabelledReview.model_validate_json(line))
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "line"
                raise LabelsFileError(
                    f"{path}:{number}: not a 'modworker labels export' line ({where}: {first['msg']}); "
                    "export the file with 'modworker labels export'"
                ) from None
    return reviewed


# -- the join ---------------------------------------------------------------------------


@dataclass
class ExportCounts:
    joined: int = 0
    without_verdict: int = 0
    without_text: int = 0
    superseded: int = 0
    duplicates: int = 0
    human_verdicts: int = 0
    unreadable_reviews: int = 0
    unreadable_verdicts: int = 0
    reviews_read: int = 0
    verdicts_read: int = 0

    def line(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in asdict(self).items())


class ReviewJoin:
    """Decisions first (``add_review``), then verdicts (``add_verdict``), then ``records``.

    Keeps the newest decision per verdict and, of the verdicts, only those a decision names.
    """

    def __init__(self) -> None:
        self.counts = ExportCounts()
        self._decisions: dict[str, ReviewDecision] = {}
        self._review_ids: set[str] = set()
        self._verdicts: dict[str, Verdict] = {}

    def add_review(self, decision: ReviewDecision) -> None:
        self.counts.reviews_read += 1
        if decision.review_id in self._review_ids:
            self.counts.duplicates += 1
            return
        self._review_ids.add(decision.review_id)
        held = self._decisions.get(decision.verdict_id)
        if held is not None:
            self.counts.superseded += 1
            if decision.decided_at < held.decided_at:
                return
        self._decisions[decision.verdict_id] = decision

    def add_verdict(self, verdict: Verdict) -> None:
        self.counts.verdicts_read += 1
        if verdict.decided_by == "human" or verdict.supersedes is not None:
            self.counts.human_verdicts += 1
            return
        if verdict.verdict_id in self._decisions:
            self._verdicts[verdict.verdict_id] = verdict  # a redelivered copy is the same verdict

    def records(self) -> list[LabelledReview]:
        """One record per decided verdict found, ordered by decision time; updates the counts."""
        out = []
        self.counts.joined = self.counts.without_verdict = self.counts.without_text = 0
        for verdict_id, decision in sorted(self._decisions.items(), key=lambda d: (d[1].decided_at, d[0])):
            verdict = self._verdicts.get(verdict_id)
            if verdict is None:
                self.counts.without_verdict += 1
                continue
            self.counts.joined += 1
            if verdict.text is None:
                self.counts.without_text += 1
            out.append(
                LabelledReview(
                    text=verdict.text,
                    labels={LABEL_TARGET: sorted(set(decision.categories))},
                    event_id=verdict.event_id,
                    kind=verdict.kind,
                    conversation_id=verdict.conversation_id,
                    tenant=verdict.tenant,
                    source=verdict.source,
                    verdict_id=verdict_id,
                    review_id=decision.review_id,
                    reviewer_id=decision.reviewer_id,
                    scores=dict(verdict.scores),
                    machine_action=verdict.action,
                    human_action=decision.action,
                    policy_version=verdict.policy_version,
                    model=verdict.model,
                    backend=verdict.backend,
                    decided_at=decision.decided_at,
                )
            )
        return out


def join(reviews: Iterable[ReviewDecision], verdicts: Iterable[Verdict]) -> tuple[list[LabelledReview], ExportCounts]:
    """The join of the module docstring over decoded decisions and verdicts."""
    joined = ReviewJoin()
    for decision in reviews:
        joined.add_review(decision)
    for verdict in verdicts:
        joined.add_verdict(verdict)
    return joined.records(), joined.counts


# -- reading Kafka ----------------------------------------------------------------------


async def read_to_end(
    settings: Settings,
    topic: str,
    handle: Callable[[bytes | None], None],
    *,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> list[str]:
    """Pass each value of every partition of ``topic``, from the beginning up to the end
    offsets of now (read committed), to ``handle``. Returns the partitions that did not
    reach their end within ``idle_timeout_s`` without progress (normally none). Raises
    ``CommandError`` for a missing topic or an unreachable broker."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from worker.cli import _KAFKA_START_ERRORS, CommandError, topic_partitions
    from worker.pipeline.source import client_options

    partitions = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
    consumer = AIOKafkaConsumer(
        **client_options(settings.kafka), group_id=None, enable_auto_commit=False, isolation_level="read_committed"
    )
    try:
        await consumer.start()
    except _KAFKA_START_ERRORS as err:
        raise CommandError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {err}") from None
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        left = {tp for tp in partitions if await consumer.position(tp) < ends[tp]}
        last_progress = time.monotonic()
        while left:
            batches = await consumer.getmany(*left, timeout_ms=200)
            for records in batches.values():
                for record in records:
                    if record.offset < ends[TopicPartition(record.topic, record.partition)]:
                        handle(record.value)
            if batches:
                last_progress = time.monotonic()
            for tp in list(left):
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
            if left and time.monotonic() - last_progress > idle_timeout_s:
                break
        return sorted(f"{tp.topic}[{tp.partition}]" for tp in left)
    finally:
        await consumer.stop()


async def export(settings: Settings, reviews_topic: str) -> tuple[list[LabelledReview], ExportCounts, list[str]]:
    """Read both topics to their end and join them: (records, counts, partitions short of their end)."""
    joined = ReviewJoin()

    def on_review(value: bytes | None) -> None:
        try:
            joined.add_review(ReviewDecision.model_validate_json(value or b""))
        except ValidationError:
            joined.counts.unreadable_reviews += 1

    def on_verdict(value: bytes | None) -> None:
        try:
            joined.add_verdict(Verdict.model_validate_json(value or b""))
        except ValidationError:
            joined.counts.unreadable_verdicts += 1

    short = []
    reads: list[tuple[str, Callable[[bytes | None], None]]] = [
        (reviews_topic, on_review),
        (settings.verdict_topic, on_verdict),
    ]
    for topic, handle in reads:
        print(f"labels: reading {topic} to its end", file=sys.stderr, flush=True)
        short += await read_to_end(settings, topic, handle)
    return joined.records(), joined.counts, short


# -- the command ------------------------------------------------------------------------


def add_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``modworker labels export``."""
    from worker.cli import _add_bootstrap_server

    labels = subparsers.add_parser("labels", help="labelled data from human review decisions")
    actions = labels.add_subparsers(dest="labels_command", metavar="ACTION")
    text = "join the review decisions with the machine verdicts they name; write labelled JSONL"
    export_parser = actions.add_parser("export", help=text, description=text)
    export_parser.add_argument("--out", type=Path, required=True, help="the labelled JSONL file to write")
    export_parser.add_argument(
        "--reviews-topic", help="topic of the ReviewDecision records (default: MODWORKER_REVIEWS__TOPIC)"
    )
    export_parser.add_argument("--config", type=Path, help="settings YAML, as for 'modworker run'")
    _add_bootstrap_server(export_parser)
    export_parser.set_defaults(func=cmd_labels_export)


def cmd_labels_export(args: argparse.Namespace) -> int:
    from worker.cli import kafka_overrides, print_setting_warnings
    from worker.config import load_settings

    settings = load_settings(args.config, require_backend=False, **kafka_overrides(args))
    print_setting_warnings(settings)
    records, counts, short = asyncio.run(export(settings, args.reviews_topic or settings.reviews.topic))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(record.line() + "\n" for record in records), encoding="utf-8")
    print(f"labels: wrote {len(records)} lines to {args.out}: {counts.line()}", file=sys.stderr)
    if short:
        print(f"labels: warning: stopped short of the end of {', '.join(short)} (no progress)", file=sys.stderr)
    return 0
