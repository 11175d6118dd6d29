"""The backend protocol: what every moderation backend (remote API or local model) offers.

A backend turns a batch of inputs into per-input category scores. It knows nothing about
Kafka, offsets or policy: the pipeline hands it texts or conversations and gets back, for
each input in the same order, either ``Scored`` or ``Rejected``.

Contract for implementations:

- ``score_texts`` / ``score_conversations`` return exactly one outcome per input, in input
  order. They never return fewer.
- ``Scored.scores`` is the backend's raw open map of category -> score in [0, 1], exactly
  as the model gave it (no renaming: the policy owns aliases). ``Scored.model`` is the model
  id the backend reports (for remote APIs: the id in the response, not the configured one).
- Composite backends (``worker.backends.cascade``) say which stage decided
  (``Scored.decided_by``) and keep every stage's scores (``Scored.stages``); a plain
  backend leaves both empty.
- ``Unavailable`` marks one input a composite could not have scored now while the rest of
  the batch was (e.g. the cascade's second stage is down for the escalated inputs): the
  pipeline's fail policy applies to those inputs only. A plain backend never returns it; it
  raises ``BackendUnavailable`` for the whole batch.
- ``Rejected`` marks an input the backend refuses for a reason that retrying cannot fix
  (e.g. a 400 on that input alone); the pipeline dead-letters it with ``reason``.
- Transient trouble is retried inside the backend. When the backend gives up it raises
  ``BackendUnavailable``; the pipeline's fail policy decides what happens then.
- ``BackendAuthError`` (bad or missing credentials) is fatal: the worker stops with the
  message, which must say what to fix and must never contain the secret itself.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import msgspec

from schemas import BackendDetails, Turn


class StageScores(msgspec.Struct, frozen=True):
    """What one stage of a composite backend gave an input: ``stage`` is its role
    (``first``, ``then``), ``backend`` its name."""

    stage: str
    backend: str
    model: str
    scores: dict[str, float]


class Scored(msgspec.Struct, frozen=True):
    """Raw scores for one input.

    ``decided_by``: the backend whose scores these are, when it is not the configured one
    (a cascade stage, or the fallback backend). ``stages``: every stage's scores, when a
    composite backend ran several. ``degraded_reason``: set when these scores came from a
    stand-in (the fallback backend) because the configured backend was down.
    ``unscored``: categories the backend was asked about and could not score (a judge that
    left them out of every try); ``scores`` lacks them, and the verdict is degraded
    (``worker.pipeline.verdicts``), never an allow by their absence.
    """

    scores: dict[str, float]
    model: str
    details: BackendDetails | None = None
    decided_by: str | None = None
    stages: tuple[StageScores, ...] = ()
    degraded_reason: str | None = None
    unscored: tuple[str, ...] = ()


class Unavailable(msgspec.Struct, frozen=True):
    """This input could not be scored now (the rest of its batch was); the fail policy
    applies to it. Only composite backends return it (see the module docstring).

    ``source``: the stage that could not answer (its backend name); the pipeline takes
    only that stage's answers to other inputs as evidence that this input is the trouble.
    ``refused``: that stage's open circuit refused the call, so nothing was tested.
    """

    reason: str
    retry_in_s: float | None = None
    source: str | None = None
    refused: bool = False


class Rejected(msgspec.Struct, frozen=True):
    """The backend refused this input for good; it goes to the dead-letter topic."""

    reason: str
    error_type: str = "backend_rejected"


Outcome = Scored | Rejected | Unavailable


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation to judge: ``context`` (oldest first) then the judged ``turn`` last."""

    turn: Turn
    context: tuple[Turn, ...] = field(default=())

    def messages(self) -> list[Turn]:
        """All turns in wire order: the context, then the judged turn last."""
        return [*self.context, self.turn]


class BackendError(Exception):
    """Base class of backend failures. Messages never contain secrets."""


class BackendAuthError(BackendError):
    """Credentials missing or refused (HTTP 401/403). Fatal: the worker stops."""


class BackendStartError(BackendError):
    """The backend cannot start (a model missing, broken or too big for the device).
    Fatal at start-up: the worker stops with the message, which says what to change."""


class BackendUnavailable(BackendError):
    """The backend could not answer within its retry budget; the fail policy applies.

    ``retry_in_s``, when set, is the earliest time a new call can succeed (e.g. an open
    circuit's next probe); callers that wait should not retry sooner.
    """

    retry_in_s: float | None = None


class Backend(abc.ABC):
    """One moderation backend. Create, ``await start()``, score, ``await close()``."""

    name: ClassVar[str]
    """Short name recorded on every verdict (``mistral``, ``openai``, ``local`` ...)."""

    async def start(self) -> None:
        """Open connections / load and warm up the model. Called once before any scoring."""

    async def close(self) -> None:
        """Release connections and memory. Safe to call twice."""

    async def ready(self) -> bool:
        """True when the backend can take work (for the readiness probe)."""
        return True

    def stage(self, name: str) -> Backend | None:
        """The stage of a composite backend that ``Unavailable.source`` names ``name``, for
        the scorer to probe it directly; ``None`` when there is no such stage (the default)."""
        return None

    @abc.abstractmethod
    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        """Score each text independently; one outcome per text, in order."""

    @abc.abstractmethod
    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        """Score the last turn of each conversation in its context; one outcome each, in order."""
