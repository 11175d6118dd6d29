"""How much memory large inputs in flight take, with and without the byte cap.

``python -m worker.offline.bench.inflight_memory --inputs 400 --chars 99990
--max-in-flight-bytes 8388608`` starts ``modworker run`` (a child process, its RSS sampled)
against a loopback Mistral server that answers slowly (``--latency-s``, so that work piles
up in flight), on the embedded broker or ``--bootstrap-servers``. It measures the worker's
idle RSS once it has joined (the baseline), then publishes ``--inputs`` contents of
``--chars`` characters each, waits for every verdict (or dead letter), and prints one JSON line: the
baseline, the peak RSS while the inputs were processed, the growth over the baseline, the
byte cap and the input bytes. Run it with a cap and with a cap above the input
(``--max-in-flight-bytes 1073741824``: only ``MODWORKER_MAX_IN_FLIGHT``, 10,000 here as in
the production overlay, bounds the work) to see what the cap holds back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from worker.offline.bench.process import MeasuredProcess
from worker.testing.broker import test_broker
from worker.testing.mistral_server import MistralServer

_KEY = "sk-bench-inflight-memory"


async def _verdicts(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def _measure(bootstrap: str, args: argparse.Namespace, log_dir: Path) -> dict[str, object]:
    tag = uuid.uuid4().hex[:8]
    topics = {name: f"bench.{name}.{tag}" for name in ("content", "conversation", "verdict", "violation", "dlq")}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, args.partitions, 1) for t in topics.values()])
    finally:
        await admin.close()
    with MistralServer(api_key=_KEY, latency_s=args.latency_s) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODWORKER_", "MISTRAL_"))}
        env |= {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "MODWORKER_CONTENT_TOPIC": topics["content"],
            "MODWORKER_CONVERSATION_TOPIC": topics["conversation"],
            "MODWORKER_VERDICT_TOPIC": topics["verdict"],
            "MODWORKER_VIOLATION_TOPIC": topics["violation"],
            "MODWORKER_DEAD_LETTER_TOPIC": topics["dlq"],
            "MODWORKER_GROUP_ID": f"bench-inflight-{tag}",
            "MODWORKER_CONVERSATION__ENABLED": "false",
            "MODWORKER_BACKEND": "mistral",
            "MISTRAL_API_KEY": _KEY,
            "MODWORKER_MISTRAL__BASE_URL": server.base_url,
            "MODWORKER_MAX_IN_FLIGHT": "10000",
            "MODWORKER_MAX_IN_FLIGHT_BYTES": str(args.max_in_flight_bytes),
            "MODWORKER_HTTP_PORT": "0",
            "MODWORKER_LOG_FORMAT": "json",
        }
        command = [sys.executable, "-m", "worker.cli", "run"]
        async with MeasuredProcess(command, env=env, log_path=log_dir / "worker.log", interval_s=0.05) as worker:
            deadline = time.monotonic() + 60
            while b"partitions.assigned" not in (log_dir / "worker.log").read_bytes() and time.monotonic() < deadline:
                worker.check_alive()
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
            settled = time.time()
            await asyncio.sleep(2.0)
            baseline = worker.rss_between(settled, time.time())
            started = time.time()
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_request_size=4 * 1024 * 1024)
            await producer.start()
            input_bytes = 0
            try:
                futures = []
                for i in range(args.inputs):
                    value = json.dumps({"id": f"in-{i}", "text": f"{i} " + "x" * args.chars}).encode()
                    input_bytes += len(value)
                    futures.append(await producer.send(topics["content"], value, key=f"in-{i}".encode()))
                await asyncio.gather(*futures)
            finally:
                await producer.stop()
            while (
                await _verdicts(bootstrap, topics["verdict"], args.partitions)
                + await _verdicts(bootstrap, topics["dlq"], args.partitions)
                < args.inputs
            ):
                worker.check_alive()
                await asyncio.sleep(0.2)
            done = time.time()
            peak = worker.rss_between(started, done)
    mib = 1024 * 1024
    return {
        "inputs": args.inputs,
        "chars_per_input": args.chars,
        "input_mib": round(input_bytes / mib, 1),
        "max_in_flight_bytes_mib": round(args.max_in_flight_bytes / mib, 1),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "growth_mib": round(peak - baseline, 1),
        "seconds": round(done - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=400)
    parser.add_argument("--chars", type=int, default=99_990, help="under MODWORKER_MAX_TEXT_CHARS (100,000)")
    parser.add_argument("--max-in-flight-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--latency-s", type=float, default=0.2, help="the loopback server's time per request")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bootstrap-servers", default=None)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the worker's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, test_broker(args.bootstrap_servers) as broker:
        log_dir = args.log_dir or Path(scratch)
        log_dir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(asyncio.run(_measure(broker.bootstrap_servers, args, log_dir))))


if __name__ == "__main__":
    main()
