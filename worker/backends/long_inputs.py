"""Inputs longer than a model's context: split texts, trim conversations.

Token estimate: ``estimate_tokens(text) = ceil(utf8_bytes / 3)``. Real tokenizers give about
4 bytes per token on English text and about 1 token per 3-byte CJK character, so the
estimate errs on the side of more tokens than the API will count, and a chunk sized by it
is not rejected as too long. Each chat message costs ``MESSAGE_OVERHEAD_TOKENS`` on top of
its content (role markers).

- A text over ``max_tokens`` becomes overlapping chunks (``split_text``): each at most
  ``max_tokens``, consecutive chunks sharing about ``overlap_tokens``, cut at whitespace
  where there is some near the end, so that a phrase on a boundary is whole in one chunk.
  The text's scores are the maximum per category across its chunks (the backend does
  that): a harmful passage anywhere flags the whole text.
- A conversation over ``max_tokens`` (``trim_conversation``) keeps the judged turn whole
  and drops the oldest context first, keeping the newest turns that fit. If the judged
  turn alone is over the limit, it is split like a text and each chunk is judged as a
  one-message conversation without context (scores again the maximum across chunks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from schemas import Turn

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: str) -> int:
    """A conservative token count for ``text`` (see the module docstring)."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii: no copy to count
    return math.ceil(size / BYTES_PER_TOKEN)


def estimate_conversation_tokens(messages: Sequence[Turn]) -> int:
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def split_text(text: str, max_tokens: int, overlap_tokens: int = 0) -> list[str]:
    """``[text]`` when it fits, else overlapping chunks that each fit (see the module docstring)."""
    if estimate_tokens(text) <= max_tokens:
        return [text]
    max_bytes = max_tokens * BYTES_PER_TOKEN
    overlap_bytes = min(overlap_tokens * BYTES_PER_TOKEN, max_bytes // 2)
    sizes = [len(ch.encode("utf-8")) for ch in text]
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end, used = start, 0
        while end < len(text) and used + sizes[end] <= max_bytes:
            used += sizes[end]
            end += 1
        if end < len(text):
            # Prefer a cut at whitespace in the last quarter, so words stay whole.
            floor = start + (end - start) * 3 // 4
            cut = end
            while cut > floor and not text[cut - 1].isspace():
                cut -= 1
            if cut > floor:
                end = cut
        chunks.append(text[start:end])
        if end >= len(text):
            break
        back, shared = end, 0
        while back > start + 1 and shared + sizes[back - 1] <= overlap_bytes:
            shared += sizes[back - 1]
            back -= 1
        start = back
    return chunks


def trim_conversation(messages: Sequence[Turn], max_tokens: int, overlap_tokens: int = 0) -> list[list[Turn]]:
    """Conversations (judged turn last) that each fit ``max_tokens``; usually exactly one.

    One when the judged turn fits: the judged turn with as much of the newest context as
    fits. Several when the judged turn alone does not fit: one per chunk of it, no context.
    """
    *context, judged = messages
    judged_cost = estimate_tokens(judged.content) + MESSAGE_OVERHEAD_TOKENS
    if judged_cost > max_tokens:
        room = max(1, max_tokens - MESSAGE_OVERHEAD_TOKENS)
        return [[Turn(role=judged.role, content=chunk)] for chunk in split_text(judged.content, room, overlap_tokens)]
    budget = max_tokens - judged_cost
    kept: list[Turn] = []
    for turn in reversed(context):
        cost = estimate_tokens(turn.content) + MESSAGE_OVERHEAD_TOKENS
        if cost > budget:
            break  # this turn and everything older is dropped
        kept.append(turn)
        budget -= cost
    kept.reverse()
    return [[*kept, judged]]
