"""Message contracts: the product's public API.

Every model here is published as a JSON Schema under ``schemas/json/`` (see
``modworker schemas export``) and in the AsyncAPI document ``schemas/asyncapi.yaml``;
a test fails when the checked-in files drift from these models.

Compatibility rule: within one ``CONTRACT_VERSION`` (a major version) changes are
additive only: a new optional field, a new enum value documented as such, never a removed,
renamed or retyped field. Readers ignore fields they do not know, so every model here
does (``extra="ignore"``), inputs and outputs alike, and the published JSON Schemas allow
additional properties. A breaking change is a new ``CONTRACT_VERSION``, announced in the
``modworker-contract`` header of every output record (``OUTPUT_HEADERS``).

The worker's own outputs are held to the exact fields declared here by its tests
(``schemas.export.strict_json_schema``), not by these models.

Importable as ``schemas`` inside the worker and, installed alone (``contracts/``, needs
only pydantic), as ``moderation_contracts``: the modules import each other relatively.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CONTRACT_VERSION = "2"
"""The major version of the output contract, in the ``modworker-contract`` header of every
verdict, violation and shadow verdict. 2: ``Verdict.backend_details``, ``decided_by``,
``stages`` and ``trimmed`` (all optional), ``ShadowVerdict``."""


class OutputHeaders:
    """Header names on verdict, violation and shadow-verdict records. Values are UTF-8."""

    CONTENT_TYPE = "content-type"
    """``application/json``: the value is one UTF-8 JSON object."""
    CONTRACT = "modworker-contract"
    """``CONTRACT_VERSION``: the major version the value follows. A consumer that knows
    version N reads every record marked N, ignoring fields it does not know."""


OUTPUT_HEADERS: list[tuple[str, bytes]] = [
    (OutputHeaders.CONTENT_TYPE, b"application/json"),
    (OutputHeaders.CONTRACT, CONTRACT_VERSION.encode()),
]
"""The headers of every verdict, violation and shadow verdict: one shared list, never
mutated (the producer only reads it), so they cost no allocation per record."""

Action = Literal["allow", "flag", "review", "block"]
"""What downstream should do, in increasing severity: ``allow < flag < review < block``."""

ACTION_SEVERITY: dict[str, int] = {"allow": 0, "flag": 1, "review": 2, "block": 3}

Kind = Literal["content", "conversation"]
Role = Literal["user", "assistant"]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain non-whitespace text")
    return value


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ContentEvent(_Input):
    """A piece of user-generated content (topic ``ugc.content``, key = ``id``)."""

    id: str = Field(min_length=1, description="Unique id of the content item; also the Kafka key.")
    text: str = Field(description="The text to moderate. Must not be blank.")
    tenant: str | None = Field(default=None, description="Platform tenant; selects policy overrides.")
    source: str | None = Field(
        default=None, description="Where the content came from (e.g. 'comments'); selects policy overrides."
    )
    author_id: str | None = None
    created_at: datetime | None = Field(default=None, description="When the user wrote it (ISO 8601).")
    metadata: dict[str, Any] | None = Field(default=None, description="Passed through to the verdict untouched.")

    _text_not_blank = field_validator("text")(_not_blank)


class Turn(_Input):
    """One earlier turn of a conversation, given as context."""

    role: Role
    content: str


class ConversationEvent(_Input):
    """One conversation turn to judge (topic ``ugc.conversations``, key = ``conversation_id``).

    ``content`` is the turn being judged; ``context`` holds earlier turns, oldest first, and
    only informs the judgement (Mistral's chat moderation classifies the last turn).
    """

    id: str = Field(min_length=1, description="The turn's id.")
    conversation_id: str = Field(min_length=1, description="The conversation's id; also the Kafka key.")
    role: Role
    content: str = Field(description="The turn's text. Must not be blank.")
    context: list[Turn] = Field(default_factory=list, description="Earlier turns, oldest first.")
    tenant: str | None = None
    source: str | None = None
    author_id: str | None = None
    created_at: datetime | None = None
    metadata: dict[str, Any] | None = None

    _content_not_blank = field_validator("content")(_not_blank)


class _Output(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputPosition(_Output):
    """Where the judged input was read: replaying from here reproduces the verdict."""

    topic: str
    partition: int
    offset: int


class CategoryHit(_Output):
    """A category whose score reached the policy's threshold."""

    category: str = Field(description="Canonical category name, after policy aliases.")
    score: float
    threshold: float
    action: Action


ScoreKind = Literal["probability", "label"]


class BackendDetails(_Output):
    """How the backend produced the scores, when it says more than the scores themselves."""

    score_kind: ScoreKind = Field(
        default="probability",
        description="probability: scores are probabilities; label: the model gave labels only, turned into "
        "1.0 (unsafe), 0.5 (controversial) or 0.0, so a threshold between them changes nothing.",
    )
    prompt_tokens: int | None = Field(
        default=None, description="Input tokens the model server counted for this input (its usage), all tries."
    )
    completion_tokens: int | None = Field(
        default=None, description="Answer tokens the model server counted for this input (its usage), all tries."
    )
    requests: int | None = Field(
        default=None,
        description="Chat completions sent for this input, all tries (llm backend: one per policy category for "
        "the guards that take one category a request).",
    )
    cached: bool = Field(
        default=False, description="True when the scores came from the dedup cache: the tokens were spent earlier."
    )


class StageScore(_Output):
    """What one stage of a cascade gave the input."""

    stage: Literal["first", "then"] = Field(description="first: scores every input; then: the escalated ones.")
    backend: str
    model: str
    scores: dict[str, float] = Field(description="Raw scores as that stage's backend gave them.")


class Verdict(_Output):
    """The decision for one input (topic ``moderation.verdicts``, key = the input's key).

    ``verdict_id`` is deterministic: the same input, policy version and model give the
    same id, so consumers can drop the duplicates that at-least-once delivery allows.
    ``violations`` and ``action`` always come from the policy applied to ``scores``, never
    from a backend's own booleans.
    """

    verdict_id: str
    event_id: str
    kind: Kind
    conversation_id: str | None = None
    tenant: str | None = None
    source: str | None = None
    author_id: str | None = None
    action: Action
    flagged: bool = Field(description="True when action is not 'allow'.")
    violations: list[CategoryHit] = Field(default_factory=list)
    scores: dict[str, float] = Field(
        default_factory=dict, description="Raw scores as the backend gave them (open map)."
    )
    model: str | None = Field(default=None, description="Model id the backend reported; None when degraded.")
    backend: str
    backend_details: BackendDetails | None = Field(
        default=None, description="Score kind and token usage, from backends that report them (llm)."
    )
    policy_version: str
    degraded: bool = False
    degraded_reason: str | None = None
    decided_by: str | None = Field(
        default=None,
        description="Backend whose scores decided, when not 'backend' itself: the deciding cascade stage, "
        "or the fallback backend (then degraded is true).",
    )
    stages: list[StageScore] | None = Field(
        default=None, description="Cascade only: each stage's scores (the second's only where it ran)."
    )
    input: InputPosition
    decided_at: datetime
    latency_ms: float | None = Field(default=None, description="From the event's Kafka timestamp to the decision.")
    text: str | None = Field(default=None, description="The judged text, only when MODWORKER_INCLUDE_TEXT is true.")
    metadata: dict[str, Any] | None = None
    supersedes: str | None = Field(
        default=None,
        description="The verdict_id this verdict replaces (a human review decision's verdict); "
        "consumers keep the newest verdict per event_id.",
    )
    reviewer_id: str | None = Field(default=None, description="The reviewer, when decided_by is 'human'.")
    trimmed: bool = Field(
        default=False,
        description="True when metadata and text were left out (null) to keep the record under the output size "
        "limit (MODWORKER_MAX_OUTPUT_BYTES).",
    )


class Violation(_Output):
    """The compact event an enforcement service needs (topic ``moderation.violations``).

    Published only for flagged inputs, keyed like the input, after the verdict.
    """

    verdict_id: str
    event_id: str
    kind: Kind
    conversation_id: str | None = None
    tenant: str | None = None
    author_id: str | None = None
    action: Action
    violations: list[CategoryHit]
    decided_at: datetime


class ShadowVerdict(_Output):
    """A candidate's decision beside the live one (topic ``moderation.shadow-verdicts``,
    key = the input's key). Written for a sample of inputs; never acted on."""

    event_id: str
    kind: Kind
    live_verdict_id: str
    live_action: Action
    live_violations: list[str] = Field(description="Categories the live verdict found.")
    live_backend: str
    live_policy_version: str
    action: Action = Field(description="The shadow's action.")
    violations: list[CategoryHit] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict, description="Raw scores the shadow decided on.")
    model: str | None = None
    backend: str = Field(description="Shadow backend, or the live one when only the policy is shadowed.")
    policy_version: str = Field(description="The shadow policy's version.")
    agree: bool = Field(description="True when the shadow's action equals the live action.")
    decided_at: datetime


