"""The sink alone: CPU per published record and publish-to-acknowledgement latency.

Not a test: it prints one line per run. ``worker.pipeline.sink.Sink`` publishes one-record groups
(a 600-byte value keyed like a verdict) to a 4-partition topic of the embedded broker, in
chunks of ``--chunk`` per event-loop turn (as the worker publishes a scored batch), either
as fast as it goes or paced at ``--rate`` groups per second. Reports the sink's thread
CPU per record and the p50/p99 time from ``publish`` to ``on_acked`` (acks=all).

    python worker/offline/bench/sink_throughput.py                   # as fast as it goes, then paced 3,000/s
    python worker/offline/bench/sink_throughput.py --records 50000 --rate 5000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.pipeline.sink import Sink
from worker.pipeline.types import OutRecord
from worker.testing.broker import tansu_broker

VALUE = b"x" * 600


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()


async def run(
    bootstrap: str, topic: str, records: int, chunk: int, rate: float | None
) -> tuple[float, float, float, float]:
    # The worker's producer settings (worker.pipeline.source.make_producer), idempotence off for the embedded broker.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5)
    sink = Sink(producer, on_error=lambda err: print(f"publish failed: {err}", file=sys.stderr))
    await sink.start()
    latencies: list[float] = []
    finished = asyncio.Event()

    def acked_at(published: float):
        def acked() -> None:
            latencies.append((time.perf_counter() - published) * 1000)
            if len(latencies) == records:
                finished.set()

        return acked

    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for start in range(0, records, chunk):
        if rate:
            await asyncio.sleep(max(0.0, wall0 + start / rate - time.perf_counter()))
        now = time.perf_counter()
        for i in range(start, min(records, start + chunk)):
            sink.publish([OutRecord(topic, f"b-{i}".encode(), VALUE)], acked_at(now))
        await asyncio.sleep(0)
    await finished.wait()
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    await sink.close()
    latencies.sort()
    return cpu / records * 1e6, records / wall, latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--rate", type=float, default=3_000.0, help="paced run's groups per second (0: skip it)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tansu_broker() as broker:
        for rate in [None] + ([args.rate] if args.rate else []):
            for _n in range(args.repeat):
                topic = f"bench-sink-{time.time_ns()}"
                await create_topic(broker.bootstrap_servers, topic)
                cpu, per_s, p50, p99 = await run(broker.bootstrap_servers, topic, args.records, args.chunk, rate)
                mode = f"paced {rate:.0f}/s" if rate else "flat out"
                print(
                    f"{mode:>14}: {cpu:5.1f} us CPU/record, {per_s:8.0f} records/s, ack p50 {p50:5.1f} ms, p99 {p99:5.1f} ms"
                )


if __name__ == "__main__":
    asyncio.run(main())
