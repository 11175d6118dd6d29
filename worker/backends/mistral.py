"""Mistral's moderation and classifier APIs (``MODWORKER_BACKEND=mistral``).

Endpoints, by ``mistral.endpoint``:

- ``moderation`` (default): text batches to ``POST /v1/moderations`` (``input``: a list of
  strings); conversation batches to ``POST /v1/chat/moderations`` (``input``: a list of
  conversations, each a list of ``{role, content}`` messages with the judged turn last).
  ``results[i].category_scores`` is taken as it is, an open map (9 categories for
  ``mistral-moderation-2411``, 11 for ``-2603``); the API's ``categories`` booleans are
  ignored: the policy decides.
- ``classifier``: the same batches to ``POST /v1/classifications`` and
  ``POST /v1/chat/classifications`` (``input``: a list of ``{"messages": [...]}``), for a
  fine-tuned classifier named by ``mistral.model``. Each ``results[i][target].scores[label]``
  becomes category ``target/label`` (e.g. ``moderation/toxicity``).

``Scored.model`` is the ``model`` of the response, not the configured alias. Retries,
limits, the breaker, long inputs and bisection on 400: ``worker.backends.http`` and
``worker.backends.remote``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from schemas import Turn
from worker.backends.base import BackendUnavailable, Scored
from worker.backends.http import ApiDialect, RemoteApi
from worker.backends.long_inputs import estimate_conversation_tokens, estimate_tokens
from worker.backends.pacing import RateLimitHeaderNames
from worker.backends.remote import RemoteBackend, score_value
from worker.config import Settings

if TYPE_CHECKING:
    import httpx

MISTRAL = ApiDialect(
    name="Mistral",
    key_env="MISTRAL_API_KEY",
    base_url_env="MODWORKER_MISTRAL__BASE_URL",
    # Per-minute limits: x-ratelimit-{limit,remaining}-{req,tokens}-minute.
    rate_limit_headers=RateLimitHeaderNames(
        limit_requests="x-ratelimit-limit-req-minute",
        remaining_requests="x-ratelimit-remaining-req-minute",
        limit_tokens="x-ratelimit-limit-tokens-minute",
        remaining_tokens="x-ratelimit-remaining-tokens-minute",
    ),
)

PATHS = {
    ("moderation", "text"): "/v1/moderations",
    ("moderation", "chat"): "/v1/chat/moderations",
    ("classifier", "text"): "/v1/classifications",
    ("classifier", "chat"): "/v1/chat/classifications",
}


class MistralBackend(RemoteBackend):
    """Mistral moderation or classifier backend built from ``Settings`` (see the module docstring).

    ``transport`` replaces httpx's network transport (tests); normally unset.
    """

    name = "mistral"

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        mistral = settings.mistral
        api = RemoteApi(
            MISTRAL, base_url=mistral.base_url, api_key=mistral.api_key, http=settings.http, transport=transport
        )
        super().__init__(
            api,
            model=mistral.model,
            endpoint=mistral.endpoint,
            max_input_tokens=mistral.max_input_tokens,
            overlap_tokens=settings.http.chunk_overlap_tokens,
        )

    async def _post_texts(self, texts: list[str]) -> list[Scored]:
        path = PATHS[(self.endpoint, "text")]
        body = {"model": self.model, "input": texts}
        answer = await self.api.post(path, body, tokens=sum(estimate_tokens(t) for t in texts))
        return self._parse(path, answer)

    async def _post_conversations(self, conversations: list[list[Turn]]) -> list[Scored]:
        path = PATHS[(self.endpoint, "chat")]
        wire = [
            [{"role": turn.role, "content": turn.content} for turn in conversation] for conversation in conversations
        ]
        if self.endpoint == "classifier":
            body: dict[str, Any] = {"model": self.model, "input": [{"messages": messages} for messages in wire]}
        else:
            body = {"model": self.model, "input": wire}
        tokens = sum(estimate_conversation_tokens(conversation) for conversation in conversations)
        answer = await self.api.post(path, body, tokens=tokens)
        return self._parse(path, answer)

    def _parse(self, path: str, answer: Any) -> list[Scored]:
        try:
            model = str(answer["model"])
            results = answer["results"]
            if self.endpoint == "classifier":
                return [Scored(scores=_classifier_scores(result), model=model) for result in results]
            return [Scored(scores=_numbers(result["category_scores"]), model=model) for result in results]
        except (KeyError, TypeError, AttributeError) as err:
            raise BackendUnavailable(
                f"Mistral API answered POST {path} in an unexpected shape ({type(err).__name__}: {err}); "
                "check MODWORKER_MISTRAL__ENDPOINT and MODWORKER_MISTRAL__MODEL"
            ) from None


def _numbers(scores: dict[str, Any]) -> dict[str, float]:
    """The scores of one result (names as strings, values as floats; a value that is not a
    number becomes NaN, never absent: ``remote.score_value``)."""
    if all(type(value) is float for value in scores.values()):  # what the API sends: the decoded dict as is
        return scores
    return {str(category): score_value(value) for category, value in scores.items()}


def _classifier_scores(result: dict[str, Any]) -> dict[str, float]:
    """``{target: {"scores": {label: s}}}`` -> ``{"target/label": s}``."""
    flat: dict[str, float] = {}
    for target, target_result in result.items():
        for label, value in _numbers(target_result["scores"]).items():
            flat[f"{target}/{label}"] = value
    return flat
