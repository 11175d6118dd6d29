"""The worker's own bookkeeping (``worker/app.py``) under interleavings a broker test meets
only by luck: an offset reset or a revoke while work is in flight or queued in the sink.

The real ``ModerationWorker`` runs without a broker: records are handed to ``_accept`` as
the consume loop would, the sink publishes into an in-memory producer whose batches are
acknowledged when the test says, and the backend answers when the test opens its gate.
Each test forces one order of events; nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from aiokafka.structs import TopicPartition

from tests.pipeline.conftest import make_record
from worker.app import ModerationWorker
from worker.backends.base import Backend, Conversation, Outcome, Scored
from worker.config import load_settings
from worker.pipeline.policy import Policy
from worker.pipeline.sink import Sink

TP = TopicPartition("ugc.content", 0)


class GatedBackend(Backend):
    """Scores every text once ``gate`` is open."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        await self.gate.wait()
        return [Scored({"spam": 0.01}, "m") for _ in texts]

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        raise AssertionError("not used")


class MemoryBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []

    def append(self, *, key: bytes | None, value: bytes | None, timestamp: Any, headers: Any) -> object:
        self.records.append((key, value))
        return object()


class MemoryProducer:
    """What the ``Sink`` needs of ``AIOKafkaProducer``; batches wait for ``ack_all``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, MemoryBatch, asyncio.Future[None]]] = []

    async def start(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> MemoryBatch:
        return MemoryBatch()

    async def send_batch(self, batch: MemoryBatch, topic: str, *, partition: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, batch, future))
        return future

    def ack_all(self) -> None:
        for _, _, future in self.sent:
            if not future.done():
                future.set_result(None)

    def published(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        return [record for sent_to, batch, _ in self.sent if sent_to == topic for record in batch.records]


class Worker:
    """A ``ModerationWorker`` on an in-memory producer and a gated backend, owning ``TP``."""

    def __init__(self) -> None:
        self.settings = load_settings(kafka={"bootstrap_servers": "127.0.0.1:1"}, require_backend=False)
        self.backend = GatedBackend()
        self.worker = ModerationWorker(self.settings, backend=self.backend, policy=Policy.load(None))
        self.producer = MemoryProducer()
        sink = self.worker._sink
        assert isinstance(sink, Sink)
        self.sink = sink
        sink._producer = self.producer
        self.worker._tracker.assign([TP])

    def read(self, offset: int, key: bytes) -> None:
        """The consume loop accepting one record of ``TP``."""
        value = json.dumps({"id": f"e{offset}", "text": f"text {offset}"}).encode()
        self.worker._accept(make_record(value, topic=TP.topic, offset=offset, key=key))

    def new_poll(self) -> None:
        """What the consume loop does between two polls (forget which partitions it sent back)."""
        rewound = getattr(self.worker, "_rewound", None)
        if rewound is not None:
            rewound.clear()

    async def dispatch(self) -> None:
        """Send the open batch to the backend and let it run up to the backend's gate."""
        self.worker._batcher.flush()
        for _ in range(5):
            await asyncio.sleep(0)

    async def processed(self) -> None:
        """Every batch task ended."""
        await asyncio.gather(*self.worker._tasks)
        for _ in range(5):
            await asyncio.sleep(0)

    async def acked(self) -> None:
        """The broker acknowledges everything sent; the callbacks have run."""
        for _ in range(5):
            await asyncio.sleep(0)
        self.producer.ack_all()
        for _ in range(5):
            await asyncio.sleep(0)

    @property
    def in_flight(self) -> int:
        return self.worker.in_flight

    async def close(self) -> None:
        sink_task = self.sink._task
        if sink_task is not None:
            sink_task.cancel()
        await self.worker.source._consumer.stop()


async def test_a_dropped_sink_group_lowers_the_in_flight_count_by_its_size() -> None:
    """One call's three verdicts are one sink group. An offset reset detaches their slot
    while the group is still queued; the sink drops it: three messages are no longer in
    flight, not one (else the count creeps up until the in-flight cap pauses for good)."""
    w = Worker()
    try:
        for offset in range(3):
            w.read(offset, key=f"k{offset}".encode())
        await w.dispatch()
        w.backend.gate.set()
        await w.processed()  # the verdicts are queued in the sink, one group (its task is not started)
        assert w.sink.unacked == 1 and w.in_flight == 3

        w.read(0, key=b"k0")  # the position moved back: the slot is detached, offset 0 read again
        await w.sink.start()  # the sink now takes the group of the detached slot and drops it
        for _ in range(5):
            await asyncio.sleep(0)

        assert w.sink.unacked == 0 and w.producer.sent == [], "the group was dropped unsent"
        assert w.in_flight == 1, "only the record read again is in flight"
    finally:
        await w.close()


