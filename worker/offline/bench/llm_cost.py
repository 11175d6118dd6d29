"""What 1,000 inputs cost in requests and tokens: the llm backend's dialects against the moderation endpoint.

Not a test: it prints a table. The inputs are the first ``--texts`` distinct texts of
``shared/data/texts.jsonl`` and the first ``--conversations`` conversations of
``shared/data/conversations.jsonl`` (their last turn judged, the rest context). Each
configuration runs the real backend (no dedup cache: every input is paid for) against a
loopback server, and counts what the server counted:

- ``mistral`` moderation endpoint (``MistralServer``, batches of ``--batch-size``):
  requests, and input tokens as the server counts them (no completion tokens);
- ``llm`` in each dialect (``LlmServer``): requests (one per input, or one per policy
  category and input for ``shieldstral`` and ``granite-guardian``), and the ``usage`` the
  server answered (prompt tokens include the json and gpt-oss-safeguard dialects'
  instruction and the chat framing; completion tokens are the answer, and
  gpt-oss-safeguard's stand-in reasoning). The policy-as-prompt guards read their own
  example policy, ``deploy/policy.forum-<dialect>.example.yaml``.

Every server counts a token per 4 UTF-8 bytes (``count_tokens_server``), so the figures
compare shapes of cost, not a tokenizer's exact counts; real tokenizers land near it on
English text.

    python worker/offline/bench/llm_cost.py
    python worker/offline/bench/llm_cost.py --texts 2000 --conversations 200 --policy deploy/policy.forum-llm.example.yaml
    python worker/offline/bench/llm_cost.py --dialects shieldstral gpt-oss-safeguard granite-guardian
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from schemas import Turn
from worker.backends.base import Backend, Conversation, Scored
from worker.backends.llm import LlmBackend
from worker.backends.mistral import MistralBackend
from worker.config import load_settings
from worker.pipeline.policy import Policy
from worker.testing import LlmServer, MistralServer
from worker.testing.mistral_server import count_tokens_server

DATA = REPO.parent / "shared" / "data"
FIXED_TAXONOMY = ("json", "llama-guard", "qwen3guard")
POLICY_AS_PROMPT = ("shieldstral", "gpt-oss-safeguard", "granite-guardian")


@dataclass
class Cost:
    name: str
    inputs: int
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def per_1000(self, value: int) -> float:
        return value * 1000 / self.inputs


def load_inputs(data: Path, texts: int, conversations: int) -> tuple[list[str], list[Conversation]]:
    lines = (data / "texts.jsonl").read_text(encoding="utf-8").splitlines()
    distinct = list(dict.fromkeys(json.loads(line)["text"] for line in lines if line.strip()))[:texts]
    chats = []
    for line in (data / "conversations.jsonl").read_text(encoding="utf-8").splitlines()[:conversations]:
        turns = [Turn(role=m["role"], content=m["content"]) for m in json.loads(line)["messages"]]
        chats.append(Conversation(turn=turns[-1], context=tuple(turns[:-1])))
    return distinct, chats


async def score_all(backend: Backend, texts: list[str], chats: list[Conversation], batch_size: int) -> None:
    await backend.start()
    try:
        for start in range(0, len(texts), batch_size):
            outcomes = await backend.score_texts(texts[start : start + batch_size])
            assert all(isinstance(o, Scored) for o in outcomes), outcomes
        for start in range(0, len(chats), batch_size):
            outcomes = await backend.score_conversations(chats[start : start + batch_size])
            assert all(isinstance(o, Scored) for o in outcomes), outcomes
    finally:
        await backend.close()


async def moderation_endpoint(texts: list[str], chats: list[Conversation], batch_size: int) -> Cost:
    with MistralServer(api_key="bench-key", max_input_tokens=1_000_000) as server:
        settings = load_settings(
            require_kafka=False,
            backend="mistral",
            mistral={"api_key": "bench-key", "base_url": server.base_url, "max_input_tokens": 1_000_000},
        )
        await score_all(MistralBackend(settings), texts, chats, batch_size)
        tokens = 0
        for body in server.bodies:
            for item in body["input"]:
                tokens += (
                    sum(count_tokens_server(m["content"]) for m in item)
                    if isinstance(item, list)
                    else count_tokens_server(item)
                )
        return Cost("mistral moderation endpoint", len(texts) + len(chats), server.request_count, tokens, 0)


async def llm(
    dialect: str, texts: list[str], chats: list[Conversation], batch_size: int, policy: Policy, label: str
) -> Cost:
    categories = policy.category_descriptions()
    with LlmServer(
        api_key=None,
        dialect=dialect,  # type: ignore[arg-type]
        categories=categories,
        max_context_tokens=1_000_000,
    ) as server:
        settings = load_settings(
            require_kafka=False,
            backend="llm",
            llm={"base_url": server.base_url, "dialect": dialect, "max_input_tokens": 1_000_000},
            scoring={"max_concurrency": 8},
        )
        backend = LlmBackend(settings, policy=policy)
        await score_all(backend, texts, chats, batch_size)
        inputs = len(texts) + len(chats)
        return Cost(
            f"llm {dialect}{label}", inputs, server.request_count, server.prompt_tokens, server.completion_tokens
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DATA, help="directory of texts.jsonl and conversations.jsonl")
    parser.add_argument("--texts", type=int, default=1_000)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--policy", type=Path, help="policy for the json dialect (default: the built-in one)")
    parser.add_argument(
        "--dialects", nargs="+", default=[*FIXED_TAXONOMY, *POLICY_AS_PROMPT], help="llm dialects to measure"
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    texts, chats = load_inputs(args.data, args.texts, args.conversations)
    policy = Policy.load(args.policy)
    label = f" ({len(policy.category_descriptions())} categories)"
    print(f"inputs: {len(texts)} texts, {len(chats)} conversations; batch size {args.batch_size}; no dedup cache")
    print()
    print("| backend | requests / 1k inputs | prompt tokens / 1k | completion tokens / 1k | total tokens / 1k |")
    print("|---|---:|---:|---:|---:|")
    costs = [asyncio.run(moderation_endpoint(texts, chats, args.batch_size))]
    for dialect in args.dialects:
        if dialect in POLICY_AS_PROMPT:
            own = Policy.load(REPO / "deploy" / f"policy.forum-{dialect}.example.yaml")
            costs.append(
                asyncio.run(
                    llm(dialect, texts, chats, args.batch_size, own, f" (forum, {len(own.category_descriptions())})")
                )
            )
        else:
            costs.append(
                asyncio.run(llm(dialect, texts, chats, args.batch_size, policy, label if dialect == "json" else ""))
            )
    for cost in costs:
        print(
            f"| {cost.name} | {cost.per_1000(cost.requests):,.1f} | {cost.per_1000(cost.prompt_tokens):,.0f} | "
            f"{cost.per_1000(cost.completion_tokens):,.0f} | "
            f"{cost.per_1000(cost.prompt_tokens + cost.completion_tokens):,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
