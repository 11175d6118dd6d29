"""Fuzz target ``decode``: ``Decoder.decode`` on any record value of either input topic,
and ``Decoder.decode_review`` on it as a record of the reviews topic.

Property: every value gives a ``Job`` or a ``DecodeFailure`` with one of the documented
error types and a reason; nothing raises. The class is checked against the standard
library's reading of the same bytes: ``not_utf8`` only for bytes that are not UTF-8,
``schema`` and ``empty_text`` only for JSON, ``too_long`` only over the limit, and a
``Job`` only for a JSON object whose judged text is that object's, not blank, within the
limit; a ``Review`` only for a JSON object.
"""

from __future__ import annotations

import json
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from worker.pipeline.decode import Decoder
from worker.pipeline.events import ContentEvent, ConversationEvent
from worker.pipeline.types import DecodeFailure, Job, PartitionOffsets, Review

CONTENT, CONVERSATION, REVIEWS = "ugc.content", "ugc.conversations", "moderation.reviews"
MAX_TEXT_CHARS = 64
"""Small, so that ``too_long`` is within the fuzzer's reach."""
ERROR_TYPES = frozenset({"not_utf8", "not_json", "schema", "empty_text", "too_long"})

_decoder = Decoder(content_topic=CONTENT, conversation_topic=CONVERSATION, max_text_chars=MAX_TEXT_CHARS)
_slot = PartitionOffsets(TopicPartition(CONTENT, 0))
_NOT_JSON = object()


def check(data: bytes) -> None:
    for topic in (CONTENT, CONVERSATION):
        record = ConsumerRecord(topic, 0, 0, 0, 0, None, data, None, 0, len(data), [])
        result = _decoder.decode(record, _slot)
        if isinstance(result, Job):
            _check_job(result, topic, data)
        else:
            assert isinstance(result, DecodeFailure), f"decode returned {type(result).__name__}"
            _check_failure(result, data)
    review = Decoder.decode_review(ConsumerRecord(REVIEWS, 0, 0, 0, 0, None, data, None, 0, len(data), []), _slot)
    if isinstance(review, Review):
        assert isinstance(_stdlib_json(data), dict), "a Review from a value that is not a JSON object"
    else:
        assert isinstance(review, DecodeFailure), f"decode_review returned {type(review).__name__}"
        assert review.error_type in ("not_utf8", "not_json", "schema"), f"review: {review.error_type!r}"
        _check_failure(review, data)


def _stdlib_json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _NOT_JSON


def _check_job(job: Job, topic: str, data: bytes) -> None:
    parsed = _stdlib_json(data)
    assert isinstance(parsed, dict), "a Job from a value that is not a JSON object"
    assert job.size == len(data), "Job.size is not the value's length"
    if topic == CONTENT:
        assert job.kind == "content" and isinstance(job.event, ContentEvent), "content topic gave another kind"
        judged, length = job.event.text, len(job.event.text)
        assert judged == parsed.get("text"), "the judged text is not the value's text field"
    else:
        assert job.kind == "conversation" and isinstance(job.event, ConversationEvent), (
            "conversation topic gave another kind"
        )
        judged = job.event.content
        length = len(judged) + sum(len(turn.content) for turn in job.event.context)
        assert judged == parsed.get("content"), "the judged turn is not the value's content field"
    assert judged.strip(), "a Job with blank text"
    assert length <= MAX_TEXT_CHARS, "a Job over the text limit"
    judged.encode("utf-8")  # what the backends and the sink will send: no lone surrogates


def _check_failure(failure: DecodeFailure, data: bytes) -> None:
    assert failure.error_type in ERROR_TYPES, f"undocumented error type {failure.error_type!r}"
    assert isinstance(failure.message, str) and failure.message, "a dead letter without a reason"
    if failure.error_type == "not_utf8":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return
        raise AssertionError("not_utf8 for a UTF-8 value")
    if failure.error_type in ("schema", "empty_text", "too_long"):
        assert _stdlib_json(data) is not _NOT_JSON, f"{failure.error_type} for a value that is not JSON"
