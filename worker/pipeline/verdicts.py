"""Turn a policy decision into the output contracts: ``Verdict`` and ``Violation``.

``verdict_id`` is deterministic: a hash of the input's kind, event id and judged text, the
context it was judged with (a conversation turn's earlier turns), the policy version and
the model id. Reprocessing the same input after a crash therefore
yields the same id, which is how consumers drop the duplicates at-least-once allows.

Verdicts are assembled, not validated: every value comes from a validated event, the
backend's parsed scores and the policy, so the builder fills the model's fields directly
(``_assemble``), which costs a fraction of ``model_construct`` on this per-message path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from schemas import BackendDetails, CategoryHit, ContentEvent, InputPosition, StageScore, Turn, Verdict, Violation
from worker.backends.base import Scored
from worker.pipeline.policy import Policy
from worker.pipeline.types import Job

_Model = TypeVar("_Model", bound=BaseModel)


def _assemble(model: type[_Model], values: dict[str, Any]) -> _Model:
    """An instance of ``model`` holding ``values`` unvalidated, as ``model_construct`` makes it.

    ``values`` must name every field of ``model`` (no defaults are filled in): what
    ``model_construct`` spends its time on (defaults, aliases, extras) is skipped.
    tests/test_verdicts.py checks the result equals a validated model.
    """
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__", set(values))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def verdict_id(
    kind: str, event_id: str, text: str, policy_version: str, model: str, context: Sequence[Turn] = ()
) -> str:
    """``context``: the turns the input was judged with; none leaves the id as it was without."""
    parts = [kind, event_id, text, policy_version, model]
    parts.extend(f"{turn.role}\x1e{turn.content}" for turn in context)
    digest = hashlib.sha256("\x1f".join(parts).encode())
    return digest.hexdigest()[:32]


class VerdictBuilder:
    """Builds verdicts for one worker: fixed policy, backend name and text inclusion."""

    def __init__(self, *, policy: Policy, backend_name: str, include_text: bool) -> None:
        self._policy = policy
        self._backend_name = backend_name
        self._include_text = include_text

    def scored(self, job: Job, result: Scored) -> Verdict:
        """The verdict for scores: ``action`` and ``violations`` come from the policy only."""
        event = job.event
        decision = self._policy.decide(result.scores, tenant=event.tenant, source=event.source)
        return self._verdict(
            job,
            action=decision.action,
            violations=decision.violations,
            scores=dict(result.scores),
            model=result.model,
            id_model=result.model,
            details=result.details,
            degraded_reason=result.degraded_reason,
            decided_by=result.decided_by,
            stages=[
                _assemble(
                    StageScore,
                    {"stage": s.stage, "backend": s.backend, "model": s.model, "scores": dict(s.scores)},
                )
                for s in result.stages
            ]
            or None,
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
        return _assemble(
            Verdict,
            {
                "verdict_id": verdict_id(
                    job.kind, event.id, job.text, self._policy.version, id_model, job.judged_context
                ),
                "event_id": event.id,
                "kind": job.kind,
                "conversation_id": conversation_id,
                "tenant": event.tenant,
                "source": event.source,
                "author_id": event.author_id,
                "action": action,
                "flagged": action != "allow",
                "violations": violations,
                "scores": scores,
                "model": model,
                "backend": self._backend_name,
                "backend_details": details,
                "policy_version": self._policy.version,
                "degraded": degraded_reason is not None,
                "degraded_reason": degraded_reason,
                "decided_by": decided_by,
                "stages": stages,
                "input": _assemble(
                    InputPosition, {"topic": record.topic, "partition": record.partition, "offset": record.offset}
                ),
                "decided_at": datetime.fromtimestamp(now_ms / 1000, UTC),
                "latency_ms": round(now_ms - record.timestamp, 3)
                if record.timestamp and record.timestamp > 0
                else None,
                "text": job.text if self._include_text else None,
                "metadata": event.metadata,
                "trimmed": False,
            },
        )

    @staticmethod
    def violation(verdict: Verdict) -> Violation | None:
        """The compact enforcement event, for flagged verdicts only."""
        if not verdict.flagged:
            return None
        return _assemble(
            Violation,
            {
                "verdict_id": verdict.verdict_id,
                "event_id": verdict.event_id,
                "kind": verdict.kind,
                "conversation_id": verdict.conversation_id,
                "tenant": verdict.tenant,
                "author_id": verdict.author_id,
                "action": verdict.action,
                "violations": verdict.violations,
                "decided_at": verdict.decided_at,
            },
        )
