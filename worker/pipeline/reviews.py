"""Reviews stage: a human review decision becomes a verdict superseding the machine's.

``MODWORKER_REVIEWS__ENABLED`` subscribes the worker (same consumer group) to
``MODWORKER_REVIEWS__TOPIC``. A record there decodes to a ``Review`` (``decode``); it skips
batching and the backend: ``ReviewStage.judge`` turns it at once, in input order, into a
``Superseding`` (the verdict ``outputs.supersede`` publishes with its violation and, DSA on,
its statement of reasons, in one acknowledged group that finishes the review's offset) or a
``ReviewRefused`` (dead-lettered, stage ``review``).

What the stage remembers, per process and bounded (LRU), never restored after a restart:

- ``RecentVerdicts``: per (kind, event id), the verdicts this process published for it
  (machine ones as they are built, ``remember``; superseding ones as they are judged), each
  with its action, its violations' scores and the input's dates. It tells a decision the
  machine's action and scores, for the agreement metrics, the violations' scores and
  whether a statement confirms the machine. A decision on a verdict not remembered leaves
  that verdict's id (only), so a later decision naming it is not refused.
- ``SeenReviews``: each applied ``review_id`` with the position it was read at.

Refusals (``ReviewRefused.error_type``), checked in this order:

- ``unknown_category``: a category the policy does not name (aliases are accepted and
  resolved to their canonical name);
- ``invalid_review``: ``allow`` with categories, or another action without any;
- ``duplicate_review``: a ``review_id`` already applied from another position (a
  redelivery of the same record, after a rebalance or a restart, is applied again and gives
  the same verdict id). Best-effort: a repeat read after the id left the bound, or by
  another replica, or after a restart, is applied again (consumers keep one verdict per id);
- ``unknown_verdict``: this process built a machine verdict of the decision's (kind, event
  id) and remembers it, and no verdict it remembers of that event (machine, superseding, or
  named by an earlier decision) has its ``verdict_id``. When it built none (another replica
  judged the event, the worker restarted since, or the event left the bound) it cannot
  tell, and the decision is applied as it stands.

Order: the superseding verdict goes to the verdict topic under the review record's key,
which is the machine verdict's key, so it lands on the machine verdict's partition after
it (a reviewer decides on a published verdict). A replay can publish the machine verdict
again after it: ``supersedes`` tells consumers which one stands.

Metrics, once the group is acknowledged (``count``):
``moderation_worker_review_decisions_total{machine_action, human_action}`` (machine action
``unknown`` when the machine verdict is not remembered) and
``moderation_worker_review_categories_total{category, outcome}``, outcome ``confirmed``
(both found it), ``added`` (the reviewer only) or ``removed`` (the machine only); not
counted when the machine verdict is not remembered.

Contract: ``judge`` and ``remember`` never raise for any input.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime

from worker.ops import metrics
from worker.pipeline.policy import Policy
from worker.pipeline.types import Job, Review
from worker.pipeline.verdict_data import Verdict
from worker.pipeline.verdicts import VerdictBuilder

_PER_EVENT = 8
"""Verdicts remembered per event at most (re-judged under new policies, reviewed again)."""


@dataclass(frozen=True, slots=True, eq=False)
class RememberedVerdict:
    """What the stage keeps of a published verdict: no text, no raw scores."""

    verdict_id: str
    action: str | None
    """None: only the id is known (a verdict a decision superseded that was not remembered)."""
    hits: tuple[tuple[str, float], ...]
    """Its violations: (category, score)."""
    created_at: datetime | None
    """The event's ``created_at``."""
    timestamp_ms: int | None
    """The input record's timestamp."""
    machine: RememberedVerdict | None = None
    """A superseding verdict's: the machine verdict behind the one it replaced, if remembered."""
    built: bool = False
    """A machine verdict this process built (``ReviewStage.remember``); False for superseding
    verdicts and for ids only named by a decision."""

    @property
    def content_date(self) -> date | None:
        """When the content was posted, as far as its input tells."""
        created = self.created_at
        if created is not None:
            return (created.astimezone(UTC) if created.tzinfo is not None else created).date()
        if self.timestamp_ms is not None and self.timestamp_ms > 0:
            return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).date()
        return None


class RecentVerdicts:
    """Per (kind, event id), the last verdicts published for it; at most ``max_events`` events.

    Per event at most ``_PER_EVENT`` machine verdicts this process built and as many others
    (superseding verdicts, ids named by decisions), each kind bounded apart: reviews of one
    event never push its machine verdicts out."""

    def __init__(self, max_events: int) -> None:
        self._max = max_events
        self._events: OrderedDict[tuple[str, str], list[RememberedVerdict]] = OrderedDict()

    def remember(self, kind: str, event_id: str, verdict: RememberedVerdict) -> None:
        key = (kind, event_id)
        known = self._events.get(key)
        if known is None:
            self._events[key] = [verdict]
            if len(self._events) > self._max:
                self._events.popitem(last=False)
            return
        self._events.move_to_end(key)
        known[:] = [v for v in known if v.verdict_id != verdict.verdict_id]
        known.append(verdict)
        same = [v for v in known if v.built == verdict.built]
        if len(same) > _PER_EVENT:
            known.remove(same[0])

    def of(self, kind: str, event_id: str) -> list[RememberedVerdict] | None:
        """The remembered verdicts of the event, oldest first; None when it is not remembered."""
        return self._events.get((kind, event_id))

    def __len__(self) -> int:
        return len(self._events)


