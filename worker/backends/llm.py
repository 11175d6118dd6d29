"""A chat model as moderation backend (``MODWORKER_BACKEND=llm``), over any OpenAI-compatible server.

Each input is one ``POST {llm.base_url}/v1/chat/completions`` (a chat completion judges one
conversation), sent concurrently: at most ``max_concurrency(settings)``
(``scoring.max_concurrency``) inputs are being judged at once per worker, and
``RemoteApi`` bounds the requests in flight by ``http.max_connections``. The request is::

    {"model": llm.model, "messages": [...], "temperature": 0, "max_tokens": n, ...}

with the messages and extra fields of the dialect (``llm.dialect``, see
``worker.backends.llm_dialects``): ``json`` asks about the policy's categories in JSON mode
(``response_format``), ``llama-guard`` and ``qwen3guard`` send the conversation to a guard
model with ``logprobs``; ``shieldstral``, ``granite-guardian`` and ``gpt-oss-safeguard`` ask
a guard model about the policy's categories. The answer's ``choices[0].message.content``
(and ``logprobs``, and ``reasoning_content`` / ``reasoning`` apart) is parsed by the dialect
into raw scores; ``Scored.details`` carries the score kind, the ``usage`` tokens and the
number of requests of every try, which also go to the ``llm_tokens`` and ``llm_requests``
metrics.

A dialect whose model takes one category a request (``shieldstral``, ``granite-guardian``)
asks one question per policy category for each input, at most
``llm.max_questions_in_flight`` of them in flight per input; each question is retried
on its own, and any question that stays unparseable (or is refused) rejects the input.

Failures, per input:

- an answer that does not parse is asked again, ``llm.parse_retries`` more times; then the
  input is ``Rejected`` with ``error_type`` ``llm_unparseable`` and the answer's first
  characters in the reason (dead-lettered: never a crash, never an allow);
- json dialect: keys of the answer that name no category asked about are ignored (counted
  in ``llm_unknown_categories``, logged at debug); an answer that leaves a category out is
  asked again within the same ``llm.parse_retries``, and when every try leaves some out the
  fullest answer is kept with the rest as ``Scored.unscored`` (a degraded verdict: never an
  allow by omission; the missing scores of one piece of a long input are unscored for the
  input);
- 400/413/422 (e.g. an input over the model's context) rejects that input alone;
- everything else is ``RemoteApi``'s: retries with Retry-After, rate limits, the breaker;
  ``BackendUnavailable`` and ``BackendAuthError`` end the whole batch, as for every backend.

Long inputs: texts over ``llm.max_input_tokens`` are split, conversations trimmed
(``worker.backends.long_inputs``); the pieces are judged apart and an input's score per
category is the highest of its pieces'.

Key: ``llm.api_key``, else ``MISTRAL_API_KEY`` when the base URL is Mistral's; a
self-hosted server needs none (no ``Authorization`` header is sent then).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from schemas import BackendDetails, Turn
from worker.backends.base import BackendUnavailable, Conversation, Outcome, Rejected, Scored
from worker.backends.http import ApiBackend, ApiDialect, ApiRejected, RemoteApi
from worker.backends.llm_dialects import (
    Dialect,
    GptOssSafeguardDialect,
    GraniteGuardianDialect,
    JsonDialect,
    Judgement,
    LlamaGuardDialect,
    Question,
    Qwen3GuardDialect,
    Reply,
    ShieldstralDialect,
    TokenLogprob,
    Unparseable,
)
from worker.backends.long_inputs import estimate_conversation_tokens, split_text, trim_conversation
from worker.backends.mistral import MISTRAL
from worker.backends.openai import OPENAI
from worker.config import Settings, is_mistral_url, llm_api_key
from worker.ops import metrics
from worker.ops.logs import LlmEvent

if TYPE_CHECKING:
    import httpx

    from worker.pipeline.policy import Policy

log = structlog.get_logger(__name__)

PATH = "/v1/chat/completions"
ANSWER_EXCERPT_CHARS = 200
"""How much of an unparseable answer its dead-letter reason quotes."""


def max_concurrency(settings: Settings) -> int:
    """Inputs judged at once: the one place the llm backend reads the concurrency limit."""
    return settings.scoring.max_concurrency


def make_dialect(settings: Settings, policy: Policy | None) -> Dialect:
    """The dialect ``llm.dialect`` names; all but the fixed-taxonomy guards ask about ``policy``'s categories."""
    llm = settings.llm
    if llm.dialect == "llama-guard":
        return LlamaGuardDialect(logprobs=llm.logprobs)
    if llm.dialect == "qwen3guard":
        return Qwen3GuardDialect(logprobs=llm.logprobs)
    if policy is None:
        from worker.backends import load_policy

        policy = load_policy(settings)
    categories = policy.category_descriptions()
    if llm.dialect == "shieldstral":
        return ShieldstralDialect(categories, logprobs=llm.logprobs)
    if llm.dialect == "granite-guardian":
        return GraniteGuardianDialect(categories, logprobs=llm.logprobs, think=llm.think)
    if llm.dialect == "gpt-oss-safeguard":
        return GptOssSafeguardDialect(categories, logprobs=llm.logprobs, reasoning_effort=llm.reasoning_effort)
    return JsonDialect(categories, json_mode=llm.json_mode)


