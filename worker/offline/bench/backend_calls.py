"""How many API requests (and inputs, and tokens) 1,000 messages cost: cache on/off, batch sizes.

Not a test: it prints a table. The stream is texts from ``shared/data/texts.jsonl`` drawn
with a Zipf-like repeat pattern (the text of rank r is drawn with probability proportional
to ``1 / r ** s``), as user-generated content repeats: copy-paste, spam, short replies.
Each configuration runs the real ``MistralBackend`` (optionally behind the real
``CachingBackend``) against a loopback ``MistralServer``, feeding full batches at steady
load with ``--concurrency`` batches in flight, and counts what reached the server.

    python worker/offline/bench/backend_calls.py                       # defaults below
    python worker/offline/bench/backend_calls.py --messages 20000 --zipf 0.8 --latency-ms 50

Data: texts.jsonl is derived from public sets (openai/moderation-api-release, MIT;
t-davidson/hate-speech-and-offensive-language, MIT; paul-rottger/exaggerated-safety,
CC-BY-4.0); see shared/data/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import structlog

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from worker.backends.base import Backend
from worker.backends.cache import CachingBackend
from worker.backends.mistral import MistralBackend
from worker.config import load_settings
from worker.testing import MistralServer
from worker.testing.mistral_server import count_tokens_server

DEFAULT_DATA = REPO.parent / "shared" / "data" / "texts.jsonl"


@dataclass
class Result:
    batch_size: int
    cache: bool
    messages: int
    requests: int
    inputs_sent: int
    tokens_sent: int
    hit_ratio: float
    seconds: float

    def per_1000(self, value: int) -> float:
        return value * 1000 / self.messages


def zipf_stream(texts: list[str], *, messages: int, pool: int, s: float, seed: int) -> list[str]:
    """``messages`` draws from the first ``pool`` (shuffled) texts, rank r weighted 1 / r**s."""
    rng = random.Random(seed)
    distinct = list(dict.fromkeys(texts))
    rng.shuffle(distinct)
    distinct = distinct[:pool]
    weights = [1 / (rank**s) for rank in range(1, len(distinct) + 1)]
    return rng.choices(distinct, weights=weights, k=messages)


async def run_one(stream: list[str], *, batch_size: int, cache: bool, concurrency: int, latency_s: float) -> Result:
    with MistralServer(api_key="bench-key", latency_s=latency_s) as server:
        settings = load_settings(
            kafka={"bootstrap_servers": "127.0.0.1:9"},
            backend="mistral",
            mistral={"api_key": "bench-key", "base_url": server.base_url},
            http={"max_connections": concurrency},
            scoring={"max_concurrency": concurrency},
        )
        backend: Backend = MistralBackend(settings)
        if cache:
            backend = CachingBackend(backend, max_entries=settings.cache.max_entries, ttl_s=settings.cache.ttl_s)
        await backend.start()
        gate = asyncio.Semaphore(concurrency)

        async def one_batch(batch: list[str]) -> None:
            async with gate:
                outcomes = await backend.score_texts(batch)
                assert len(outcomes) == len(batch)

        started = time.perf_counter()
        # Batches are created in stream order and at most `concurrency` run at once, as the pipeline does.
        tasks = []
        for start in range(0, len(stream), batch_size):
            await gate.acquire()
            gate.release()
            tasks.append(asyncio.create_task(one_batch(stream[start : start + batch_size])))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
        await backend.close()
        sent = [text for body in server.bodies for text in body["input"]]
        hit_ratio = backend.cache_stats().hit_ratio if isinstance(backend, CachingBackend) else 0.0
        return Result(
            batch_size=batch_size,
            cache=cache,
            messages=len(stream),
            requests=server.request_count,
            inputs_sent=len(sent),
            tokens_sent=sum(count_tokens_server(t) for t in sent),
            hit_ratio=hit_ratio,
            seconds=seconds,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=5_000, help="distinct texts to draw from")
    parser.add_argument("--zipf", type=float, default=1.0, help="repeat skew s (0: uniform)")
    parser.add_argument("--batch-sizes", type=str, default="1,8,32,128")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="server service time per request")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # The cache logs its hit ratio every 1,000 lookups; the table says it once.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    texts = [json.loads(line)["text"] for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    stream = zipf_stream(texts, messages=args.messages, pool=args.pool, s=args.zipf, seed=args.seed)
    counts = Counter(stream)
    top10 = sum(c for _, c in counts.most_common(10)) / len(stream)
    print(
        f"stream: {len(stream)} messages, {len(counts)} distinct ({len(counts) / len(stream):.1%}), "
        f"top-10 texts {top10:.1%} of messages; zipf s={args.zipf}, pool {args.pool}, seed {args.seed}; "
        f"concurrency {args.concurrency}, server latency {args.latency_ms:g} ms"
    )
    print()
    print(
        "| batch size | cache | requests / 1k msgs | inputs sent / 1k | tokens sent / 1k | cache hit ratio | msgs/s |"
    )
    print("|---:|:---:|---:|---:|---:|---:|---:|")
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for cache in (False, True):
            result = asyncio.run(
                run_one(
                    stream,
                    batch_size=batch_size,
                    cache=cache,
                    concurrency=args.concurrency,
                    latency_s=args.latency_ms / 1000,
                )
            )
            results.append(result)
            print(
                f"| {batch_size} | {'on' if cache else 'off'} | {result.per_1000(result.requests):.1f} | "
                f"{result.per_1000(result.inputs_sent):.0f} | {result.per_1000(result.tokens_sent):.0f} | "
                f"{result.hit_ratio:.1%} | {result.messages / result.seconds:.0f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))


if __name__ == "__main__":
    main()
