"""A loopback server that speaks OpenAI's moderation wire format (``POST /v1/moderations``).

Request: ``{"model": ..., "input": ...}`` where ``input`` is a string, a list of strings
(a batch), or a list of ``{"type": "text", "text"}`` / ``{"type": "image_url", ...}``
parts (one multi-modal input). ``OPENAI_REQUEST_SCHEMA`` is that shape as JSON Schema,
written from OpenAI's public API reference; ``openai_request_validator()`` checks bodies
against it.

Answer: ``{"id": "modr-...", "model": <configured model>, "results": [{"flagged",
"categories", "category_scores", "category_applied_input_types"}]}`` with the 13
``OPENAI_CATEGORIES`` scored by ``fake_scores`` (markers such as
``<<harassment/threatening:0.9>>`` work the same way).

Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}``, with 400
(not 422) for a body that breaks the schema or an input over ``max_input_tokens``, 401 for
a wrong key, 429 with ``Retry-After``; rate-limit headers
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``. Everything else (faults,
latency, the rate-limit window, the request log) is ``LoopbackApiServer``'s.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from worker.testing.faults import FaultPlan
from worker.testing.loopback import ApiAnswer, LoopbackApiServer, RateLimit, RateWindow, RecordedRequest, RouteHandler
from worker.testing.mistral_server import count_tokens_server, fake_scores
from worker.testing.openapi import BodyValidator

OPENAI_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
"""The 13 categories of ``omni-moderation-latest``."""

OPENAI_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["input"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string"},
        "input": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            {
                                "type": "object",
                                "required": ["type", "text"],
                                "additionalProperties": False,
                                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                            },
                            {
                                "type": "object",
                                "required": ["type", "image_url"],
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"const": "image_url"},
                                    "image_url": {
                                        "type": "object",
                                        "required": ["url"],
                                        "properties": {"url": {"type": "string"}},
                                    },
                                },
                            },
                        ]
                    },
                },
            ]
        },
    },
}


def openai_request_validator() -> BodyValidator:
    """A ``BodyValidator`` for ``POST /v1/moderations`` bodies (needs ``jsonschema``)."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(OPENAI_REQUEST_SCHEMA)

    def validate(path: str, body: Any) -> list[str]:
        if path != "/v1/moderations":
            return [f"POST {path} is not an OpenAI moderation endpoint"]
        return [
            f"{'/'.join(str(p) for p in error.absolute_path) or '<body>'}: {error.message}"
            for error in validator.iter_errors(body)
        ]

    return validate


class OpenAIServer(LoopbackApiServer):
    """OpenAI's moderation API on loopback. ``with OpenAIServer(api_key="k") as srv``."""

    default_model: ClassVar[str] = "omni-moderation-2024-09-26"

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        model: str = "omni-moderation-2024-09-26",
        categories: Sequence[str] = OPENAI_CATEGORIES,
        max_input_tokens: int = 32_768,
        validator: BodyValidator | None = None,
        latency_s: float = 0.0,
        fault_plan: FaultPlan = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        super().__init__(
            api_key=api_key, validator=validator, latency_s=latency_s, fault_plan=fault_plan, rate_limit=rate_limit
        )
        self.model = model
        self.categories = tuple(categories)
        self.max_input_tokens = max_input_tokens

    def routes(self) -> Mapping[str, RouteHandler]:
        return {"/v1/moderations": self._moderations}

    def _moderations(self, request: RecordedRequest) -> dict[str, Any]:
        texts = _inputs(request.body["input"])
        for text in texts:
            tokens = count_tokens_server(text)
            if tokens > self.max_input_tokens:
                message = f"This model's maximum context length is {self.max_input_tokens} tokens, however you requested {tokens} tokens."
                raise ApiAnswer(400, self.error_body(400, message))
        results = []
        for text in texts:
            scores = fake_scores(text, self.categories)
            results.append(
                {
                    "flagged": any(score >= 0.5 for score in scores.values()),
                    "categories": {c: s >= 0.5 for c, s in scores.items()},
                    "category_scores": scores,
                    "category_applied_input_types": {c: ["text"] for c in scores},
                }
            )
        return {"id": f"modr-{uuid.uuid4().hex}", "model": self.model, "results": results}

    def error_body(self, status: int, message: str) -> Any:
        kinds = {401: ("invalid_request_error", "invalid_api_key"), 429: ("requests", "rate_limit_exceeded")}
        kind, code = kinds.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
        if status == 401:
            # OpenAI echoes a masked key; the client must not copy this body anywhere.
            message = "Incorrect API key provided: sk-***. You can find your API key in your account settings."
        if status == 429:
            message = "Rate limit reached for requests"
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}

    def validation_error(self, errors: list[str]) -> ApiAnswer:
        return ApiAnswer(400, self.error_body(400, "; ".join(errors)))

    def rate_limit_headers(self, window: RateWindow, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        reset = f"{math.ceil(window.reset_in(now))}s"
        if window.limit.requests_per_minute is not None:
            headers["x-ratelimit-limit-requests"] = str(window.limit.requests_per_minute)
            headers["x-ratelimit-remaining-requests"] = str(window.remaining_requests)
            headers["x-ratelimit-reset-requests"] = reset
        if window.limit.tokens_per_minute is not None:
            headers["x-ratelimit-limit-tokens"] = str(window.limit.tokens_per_minute)
            headers["x-ratelimit-remaining-tokens"] = str(window.remaining_tokens)
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    def count_tokens(self, body: Any) -> int:
        if not isinstance(body, dict):
            return 0
        return sum(count_tokens_server(text) for text in _inputs(body.get("input")))


def _inputs(value: Any) -> list[str]:
    """The texts of a request, one per result: a list of parts is ONE multi-modal input."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return ["".join(part.get("text", "") for part in value if part.get("type") == "text")]
    if isinstance(value, list):
        return [str(item) for item in value]
    return []
