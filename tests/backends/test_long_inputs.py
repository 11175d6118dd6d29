"""Over-long inputs: chunking texts, trimming conversations, and the backend's max-merge."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from schemas import Turn
from tests.backends.conftest import started
from tests.conftest import SPEC
from worker.backends.base import Conversation, Scored
from worker.backends.long_inputs import MESSAGE_OVERHEAD_TOKENS, estimate_tokens, split_text, trim_conversation
from worker.backends.mistral import MistralBackend
from worker.config import Settings
from worker.testing import MistralServer, fake_scores
from worker.testing.mistral_server import count_tokens_server
from worker.testing.openapi import load_spec_validator

SettingsFor = Callable[..., Settings]


def test_a_text_that_fits_is_one_chunk() -> None:
    assert split_text("short text", max_tokens=100, overlap_tokens=10) == ["short text"]


def test_chunks_fit_overlap_and_cover_the_whole_text() -> None:
    text = " ".join(f"w{i:04d}" for i in range(3_000))  # 18,000 bytes: 6,000 estimated tokens
    chunks = split_text(text, max_tokens=500, overlap_tokens=50)

    assert len(chunks) > 12
    assert all(estimate_tokens(chunk) <= 500 for chunk in chunks)
    for before, after in itertools.pairwise(chunks):
        shared = before[-30:]
        assert shared in after, "consecutive chunks share their boundary text"
    # Every word is whole in at least one chunk.
    words = set(text.split())
    assert words == {word for chunk in chunks for word in chunk.split() if word in words}


def test_multibyte_text_is_chunked_by_bytes() -> None:
    text = "猫" * 5_000  # 3 bytes each: one estimated token per character
    chunks = split_text(text, max_tokens=1_000, overlap_tokens=0)
    assert all(estimate_tokens(c) <= 1_000 for c in chunks) and "".join(chunks) == text


def test_conversation_drops_the_oldest_context_first_and_keeps_the_judged_turn() -> None:
    turns = [Turn(role="user" if i % 2 == 0 else "assistant", content=f"turn {i} " + "x" * 290) for i in range(10)]
    judged = Turn(role="assistant", content="the judged reply")
    cost = estimate_tokens(turns[0].content) + MESSAGE_OVERHEAD_TOKENS
    budget = 3 * cost + estimate_tokens(judged.content) + MESSAGE_OVERHEAD_TOKENS
    (trimmed,) = trim_conversation([*turns, judged], max_tokens=budget)

    assert trimmed == [turns[7], turns[8], turns[9], judged]


def test_a_judged_turn_over_the_limit_is_chunked_without_context() -> None:
    judged = Turn(role="user", content="y " * 3_000)
    pieces = trim_conversation([Turn(role="assistant", content="earlier"), judged], max_tokens=400, overlap_tokens=20)
    assert len(pieces) > 1
    assert all(len(piece) == 1 and piece[0].role == "user" for piece in pieces)


async def test_a_long_text_is_chunked_under_the_context_and_scored_as_the_max(
    api_key: str, settings_for: SettingsFor
) -> None:
    tail_marker = "<<selfharm:0.91>>"
    head_marker = "<<pii:0.66>>"
    long_text = head_marker + " " + "lorem ipsum dolor " * 1_500 + tail_marker  # ~27k bytes
    assert count_tokens_server(long_text) > 2_000
    with MistralServer(api_key=api_key, max_input_tokens=2_000, validator=load_spec_validator(SPEC)) as server:
        settings = settings_for(server, mistral={"max_input_tokens": 2_000})
        async with started(MistralBackend(settings)) as backend:
            (short, long) = await backend.score_texts(["short one", long_text])
        assert server.violations == [] and {r.status for r in server.requests} == {200}
        sent = server.requests[0].body["input"]

    assert len(sent) > 3 and sent[0] == "short one"
    chunk_scores = [fake_scores(chunk) for chunk in sent[1:]]
    assert isinstance(long, Scored) and isinstance(short, Scored)
    assert long.scores == {c: max(s[c] for s in chunk_scores) for c in chunk_scores[0]}
    assert long.scores["selfharm"] == 0.91 and long.scores["pii"] == 0.66
    assert short.scores == fake_scores("short one")


async def test_a_long_conversation_is_trimmed_so_the_api_accepts_it(api_key: str, settings_for: SettingsFor) -> None:
    context = tuple(
        Turn(role="user" if i % 2 == 0 else "assistant", content=f"old turn {i} " + "z " * 600) for i in range(12)
    )
    judged = Turn(role="assistant", content="final answer <<violence_and_threats:0.77>>")
    with MistralServer(api_key=api_key, max_input_tokens=2_000, validator=load_spec_validator(SPEC)) as server:
        settings = settings_for(server, mistral={"max_input_tokens": 2_000})
        async with started(MistralBackend(settings)) as backend:
            (outcome,) = await backend.score_conversations([Conversation(turn=judged, context=context)])
        (request,) = server.requests
        assert request.status == 200 and server.violations == []

    (sent,) = request.body["input"]
    assert sent[-1] == {"role": "assistant", "content": judged.content}
    kept = [m["content"] for m in sent[:-1]]
    assert kept == [t.content for t in context[-len(kept) :]], "the newest context is kept, the oldest dropped"
    assert 0 < len(kept) < len(context)
    assert isinstance(outcome, Scored) and outcome.scores["violence_and_threats"] == 0.77


def test_a_broken_score_of_one_piece_stays_broken_in_the_merged_scores() -> None:
    """A NaN (a score the API sent broken) must survive the max across pieces, in any order."""
    import math

    from worker.backends.base import Scored
    from worker.backends.remote import _merge

    for pieces in (
        [Scored({"sexual": math.nan}, "m"), Scored({"sexual": 0.3}, "m")],
        [Scored({"sexual": 0.3}, "m"), Scored({"sexual": math.nan}, "m")],
    ):
        (merged,) = _merge(list(pieces), [0, 0], 1)
        assert isinstance(merged, Scored) and math.isnan(merged.scores["sexual"])