class ReviewDecision(_Input):
    """A human reviewer's decision on one machine verdict (topic ``moderation.reviews``,
    key = the verdict's key: the content id or the conversation id).

    The worker answers each decision with a superseding ``Verdict`` (``supersedes`` =
    ``verdict_id``, ``decided_by`` = ``human``), a ``Violation`` when ``action`` restricts,
    and an updated statement of reasons when DSA statements are on. ``review_id`` is the
    decision's own unique id: a second decision with the same id is a duplicate.
    """

    review_id: str = Field(min_length=1, description="Unique id of this decision; a repeat is a duplicate.")
    verdict_id: str = Field(min_length=1, description="The machine verdict decided on.")
    event_id: str = Field(min_length=1, description="The input the verdict judged.")
    kind: Kind = "content"
    conversation_id: str | None = Field(default=None, description="For conversation turns: the conversation's id.")
    tenant: str | None = None
    source: str | None = None
    author_id: str | None = None
    reviewer_id: str = Field(min_length=1)
    action: Action = Field(description="The action the reviewer decided.")
    categories: list[str] = Field(
        default_factory=list,
        description="The categories the reviewer found violated (canonical names); empty for allow.",
    )
    reason: str | None = Field(default=None, description="The reviewer's reason, for the record.")
    decided_at: datetime
    content_created_at: datetime | None = Field(
        default=None,
        description="When the user posted the content: the statement of reasons' content_date (DSA on); unset: "
        "the machine verdict's input's, when the worker still remembers it, else the decision's day.",
    )


