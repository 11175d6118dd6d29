"""A loopback server that speaks the OpenAI chat-completions wire format, as vLLM serves it.

``POST /v1/chat/completions`` with ``{"model", "messages": [{"role", "content"}], "temperature",
"max_tokens", "response_format", "logprobs", "top_logprobs"}``; every body is checked
against ``CHAT_REQUEST_SCHEMA`` (unknown fields are refused, as OpenAI does) and against
the API's own rules: ``top_logprobs`` needs ``logprobs: true``, and JSON mode needs the
word "json" in the messages. A violation is recorded (``violations``) and answered 400.

The model it plays is ``dialect``:

- ``json``: a chat model following the json dialect's contract. It reads the category
  names from the answer template in the system message (``"<name>": <number in [0, 1]>``),
  the judged text from the user message (``{"text"}``, or the last message of
  ``{"conversation"}``), and answers ``{"scores": {...}}`` with ``fake_scores`` of that
  text (markers such as ``<<spam:0.9>>`` set a score).
- ``llama-guard``: ``safe``, or ``unsafe`` and the codes whose ``fake_scores`` over
  ``S1``..``S14`` reach 0.5 (``<<S1:0.9>>`` marks violent crimes); the label's probability
  is the highest marked score.
- ``qwen3guard``: ``Safety: ...`` and ``Categories: ...`` over Qwen3Guard's categories,
  marked by their snake_case names (``<<violent:0.9>>``): a highest score of 0.8 or more
  is ``Unsafe``, from 0.5 ``Controversial``; the label's probability is that score.

- ``shieldstral``: one token, ``yes`` when the asked category's marked score reaches 0.5,
  else ``no``; the label's probability is that score (or 1 minus it). The category is
  the one of ``categories`` (``{name: description}``, the policy the worker applies)
  whose question the ``<Query>`` holds: the description itself, or its name.
- ``granite-guardian``: ``<score> yes </score>`` / ``<score> no </score>`` for the category
  whose description (or name, or pre-baked ``criteria_id``) is the request's
  ``chat_template_kwargs.guardian_config``; with ``think: true`` a ``<think>...</think>``
  comes first, in the content, as vLLM serves it without a reasoning parser.
- ``gpt-oss-safeguard``: the harmony format as vLLM serves it: the analysis in
  ``message.reasoning_content`` and ``message.reasoning``, the final answer
  ``{"<name>": 0|1, ...}`` in ``content``, over the names of the system message's output
  template (``"<name>": <0 or 1>``); 1 when the marked score reaches 0.5. The reasoning's
  tokens come first in ``logprobs`` and count toward ``max_tokens``: when it fills them,
  ``content`` is ``null``. ``reasoning_effort`` is required.

A judged text containing ``<<unparseable>>`` gets a chat model's refusal in any dialect,
and ``answer`` (``answer(request, default) -> content``) may replace any answer, for
malformed ones.

Answers are ``chat.completion`` objects with ``usage`` (``prompt_tokens``: the
server's token count of every message plus 4 per message and 3 for the reply's priming,
as OpenAI counts, plus Granite Guardian's criterion, but no guard's own template text;
``completion_tokens``: the answer's tokens, reasoning included) and, when asked for
``logprobs`` and ``logprobs`` is on, ``choices[0].logprobs.content``: one entry per answer
token (``token``, ``logprob``, ``bytes``, ``top_logprobs``) as vLLM sends it; at a guard
label the alternatives are the other labels with the rest of the probability, split
evenly. An answer longer than ``max_tokens`` is cut there with ``finish_reason`` ``length``;
a prompt plus ``max_tokens`` over ``max_context_tokens`` is refused with vLLM's 400.
Errors are ``{"error": {"message", "type", "param", "code"}}`` (vLLM's shape), except
401, which vLLM answers ``{"error": "Unauthorized"}``. ``json_mode=False`` plays a server
without JSON mode (400 on ``response_format`` json_object); ``logprobs=False`` one that
returns ``"logprobs": null``.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Unpack

from worker.testing.loopback import ApiAnswer, LoopbackApiServer, LoopbackOptions, RecordedRequest, RouteHandler
from worker.testing.mistral_server import count_tokens_server, fake_scores
from worker.testing.openapi import BodyValidator

PATH = "/v1/chat/completions"

LLAMA_GUARD_CODES: tuple[str, ...] = tuple(f"S{n}" for n in range(1, 15))
QWEN3GUARD_LABELS: dict[str, str] = {
    "violent": "Violent",
    "non_violent_illegal_acts": "Non-violent Illegal Acts",
    "sexual_content_or_sexual_acts": "Sexual Content or Sexual Acts",
    "pii": "PII",
    "suicide_and_self_harm": "Suicide & Self-Harm",
    "unethical_acts": "Unethical Acts",
    "politically_sensitive_topics": "Politically Sensitive Topics",
    "copyright_violation": "Copyright Violation",
    "jailbreak": "Jailbreak",
}
"""Marker name -> the category as Qwen3Guard writes it."""

REFUSAL = "I'm sorry, but I can't help with that request."
"""The answer to a judged text containing ``<<unparseable>>``."""

UNPARSEABLE_MARKER = "<<unparseable>>"

_TEMPLATE_ENTRY = re.compile(r'"([^"]+)": <number in \[0, 1\]>')
_SAFEGUARD_ENTRY = re.compile(r'"([^"]+)": <0 or 1>')
_QUERY = re.compile(r"<Query>(.*?)</Query>", re.DOTALL)
_CONTENT = re.compile(r"<Content>(.*)</Content>", re.DOTALL)
SAFEGUARD_REASONING = "The user posted a message. I check it against each rule of the policy in turn."
"""The analysis gpt-oss-safeguard's stand-in writes before its final answer."""
GRANITE_THINKING = "<think>I compare the last message with the criterion.</think>\n"
GRANITE_CRITERIA_IDS = (
    "harm",
    "social_bias",
    "jailbreak",
    "profanity",
    "sexual_content",
    "unethical_behavior",
    "violence",
)
_TOKEN = re.compile(r"\s*[A-Za-z]+|\s*[0-9]+|\s*[^\sA-Za-z0-9]|\s+")