class SeenReviews:
    """Applied review ids with the position each was read at; at most ``max_reviews``."""

    def __init__(self, max_reviews: int) -> None:
        self._max = max_reviews
        self._seen: OrderedDict[str, tuple[str, int, int]] = OrderedDict()

    def first_seen(self, review_id: str) -> tuple[str, int, int] | None:
        return self._seen.get(review_id)

    def add(self, review_id: str, position: tuple[str, int, int]) -> None:
        self._seen[review_id] = position
        self._seen.move_to_end(review_id)
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Superseding:
    """An applied decision: the verdict to publish and what the statement and metrics need."""

    verdict: Verdict
    machine: RememberedVerdict | None
    """The machine verdict the decision is compared with, when remembered."""
    content_date: date
    """When the content was posted (the statement's ``content_date``)."""

    @property
    def confirmed(self) -> bool:
        """The reviewer kept the machine verdict's action."""
        return self.machine is not None and self.machine.action == self.verdict.action


@dataclass(frozen=True, slots=True)
class ReviewRefused:
    """Why a decision is dead-lettered (stage ``review``)."""

    error_type: str
    message: str


class ReviewStage:
    """Judges review decisions for one worker: a fixed policy, bounded memories."""

    def __init__(self, *, policy: Policy, verdicts: VerdictBuilder, recent_events: int, recent_reviews: int) -> None:
        self._policy = policy
        self._verdicts = verdicts
        self._known = frozenset(policy.category_descriptions())
        self.recent = RecentVerdicts(recent_events)
        self.seen = SeenReviews(recent_reviews)

    def remember(self, job: Job, verdict: Verdict) -> None:
        """Keep what a decision on ``verdict`` needs (the outputs' ``on_verdict``). O(1)."""
        record = job.record
        self.recent.remember(
            verdict.kind,
            verdict.event_id,
            RememberedVerdict(
                verdict.verdict_id,
                verdict.action,
                tuple((hit.category, hit.score) for hit in verdict.violations),
                job.event.created_at,
                record.timestamp,
                built=True,
            ),
        )

    def judge(self, review: Review) -> Superseding | ReviewRefused:
        """The superseding verdict of ``review``, or why it is refused (module docstring)."""
        decision = review.decision
        categories = [self._policy.canonical(name) for name in decision.categories]
        unknown = [name for name in dict.fromkeys(categories) if name not in self._known]
        if unknown:
            return ReviewRefused(
                "unknown_category",
                f"categories {', '.join(repr(n) for n in unknown)} are not in the policy (version "
                f"{self._policy.version}); known: {', '.join(sorted(self._known))}",
            )
        if decision.action == "allow" and categories:
            return ReviewRefused("invalid_review", "action allow names categories: an allow names none")
        if decision.action != "allow" and not categories:
            return ReviewRefused("invalid_review", f"action {decision.action} names no category: name at least one")
        record = review.record
        position = (record.topic, record.partition, record.offset)
        first = self.seen.first_seen(decision.review_id)
        if first is not None and first != position:
            return ReviewRefused(
                "duplicate_review",
                f"review_id {decision.review_id!r} was applied already, from {first[0]}-{first[1]} offset {first[2]}",
            )
        known = self.recent.of(decision.kind, decision.event_id) or []
        superseded = next((v for v in known if v.verdict_id == decision.verdict_id), None)
        if superseded is None and any(v.built for v in known):
            return ReviewRefused(
                "unknown_verdict",
                f"{decision.kind} {decision.event_id!r} has no verdict {decision.verdict_id!r}; its recent "
                f"verdicts: {', '.join(v.verdict_id for v in known)}",
            )
        machine = superseded.machine if superseded is not None and superseded.machine is not None else superseded
        if machine is not None and machine.action is None:
            machine = None
        verdict = self._verdicts.superseding(review, categories, dict(machine.hits) if machine is not None else {})
        self.seen.add(decision.review_id, position)
        remembered_date = superseded.content_date if superseded is not None else None
        if superseded is None:  # its id only, so that a later decision naming it is not refused
            self.recent.remember(
                decision.kind, decision.event_id, RememberedVerdict(decision.verdict_id, None, (), None, None)
            )
        self.recent.remember(
            decision.kind,
            decision.event_id,
            RememberedVerdict(
                verdict.verdict_id,
                verdict.action,
                tuple((hit.category, hit.score) for hit in verdict.violations),
                superseded.created_at if superseded is not None else decision.content_created_at,
                superseded.timestamp_ms if superseded is not None else None,
                machine=machine,
            ),
        )
        created = decision.content_created_at
        content_date = (
            (created.astimezone(UTC) if created.tzinfo is not None else created).date()
            if created is not None
            else remembered_date or decision.decided_at.astimezone(UTC).date()
        )
        return Superseding(verdict, machine, content_date)

    @staticmethod
    def count(outcome: Superseding) -> None:
        """Count the decision's agreement with the machine (once its outputs are acknowledged)."""
        verdict = outcome.verdict
        machine = outcome.machine
        metrics.review_decisions((machine.action if machine is not None else None) or "unknown", verdict.action).inc()
        if machine is None:
            return
        human = {hit.category for hit in verdict.violations}
        found = {category for category, _ in machine.hits}
        for category in human | found:
            outcome_label = (
                "confirmed" if category in human and category in found else "added" if category in human else "removed"
            )
            metrics.review_categories(category, outcome_label).inc()