class LlmBackend(ApiBackend):
    """See the module docstring. ``policy``: the one the worker applies (json dialect; default:
    the configured policy file). ``transport`` replaces httpx's network transport (tests)."""

    name = "llm"

    def __init__(
        self, settings: Settings, *, policy: Policy | None = None, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        llm = settings.llm
        mistral = is_mistral_url(llm.base_url)
        dialect = ApiDialect(
            name="LLM",
            key_env="MISTRAL_API_KEY" if mistral and llm.api_key is None else "MODWORKER_LLM__API_KEY",
            base_url_env="MODWORKER_LLM__BASE_URL",
            rate_limit_headers=MISTRAL.rate_limit_headers if mistral else OPENAI.rate_limit_headers,
            requires_key=mistral,
        )
        self.api = RemoteApi(
            dialect, base_url=llm.base_url, api_key=llm_api_key(settings), http=settings.http, transport=transport
        )
        self.model = llm.model
        self.dialect = make_dialect(settings, policy)
        self.max_answer_tokens = llm.max_answer_tokens or self.dialect.max_answer_tokens
        self.tries = 1 + llm.parse_retries
        self.max_input_tokens = llm.max_input_tokens
        self.overlap_tokens = settings.http.chunk_overlap_tokens
        self._judging = asyncio.Semaphore(max_concurrency(settings))
        self.questions_in_flight = llm.max_questions_in_flight

    @property
    def cache_namespace(self) -> str:
        """Scores are reusable within the same dialect and model (and, for json, the same prompt)."""
        prompt = getattr(self.dialect, "system_prompt", "")
        digest = hashlib.blake2b(prompt.encode(), digest_size=6).hexdigest()
        return f"{self.name}:{self.dialect.name}:{self.model}:{digest}"

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        pieces: list[list[Turn]] = []
        owners: list[int] = []
        for index, text in enumerate(texts):
            for chunk in split_text(text, self.max_input_tokens, self.overlap_tokens):
                pieces.append([Turn(role="user", content=chunk)])
                owners.append(index)
        return _merge(await self._judge_all(pieces), owners, len(texts))

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        pieces: list[list[Turn]] = []
        owners: list[int] = []
        for index, conversation in enumerate(conversations):
            for trimmed in trim_conversation(conversation.messages(), self.max_input_tokens, self.overlap_tokens):
                pieces.append(trimmed)
                owners.append(index)
        return _merge(await self._judge_all(pieces), owners, len(conversations))

    async def _judge_all(self, pieces: list[list[Turn]]) -> list[Outcome]:
        # A TaskGroup: the first BackendUnavailable / BackendAuthError cancels the other
        # requests of the batch and is raised as itself (the pipeline handles it per batch).
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._judge(turns)) for turns in pieces]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _judge(self, turns: list[Turn]) -> Outcome:
        """One piece: every question of the dialect (one, or one per category, at most
        ``llm.max_questions_in_flight`` in flight), merged into one outcome."""
        questions = self.dialect.questions(turns)
        async with self._judging:
            if len(questions) == 1:
                answers = [await self._ask(questions[0])]
            else:
                bound = asyncio.Semaphore(self.questions_in_flight)

                async def bounded(question: Question) -> _Answer | Rejected:
                    async with bound:
                        return await self._ask(question)

                try:
                    async with asyncio.TaskGroup() as group:
                        tasks = [group.create_task(bounded(question)) for question in questions]
                except BaseExceptionGroup as failed:
                    raise failed.exceptions[0] from None
                answers = [task.result() for task in tasks]
        rejected = next((answer for answer in answers if isinstance(answer, Rejected)), None)
        if rejected is not None:
            return rejected
        scores: dict[str, float] = {}
        unscored: list[str] = []
        kinds: set[str] = set()
        prompt_tokens = completion_tokens = requests = 0
        model = ""
        for answer in (answer for answer in answers if isinstance(answer, _Answer)):
            scores |= answer.judgement.scores
            unscored += answer.judgement.missing
            kinds.add(answer.judgement.score_kind)
            prompt_tokens += answer.prompt_tokens
            completion_tokens += answer.completion_tokens
            requests += answer.requests
            model = model or answer.model
        details = BackendDetails(
            score_kind="label" if "label" in kinds else "probability",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            requests=requests,
        )
        return Scored(scores=scores, model=model or self.model, details=details, unscored=tuple(unscored))

    async def _ask(self, question: Question) -> _Answer | Rejected:
        """One question, asked again while its answer does not parse (``llm.parse_retries``)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": question.messages,
            "temperature": 0,
            "max_tokens": self.max_answer_tokens,
            **question.fields,
        }
        tokens = estimate_conversation_tokens([Turn(role="user", content=m["content"]) for m in question.messages])
        prompt_tokens = completion_tokens = 0
        problem = answer_text = ""
        partial: Judgement | None = None  # the fullest answer that left categories out
        model = ""
        for attempt in range(1, self.tries + 1):
            try:
                answer = await self.api.post(PATH, body, tokens=tokens)
            except ApiRejected as rejected:
                return Rejected(reason=f"LLM server refused the input (HTTP {rejected.status}): {rejected.message}")
            model, reply, usage = _read(answer)
            self._count(*usage)
            prompt_tokens += usage[0]
            completion_tokens += usage[1]
            try:
                judgement = self.dialect.parse_question(question, reply)
            except Unparseable as err:
                problem, answer_text = err.problem, reply.content
                metrics.llm_unparseable(self.dialect.name).inc()
                log.warning(
                    LlmEvent.UNPARSEABLE,
                    dialect=self.dialect.name,
                    category=question.category,
                    attempt=attempt,
                    of=self.tries,
                    problem=problem,
                    answer=answer_text[:ANSWER_EXCERPT_CHARS],
                )
                continue
            self._note_unknown(judgement)
            if judgement.missing:
                self._note_missing(judgement, attempt)
                if partial is None or len(judgement.missing) <= len(partial.missing):
                    partial = judgement
                continue
            return _Answer(judgement, model, prompt_tokens, completion_tokens, attempt)
        if partial is not None:  # scored what it gave; the verdict is degraded for the rest
            return _Answer(partial, model, prompt_tokens, completion_tokens, self.tries)
        asked = f" (category {question.category!r})" if question.category else ""
        return Rejected(
            reason=f"the {self.dialect.name} answer{asked} could not be parsed after {self.tries} "
            f"tr{'y' if self.tries == 1 else 'ies'}: {problem}; "
            f"the answer began {answer_text[:ANSWER_EXCERPT_CHARS]!r}",
            error_type="llm_unparseable",
        )

    def _note_unknown(self, judgement: Judgement) -> None:
        """Keys naming no category asked about: ignored, counted, logged at debug."""
        if not judgement.unknown:
            return
        for key in judgement.unknown:
            metrics.llm_unknown_category(key).inc()
        log.debug(
            LlmEvent.UNKNOWN_CATEGORIES,
            dialect=self.dialect.name,
            categories=[key[:ANSWER_EXCERPT_CHARS] for key in judgement.unknown[:10]],
        )

    def _note_missing(self, judgement: Judgement, attempt: int) -> None:
        for category in judgement.missing:
            metrics.llm_missing_categories(category).inc()
        log.warning(
            LlmEvent.MISSING_CATEGORIES,
            dialect=self.dialect.name,
            missing=list(judgement.missing),
            attempt=attempt,
            of=self.tries,
        )

    def _count(self, prompt: int, completion: int) -> None:
        metrics.llm_requests(self.dialect.name).inc()
        metrics.llm_tokens(self.dialect.name, "prompt").inc(prompt)
        metrics.llm_tokens(self.dialect.name, "completion").inc(completion)


@dataclass(frozen=True, slots=True)
class _Answer:
    """A parsed answer to one question, with what it cost (all its tries)."""

    judgement: Judgement
    model: str
    prompt_tokens: int
    completion_tokens: int
    requests: int


def _read(answer: Any) -> tuple[str, Reply, tuple[int, int]]:
    """``(model, reply, (prompt_tokens, completion_tokens))`` of a chat-completions answer.

    ``model`` is ``""`` when the server names none. A body without ``choices[0].message``
    is not a chat-completions server speaking:
    ``BackendUnavailable`` naming the setting to check. A ``null`` content (a refusal, a
    tool call) is an empty reply, which no dialect parses.
    """
    try:
        choice = answer["choices"][0]
        message = choice["message"]
        model = str(answer.get("model") or "")
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise BackendUnavailable(
            f"LLM server answered POST {PATH} in an unexpected shape ({type(err).__name__}: {err}); "
            "check MODWORKER_LLM__BASE_URL points at an OpenAI-compatible chat-completions server"
        ) from None
    content = message.get("content") if isinstance(message, dict) else None
    reasoning = (message.get("reasoning_content") or message.get("reasoning")) if isinstance(message, dict) else None
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    counts = (_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))
    reply = Reply(
        str(content or ""),
        choice.get("finish_reason"),
        _logprobs(choice.get("logprobs")),
        reasoning=reasoning if isinstance(reasoning, str) else "",
    )
    return model, reply, counts


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _logprobs(value: Any) -> tuple[TokenLogprob, ...] | None:
    """``choices[0].logprobs.content`` as vLLM and OpenAI send it; None when absent or malformed."""
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list) or not content:
        return None
    tokens = []
    try:
        for item in content:
            top = tuple((str(alt["token"]), float(alt["logprob"])) for alt in item.get("top_logprobs") or ())
            tokens.append(TokenLogprob(token=str(item["token"]), logprob=float(item["logprob"]), top=top))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # OverflowError: an int beyond floats
        return None
    return tuple(tokens)


def _merge(outcomes: list[Outcome], owners: list[int], count: int) -> list[Outcome]:
    """One outcome per input: the highest score per category across its pieces, their tokens
    summed; a rejected piece rejects the input."""
    merged: list[Outcome | None] = [None] * count
    for outcome, owner in zip(outcomes, owners, strict=True):
        current = merged[owner]
        if current is None or isinstance(outcome, Rejected):
            merged[owner] = current if isinstance(current, Rejected) else outcome
        elif isinstance(current, Scored) and isinstance(outcome, Scored):
            scores = dict(current.scores)
            for category, value in outcome.scores.items():
                scores[category] = max(value, scores.get(category, value))
            unscored = (*current.unscored, *(c for c in outcome.unscored if c not in current.unscored))
            merged[owner] = Scored(
                scores=scores,
                model=current.model,
                details=_add(current.details, outcome.details),
                unscored=unscored,
            )
    if any(outcome is None for outcome in merged):
        raise AssertionError("every input yields at least one piece")
    return [outcome for outcome in merged if outcome is not None]


def _add(first: BackendDetails | None, second: BackendDetails | None) -> BackendDetails | None:
    if first is None or second is None:
        return first or second
    return BackendDetails(
        score_kind="label" if "label" in (first.score_kind, second.score_kind) else "probability",
        prompt_tokens=(first.prompt_tokens or 0) + (second.prompt_tokens or 0),
        completion_tokens=(first.completion_tokens or 0) + (second.completion_tokens or 0),
        requests=(first.requests or 0) + (second.requests or 0),
    )
