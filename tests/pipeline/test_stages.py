"""Pure-logic stages: decode classification, micro-batch flushing, per-key sequencing."""

from __future__ import annotations

import asyncio
import json

from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from worker.pipeline.batching import MicroBatcher
from worker.pipeline.decode import Decoder
from worker.pipeline.ordering import KeySequencer
from worker.pipeline.sink import dead_letter_record
from worker.pipeline.types import DecodeFailure, Job, PartitionOffsets

DECODER = Decoder(content_topic="in.c", conversation_topic="in.v", max_text_chars=50)


def decode(rec: ConsumerRecord) -> Job | DecodeFailure:
    """Decode ``rec`` as the worker does, tracked in a fresh slot of its partition."""
    return DECODER.decode(rec, PartitionOffsets(TopicPartition(rec.topic, rec.partition)))


def record(
    value: bytes | None,
    topic: str = "in.c",
    offset: int = 0,
    key: bytes | None = b"k",
    partition: int = 0,
    headers: list | None = None,
):
    return ConsumerRecord(topic, partition, offset, 0, 0, key, value, None, len(value or b""), 0, headers or [])


def test_decode_valid_content_and_conversation():
    job = decode(record(json.dumps({"id": "1", "text": "hello", "extra": 1}).encode()))
    assert isinstance(job, Job) and job.kind == "content" and job.text == "hello"
    turn = {
        "id": "t",
        "conversation_id": "c",
        "role": "user",
        "content": "hi",
        "context": [{"role": "assistant", "content": "yo"}],
    }
    job = decode(record(json.dumps(turn).encode(), topic="in.v", key=None))
    assert isinstance(job, Job) and job.kind == "conversation" and job.text == "hi"
    assert job.key == b"c"  # no key on the record: the conversation id it should have had


def test_decode_failures_are_classified():
    cases = {
        b"\xff\xfe": "not_utf8",
        b"{nope": "not_json",
        json.dumps({"text": "no id"}).encode(): "schema",
        json.dumps({"id": "1", "text": " \n\t"}).encode(): "empty_text",
        json.dumps({"id": "1", "text": "x" * 51}).encode(): "too_long",
        json.dumps([1, 2]).encode(): "schema",
    }
    for value, error_type in cases.items():
        result = decode(record(value))
        assert isinstance(result, DecodeFailure), value
        assert result.error_type == error_type, (value, result)
        assert result.message
    assert decode(record(None)).error_type == "not_json"
    assert decode(record(b"{}", topic="other")).error_type == "unknown_topic"


def test_conversation_context_counts_towards_the_length_limit():
    turn = {
        "id": "t",
        "conversation_id": "c",
        "role": "user",
        "content": "short",
        "context": [{"role": "user", "content": "y" * 60}],
    }
    assert decode(record(json.dumps(turn).encode(), topic="in.v")).error_type == "too_long"


def test_dead_letter_keeps_original_bytes_and_adds_reasons():
    original = record(b"\xff", key=b"key-1", offset=42, headers=[("trace", b"abc")])
    out = dead_letter_record(original, topic="dlq", stage="decode", error_type="not_utf8", message="bad")
    headers = dict(out.headers)
    assert out.key == b"key-1" and out.value == b"\xff" and out.topic == "dlq"
    assert headers["trace"] == b"abc"
    assert headers["x-modworker-dlq-origin-offset"] == b"42"
    assert headers["x-modworker-dlq-error-type"] == b"not_utf8"


def _job(i: int, kind: str = "content", size: int = 10, key: bytes = b"k", partition: int = 0) -> Job:
    value = json.dumps({"id": str(i), "text": "t"}).encode()
    rec = record(value, offset=i, key=key, partition=partition)
    job = decode(rec)
    job.kind = kind
    job.size = size
    return job


async def test_batches_flush_on_count_bytes_and_wait():
    batches: list[tuple[str, list[int]]] = []
    batcher = MicroBatcher(
        max_size=3,
        max_bytes=100,
        max_wait_s=0.05,
        on_batch=lambda kind, jobs: batches.append((kind, [j.record.offset for j in jobs])),
    )
    for i in range(3):
        batcher.add(_job(i))
    assert batches == [("content", [0, 1, 2])]  # count
    batcher.add(_job(3, size=60))
    batcher.add(_job(4, size=60))  # would overflow 100 bytes: the open batch goes first
    assert batches[-1] == ("content", [3])
    batcher.add(_job(5, kind="conversation"))  # lanes never mix
    assert batcher.queued == 2
    await asyncio.sleep(0.12)  # max wait
    assert sorted(batches[1:]) == [("content", [3]), ("content", [4]), ("conversation", [5])]
    assert batcher.queued == 0


async def test_flush_sends_open_batches_at_once():
    batches = []
    batcher = MicroBatcher(max_size=10, max_bytes=1000, max_wait_s=60, on_batch=lambda k, j: batches.append(len(j)))
    batcher.add(_job(0))
    batcher.add(_job(1, kind="conversation"))
    batcher.flush()
    assert batches == [1, 1] and batcher.queued == 0


def test_sequencer_releases_each_key_in_input_order():
    sequencer = KeySequencer()
    a = [_job(i, key=b"a") for i in range(3)]
    b = [_job(10 + i, key=b"b") for i in range(2)]
    for job in (a[0], b[0], a[1], b[1], a[2]):
        sequencer.enter(job)
    released: list[int] = []
    sequencer.complete(a[2], lambda: released.append(2))
    sequencer.complete(b[1], lambda: released.append(11))
    assert released == []  # both wait for earlier inputs of their key
    sequencer.complete(b[0], lambda: released.append(10))
    assert released == [10, 11]
    sequencer.complete(a[1], lambda: released.append(1))
    sequencer.complete(a[0], lambda: released.append(0))
    assert released == [10, 11, 0, 1, 2]
    assert len(sequencer) == 0


def test_sequencer_drop_forgets_revoked_partitions():
    sequencer = KeySequencer()
    first, second = _job(0), _job(1)
    sequencer.enter(first)
    sequencer.enter(second)
    third = _job(2)
    sequencer.enter(third)
    sequencer.complete(third, lambda: None)  # done, but waiting behind first and second
    assert sequencer.drop([TopicPartition("in.c", 0)]) == 1
    released = []
    sequencer.complete(second, lambda: released.append(1))  # not waiting for the dropped line
    assert released == [1]


def test_deeply_nested_json_is_dead_lettered_not_raised():
    # 6 kB of brackets: json.loads raises RecursionError, which must not leave the decoder.
    for value in (b"[" * 6_000 + b"]" * 6_000, b'{"id": "1", "text": ' + b"[" * 6_000 + b"]" * 6_000 + b"}"):
        result = decode(record(value))
        assert isinstance(result, DecodeFailure)
        assert result.error_type == "not_json"
        assert "deep" in result.message