CHAT_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "additionalProperties": False,
                "properties": {
                    "role": {"enum": ["system", "user", "assistant"]},
                    "content": {"type": "string"},
                },
            },
        },
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "max_tokens": {"type": "integer", "minimum": 1},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "additionalProperties": False,
            "properties": {"type": {"enum": ["text", "json_object"]}},
        },
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "reasoning_effort": {"enum": ["low", "medium", "high"]},
        "chat_template_kwargs": {"type": "object"},
    },
}
"""The subset of the chat-completions request the worker may send, as JSON Schema (with
vLLM's ``chat_template_kwargs``)."""

Answerer = Callable[[RecordedRequest, str], str]
Label = tuple[str, float, tuple[str, ...]]
"""A label in an answer: the label, its probability, the other labels (sharing the rest)."""


def chat_request_validator() -> BodyValidator:
    """Schema and API rules for ``POST /v1/chat/completions`` bodies (needs ``jsonschema``)."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(CHAT_REQUEST_SCHEMA)

    def validate(path: str, body: Any) -> list[str]:
        if path != PATH:
            return [f"POST {path} is not the chat-completions endpoint"]
        errors = [
            f"{'/'.join(str(p) for p in error.absolute_path) or '<body>'}: {error.message}"
            for error in validator.iter_errors(body)
        ]
        if errors or not isinstance(body, dict):
            return errors
        if "top_logprobs" in body and body.get("logprobs") is not True:
            errors.append("top_logprobs: logprobs must be set to true if top_logprobs is specified")
        if (body.get("response_format") or {}).get("type") == "json_object" and not any(
            "json" in message["content"].lower() for message in body["messages"]
        ):
            errors.append(
                "messages: 'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                "'json_object'"
            )
        return errors

    return validate


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The server's ``usage.prompt_tokens``: each message's tokens + 4, and 3 for the reply."""
    return sum(count_tokens_server(str(message.get("content", ""))) + 4 for message in messages) + 3


def tokenize(content: str) -> list[str]:
    """The server's answer tokens: words and numbers with their leading space, punctuation alone."""
    return _TOKEN.findall(content)


