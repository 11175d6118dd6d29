"""The message contracts of moderation-worker (pydantic models + exported JSON Schemas).

Installed alone from ``contracts/`` this package is ``moderation_contracts`` (pydantic is
its only dependency), so the imports here are relative.
"""

from .export import export_json_schemas, json_schemas
from .models import (
    ACTION_SEVERITY,
    CONTRACT_VERSION,
    OUTPUT_HEADERS,
    Action,
    BackendDetails,
    CategoryHit,
    ContentEvent,
    ConversationEvent,
    DeadLetterHeaders,
    InputPosition,
    Kind,
    OutputHeaders,
    ReviewDecision,
    ScoreKind,
    ShadowVerdict,
    StageScore,
    Turn,
    Verdict,
    Violation,
)
from .statements import StatementOfReasons

__all__ = [
    "ACTION_SEVERITY",
    "CONTRACT_VERSION",
    "OUTPUT_HEADERS",
    "Action",
    "BackendDetails",
    "CategoryHit",
    "ContentEvent",
    "ConversationEvent",
    "DeadLetterHeaders",
    "InputPosition",
    "Kind",
    "OutputHeaders",
    "ReviewDecision",
    "ScoreKind",
    "ShadowVerdict",
    "StageScore",
    "StatementOfReasons",
    "Turn",
    "Verdict",
    "Violation",
    "export_json_schemas",
    "json_schemas",
]
