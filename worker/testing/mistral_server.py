"""A loopback server that speaks Mistral's moderation and classifier wire format.

Endpoints (request and response shapes as in Mistral's OpenAPI document, vendored at
``tests/specs/mistral-moderation.openapi.yaml``):

- ``POST /v1/moderations``: ``input`` a string or a list of strings.
- ``POST /v1/chat/moderations``: ``input`` one conversation (a list of messages) or a list
  of conversations; each conversation is judged on its LAST message.
- ``POST /v1/classifications`` and ``POST /v1/chat/classifications``: the same inputs
  (chat: ``{"messages": [...]}`` objects); results map each target to
  ``{"scores": {label: score}}``.

Scores are deterministic, see ``fake_scores``, unless a ``scorer`` is given (e.g.
``scores_from_labels``: the labelled data's answers, for measuring a cascade). Moderation results carry ``categories``
booleans (score >= 0.5) like the real API; a client must not use them. The response
``model`` is the server's configured ``model`` for moderation, and the requested model for
classifiers (a fine-tuned classifier id).

Errors, as Mistral sends them: 401 ``{"message": "Unauthorized", ...}`` for a wrong key;
422 ``{"detail": [{"loc", "msg", "type"}]}`` for a body that breaks the schema; 400
``{"object": "error", "message": "Prompt contains N tokens ...", ...}`` when an input is
longer than ``max_input_tokens`` (counted as ``count_tokens_server``); 429 with
``Retry-After`` and ``{"object": "error", "message": "Rate limit exceeded",
"type": "rate_limited", "code": "1300"}``; 5xx with an ``{"object": "error"}`` body. All
other behaviour (faults, latency, rate-limit window, request log) is
``worker.testing.loopback.LoopbackApiServer``'s.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from worker.testing.faults import FaultPlan
from worker.testing.loopback import ApiAnswer, LoopbackApiServer, RateLimit, RateWindow, RecordedRequest, RouteHandler
from worker.testing.openapi import BodyValidator

CATEGORIES_2411: tuple[str, ...] = (
    "sexual",
    "hate_and_discrimination",
    "violence_and_threats",
    "dangerous_and_criminal_content",
    "selfharm",
    "health",
    "financial",
    "law",
    "pii",
)
"""The 9 categories of ``mistral-moderation-2411``."""

CATEGORIES_2603: tuple[str, ...] = (
    "sexual",
    "hate_and_discrimination",
    "violence_and_threats",
    "dangerous",
    "criminal",
    "selfharm",
    "health",
    "financial",
    "law",
    "pii",
    "jailbreaking",
)
"""The 11 categories documented for ``mistral-moderation-2603``."""

MODEL_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mistral-moderation-2411": CATEGORIES_2411,
    "mistral-moderation-2603": CATEGORIES_2603,
}

MODEL_CONTEXT_TOKENS: dict[str, int] = {
    "mistral-moderation-2411": 8_192,
    "mistral-moderation-2603": 131_072,
}
"""Context length per model (8k and 128k, as Mistral documents)."""

DEFAULT_CLASSIFIER_TARGETS: dict[str, tuple[str, ...]] = {"moderation": ("toxicity", "insult", "safe")}

_MARKER = re.compile(r"<<([^<>:\s]+):([0-9]+(?:\.[0-9]+)?)>>")


def fake_scores(text: str, categories: Sequence[str] = CATEGORIES_2411) -> dict[str, float]:
    """The deterministic scores the loopback servers give ``text``, one per category.

    Each category gets a small base score,
    ``(int(sha256(f"{category}\\x00{text}").hexdigest()[:8], 16) % 1000) / 10000``
    (so always below 0.1), overridden by markers in the text of the form
    ``<<category:0.93>>`` (several allowed; a value above 1 counts as 1; a marker naming a
    category outside ``categories`` is ignored). Classifier categories are
    ``target/label``, e.g. ``<<moderation/toxicity:0.9>>``.
    """
    return dict(_scores(text, tuple(categories)))


@functools.lru_cache(maxsize=100_000)
def _scores(text: str, categories: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    # Cached: a pure function of its arguments, and the bench's servers score the same
    # texts over and over (a sha256 per category was most of their CPU per request).
    scores = {category: _base_score(category, text) for category in categories}
    for category, value in _MARKER.findall(text):
        if category in scores:
            scores[category] = min(1.0, float(value))
    return tuple(scores.items())


ScoreFunction = Callable[[str, Sequence[str]], dict[str, float]]
"""``scorer(text, categories) -> {category: score}``: how a server scores one judged text."""


def scores_from_labels(labels: Mapping[str, Iterable[str]], *, positive: float = 0.95) -> ScoreFunction:
    """A scorer that knows the answers: ``positive`` for each category ``labels[text]`` names,
    ``fake_scores`` (below 0.1, or a marker's value) for the rest and for unknown texts.

    A stand-in second stage that is right by construction (labelled data's labels), so a
    cascade's loss against it is what the first stage's confident decisions cost.
    """
    known = {text: frozenset(names) for text, names in labels.items()}

    def score(text: str, categories: Sequence[str]) -> dict[str, float]:
        scores = fake_scores(text, categories)
        for category in known.get(text, ()):
            if category in scores:
                scores[category] = max(scores[category], positive)
        return scores

    return score


def _base_score(category: str, text: str) -> float:
    digest = hashlib.sha256(f"{category}\x00{text}".encode()).hexdigest()
    return (int(digest[:8], 16) % 1000) / 10000


def count_tokens_server(text: str) -> int:
    """How the server counts an input's tokens: one per 4 UTF-8 bytes, rounded up.

    Real tokenizers vary; a client that estimates conservatively (more tokens than this)
    never sends the server an input it rejects as too long.
    """
    return math.ceil(len(text.encode("utf-8")) / 4)


class MistralServer(LoopbackApiServer):
    """Mistral's moderation and classifier API on loopback. ``with MistralServer() as srv``.

    ``model`` selects the category set (``MODEL_CATEGORIES``; unknown ids need
    ``categories``) and the context limit (``max_input_tokens``, default from
    ``MODEL_CONTEXT_TOKENS``, else 8,192). ``classifier_targets`` maps each classifier target
    to its labels. See ``LoopbackApiServer`` for ``api_key``, ``validator``, ``latency_s``,
    ``fault_plan`` and ``rate_limit``.
    """

    default_model: ClassVar[str] = "mistral-moderation-2411"

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        model: str = "mistral-moderation-2411",
        categories: Sequence[str] | None = None,
        classifier_targets: Mapping[str, Sequence[str]] | None = None,
        max_input_tokens: int | None = None,
        validator: BodyValidator | None = None,
        latency_s: float = 0.0,
        fault_plan: FaultPlan = None,
        rate_limit: RateLimit | None = None,
        scorer: ScoreFunction | None = None,
    ) -> None:
        super().__init__(
            api_key=api_key, validator=validator, latency_s=latency_s, fault_plan=fault_plan, rate_limit=rate_limit
        )
        if categories is None and model not in MODEL_CATEGORIES:
            raise ValueError(f"unknown model {model!r}: pass categories=... for it")
        self.model = model
        self.categories: tuple[str, ...] = tuple(categories) if categories is not None else MODEL_CATEGORIES[model]
        self.classifier_targets = {
            target: tuple(labels) for target, labels in (classifier_targets or DEFAULT_CLASSIFIER_TARGETS).items()
        }
        self.max_input_tokens = max_input_tokens or MODEL_CONTEXT_TOKENS.get(model, 8_192)
        self.scorer: ScoreFunction = scorer or fake_scores

    # ---- routes -----------------------------------------------------------------------------

    def routes(self) -> Mapping[str, RouteHandler]:
        return {
            "/v1/moderations": self._moderations,
            "/v1/chat/moderations": self._chat_moderations,
            "/v1/classifications": self._classifications,
            "/v1/chat/classifications": self._chat_classifications,
        }

    def _moderations(self, request: RecordedRequest) -> dict[str, Any]:
        texts = _texts(request.body["input"])
        self._check_length([[text] for text in texts])
        return self._moderation_response([self._moderation_result(text) for text in texts], texts)

    def _chat_moderations(self, request: RecordedRequest) -> dict[str, Any]:
        conversations = _conversations(request.body["input"])
        self._check_length([[_content(m) for m in conversation] for conversation in conversations])
        judged = [_content(conversation[-1]) if conversation else "" for conversation in conversations]
        all_texts = [_content(m) for conversation in conversations for m in conversation]
        return self._moderation_response([self._moderation_result(text) for text in judged], all_texts)

    def _classifications(self, request: RecordedRequest) -> dict[str, Any]:
        texts = _texts(request.body["input"])
        self._check_length([[text] for text in texts])
        return self._classification_response(request.body["model"], texts, texts)

    def _chat_classifications(self, request: RecordedRequest) -> dict[str, Any]:
        raw = request.body["input"]
        instructs = [raw] if isinstance(raw, dict) else raw
        conversations = [instruct["messages"] for instruct in instructs]
        self._check_length([[_content(m) for m in conversation] for conversation in conversations])
        judged = [_content(conversation[-1]) if conversation else "" for conversation in conversations]
        all_texts = [_content(m) for conversation in conversations for m in conversation]
        return self._classification_response(request.body["model"], judged, all_texts)

    # ---- shapes -----------------------------------------------------------------------------

    def _moderation_result(self, text: str) -> dict[str, Any]:
        scores = self.scorer(text, self.categories)
        return {"categories": {c: s >= 0.5 for c, s in scores.items()}, "category_scores": scores}

    def _moderation_response(self, results: list[dict[str, Any]], texts: list[str]) -> dict[str, Any]:
        return {"id": uuid.uuid4().hex, "model": self.model, "results": results, "usage": _usage(texts)}

    def _classification_response(self, model: str, judged: list[str], texts: list[str]) -> dict[str, Any]:
        labels = [f"{target}/{label}" for target, names in self.classifier_targets.items() for label in names]
        results = []
        for text in judged:
            scores = fake_scores(text, labels)
            results.append(
                {
                    target: {"scores": {label: scores[f"{target}/{label}"] for label in names}}
                    for target, names in self.classifier_targets.items()
                }
            )
        return {"id": uuid.uuid4().hex, "model": model, "results": results, "usage": _usage(texts)}

    def _check_length(self, inputs: list[list[str]]) -> None:
        """400 for the whole request when any one input is over the context, as Mistral does."""
        for parts in inputs:
            tokens = sum(count_tokens_server(part) for part in parts)
            if tokens > self.max_input_tokens:
                message = (
                    f"Prompt contains {tokens} tokens, too large for model with "
                    f"{self.max_input_tokens} maximum context length"
                )
                raise ApiAnswer(400, self.error_body(400, message))

    # ---- the API's own shapes for errors, limits and tokens ---------------------------------------

    def error_body(self, status: int, message: str) -> Any:
        if status == 401:
            return {"message": message, "request_id": uuid.uuid4().hex}
        if status == 404:
            return {"detail": message}
        if status == 429:  # the body Mistral sends, whatever the reason
            return {"object": "error", "message": "Rate limit exceeded", "type": "rate_limited", "code": "1300"}
        kind = "invalid_request_error" if status < 500 else "internal_server_error"
        return {"object": "error", "message": message, "type": kind, "param": None, "code": None}

    def validation_error(self, errors: list[str]) -> ApiAnswer:
        detail = [{"loc": ["body"], "msg": error, "type": "value_error"} for error in errors]
        return ApiAnswer(422, {"detail": detail})

    def rate_limit_headers(self, window: RateWindow, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        if window.limit.requests_per_minute is not None:
            headers["x-ratelimit-limit-req-minute"] = str(window.limit.requests_per_minute)
            headers["x-ratelimit-remaining-req-minute"] = str(window.remaining_requests)
        if window.limit.tokens_per_minute is not None:
            headers["x-ratelimit-limit-tokens-minute"] = str(window.limit.tokens_per_minute)
            headers["x-ratelimit-remaining-tokens-minute"] = str(window.remaining_tokens)
        return headers

    def count_tokens(self, body: Any) -> int:
        return sum(
            count_tokens_server(text) for text in _all_strings(body.get("input") if isinstance(body, dict) else None)
        )


def _texts(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _conversations(value: Any) -> list[list[dict[str, Any]]]:
    if value and isinstance(value[0], dict):
        return [value]  # one conversation, not a batch
    return list(value)


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content chunks: only the text ones are scored
        return "".join(chunk.get("text", "") for chunk in content if isinstance(chunk, dict))
    return ""


def _all_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in _all_strings(item)]
    if isinstance(value, dict):
        if "content" in value:
            return [_content(value)]
        return _all_strings(value.get("messages"))
    return []


def _usage(texts: list[str]) -> dict[str, int]:
    tokens = sum(count_tokens_server(text) for text in texts)
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "request_count": 1}
