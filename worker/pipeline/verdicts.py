"""Turn a policy decision into the output contracts: ``Verdict`` and ``Violation``.

``verdict_id`` is deterministic: a hash of the input's kind, event id and judged text, the
context it was judged with (a conversation turn's earlier turns), the policy version and
the model id. Reprocessing the same input after a crash therefore
yields the same id, which is how consumers drop the duplicates at-least-once allows.

A human review decision gets a superseding verdict (``superseding``): its id hashes only the
decision's ``review_id`` (``human_verdict_id``), so a redelivered decision gives the same id.

Verdicts are plain data (``verdict_data``: msgspec Structs that mirror the contracts), not
validated: every value comes from a validated event, the backend's parsed scores and the
policy, so the builder fills the fields directly, which costs a fraction of even an
unvalidated pydantic model on this per-message path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from schemas import ACTION_SEVERITY, Action, BackendDetails, Turn
from worker.backends.base import Scored
from worker.pipeline.events import ContentEvent
from worker.pipeline.policy import Policy
from worker.pipeline.types import Job, Review
from worker.pipeline.verdict_data import CategoryHit, InputPosition, StageScore, Verdict, Violation, violation_of

HUMAN = "human"
"""``decided_by`` and ``backend`` of a verdict a reviewer decided."""


def verdict_id(
    kind: str, event_id: str, text: str, policy_version: str, model: str, context: Sequence[Turn] = ()
) -> str:
    """``context``: the turns the input was judged with; none leaves the id as it was without."""
    parts = [kind, event_id, text, policy_version, model]
    parts.extend(f"{turn.role}\x1e{turn.content}" for turn in context)
    digest = hashlib.sha256("\x1f".join(parts).encode())
    return digest.hexdigest()[:32]


def human_verdict_id(review_id: str) -> str:
    """The id of the verdict a review decision gives: the same for every delivery of it."""
    return hashlib.sha256(f"review\x1f{review_id}".encode()).hexdigest()[:32]


def unscored_action(fail_policy: str) -> Action:
    """The least action of a verdict some of whose categories went unscored: what the fail
    policy publishes when nothing could be scored (``allow`` under ``allow``), else
    ``review``: under ``wait`` and ``fallback`` nothing passes unmoderated, and the backend
    already spent its retries on the input."""
    return "allow" if fail_policy == "allow" else "review"


class VerdictBuilder:
    """Builds verdicts for one worker: fixed policy, backend name and text inclusion.

    ``unscored_action`` (``unscored_action(fail_policy)``): the least action of a verdict
    whose scores lack categories the backend could not score (``Scored.unscored``).
    """

    def __init__(
        self, *, policy: Policy, backend_name: str, include_text: bool, unscored_action: Action = "review"
    ) -> None:
        self._policy = policy
        self._backend_name = backend_name
        self._include_text = include_text
        self._unscored_action: Action = unscored_action

    def scored(self, job: Job, result: Scored) -> Verdict:
        """The verdict for scores: ``action`` and ``violations`` come from the policy only.

        With ``result.unscored`` the verdict is degraded, its reason naming those
        categories, and its action at least ``unscored_action`` (the policy's decision on
        the scores there are, when stricter): an unscored category never reads as allowed.
        """
        event = job.event
        decision = self._policy.decide(result.scores, tenant=event.tenant, source=event.source)
        action = decision.action
        degraded_reason = result.degraded_reason
        id_model = result.model
        if result.unscored:
            if ACTION_SEVERITY[self._unscored_action] > ACTION_SEVERITY[action]:
                action = self._unscored_action
            names = ", ".join(result.unscored)
            reason = f"no score for {names}: the backend left them out of every try"
            degraded_reason = reason if degraded_reason is None else f"{degraded_reason}; {reason}"
            id_model = f"{result.model}|unscored:{names}"  # a later complete verdict is no duplicate
        return self._verdict(
            job,
            action=action,
            violations=decision.violations,
            scores=dict(result.scores),
            model=result.model,
            id_model=id_model,
            details=result.details,
            degraded_reason=degraded_reason,
            decided_by=result.decided_by,
            stages=[StageScore(s.stage, s.backend, s.model, dict(s.scores)) for s in result.stages] or None,
        )

    def degraded(self, job: Job, *, action: str, reason: str) -> Verdict:
        """A verdict without scores, decided by the fail policy (``review`` or ``allow``)."""
        return self._verdict(
            job,
            action=action,
            violations=[],
            scores={},
            model=None,
            id_model=f"degraded:{action}",
            degraded_reason=reason,
        )

    def _verdict(
        self,
        job: Job,
        *,
        action: str,
        violations: list[CategoryHit],
        scores: dict[str, float],
        model: str | None,
        id_model: str,
        degraded_reason: str | None = None,
        details: BackendDetails | None = None,
        decided_by: str | None = None,
        stages: list[StageScore] | None = None,
    ) -> Verdict:
        event = job.event
        record = job.record
        now_ms = time.time() * 1000
        conversation_id = None if isinstance(event, ContentEvent) else event.conversation_id
        return Verdict(
            verdict_id=verdict_id(job.kind, event.id, job.text, self._policy.version, id_model, job.judged_context),
            event_id=event.id,
            kind=job.kind,
            conversation_id=conversation_id,
            tenant=event.tenant,
            source=event.source,
            author_id=event.author_id,
            action=action,  # type: ignore[arg-type]  # the policy's or the fail policy's: an Action
            flagged=action != "allow",
            violations=violations,
            scores=scores,
            model=model,
            backend=self._backend_name,
            backend_details=details,
            policy_version=self._policy.version,
            degraded=degraded_reason is not None,
            degraded_reason=degraded_reason,
            decided_by=decided_by,
            stages=stages,
            input=InputPosition(record.topic, record.partition, record.offset),
            decided_at=datetime.fromtimestamp(now_ms / 1000, UTC),
            latency_ms=round(now_ms - record.timestamp, 3) if record.timestamp and record.timestamp > 0 else None,
            text=job.text if self._include_text else None,
            metadata=event.metadata,
            supersedes=None,
            reviewer_id=None,
            trimmed=False,
        )

    def superseding(self, review: Review, categories: Sequence[str], machine_scores: Mapping[str, float]) -> Verdict:
        """The verdict a reviewer's decision gives, replacing the one it names (``supersedes``).

        ``categories``: the decision's categories, canonical. Each is a violation with the
        reviewer's action; its score is the machine's (``machine_scores``: the machine
        verdict's violations, category -> score, when remembered) where the machine found
        it too, else 1.0 (a person found it); its threshold is the current policy's for the
        decision's tenant and source. ``scores`` is empty: a person gives none.
        """
        decision = review.decision
        record = review.record
        action = decision.action
        violations = sorted(
            (
                CategoryHit(
                    name,
                    machine_scores.get(name, 1.0),
                    self._policy.threshold(name, tenant=decision.tenant, source=decision.source),
                    action,
                )
                for name in dict.fromkeys(categories)
            ),
            key=lambda hit: (-hit.score, hit.category),
        )
        now_ms = time.time() * 1000
        return Verdict(
            verdict_id=human_verdict_id(decision.review_id),
            event_id=decision.event_id,
            kind=decision.kind,
            conversation_id=decision.conversation_id,
            tenant=decision.tenant,
            source=decision.source,
            author_id=decision.author_id,
            action=action,
            flagged=action != "allow",
            violations=violations,
            scores={},
            model=None,
            backend=HUMAN,
            backend_details=None,
            policy_version=self._policy.version,
            degraded=False,
            degraded_reason=None,
            decided_by=HUMAN,
            stages=None,
            input=InputPosition(record.topic, record.partition, record.offset),
            decided_at=decision.decided_at,
            latency_ms=round(now_ms - record.timestamp, 3) if record.timestamp and record.timestamp > 0 else None,
            text=None,
            metadata=None,
            supersedes=decision.verdict_id,
            reviewer_id=decision.reviewer_id,
            trimmed=False,
        )

    @staticmethod
    def violation(verdict: Verdict) -> Violation | None:
        """The compact enforcement event, for flagged verdicts only."""
        if not verdict.flagged:
            return None
        return violation_of(verdict)
