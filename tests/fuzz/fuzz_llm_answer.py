"""Fuzz target ``llm_answer``: a chat-completions answer body, read and parsed by every dialect.
The same bytes are also parsed as an answer's text alone (with logprobs naming every
dialect's labels), so that the parsers see mutated answers, not only mutated JSON.

The body goes the way the ``llm`` backend takes it: ``decode_json`` (``ValueError`` when it
is not JSON), ``_read`` (``BackendUnavailable`` when it is not a chat-completions answer),
then each dialect's ``parse_question`` for each of its questions (``Unparseable`` when the
answer does not follow the dialect). Property: those three exceptions and no other; and a
parsed answer's scores are finite numbers in [0, 1] (``Policy.decide`` refuses anything
else), of a known ``score_kind``, for the categories the dialect reports (the json
dialect: each category it asks about scored or listed as missing, no other scored).
"""

from __future__ import annotations

import math
import re

from schemas import Turn
from worker.backends.base import BackendUnavailable
from worker.backends.http import decode_json
from worker.backends.llm import _read
from worker.backends.llm_dialects import (
    LLAMA_GUARD_HAZARDS,
    Dialect,
    GptOssSafeguardDialect,
    GraniteGuardianDialect,
    JsonDialect,
    LlamaGuardDialect,
    Qwen3GuardDialect,
    Reply,
    ShieldstralDialect,
    TokenLogprob,
    Unparseable,
)

CATEGORIES = {"hate": "Attacks on people for who they are.", "harm": None, "self_harm": "Is it about self-harm?"}

DIALECTS: tuple[Dialect, ...] = (
    JsonDialect(CATEGORIES),
    LlamaGuardDialect(),
    Qwen3GuardDialect(),
    ShieldstralDialect(CATEGORIES),
    GraniteGuardianDialect(CATEGORIES, think=True),
    GptOssSafeguardDialect(CATEGORIES),
)
_TURNS = [Turn(role="user", content="hello")]
_QUESTIONS = [(dialect, question) for dialect in DIALECTS for question in dialect.questions(_TURNS)]
_REPORTED = {
    "json": set(CATEGORIES),
    "gpt-oss-safeguard": set(CATEGORIES),
    "llama-guard": set(LLAMA_GUARD_HAZARDS.values()),
}


_LABELS = (" yes", "no", "safe", " unsafe", "Unsafe", " Controversial", "1", " 0")


def check(data: bytes) -> None:
    _check_reply(_as_answer_text(data))
    try:
        answer = decode_json(data)
    except ValueError:
        return
    try:
        _model, reply, _usage = _read(answer)
    except BackendUnavailable:
        return
    _check_reply(reply)


def _as_answer_text(data: bytes) -> Reply:
    """``data`` as the content of an answer whose every token has the labels as alternatives."""
    text = data.decode("utf-8", "replace")
    tokens = tuple(
        TokenLogprob(token, -0.1 * (i % 7), tuple((label, -0.5 * (j + i % 3)) for j, label in enumerate(_LABELS)))
        for i, token in enumerate(re.findall(r"\s*\S+", text))
    )
    return Reply(text, "stop", tokens or None)


def _check_reply(reply: Reply) -> None:
    for dialect, question in _QUESTIONS:
        try:
            judgement = dialect.parse_question(question, reply)
        except Unparseable as err:
            assert err.problem, f"{dialect.name}: Unparseable without a problem"
            continue
        assert judgement.score_kind in ("probability", "label"), f"{dialect.name}: {judgement.score_kind!r}"
        for category, score in judgement.scores.items():
            assert type(score) is float and math.isfinite(score) and 0.0 <= score <= 1.0, (
                f"{dialect.name}: score {score!r} for {category!r}"
            )
        expected = {question.category} if question.category is not None else _REPORTED.get(dialect.name)
        if expected is not None:
            covered = set(judgement.scores) | set(judgement.missing)
            assert covered == expected and not set(judgement.scores) & set(judgement.missing), (
                f"{dialect.name}: scores for {sorted(judgement.scores)}, missing {judgement.missing}"
            )
