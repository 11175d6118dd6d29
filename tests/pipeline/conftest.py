"""Builders for the pipeline's unit tests: records, slots and jobs without a broker."""

from __future__ import annotations

import json
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from worker.pipeline.decode import Decoder
from worker.pipeline.types import Job, PartitionOffsets

CONTENT_TOPIC = "in.c"
CONVERSATION_TOPIC = "in.v"
DECODER = Decoder(content_topic=CONTENT_TOPIC, conversation_topic=CONVERSATION_TOPIC, max_text_chars=1000)


def make_record(
    value: bytes | None,
    *,
    topic: str = CONTENT_TOPIC,
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = b"k",
    timestamp: int = 0,
) -> ConsumerRecord:
    return ConsumerRecord(
        topic, partition, offset, timestamp, 0, key, value, None, len(key or b""), len(value or b""), []
    )


def make_job(
    text: str = "hello", *, slot: PartitionOffsets | None = None, offset: int = 0, key: bytes = b"k", **event: Any
) -> Job:
    """A content job tracked in ``slot`` (a fresh one of in.c-0 by default)."""
    slot = slot or PartitionOffsets(TopicPartition(CONTENT_TOPIC, 0))
    slot.track(offset)
    value = json.dumps({"id": f"e{offset}", "text": text, **event}).encode()
    job = DECODER.decode(make_record(value, offset=offset, key=key, partition=slot.tp.partition), slot)
    assert isinstance(job, Job)
    return job
