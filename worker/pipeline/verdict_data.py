"""Verdicts and violations as the pipeline holds them: msgspec Structs, plain data.

``schemas`` stays the public contract (JSON Schema, AsyncAPI, docs): ``Verdict``,
``Violation``, ``CategoryHit``, ``InputPosition`` and ``StageScore`` here mirror its models
field for field (names, order; tests/pipeline/test_verdicts.py fails when they drift).
They exist because a verdict is built for every input: a Struct is built in C from its
values, where even an unvalidated pydantic model costs a dict, a set and four attribute
writes, and the nested hits and input position as many again.

Every value comes from a validated event, the backend's parsed scores and the policy, so
nothing is validated here. ``BackendDetails`` stays the contract's model (backends build
it, rarely). ``encode`` writes their bytes; ``to_contract`` gives the pydantic model of one
(tests, and the encoder's fallback), equal to the model pydantic validates from those bytes.

Structs are immutable: a trimmed verdict is a new one (``msgspec.structs.replace``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from pydantic import BaseModel

import schemas
from schemas import Action, BackendDetails, Kind


class CategoryHit(msgspec.Struct, frozen=True, gc=False):
    """``schemas.CategoryHit``: a category whose score reached the policy's threshold."""

    category: str
    score: float
    threshold: float
    action: Action


class InputPosition(msgspec.Struct, frozen=True, gc=False):
    """``schemas.InputPosition``: where the judged input was read."""

    topic: str
    partition: int
    offset: int


class StageScore(msgspec.Struct, frozen=True, gc=False):
    """``schemas.StageScore``: what one stage of a cascade gave the input."""

    stage: str
    backend: str
    model: str
    scores: dict[str, float]


class Verdict(msgspec.Struct, frozen=True, gc=False):
    """``schemas.Verdict``: the decision for one input. ``gc=False``: its fields hold plain
    values, Structs of this module and a ``BackendDetails``, never a cycle."""

    verdict_id: str
    event_id: str
    kind: Kind
    conversation_id: str | None
    tenant: str | None
    source: str | None
    author_id: str | None
    action: Action
    flagged: bool
    violations: list[CategoryHit]
    scores: dict[str, float]
    model: str | None
    backend: str
    backend_details: BackendDetails | None
    policy_version: str
    degraded: bool
    degraded_reason: str | None
    decided_by: str | None
    stages: list[StageScore] | None
    input: InputPosition
    decided_at: datetime
    latency_ms: float | None
    text: str | None
    metadata: dict[str, Any] | None
    supersedes: str | None
    reviewer_id: str | None
    trimmed: bool


class Violation(msgspec.Struct, frozen=True, gc=False):
    """``schemas.Violation``: the compact event an enforcement service needs."""

    verdict_id: str
    event_id: str
    kind: Kind
    conversation_id: str | None
    tenant: str | None
    author_id: str | None
    action: Action
    violations: list[CategoryHit]
    decided_at: datetime


def violation_of(verdict: Verdict) -> Violation:
    """The violation event of ``verdict`` (flagged or not: the caller decides)."""
    return Violation(
        verdict.verdict_id,
        verdict.event_id,
        verdict.kind,
        verdict.conversation_id,
        verdict.tenant,
        verdict.author_id,
        verdict.action,
        verdict.violations,
        verdict.decided_at,
    )


_CONTRACTS: dict[type[msgspec.Struct], type[BaseModel]] = {
    CategoryHit: schemas.CategoryHit,
    InputPosition: schemas.InputPosition,
    StageScore: schemas.StageScore,
    Verdict: schemas.Verdict,
    Violation: schemas.Violation,
}


def to_contract(value: Any) -> Any:
    """The contract's pydantic model of a Struct of this module (nested ones too), built
    unvalidated from its values, as ``model_construct`` would; anything else unchanged."""
    contract = _CONTRACTS.get(type(value))
    if contract is None:
        if isinstance(value, list):
            return [to_contract(item) for item in value]
        return value
    fields = {name: to_contract(getattr(value, name)) for name in value.__struct_fields__}
    model = contract.__new__(contract)
    object.__setattr__(model, "__dict__", fields)
    object.__setattr__(model, "__pydantic_fields_set__", set(fields))
    object.__setattr__(model, "__pydantic_extra__", None)
    object.__setattr__(model, "__pydantic_private__", None)
    return model
