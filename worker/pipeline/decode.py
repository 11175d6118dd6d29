"""Decode stage: raw Kafka record bytes -> a validated event, or a reason to dead-letter it.

msgspec decodes the value bytes into the event's Struct (``worker.pipeline.events``) first;
where it cannot vouch that pydantic would accept the same bytes with the same values, pydantic
validates them (straight from the bytes) as the contract's models define, and an accepted model
becomes its Struct. So the inputs accepted and the values read are pydantic's, and a
``Job.event`` is always a Struct. Only when validation fails is the failure classified, so the
common path stays cheap.

Contract: ``Decoder.decode`` never raises for bad input; every record yields either a
``Job`` or a ``DecodeFailure`` whose ``error_type`` is one of ``not_utf8``, ``not_json``,
``schema``, ``empty_text``, ``too_long`` or ``unknown_topic``. A value nested deeper than
a parser can follow is ``not_json``. ``Decoder.decode_review`` does the same for a record of
the reviews topic: a ``Review`` or a ``DecodeFailure`` (``not_utf8``, ``not_json``, ``schema``).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

import schemas
from schemas import Kind, ReviewDecision
from worker.pipeline.events import ContentEvent, ConversationEvent, EventDecoder, from_model
from worker.pipeline.types import DecodeFailure, Job, PartitionOffsets, Record, Review

_Model = type[schemas.ContentEvent] | type[schemas.ConversationEvent]


class Decoder:
    """Turns records of the two input topics into ``Job`` or ``DecodeFailure``."""

    def __init__(self, *, content_topic: str, conversation_topic: str, max_text_chars: int) -> None:
        self._kinds: dict[str, tuple[Kind, EventDecoder, _Model]] = {
            content_topic: ("content", EventDecoder(ContentEvent), schemas.ContentEvent),
            conversation_topic: ("conversation", EventDecoder(ConversationEvent), schemas.ConversationEvent),
        }
        self._max_text_chars = max_text_chars

    def decode(self, record: Record, slot: PartitionOffsets) -> Job | DecodeFailure:
        """``record`` as a ``Job`` tracked in ``slot``, or why it cannot be judged. Never raises."""
        entry = self._kinds.get(record.topic)
        if entry is None:
            return DecodeFailure(record, "unknown_topic", f"no decoder for topic {record.topic!r}")
        kind, decoder, model = entry
        value = record.value
        if value is None:
            return DecodeFailure(record, "not_json", "record has no value (tombstone)")
        event = decoder.decode(value)
        if event is None:
            try:
                event = from_model(model.model_validate_json(value))
            except ValidationError as err:
                return self._classify(record, err)
        if isinstance(event, ConversationEvent):
            text_len = len(event.content) + sum(len(turn.content) for turn in event.context)
            judged = event.content
        else:
            judged = event.text
            text_len = len(judged)
        if text_len > self._max_text_chars:
            return DecodeFailure(
                record,
                "too_long",
                f"text is {text_len} characters; the limit is {self._max_text_chars} (MODWORKER_MAX_TEXT_CHARS)",
            )
        return Job(record=record, slot=slot, kind=kind, event=event, size=len(value))

    @staticmethod
    def decode_review(record: Record, slot: PartitionOffsets) -> Review | DecodeFailure:
        """``record`` (of the reviews topic) as a ``Review`` tracked in ``slot``, or why not. Never raises."""
        if record.value is None:
            return DecodeFailure(record, "not_json", "record has no value (tombstone)")
        try:
            decision = ReviewDecision.model_validate_json(record.value)
        except ValidationError as err:
            return Decoder._classify(record, err)
        return Review(record=record, slot=slot, decision=decision)

    @staticmethod
    def _classify(record: Record, err: ValidationError) -> DecodeFailure:
        value: bytes = record.value
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as decode_err:
            return DecodeFailure(record, "not_utf8", f"value is not UTF-8: {decode_err}")
        try:
            json.loads(text)
        except json.JSONDecodeError as json_err:
            return DecodeFailure(record, "not_json", f"value is not JSON: {json_err}")
        except RecursionError:
            # Pydantic refused it already (its parser bounds the depth); the standard parser
            # would recurse past the interpreter's limit: bad input, not a worker failure.
            return DecodeFailure(record, "not_json", "value is nested too deeply to parse as JSON")
        errors = err.errors(include_url=False)
        if all(_is_blank_text_error(e) for e in errors):
            return DecodeFailure(record, "empty_text", "text is empty or whitespace only")
        return DecodeFailure(record, "schema", _summarise(errors))


def _is_blank_text_error(error: Any) -> bool:
    return error.get("loc") in (("text",), ("content",)) and "non-whitespace" in str(error.get("msg", ""))


def _summarise(errors: list[Any]) -> str:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or '<root>'}: {e.get('msg')}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "schema violation: " + "; ".join(parts) + more
