"""Input events as the pipeline holds them: msgspec Structs, decoded straight from record bytes.

``schemas`` stays the public contract (JSON Schema, AsyncAPI, docs): ``ContentEvent``,
``ConversationEvent`` and ``Turn`` here mirror its models field for field (names, order,
types, defaults; tests/pipeline/test_events.py fails when they drift). They exist because
msgspec decodes a record in a fraction of pydantic's CPU and a Struct takes a fraction of a
model's memory, and thousands of events are in flight.

The agreement rule: the inputs the worker accepts, and the values it reads from them, are
exactly pydantic's. ``EventDecoder.decode`` returns a Struct only where pydantic would accept
the same bytes with equal values; wherever the two parsers may disagree it returns None and
the caller validates with pydantic (``from_model`` turns the model into its Struct). Where
msgspec is more lenient than pydantic, the fast path refuses:

- invalid UTF-8 inside a field the Struct does not declare (msgspec skips it unread);
- nesting deeper than pydantic's parser follows (it stops at about 200 levels);
- a blank ``text`` / ``content`` (pydantic's ``_not_blank``);
- a ``created_at`` string outside ``_AGREED_DATETIME`` (e.g. more than 6 fractional digits:
  msgspec rounds them, pydantic truncates).

Where pydantic is the more lenient (``NaN``/``Infinity``, numbers out of float range, a unix
time for ``created_at``, ``2024-01-02``, ``_`` or ``,`` in a datetime), msgspec refuses and
pydantic decides. Datetimes hold ``datetime.timezone`` offsets (pydantic's own ``TzInfo`` is
replaced by the equal ``timezone``), whichever parser read them.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any

import msgspec

import schemas
from schemas.models import Role

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

_MAX_NESTING = 128
"""Records with more ``{`` and ``[`` bytes than this go to pydantic: its parser refuses
nesting past about 200 levels, msgspec's follows deeper."""

_AGREED_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?"
)
"""``created_at`` forms msgspec and pydantic both parse to the same instant and offset (or both
refuse, for an impossible date or time); any other string is left to pydantic."""


class Turn(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=False):
    """``schemas.Turn``: one earlier turn of a conversation."""

    role: Role
    content: str


class ContentEvent(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=False):
    """``schemas.ContentEvent``. ``gc=False``: its fields hold JSON values only, never a cycle."""

    id: NonEmpty
    text: str
    tenant: str | None = None
    source: str | None = None
    author_id: str | None = None
    created_at: datetime | None = None
    metadata: dict[str, Any] | None = None


class ConversationEvent(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=False):
    """``schemas.ConversationEvent``; ``context`` is a tuple (a Struct is immutable)."""

    id: NonEmpty
    conversation_id: NonEmpty
    role: Role
    content: str
    context: tuple[Turn, ...] = ()
    tenant: str | None = None
    source: str | None = None
    author_id: str | None = None
    created_at: datetime | None = None
    metadata: dict[str, Any] | None = None


Event = ContentEvent | ConversationEvent


class _CreatedAt(msgspec.Struct, gc=False):
    created_at: str | None = None


_CREATED_AT = msgspec.json.Decoder(_CreatedAt)


class EventDecoder:
    """Decodes one kind's record values into its Struct, as far as pydantic would agree."""

    def __init__(self, struct: type[ContentEvent] | type[ConversationEvent]) -> None:
        self._decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(struct)

    def decode(self, value: bytes) -> Event | None:
        """The event in ``value``, or None: pydantic must decide (it may still accept). Never raises."""
        if not value.isascii():
            try:
                value.decode()
            except UnicodeDecodeError:
                return None
        if len(value) > _MAX_NESTING and value.count(b"{") + value.count(b"[") > _MAX_NESTING:
            return None
        try:
            event = self._decoder.decode(value)
        except (msgspec.DecodeError, ValueError, RecursionError):
            # ValueError: msgspec raises UnicodeDecodeError for invalid UTF-8 in a declared field.
            return None
        judged = event.text if isinstance(event, ContentEvent) else event.content
        if not judged.strip():
            return None
        if event.created_at is not None:
            written = _CREATED_AT.decode(value).created_at
            if written is None or _AGREED_DATETIME.fullmatch(written) is None:
                return None
        return event


def from_model(model: schemas.ContentEvent | schemas.ConversationEvent) -> Event:
    """The Struct of a validated event (no validation again: its values are valid)."""
    created_at = _stdlib_offset(model.created_at)
    if isinstance(model, schemas.ContentEvent):
        return ContentEvent(
            model.id, model.text, model.tenant, model.source, model.author_id, created_at, model.metadata
        )
    return ConversationEvent(
        model.id,
        model.conversation_id,
        model.role,
        model.content,
        tuple(Turn(turn.role, turn.content) for turn in model.context),
        model.tenant,
        model.source,
        model.author_id,
        created_at,
        model.metadata,
    )


def schema_turns(turns: tuple[Turn, ...]) -> tuple[schemas.Turn, ...]:
    """``turns`` as the ``schemas.Turn`` models backends take, built without validation
    (the values are valid already)."""
    return tuple(schema_turn(turn.role, turn.content) for turn in turns)


def schema_turn(role: Role, content: str) -> schemas.Turn:
    """A ``schemas.Turn`` of already-valid values, equal to a validated one."""
    turn = schemas.Turn.__new__(schemas.Turn)
    object.__setattr__(turn, "__dict__", {"role": role, "content": content})
    object.__setattr__(turn, "__pydantic_fields_set__", _TURN_FIELDS)
    object.__setattr__(turn, "__pydantic_extra__", None)
    object.__setattr__(turn, "__pydantic_private__", None)
    return turn


_TURN_FIELDS = frozenset(("role", "content"))


def _stdlib_offset(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    offset = value.utcoffset()
    return value if offset is None else value.replace(tzinfo=timezone(offset))
