"""CPU per message of the worker's own work, Kafka I/O aside, for the tree on PYTHONPATH.

Not a test: it answers "what did a change to the pipeline save", with less noise than a
full ``modworker bench`` on a shared machine. One process decodes ``--batch`` x 60 content
records of the bench's workload, holds their places in key order, scores them in batches
through the real Mistral backend (httpx, retries, breaker) against the bench's loopback
server (a process of its own, 0 ms), at most 8 calls at once, concludes every result
(policy, verdict, violation, JSON, ordering), chooses each output record's partition and
runs the acknowledgement callbacks; the sink's Kafka producer and the consumer are left
out. It prints the best of ``--rounds`` passes, in µs of this process's CPU per message.
``--compare DIR ...`` runs the same in a child process per source tree (each tree's own
``worker`` package), so two versions are measured side by side in one run:

    python worker/offline/bench/pipeline_cost.py
    python worker/offline/bench/pipeline_cost.py --compare /tmp/old-tree . --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and "--port" not in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

KEY = "bench-key"


async def _measure(port: int, batch: int, rounds: int) -> float:
    from aiokafka import ConsumerRecord
    from aiokafka.structs import TopicPartition

    from worker.backends.mistral import MistralBackend
    from worker.config import Settings
    from worker.offline.bench.workload import Workload, find_data_dir
    from worker.pipeline import sink as sink_module
    from worker.pipeline.decode import Decoder
    from worker.pipeline.outputs import Outputs
    from worker.pipeline.policy import Policy
    from worker.pipeline.types import PartitionOffsets
    from worker.pipeline.verdicts import VerdictBuilder

    count = batch * 60
    events = [e for e in Workload(find_data_dir()).events(count * 2) if e.kind == "content"][:count]
    now_ms = int(time.time() * 1000)
    records = [
        ConsumerRecord("c", i % 4, i, now_ms, 0, e.key, e.value, None, 1, len(e.value), [])
        for i, e in enumerate(events)
    ]
    settings = Settings(
        content_topic="c",
        conversation_topic="t",
        verdict_topic="v",
        violation_topic="x",
        dead_letter_topic="d",
        backend="mistral",
        mistral={"api_key": KEY, "base_url": f"http://127.0.0.1:{port}"},
        cache={"enabled": False},
    )
    backend = MistralBackend(settings)
    await backend.start()
    decoder = Decoder(content_topic="c", conversation_topic="t", max_text_chars=100_000)
    slots = [PartitionOffsets(TopicPartition("c", p)) for p in range(4)]
    partition_of: Any = sink_module._partition_of
    old_partitioner = hasattr(sink_module, "DefaultPartitioner")

    async def one_pass() -> float:
        groups: list[tuple[list[Any], Any]] = []

        class Publisher:
            def publish(self, out: list[Any], on_acked: Any, origin: Any = None, messages: int = 1) -> None:
                groups.append((out, on_acked))

        outputs = Outputs(
            settings,
            sink=Publisher(),
            verdicts=VerdictBuilder(policy=Policy.load(None), backend_name="mistral", include_text=False),
            on_finished=lambda slot, offset: None,
            on_abandoned=lambda: None,
        )
        started = time.process_time()
        jobs: list[Any] = [decoder.decode(r, slots[r.partition]) for r in records]
        for job in jobs:
            outputs.expect(job)
        limit = asyncio.Semaphore(8)

        async def call(start: int) -> None:
            part = jobs[start : start + batch]
            async with limit:
                results = await backend.score_texts([job.text for job in part])
            if hasattr(outputs, "conclude_all"):
                outputs.conclude_all(part, results)
            else:  # a tree from before per-call groups
                for job, result in zip(part, results, strict=True):
                    outputs.conclude(job, result)

        await asyncio.gather(*(call(i) for i in range(0, len(jobs), batch)))
        partitions = [0, 1, 2, 3]
        for out, _ in groups:
            for record in out:
                if old_partitioner:
                    partition_of(record.key, partitions, partitions)
                else:
                    partition_of(record.key, partitions)
        for _, on_acked in groups:
            on_acked()
        return (time.process_time() - started) / len(jobs)

    await one_pass()
    best = min([await one_pass() for _ in range(rounds)])
    await backend.close()
    return best


def _child(args: argparse.Namespace) -> None:
    from worker.ops.logs import configure_logging

    configure_logging(level="info", fmt="json", secrets=[])
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    gc.freeze()
    with asyncio.Runner(loop_factory=factory) as runner:
        best = runner.run(_measure(args.port, args.batch, args.rounds))
    print(f"{args.label:24s} loop={args.loop:8s} batch={args.batch}: {1e6 * best:6.1f} µs CPU per message", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="alternate the trees this many times")
    parser.add_argument("--loops", default="asyncio,uvloop", help="event loops to measure each tree on")
    parser.add_argument("--compare", nargs="*", default=None, help="source trees (default: this one)")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.port:
        _child(args)
        return
    from worker.offline.bench.api_process import ApiServerProcess

    trees = [Path(t).resolve() for t in (args.compare or [Path(__file__).resolve().parents[3]])]
    with ApiServerProcess(KEY) as api:
        for _ in range(args.repeat):
            for tree in trees:
                for loop in args.loops.split(","):
                    subprocess.run(
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "--port",
                            str(api.port),
                            "--loop",
                            loop,
                            "--batch",
                            str(args.batch),
                            "--rounds",
                            str(args.rounds),
                            "--label",
                            str(tree)[-24:],
                        ],
                        env={**os.environ, "PYTHONPATH": str(tree)},
                        cwd="/",
                        check=True,
                    )


if __name__ == "__main__":
    main()