class LlmServer(LoopbackApiServer):
    """OpenAI-compatible chat completions on loopback, answering as ``dialect`` (see the module docstring).

    ``with LlmServer(dialect="llama-guard", api_key=None) as srv`` plays a self-hosted vLLM
    without a key. Every request body is validated (needs ``jsonschema``, the test extra)
    unless ``validator`` is given (``None``: no validation).
    """

    default_model: ClassVar[str] = "mistral-small-2506"

    def __init__(
        self,
        *,
        dialect: Literal[
            "json", "llama-guard", "qwen3guard", "shieldstral", "gpt-oss-safeguard", "granite-guardian"
        ] = "json",
        categories: Mapping[str, str | None] | None = None,
        logprobs: bool = True,
        json_mode: bool = True,
        max_context_tokens: int = 32_768,
        answer: Answerer | None = None,
        **options: Unpack[LoopbackOptions],
    ) -> None:
        options.setdefault("validator", chat_request_validator())
        super().__init__(**options)
        self.dialect = dialect
        self.categories = dict(categories or {})
        self.logprobs = logprobs
        self.json_mode = json_mode
        self.max_context_tokens = max_context_tokens
        self.answer = answer
        self.prompt_tokens = 0
        """Sum of the ``usage.prompt_tokens`` answered so far (what a bill would count)."""
        self.completion_tokens = 0
        """Sum of the ``usage.completion_tokens`` answered so far."""

    def routes(self) -> Mapping[str, RouteHandler]:
        return {PATH: self._complete}

    # ---- one completion -----------------------------------------------------------------

    def _complete(self, request: RecordedRequest) -> dict[str, Any]:
        body = request.body
        messages: list[dict[str, Any]] = body["messages"]
        if not self.json_mode and (body.get("response_format") or {}).get("type") == "json_object":
            raise ApiAnswer(400, self.error_body(400, "response_format json_object is not supported by this server"))
        max_tokens = int(body.get("max_tokens") or 16)
        prompt_tokens = count_prompt_tokens(messages)
        # Granite Guardian's chat template writes the criterion into the prompt.
        config = (body.get("chat_template_kwargs") or {}).get("guardian_config") or {}
        prompt_tokens += sum(count_tokens_server(str(value)) for value in config.values())
        if prompt_tokens + max_tokens > self.max_context_tokens:
            message = (
                f"This model's maximum context length is {self.max_context_tokens} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
            raise ApiAnswer(400, self.error_body(400, message))

        if self.dialect == "gpt-oss-safeguard" and "reasoning_effort" not in body:
            raise ApiAnswer(400, self.error_body(400, "gpt-oss-safeguard is served with a reasoning_effort"))
        content, labels = self._judge(body)
        if self.answer is not None:
            replaced = self.answer(request, content)
            if replaced != content:
                content, labels = replaced, []
        reasoning = SAFEGUARD_REASONING if self.dialect == "gpt-oss-safeguard" else None
        thinking = tokenize(reasoning) if reasoning else []
        tokens = tokenize(content)
        finish_reason = "stop"
        answer: str | None = content
        if len(thinking) >= max_tokens:
            thinking, tokens, finish_reason, answer = thinking[:max_tokens], [], "length", None
            reasoning = "".join(thinking)
        elif len(thinking) + len(tokens) > max_tokens:
            tokens, finish_reason = tokens[: max_tokens - len(thinking)], "length"
            answer = "".join(tokens)
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += len(thinking) + len(tokens)
        reply: dict[str, Any] = {"role": "assistant", "content": answer, "tool_calls": []}
        if reasoning is not None:
            reply |= {"reasoning_content": reasoning, "reasoning": reasoning}
        choice: dict[str, Any] = {
            "index": 0,
            "message": reply,
            "logprobs": self._logprobs(thinking + tokens, labels, body) if body.get("logprobs") else None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(thinking) + len(tokens),
                "total_tokens": prompt_tokens + len(thinking) + len(tokens),
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": None,
        }

    def _judge(self, body: dict[str, Any]) -> tuple[str, list[Label]]:
        """The answer, and each label's ``(label, probability, other labels)`` for logprobs, in answer order."""
        messages: list[dict[str, Any]] = body["messages"]
        judged = _judged_text(messages, self.dialect)
        if UNPARSEABLE_MARKER in judged:
            return REFUSAL, []
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        if self.dialect == "json":
            categories = _TEMPLATE_ENTRY.findall(system)
            if not categories:
                return "I can't tell which categories you want scored.", []
            return json.dumps({"scores": fake_scores(judged, categories)}), []
        if self.dialect == "llama-guard":
            scores = fake_scores(judged, LLAMA_GUARD_CODES)
            hit = [code for code in LLAMA_GUARD_CODES if scores[code] >= 0.5]
            top = max(scores.values())
            if hit:
                return f"unsafe\n{','.join(hit)}", [("unsafe", top, ("safe",))]
            return "safe", [("safe", 1.0 - top, ("unsafe",))]
        if self.dialect == "qwen3guard":
            return self._qwen3guard(judged)
        if self.dialect == "gpt-oss-safeguard":
            names = _SAFEGUARD_ENTRY.findall(system)
            if not names:
                return "I can't tell which rules you want applied.", []
            scores = fake_scores(judged, names)
            values = {name: int(scores[name] >= 0.5) for name in names}
            labels: list[Label] = [
                (str(value), scores[name] if value else 1.0 - scores[name], (str(1 - value),))
                for name, value in values.items()
            ]
            return json.dumps(values), labels
        if self.dialect == "shieldstral":
            query = _QUERY.search(str(messages[-1].get("content", "")))
            category = self._category(query.group(1) if query else "")
        else:
            config = (body.get("chat_template_kwargs") or {}).get("guardian_config") or {}
            category = self._category(str(config.get("custom_criteria") or config.get("criteria_id") or ""))
        score = fake_scores(judged, (category,))[category] if category else 0.0
        label = "yes" if score >= 0.5 else "no"
        probability = score if label == "yes" else 1.0 - score
        labels = [(label, probability, ("no" if label == "yes" else "yes",))]
        if self.dialect == "shieldstral":
            return label, labels
        think = bool((body.get("chat_template_kwargs") or {}).get("think"))
        return f"{GRANITE_THINKING if think else ''}<score> {label} </score>", labels

    def _category(self, asked: str) -> str | None:
        """The category of ``categories`` that ``asked`` (a query or a criterion) is about: the longest match."""
        found = [
            (len(needle), name)
            for name, description in self.categories.items()
            for needle in (description or "", name, name.replace("_", " "))
            if needle and needle.strip() in asked
        ]
        return max(found)[1] if found else None

    def _qwen3guard(self, judged: str) -> tuple[str, list[Label]]:
        scores = fake_scores(judged, tuple(QWEN3GUARD_LABELS))
        top = max(scores.values())
        named = [QWEN3GUARD_LABELS[name] for name, score in scores.items() if score >= 0.5]
        if top >= 0.8:
            label = "Unsafe"
        elif top >= 0.5:
            label = "Controversial"
        else:
            label, top = "Safe", 1.0 - top
        others = tuple(other for other in ("Safe", "Unsafe", "Controversial") if other != label)
        return f"Safety: {label}\nCategories: {', '.join(named) or 'None'}", [(label, top, others)]

    def _logprobs(self, tokens: list[str], labels: list[Label], body: dict[str, Any]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        top_n = int(body.get("top_logprobs") or 0)
        content = []
        pending = list(labels)
        # The labels are in the answer, after any reasoning: matched from the end backwards.
        at_label: dict[int, Label] = {}
        for index in range(len(tokens) - 1, -1, -1):
            if pending and tokens[index].strip() == pending[-1][0]:
                at_label[index] = pending.pop()
        for index, token in enumerate(tokens):
            alternatives = [(token, 0.0)]
            if index in at_label:
                _, probability, others = at_label[index]
                lead = token[: len(token) - len(token.lstrip())]
                rest = (1.0 - probability) / len(others)
                alternatives = [(token, _log(probability))] + [(lead + other, _log(rest)) for other in others]
                alternatives.sort(key=lambda pair: -pair[1])
            logprob = next(value for text, value in alternatives if text == token)
            content.append(
                {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": text, "logprob": value, "bytes": list(text.encode())}
                        for text, value in alternatives[:top_n]
                    ],
                }
            )
        return {"content": content}

    # ---- the API's shapes ---------------------------------------------------------------

    def error_body(self, status: int, message: str) -> Any:
        if status == 401:
            return {"error": "Unauthorized"}
        kinds = {400: "BadRequestError", 404: "NotFoundError", 429: "TooManyRequestsError"}
        kind = kinds.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
        return {"error": {"message": message, "type": kind, "param": None, "code": status}}

    def validation_error(self, errors: list[str]) -> ApiAnswer:
        return ApiAnswer(400, self.error_body(400, "; ".join(errors)))

    def count_tokens(self, body: Any) -> int:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return 0
        return count_prompt_tokens([m for m in body["messages"] if isinstance(m, dict)])


def _log(probability: float) -> float:
    # vLLM reports -9999.0 for a token too unlikely to have a finite log probability.
    return math.log(probability) if probability > 0 else -9999.0


def _judged_text(messages: list[dict[str, Any]], dialect: str) -> str:
    """The text the model is asked to judge: the last message, unwrapped from the json dialect's JSON
    or Shieldstral's ``<Content>``."""
    last = str(messages[-1].get("content", ""))
    if dialect == "shieldstral":
        content = _CONTENT.search(last)
        return content.group(1) if content else last
    if dialect != "json":
        return last
    _, _, payload = last.partition("\n")
    try:
        data = json.loads(payload)
    except ValueError:
        return last
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        return str(data["text"])
    if isinstance(data, dict) and isinstance(data.get("conversation"), list) and data["conversation"]:
        return str(data["conversation"][-1].get("content", ""))
    return last
