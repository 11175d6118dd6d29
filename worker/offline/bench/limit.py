"""The limit: a plain aiokafka loop moving records from the input topics to one output topic.

No parsing, no backend, no policy: consume a batch (``getmany``), append its records to
one producer batch per partition (``create_batch`` / ``send_batch``: the cheapest way
aiokafka has to produce; acks=all, linger 5 ms and 512 KB batches, as the worker's own
producer), and commit the batch's offsets once the broker acknowledged
the records (acks=all). Acknowledgement of one batch is awaited while the next is read,
so reading and producing overlap. Records keep their key and their partition number (the
output topic needs at least as many partitions as the inputs; the bench creates it so).

This is the ceiling one Python process reaches on a machine and broker; the worker's
throughput is reported as a ratio of it. Runs in its own process so that its CPU time and
RSS are measured like the worker's:

    python -m worker.offline.bench.limit --bootstrap HOST:PORT --inputs A,B --output OUT --group G

It runs until SIGTERM or SIGINT, then waits for the last acknowledgements, commits and
exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

MAX_POLL_RECORDS = 2_000
MAX_BATCH_BYTES = 512 * 1024
"""The worker's output producer setting (``worker.app``). With aiokafka's default 16 KB the
same loop moves about a quarter as much: one request in flight per broker, one batch per
partition in it."""


async def move(
    bootstrap: str, inputs: list[str], output: str, group: str, *, idempotence: bool, fetch_max_wait_ms: int = 500
) -> int:
    """Move records until stopped; returns how many were read (all acknowledged and committed)."""
    consumer = AIOKafkaConsumer(
        *inputs,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
        max_poll_records=MAX_POLL_RECORDS,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        linger_ms=5,
        max_batch_size=MAX_BATCH_BYTES,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await consumer.start()
    await producer.start()
    out_partitions = sorted(await producer.partitions_for(output))
    moved = 0
    pending: tuple[list[asyncio.Future], dict[TopicPartition, int]] | None = None
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=MAX_POLL_RECORDS)
            if not batches:
                if pending is not None:  # idle: finish the last batch now
                    await _acknowledge_and_commit(consumer, *pending)
                    pending = None
                continue
            futures = []
            for tp, records in batches.items():
                if tp.partition not in out_partitions:
                    raise SystemExit(
                        f"output topic {output} has no partition {tp.partition}: "
                        "create it with as many partitions as the inputs"
                    )
                batch = producer.create_batch()
                for record in records:
                    if batch.append(key=record.key, value=record.value, timestamp=None) is None:  # full
                        futures.append(await producer.send_batch(batch, output, partition=tp.partition))
                        batch = producer.create_batch()
                        batch.append(key=record.key, value=record.value, timestamp=None)
                futures.append(await producer.send_batch(batch, output, partition=tp.partition))
                moved += len(records)
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
            if pending is not None:
                await _acknowledge_and_commit(consumer, *pending)
            pending = (futures, offsets)
        if pending is not None:
            await _acknowledge_and_commit(consumer, *pending)
    finally:
        await producer.stop()
        await consumer.stop()
    return moved


async def _acknowledge_and_commit(
    consumer: AIOKafkaConsumer, futures: list[asyncio.Future], offsets: dict[TopicPartition, int]
) -> None:
    await asyncio.gather(*futures)
    await consumer.commit(offsets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.offline.bench.limit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--inputs", required=True, help="comma-separated input topics")
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--idempotence", action="store_true", help="idempotent producer (not on the embedded broker)")
    parser.add_argument("--fetch-max-wait-ms", type=int, default=500, help="consumer fetch wait (aiokafka default 500)")
    args = parser.parse_args(argv)
    asyncio.run(
        move(
            args.bootstrap,
            args.inputs.split(","),
            args.output,
            args.group,
            idempotence=args.idempotence,
            fetch_max_wait_ms=args.fetch_max_wait_ms,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
