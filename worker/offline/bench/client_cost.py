"""CPU per backend request: the worker's httpx client against a bare HTTP/1.1 client.

Not a test, and not used by the worker: it answers "how much of the worker's CPU per
message is the HTTP client, and what would another client save" (docs/benchmarks.md).
Both clients POST the same batch of 64 texts to the bench's loopback Mistral server (a
process of its own), ``--concurrency`` requests at once, for ``--seconds``, on asyncio's
loop and on uvloop, and report this process's CPU per request. Both encode and decode with
orjson, so the difference is the client alone. The bare client is the least an HTTP/1.1
client does (one write per request, Content-Length answers, keep-alive connections): no
TLS, proxies, chunked answers, timeouts or pool limits, so it is a floor, not a candidate.

    python worker/offline/bench/client_cost.py
    python worker/offline/bench/client_cost.py --concurrency 16 --latency-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import httpx
import orjson

from worker.offline.bench.api_process import ApiServerProcess
from worker.offline.bench.workload import Workload, find_data_dir

KEY = "bench-key"
PATH = "/v1/moderations"


class BareClient:
    """Keep-alive HTTP/1.1 POSTs on asyncio streams; Content-Length answers only."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = self._idle.pop() if self._idle else await asyncio.open_connection(self._host, self._port)
        reader, writer = conn
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Accept: application/json\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        header = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in header.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await reader.readexactly(length)
        self._idle.append(conn)
        return int(header[9:12]), data

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


async def measure(
    kind: str, base_url: str, port: int, body: dict[str, Any], concurrency: int, seconds: float
) -> tuple[float, float]:
    """(CPU seconds per request of this process, requests per second) over ``seconds``."""
    call: Callable[[], Awaitable[Any]]
    if kind == "httpx":
        client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {KEY}", "Accept": "application/json"},
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )

        async def call() -> Any:
            response = await client.post(PATH, content=orjson.dumps(body), headers={"Content-Type": "application/json"})
            return orjson.loads(response.content)

    else:
        bare = BareClient("127.0.0.1", port)

        async def call() -> Any:
            return orjson.loads((await bare.post(PATH, orjson.dumps(body)))[1])

    await call()
    count = 0
    stop = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal count
        while time.monotonic() < stop:
            await call()
            count += 1

    started = time.process_time()
    wall = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    cpu = time.process_time() - started
    wall = time.monotonic() - wall
    if kind == "httpx":
        await client.aclose()
    else:
        bare.close()
    return cpu / max(1, count), count / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workload = Workload(find_data_dir())
    events = workload.events(args.batch * 4)
    texts = [json.loads(event.value)["text"] for event in events if event.kind == "content"][: args.batch]
    body = {"model": "mistral-moderation-latest", "input": texts}
    try:
        import uvloop

        loops: list[tuple[str, Any]] = [("asyncio", None), ("uvloop", uvloop.new_event_loop)]
    except ImportError:
        loops = [("asyncio", None)]
    with ApiServerProcess(KEY) as api:
        api.latency_s = args.latency_ms / 1000
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for kind in ("httpx", "bare"):
                for name, factory in loops:
                    with asyncio.Runner(loop_factory=factory) as runner:
                        measured = runner.run(
                            measure(kind, api.base_url, api.port, body, args.concurrency, args.seconds)
                        )
                    results.setdefault(f"{kind} on {name}", []).append(measured)
    bound = args.concurrency / (args.latency_ms / 1000) if args.latency_ms else None
    for label, values in results.items():
        cpu, rate = min(v[0] for v in values), max(v[1] for v in values)
        share = f", {rate:5.0f} requests/s = {rate / bound:4.0%} of the bound" if bound else ""
        print(
            f"{label:18s} {1000 * cpu:6.2f} ms CPU per request of {len(texts)} ({1e6 * cpu / len(texts):5.1f} µs per message){share}"
        )
    print(json.dumps({label: min(values) for label, values in results.items()}))


if __name__ == "__main__":
    main()
