"""OpenAI's moderation API (``MODWORKER_BACKEND=openai``, ``OPENAI_API_KEY``).

Text batches go to ``POST /v1/moderations`` with ``input`` a list of strings and
``model`` from ``openai.model`` (default ``omni-moderation-latest``).
``results[i].category_scores`` (13 categories such as ``harassment/threatening``) is
taken as the open map it is; ``flagged`` and ``categories`` are ignored: the policy's
default aliases map OpenAI's names onto its harms.

OpenAI has no conversation endpoint: a conversation is scored on its judged turn's text
alone (its context is not sent), in the same batched request shape.

Retries, limits (OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``), the
breaker, long inputs and bisection on 400: ``worker.backends.http`` and
``worker.backends.remote``. OpenAI answers a malformed body with 400 (not 422); that is
treated like any other rejection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from schemas import Turn
from worker.backends.base import BackendUnavailable, Scored
from worker.backends.http import ApiDialect, RemoteApi
from worker.backends.long_inputs import estimate_tokens
from worker.backends.pacing import RateLimitHeaderNames
from worker.backends.remote import RemoteBackend, score_value
from worker.config import Settings

if TYPE_CHECKING:
    import httpx

PATH = "/v1/moderations"


OPENAI = ApiDialect(
    name="OpenAI",
    key_env="OPENAI_API_KEY",
    base_url_env="MODWORKER_OPENAI__BASE_URL",
    # x-ratelimit-{limit,remaining,reset}-{requests,tokens}, resets like "6m0s".
    rate_limit_headers=RateLimitHeaderNames(
        limit_requests="x-ratelimit-limit-requests",
        remaining_requests="x-ratelimit-remaining-requests",
        limit_tokens="x-ratelimit-limit-tokens",
        remaining_tokens="x-ratelimit-remaining-tokens",
        reset_requests="x-ratelimit-reset-requests",
        reset_tokens="x-ratelimit-reset-tokens",
    ),
)


class OpenAIBackend(RemoteBackend):
    """OpenAI moderation backend built from ``Settings`` (see the module docstring)."""

    name = "openai"

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        openai = settings.openai
        api = RemoteApi(
            OPENAI, base_url=openai.base_url, api_key=openai.api_key, http=settings.http, transport=transport
        )
        super().__init__(
            api,
            model=openai.model,
            endpoint="moderation",
            max_input_tokens=openai.max_input_tokens,
            overlap_tokens=settings.http.chunk_overlap_tokens,
        )

    async def _post_texts(self, texts: list[str]) -> list[Scored]:
        answer = await self.api.post(
            PATH, {"model": self.model, "input": texts}, tokens=sum(map(estimate_tokens, texts))
        )
        return _parse(answer)

    async def _post_conversations(self, conversations: list[list[Turn]]) -> list[Scored]:
        return await self._post_texts([conversation[-1].content for conversation in conversations])


def _parse(answer: Any) -> list[Scored]:
    try:
        model = str(answer["model"])
        return [
            Scored(
                scores={str(c): score_value(v) for c, v in result["category_scores"].items()},
                model=model,
            )
            for result in answer["results"]
        ]
    except (KeyError, TypeError, AttributeError) as err:
        raise BackendUnavailable(
            f"OpenAI API answered POST {PATH} in an unexpected shape ({type(err).__name__}: {err}); "
            "check MODWORKER_OPENAI__BASE_URL"
        ) from None