class DeadLetterHeaders:
    """Header names on dead-letter records (topic ``moderation.dead-letter``).

    The record's key and value are the original bytes, unchanged, and the original
    headers are kept, so a replay is a copy back to ``origin-topic``. Values are UTF-8.
    """

    STAGE = "x-modworker-dlq-stage"
    """Pipeline stage that rejected the input: ``decode``, ``backend``, ``output``, ``statement``
    (its verdict was published; its statement of reasons was not valid), ``review`` (a
    review decision the worker refused; no verdict was published for it) or ``submit``
    (``modworker dsa submit``: a statement of reasons the DSA Transparency Database refused)."""
    ERROR_TYPE = "x-modworker-dlq-error-type"
    """Machine-readable reason: ``not_utf8``, ``not_json``, ``schema``, ``empty_text``,
    ``too_long``, ``backend_rejected``, ``invalid_scores``, ``llm_unparseable``, ``backend_failed`` (the input
    failed alone repeatedly while the backend answered others), ``output_too_large``
    (its verdict could not be made to fit the output size limit), ``invalid_statement`` (the
    statement of reasons of its restricting verdict failed the DSA schema; the message says why).
    Review decisions (topic ``moderation.reviews``, stage ``review``): ``unknown_category`` (a
    category the policy does not name), ``invalid_review`` (``allow`` with categories, or
    another action without any), ``duplicate_review`` (a ``review_id`` this worker applied
    recently from another position of the topic; best-effort: its memory is bounded and per
    process) and ``unknown_verdict`` (the worker built a verdict of the decision's event and
    remembers none of that event with its ``verdict_id``; a decision for an event it built no
    verdict of, or no longer remembers, is applied).
    Statements of reasons (stage ``submit``): ``submission_refused`` (the database refused its
    fields; the message is the API's, ``field: message``) and ``not_json``."""
    MESSAGE = "x-modworker-dlq-message"
    """Human-readable reason (truncated to 1,000 characters)."""
    ORIGIN_TOPIC = "x-modworker-dlq-origin-topic"
    ORIGIN_PARTITION = "x-modworker-dlq-origin-partition"
    ORIGIN_OFFSET = "x-modworker-dlq-origin-offset"
    TRUNCATED = "x-modworker-dlq-truncated"
    """Present only when the record would have exceeded the output size limit: what was
    cut, ``value`` (the value is a prefix of the original) or ``value,headers`` (the
    original headers were dropped too). Such a record cannot be replayed as is."""
    ORIGINAL_SIZE = "x-modworker-dlq-original-size"
    """With ``TRUNCATED``: the original value's size in bytes."""

    ALL = (STAGE, ERROR_TYPE, MESSAGE, ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_OFFSET, TRUNCATED, ORIGINAL_SIZE)


from .statements import StatementOfReasons  # noqa: E402  (its own module: the DSA API's schema)

EXPORTED_MODELS: dict[str, type[BaseModel]] = {
    "content_event": ContentEvent,
    "conversation_event": ConversationEvent,
    "verdict": Verdict,
    "violation": Violation,
    "shadow_verdict": ShadowVerdict,
    "statement_of_reasons": StatementOfReasons,
    "review_decision": ReviewDecision,
}
