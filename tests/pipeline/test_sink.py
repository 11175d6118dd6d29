"""The sink without a broker: what it holds while a round waits for the producer."""

from __future__ import annotations

import asyncio
from typing import Any

from worker.pipeline.sink import Sink
from worker.pipeline.types import OutRecord


class Batch:
    def __init__(self) -> None:
        self.values: list[bytes | None] = []

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any) -> object:
        self.values.append(value)
        return object()


class SlowProducer:
    """Each ``send_batch`` waits for ``drained``, as aiokafka's waits for the partition's
    previous batch; the delivery futures resolve at once after it."""

    def __init__(self) -> None:
        self.drained = asyncio.Event()
        self.waiting = asyncio.Event()
        self.sent: list[Batch] = []

    async def start(self) -> None: ...

    async def flush(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> Batch:
        return Batch()

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[None]:
        self.waiting.set()
        await self.drained.wait()
        self.sent.append(batch)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_round_lets_go_of_its_records_once_they_are_in_their_batches():
    producer = SlowProducer()
    sink = Sink(producer, on_error=print)  # type: ignore[arg-type]
    acked: list[str] = []
    first = [OutRecord("state", b"c", b"x" * 10_000, partition=0), OutRecord("v", b"c", b"verdict")]
    second = [OutRecord("v", b"d", b"verdict")]
    sink.publish(first, lambda: acked.append("first"))
    sink.publish(second, lambda: acked.append("second"))
    await sink.start()
    await asyncio.wait_for(producer.waiting.wait(), 5)
    assert first == [] and second == [], "a round waiting for the producer still holds records already appended"
    producer.drained.set()
    for _ in range(100):
        if acked:
            break
        await asyncio.sleep(0.01)
    assert acked == ["first", "second"]
    assert sorted(v for batch in producer.sent for v in batch.values) == sorted([b"x" * 10_000, b"verdict", b"verdict"])
    await sink.close()
