"""What every remote-API backend does around its wire format: long inputs and bad inputs.

``RemoteBackend`` implements the ``Backend`` protocol on top of two per-API methods,
``_post_texts`` and ``_post_conversations`` (one HTTP request each, one ``dict`` of scores
per input, in order). Around them it:

- splits over-long texts and trims over-long conversations (``worker.backends.long_inputs``),
  sends the pieces, and merges each input's scores as the maximum per category across its
  pieces;
- bisects a batch the API refuses with 400/413/422 (``ApiRejected``): the halves are sent
  again until the refused input is alone, which becomes ``Rejected`` with the API's
  message; every other input is scored. A batch of n inputs with one bad input costs
  about ``2 * log2(n)`` extra requests;
- lets ``BackendAuthError`` and ``BackendUnavailable`` from ``RemoteApi`` through
  unchanged: the pipeline stops on the first and applies its fail policy on the second.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from schemas import Turn
from worker.backends.base import BackendUnavailable, Conversation, Outcome, Rejected, Scored
from worker.backends.http import ApiBackend, ApiRejected, RemoteApi
from worker.backends.long_inputs import split_text, trim_conversation

Piece = TypeVar("Piece")


class RemoteBackend(ApiBackend):
    """Base class of the HTTP backends; subclasses speak one API's wire format."""

    def __init__(
        self, api: RemoteApi, *, model: str, endpoint: str, max_input_tokens: int, overlap_tokens: int
    ) -> None:
        self.api = api
        self.model = model
        """The configured model (what requests ask for); ``Scored.model`` is what the API answered."""
        self.endpoint = endpoint
        self.max_input_tokens = max_input_tokens
        self.overlap_tokens = overlap_tokens

    @property
    def cache_namespace(self) -> str:
        """Scores are reusable only within the same backend, endpoint and configured model."""
        return f"{self.name}:{self.endpoint}:{self.model}"

    @abc.abstractmethod
    async def _post_texts(self, texts: list[str]) -> list[Scored]:
        """One request scoring ``texts``; one ``Scored`` per text, in order."""

    @abc.abstractmethod
    async def _post_conversations(self, conversations: list[list[Turn]]) -> list[Scored]:
        """One request scoring the last turn of each conversation; one ``Scored`` each, in order."""

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        pieces: list[str] = []
        owners: list[int] = []
        for index, text in enumerate(texts):
            for chunk in split_text(text, self.max_input_tokens, self.overlap_tokens):
                pieces.append(chunk)
                owners.append(index)
        outcomes = await self._bisecting(pieces, self._post_texts)
        return _merge(outcomes, owners, len(texts))

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        pieces: list[list[Turn]] = []
        owners: list[int] = []
        for index, conversation in enumerate(conversations):
            for trimmed in trim_conversation(conversation.messages(), self.max_input_tokens, self.overlap_tokens):
                pieces.append(trimmed)
                owners.append(index)
        outcomes = await self._bisecting(pieces, self._post_conversations)
        return _merge(outcomes, owners, len(conversations))

    async def _bisecting(
        self, pieces: list[Piece], post: Callable[[list[Piece]], Awaitable[list[Scored]]]
    ) -> list[Outcome]:
        if not pieces:
            return []
        try:
            scored = await post(pieces)
        except ApiRejected as rejected:
            if len(pieces) == 1:
                return [
                    Rejected(
                        reason=f"{self.api.dialect.name} API refused the input (HTTP {rejected.status}): {rejected.message}"
                    )
                ]
            middle = len(pieces) // 2
            return [*await self._bisecting(pieces[:middle], post), *await self._bisecting(pieces[middle:], post)]
        if len(scored) != len(pieces):
            raise BackendUnavailable(
                f"{self.api.dialect.name} API answered {len(scored)} results for {len(pieces)} inputs"
            )
        return list(scored)


def _merge(outcomes: list[Outcome], owners: list[int], count: int) -> list[Outcome]:
    """One outcome per input: the max per category across its pieces; any rejected piece rejects it."""
    merged: list[Outcome | None] = [None] * count
    for outcome, owner in zip(outcomes, owners, strict=True):
        current = merged[owner]
        if current is None or isinstance(outcome, Rejected):
            merged[owner] = outcome if not isinstance(current, Rejected) else current
        elif isinstance(current, Scored) and isinstance(outcome, Scored):
            scores = dict(current.scores)
            for category, value in outcome.scores.items():
                scores[category] = _highest(value, scores.get(category, value))
            merged[owner] = Scored(scores=scores, model=current.model)
    if any(outcome is None for outcome in merged):
        raise AssertionError("every input yields at least one piece")
    return [outcome for outcome in merged if outcome is not None]


def _highest(a: float, b: float) -> float:
    """The larger score; NaN (a broken score) when either is, whatever the order."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def score_value(value: Any) -> float:
    """An API's score as a float, NaN when it is not a number (``null``, a string, a boolean):
    never dropped, since an absent category can read as allow, while NaN makes the policy
    refuse the scores (dead-lettered as ``invalid_scores``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)