async def test_an_offset_reset_with_jobs_in_flight_does_not_stall_the_partition() -> None:
    """Three turns of one key are at the backend when the position moves back and they are
    read again. The old jobs are abandoned; the new ones must not wait behind them in their
    key's line: they are published and the committed offset moves past them."""
    w = Worker()
    try:
        await w.sink.start()
        for offset in range(3):
            w.read(offset, key=b"same-key")
        await w.dispatch()  # the old jobs wait at the backend
        for offset in range(3):
            w.read(offset, key=b"same-key")  # the first one resets the slot
        assert w.in_flight == 6

        w.backend.gate.set()
        await w.processed()  # the old batch ends: abandoned, its slot no longer owned
        await w.dispatch()
        await w.processed()
        await w.acked()

        assert len(w.producer.published(w.settings.verdict_topic)) == 3, "the records read again were published"
        assert w.worker._tracker.committable([TP]) == {TP: 3}, "the committed offset moves past them"
        assert w.in_flight == 0
    finally:
        await w.close()


class SeekRecorder:
    """Stands in for the consumer under ``Source``: records where the worker seeks."""

    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def stop(self) -> None:
        pass


async def test_a_position_moved_back_above_unfinished_inputs_is_read_again_from_the_lowest_of_them() -> None:
    """Offsets 0-4 are read, 0 and 1 still at the backend, when the position moves back to 3
    (a truncation reset to latest). Tracking afresh from 3 would commit over 0-2, which the
    old slot abandons: the worker sends the position back to 0 and ignores the rest of the
    poll; reading resumes from 0 on the fresh slot, and the commit never passes 0 unjudged."""
    w = Worker()
    real_consumer = w.worker.source._consumer
    await real_consumer.stop()
    recorder = SeekRecorder()
    w.worker.source._consumer = recorder
    try:
        await w.sink.start()
        for offset in range(2):
            w.read(offset, key=f"k{offset}".encode())
        await w.dispatch()  # 0 and 1 wait at the backend
        for offset in range(2, 5):
            w.read(offset, key=f"k{offset}".encode())
        w.new_poll()
        for offset in (3, 4):
            w.read(offset, key=f"k{offset}".encode())  # moved back to 3
        assert recorder.seeks == [(TP, 0)], "sent back to the lowest unfinished offset"

        w.new_poll()  # reads from 0
        for offset in range(5):
            w.read(offset, key=f"k{offset}".encode())
        w.backend.gate.set()
        await w.processed()
        await w.dispatch()
        await w.processed()
        await w.acked()

        assert w.worker._tracker.committable([TP]) == {TP: 5}
        verdicts = {value for _, value in w.producer.published(w.settings.verdict_topic)}
        assert {json.loads(v or b"{}")["event_id"] for v in verdicts} == {f"e{o}" for o in range(5)}
        assert w.in_flight == 0
    finally:
        await w.close()


class SlowMetadataProducer(MemoryProducer):
    """``MemoryProducer`` whose first round waits for ``metadata`` (a slow leader lookup)."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata = asyncio.Event()

    async def partitions_for(self, topic: str) -> set[int]:
        await self.metadata.wait()
        return {0}


async def test_outputs_still_queued_at_shutdown_are_dropped_and_nothing_is_sent_after_leaving_the_group() -> None:
    """The drain ended (its timeout) with e0's verdict being sent and e1's queued behind it.
    Neither offset is committed any more, so e1's verdict is dropped unsent (the next owner
    redoes e1), and the sink is closed before the consumer leaves the group: nothing is
    published for a partition another member may already own."""
    w = Worker()
    producer = w.sink._producer = w.producer = SlowMetadataProducer()
    left_with: list[int] = []  # the sends made when the consumer left the group
    real_stop = w.worker.source.stop

    async def stop() -> None:
        left_with.append(len(producer.sent))
        await real_stop()

    w.worker.source.stop = stop  # type: ignore[method-assign]
    try:
        await w.sink.start()
        w.backend.gate.set()
        w.read(0, key=b"k0")
        await w.dispatch()
        await w.processed()  # e0's verdict: taken by the sink, waiting for the metadata
        w.read(1, key=b"k1")
        await w.dispatch()
        await w.processed()  # e1's verdict: queued behind it
        assert w.sink.unacked == 2 and producer.sent == []

        closing = asyncio.create_task(w.worker._close_quietly())
        for _ in range(5):
            await asyncio.sleep(0)
        producer.metadata.set()
        await asyncio.wait_for(closing, timeout=5)

        verdicts = [json.loads(v or b"{}")["event_id"] for _, v in producer.published(w.settings.verdict_topic)]
        assert verdicts == ["e0"], "the verdict still queued was dropped, not sent"
        assert left_with == [len(producer.sent)], "nothing was sent after the consumer left the group"
    finally:
        await w.close()
