"""CPU per backend call of each HTTP engine (``MODWORKER_HTTP__ENGINE``), the rest alike.

Not a test: it answers "what does each engine cost per call". The real Mistral backend
(retries, breaker, pacing, JSON) scores ``--calls`` batches of ``--batch`` texts from the
bench's workload against the bench's loopback server (a process of its own, 0 ms), at
most 8 calls at once, on uvloop; it prints this process's CPU per call and per text for
each engine, alternating them ``--repeat`` times (the best of each is the figure):

    python worker/offline/bench/http_engine.py
    python worker/offline/bench/http_engine.py --batch 16 --calls 1000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

KEY = "bench-key"
ENGINES = ("aiohttp", "httpx")


async def _measure(port: int, engine: str, batch: int, calls: int, texts: list[str]) -> float:
    """CPU seconds of this process per call."""
    from worker.backends.mistral import MistralBackend
    from worker.config import Settings

    settings = Settings(
        backend="mistral",
        mistral={"api_key": KEY, "base_url": f"http://127.0.0.1:{port}"},
        http={"engine": engine},
        cache={"enabled": False},
    )
    backend = MistralBackend(settings)
    await backend.start()
    limit = asyncio.Semaphore(8)

    async def call(i: int) -> None:
        start = (i * batch) % (len(texts) - batch)
        async with limit:
            await backend.score_texts(texts[start : start + batch])

    try:
        await asyncio.gather(*(call(i) for i in range(50)))  # warm: connections, caches
        started = time.process_time()
        await asyncio.gather(*(call(i) for i in range(calls)))
        return (time.process_time() - started) / calls
    finally:
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import uvloop

    from worker.offline.bench.api_process import ApiServerProcess
    from worker.offline.bench.workload import Workload, find_data_dir
    from worker.ops.logs import configure_logging

    configure_logging(level="warning", fmt="json", secrets=[])
    texts = [e.value.decode() for e in Workload(find_data_dir()).events(4_000) if e.kind == "content"]
    best: dict[str, float] = {}
    with ApiServerProcess(KEY) as api, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for _ in range(args.repeat):
            for engine in ENGINES:
                cost = runner.run(_measure(api.port, engine, args.batch, args.calls, texts))
                best[engine] = min(best.get(engine, cost), cost)
    for engine in ENGINES:
        per_call = best[engine] * 1e6
        print(
            f"engine={engine:8s} batch={args.batch}: {per_call:7.0f} µs CPU per call, {per_call / args.batch:6.1f} per text"
        )
    print(f"aiohttp / httpx: {best['aiohttp'] / best['httpx']:.2f}")


if __name__ == "__main__":
    main()
