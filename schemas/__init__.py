"""The message contracts of moderation-worker (pydantic models + exported JSON Schemas)."""

from schemas.export import export_json_schemas, json_schemas
from schemas.models import (
    ACTION_SEVERITY,
    CONTRACT_VERSION,
    Action,
    BackendDetails,
    CategoryHit,
    ContentEvent,
    ConversationEvent,
    DeadLetterHeaders,
    InputPosition,
    Kind,
    ScoreKind,
    ShadowVerdict,
    StageScore,
    Turn,
    Verdict,
    Violation,
)

__all__ = [
    "ACTION_SEVERITY",
    "CONTRACT_VERSION",
    "Action",
    "BackendDetails",
    "CategoryHit",
    "ContentEvent",
    "ConversationEvent",
    "DeadLetterHeaders",
    "InputPosition",
    "Kind",
    "ScoreKind",
    "ShadowVerdict",
    "StageScore",
    "Turn",
    "Verdict",
    "Violation",
    "export_json_schemas",
    "json_schemas",
]
