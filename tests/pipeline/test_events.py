"""The msgspec events mirror the contract's models, and decoding with them accepts and reads
exactly what pydantic does (worker.pipeline.events, the agreement rule)."""

from __future__ import annotations

import json
import types
import typing
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from aiokafka.structs import TopicPartition
from annotated_types import MinLen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

import schemas
from tests.pipeline.conftest import CONTENT_TOPIC, CONVERSATION_TOPIC, DECODER, make_record
from worker.pipeline import events
from worker.pipeline.decode import Decoder
from worker.pipeline.types import DecodeFailure, Job, PartitionOffsets

MIRRORS = [
    (schemas.ContentEvent, events.ContentEvent),
    (schemas.ConversationEvent, events.ConversationEvent),
    (schemas.Turn, events.Turn),
]


def _contract_type(hint: Any) -> Any:
    """A Struct field's type as the contract's model spells it: events.Turn is schemas.Turn, a
    tuple[X, ...] a list[X], and msgspec.Meta(min_length) pydantic's MinLen."""
    if hint is events.Turn:
        return schemas.Turn
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _contract_type(args[0])
    if origin is tuple:
        return list[_contract_type(args[0])]  # type: ignore[misc]
    if origin in (typing.Union, types.UnionType):
        return frozenset(_contract_type(a) for a in args)
    return hint


def _model_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return frozenset(typing.get_args(hint))
    return hint


def _min_length(struct_hint: Any) -> int | None:
    if typing.get_origin(struct_hint) is typing.Annotated:
        for meta in typing.get_args(struct_hint)[1:]:
            if isinstance(meta, msgspec.Meta):
                return meta.min_length
    return None


@pytest.mark.parametrize(("model", "struct"), MIRRORS, ids=lambda m: m.__name__)
def test_each_struct_mirrors_its_contract_model_field_for_field(model: Any, struct: Any) -> None:
    fields = msgspec.structs.fields(struct)
    assert [f.name for f in fields] == list(model.model_fields), "same fields, same order"
    hints = typing.get_type_hints(struct, include_extras=True)
    for field in fields:
        info = model.model_fields[field.name]
        assert _contract_type(hints[field.name]) == _model_type(info.annotation), f"{field.name}: same type"
        assert field.required == info.is_required(), f"{field.name}: required in both or neither"
        if not field.required:
            default = info.default_factory() if info.default is PydanticUndefined else info.default  # type: ignore[call-arg,misc]
            struct_default = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
            assert (list(struct_default) if isinstance(struct_default, tuple) else struct_default) == default
        model_min = next((m.min_length for m in info.metadata if isinstance(m, MinLen)), None)
        assert _min_length(hints[field.name]) == model_min, f"{field.name}: same min_length"


def test_a_struct_is_immutable_and_untracked_by_the_cycle_collector() -> None:
    event = events.ContentEvent("e1", "hello")
    with pytest.raises(AttributeError):
        event.text = "other"  # type: ignore[misc]
    import gc

    assert not gc.is_tracked(event), "gc=False: thousands in flight cost the collector nothing"


def test_schema_turn_equals_a_validated_turn() -> None:
    built = events.schema_turn("assistant", "hello there")
    validated = schemas.Turn(role="assistant", content="hello there")
    assert built == validated
    assert built.model_dump() == validated.model_dump()
    assert built.model_fields_set == validated.model_fields_set


# -- agreement with pydantic ---------------------------------------------------------


def _old_decode(record: Any, model: type[schemas.ContentEvent] | type[schemas.ConversationEvent]) -> Any:
    """What decode gave before the Structs: pydantic, and ``_classify`` on its failure."""
    try:
        event = model.model_validate_json(record.value)
    except ValidationError as err:
        failure = Decoder._classify(record, err)
        return ("failure", failure.error_type, failure.message)
    values = event.model_dump()
    values["created_at"] = _instant(event.created_at)
    return ("job", repr(values))


def _new_decode(record: Any) -> Any:
    outcome = DECODER.decode(record, PartitionOffsets(TopicPartition(record.topic, 0)))
    if isinstance(outcome, DecodeFailure):
        return ("failure", outcome.error_type, outcome.message)
    assert isinstance(outcome, Job)
    event = outcome.event
    assert isinstance(event, events.ContentEvent | events.ConversationEvent), "Job.event is always a Struct"
    values = msgspec.structs.asdict(event)
    if "context" in values:
        values["context"] = [msgspec.structs.asdict(turn) for turn in values["context"]]
    values["created_at"] = _instant(event.created_at)
    return ("job", repr(values))


def _instant(value: datetime | None) -> Any:
    """What a datetime means to its readers (statements, reviews): wall time, offset, UTC date."""
    if value is None:
        return None
    aware = value.tzinfo is not None
    return (value.replace(tzinfo=None), value.utcoffset(), (value.astimezone(UTC) if aware else value).date())


def _assert_agrees(value: bytes, topic: str) -> None:
    model = schemas.ContentEvent if topic == CONTENT_TOPIC else schemas.ConversationEvent
    record = make_record(value, topic=topic)
    if len(value) <= 1000:  # DECODER's max_text_chars: too_long is the same check after either
        assert _new_decode(record) == _old_decode(record, model)


def _fast(value: bytes, struct: Any = events.ContentEvent) -> Any:
    return events.EventDecoder(struct).decode(value)


def _content(**fields: Any) -> bytes:
    return json.dumps({"id": "e1", "text": "hello", **fields}).encode()


LENIENT_MSGSPEC = {
    "invalid UTF-8 in an unknown field (msgspec skips it unread)": b'{"id":"e1","text":"hi","x":"\xff"}',
    "overlong UTF-8 in an unknown field": b'{"id":"e1","text":"hi","x":"\xc0\x80"}',
    "nesting past pydantic's limit in metadata": b'{"id":"e1","text":"hi","metadata":{"x":'
    + b"[" * 250
    + b"]" * 250
    + b"}}",
    "nesting past pydantic's limit in an unknown field": b'{"id":"e1","text":"hi","x":'
    + b"[" * 250
    + b"]" * 250
    + b"}",
    "blank text": _content(text=" \t\n"),
    "text of a non-breaking space": _content(text="\u00a0"),
    "text of a separator control character": _content(text="\x1c"),
    "a later duplicate text that is blank": b'{"id":"e1","text":"hi","text":"  "}',
    "more than 6 fractional digits (msgspec rounds, pydantic truncates)": _content(
        created_at="2024-01-02T03:04:05.1234567Z"
    ),
    "fractional digits rounding into the next second": _content(created_at="2024-01-02T03:04:05.9999999Z"),
}


@pytest.mark.parametrize("value", LENIENT_MSGSPEC.values(), ids=LENIENT_MSGSPEC.keys())
def test_where_msgspec_is_more_lenient_the_fast_path_refuses_and_pydantic_decides(value: bytes) -> None:
    assert _fast(value) is None, "the fast path must not vouch for this"
    _assert_agrees(value, CONTENT_TOPIC)


LENIENT_PYDANTIC = {
    "created_at as a unix number": _content(created_at=1_700_000_000),
    "created_at as a unix number in a string": _content(created_at="1700000000.5"),
    "created_at as a date only": _content(created_at="2024-01-02"),
    "created_at without seconds": _content(created_at="2024-01-02T03:04Z"),
    "created_at with an underscore": _content(created_at="2024-01-02_03:04:05Z"),
    "created_at with a decimal comma": _content(created_at="2024-01-02T03:04:05,5+01:00"),
    "NaN in metadata": b'{"id":"e1","text":"hi","metadata":{"x":NaN}}',
    "Infinity in an unknown field": b'{"id":"e1","text":"hi","x":-Infinity}',
    "a number out of float range": b'{"id":"e1","text":"hi","metadata":{"x":1e400}}',
    "a first duplicate of the wrong type": b'{"id":"e1","text":5,"text":"hi"}',
}


@pytest.mark.parametrize("value", LENIENT_PYDANTIC.values(), ids=LENIENT_PYDANTIC.keys())
def test_where_pydantic_is_more_lenient_its_model_becomes_the_struct(value: bytes) -> None:
    assert _fast(value) is None
    outcome = DECODER.decode(make_record(value), PartitionOffsets(TopicPartition(CONTENT_TOPIC, 0)))
    assert isinstance(outcome, Job), "pydantic accepts it, so the worker does"
    assert isinstance(outcome.event, events.ContentEvent)
    _assert_agrees(value, CONTENT_TOPIC)


AGREED = {
    "a plain event": _content(),
    "every field": _content(
        tenant="t",
        source="s",
        author_id="a",
        created_at="2024-01-02T03:04:05Z",
        metadata={"a": [1, 2.5, None, {"b": True}]},
    ),
    "lowercase t and z": _content(created_at="2024-01-02t03:04:05.5z"),
    "a space for T and an offset": _content(created_at="2024-01-02 03:04:05-23:59"),
    "a naive datetime": _content(created_at="2024-01-02T03:04:05.123456"),
    "an offset of -00:00": _content(created_at="2024-01-02T03:04:05-00:00"),
    "big integers": b'{"id":"e1","text":"hi","metadata":{"x":123456789012345678901234567890,"y":-0.0,"z":1e-400}}',
    "duplicate keys": b'{"id":"e0","text":"hi","id":"e1","metadata":{"x":1,"y":2,"x":3}}',
    "a surrogate pair escape": b'{"id":"e1","text":"\\ud83d\\ude00"}',
    "extra fields": b'{"id":"e1","text":"hi","new_field":{"nested":[1,2,3]},"other":null}',
    "non-ASCII text": _content(text="caf\u00e9 \u4e16\u754c \U0001f600"),
}


@pytest.mark.parametrize("value", AGREED.values(), ids=AGREED.keys())
def test_where_both_agree_the_fast_path_decodes(value: bytes) -> None:
    assert isinstance(_fast(value), events.ContentEvent), "the common forms take the fast path"
    _assert_agrees(value, CONTENT_TOPIC)


REFUSED_BY_BOTH = {
    "a lone surrogate escape": b'{"id":"e1","text":"\\ud800"}',
    "a lone trailing surrogate": b'{"id":"e1","text":"a","x":"\\udc00"}',
    "trailing data": _content() + b" x",
    "a byte order mark": b"\xef\xbb\xbf" + _content(),
    "a leap second": _content(created_at="2024-12-31T23:59:60Z"),
    "an offset of 24 hours": _content(created_at="2024-01-02T03:04:05+24:00"),
    "an int for a str": b'{"id":1,"text":"hi"}',
    "an empty id": _content(id=""),
    "invalid UTF-8 in the text": b'{"id":"e1","text":"\xff"}',
}


@pytest.mark.parametrize("value", REFUSED_BY_BOTH.values(), ids=REFUSED_BY_BOTH.keys())
def test_what_both_refuse_is_classified_as_before(value: bytes) -> None:
    assert _fast(value) is None
    assert isinstance(
        DECODER.decode(make_record(value), PartitionOffsets(TopicPartition(CONTENT_TOPIC, 0))), DecodeFailure
    )
    _assert_agrees(value, CONTENT_TOPIC)


# -- property: the new decoder's outcome is the old one's -----------------------------

_BLANKS = [" ", "\t\n", "\u00a0", "\u2028", "\x1c", "\u3000", "\u200b", ""]
_ESCAPES = [b'"\\ud800"', b'"\\udfff x"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"a\\u00e9"', b'"\\ud83d\\u0041"']


def _string() -> st.SearchStrategy[bytes]:
    plain = st.text(max_size=12).map(lambda s: json.dumps(s, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return st.one_of(
        plain,
        st.text(max_size=12).map(lambda s: json.dumps(s).encode()),
        st.sampled_from(_BLANKS).map(lambda s: json.dumps(s).encode()),
        st.sampled_from(_ESCAPES),
        st.binary(max_size=4).map(lambda b: b'"' + b.replace(b'"', b"").replace(b"\\", b"") + b'"'),
    )


def _number() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers().map(lambda i: str(i).encode()),
        st.integers(min_value=-(2**90), max_value=2**90).map(lambda i: str(i).encode()),
        st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
        st.sampled_from(
            [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-0", b"1E5", b"01", b"1.", b"2.2250738585072011e-308"]
        ),
    )


def _datetime() -> st.SearchStrategy[bytes]:
    digits = st.integers(min_value=0, max_value=99)
    two = digits.map(lambda n: f"{n:02d}")
    year = st.sampled_from(["2024", "0001", "9999", "0000", "1999", "2023"])
    sep = st.sampled_from(["T", "t", " ", "_", "x"])
    fraction = st.one_of(
        st.just(""),
        st.integers(min_value=0, max_value=12).flatmap(
            lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n).map(lambda d: ("." if n else ",") + d)
        ),
    )
    tz = st.one_of(
        st.sampled_from(["", "Z", "z", "+00:00", "-00:00", "+24:00", "UTC", " Z"]),
        st.tuples(st.sampled_from("+-"), two, two, st.sampled_from([":", ""])).map(
            lambda t: f"{t[0]}{t[1]}{t[3]}{t[2]}"
        ),
    )
    stamp = st.tuples(year, two, two, sep, two, two, two, fraction, tz).map(
        lambda p: f"{p[0]}-{p[1]}-{p[2]}{p[3]}{p[4]}:{p[5]}:{p[6]}{p[7]}{p[8]}"
    )
    small = st.tuples(
        st.integers(1, 12), st.integers(1, 28), st.integers(0, 23), st.integers(0, 59), st.integers(0, 60)
    )
    likely = st.tuples(small, fraction, tz).map(
        lambda p: f"2024-{p[0][0]:02d}-{p[0][1]:02d}T{p[0][2]:02d}:{p[0][3]:02d}:{p[0][4]:02d}{p[1]}{p[2]}"
    )
    return st.one_of(
        stamp.map(lambda s: json.dumps(s).encode()),
        likely.map(lambda s: json.dumps(s).encode()),
        st.sampled_from(
            [b'"2024-01-02"', b'"2024-01-02T03:04Z"', b'"1700000000"', b"1700000000", b"1.5e9", b"null", b'""']
        ),
    )


def _json(depth: int = 3) -> st.SearchStrategy[bytes]:
    scalar = st.one_of(_string(), _number(), st.sampled_from([b"true", b"false", b"null"]))
    return st.recursive(
        scalar,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda xs: b"[" + b",".join(xs) + b"]"),
            st.lists(st.tuples(_string(), inner), max_size=3).map(
                lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}"
            ),
        ),
        max_leaves=6,
    )


def _deep() -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(min_value=100, max_value=230), st.booleans()).map(
        lambda p: b"[" * p[0] + b"]" * p[0] if p[1] else b'{"a":' * p[0] + b"1" + b"}" * p[0]
    )


def _valid_string(*, judged: bool = False) -> st.SearchStrategy[bytes]:
    text = st.text(min_size=1, max_size=20)
    if judged:
        text = text.filter(lambda s: bool(s.strip()))
    return st.tuples(text, st.booleans()).map(
        lambda p: json.dumps(p[0], ensure_ascii=p[1]).encode("utf-8", "surrogatepass")
    )


def _optional(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(b"null"), strategy)


def _turn() -> st.SearchStrategy[bytes]:
    role = st.sampled_from([b'"user"', b'"assistant"'])
    bad_role = st.sampled_from([b'"system"', b"1", b"null"])
    return _document({"role": (role, bad_role), "content": (_valid_string(), _string())}, required=("role", "content"))


Field = tuple[st.SearchStrategy[bytes], st.SearchStrategy[bytes]]
"""A field's values: valid ones (drawn most of the time) and near-valid ones."""


def _document(fields: dict[str, Field], required: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        pairs = []
        for name, (valid, near) in fields.items():
            present = draw(st.integers(0, 29)) > 0 if name in required else draw(st.booleans())
            for _ in range(2 if draw(st.integers(0, 19)) == 0 else 1):  # sometimes a duplicate key
                if present:
                    pairs.append((json.dumps(name).encode(), draw(valid if draw(st.integers(0, 9)) < 9 else near)))
        for _ in range(draw(st.integers(0, 2))):
            extra = _json() if draw(st.integers(0, 9)) else _deep()
            pairs.append((draw(_string()), draw(extra)))
        order = draw(st.permutations(range(len(pairs))))
        return b"{" + b",".join(pairs[i][0] + b":" + pairs[i][1] for i in order) + b"}"

    return build()


_OBJECT = st.lists(st.tuples(_valid_string(), _json()), max_size=3).map(
    lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}"
)
_COMMON: dict[str, Field] = {
    "tenant": (_optional(_valid_string()), st.one_of(_string(), _number())),
    "source": (_optional(_valid_string()), _string()),
    "author_id": (_optional(_valid_string()), _json()),
    "created_at": (_optional(_datetime()), _datetime()),
    "metadata": (_optional(_OBJECT), st.one_of(_json(), _deep().map(lambda d: b'{"x":' + d + b"}"))),
}
_CONTENT = _document(
    {"id": (_valid_string(), _string()), "text": (_valid_string(judged=True), _string()), **_COMMON},
    required=("id", "text"),
)
_CONVERSATION = _document(
    {
        "id": (_valid_string(), _string()),
        "conversation_id": (_valid_string(), _string()),
        "role": (st.sampled_from([b'"user"', b'"assistant"']), st.sampled_from([b'"system"', b'"User"', b"2"])),
        "content": (_valid_string(judged=True), _string()),
        "context": (st.lists(_turn(), max_size=3).map(lambda ts: b"[" + b",".join(ts) + b"]"), _json()),
        **_COMMON,
    },
    required=("id", "conversation_id", "role", "content"),
)


def _mutated(document: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(document, st.integers(0, 15), st.binary(max_size=3)).map(
        lambda p: p[0] if p[1] > 3 else (p[0][:-1], p[0] + b" " + p[2], b"\xef\xbb\xbf" + p[0], p[0] + b"\n")[p[1]]
    )


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(_mutated(_CONTENT))
def test_content_records_decode_as_pydantic_decodes_them(value: bytes) -> None:
    _assert_agrees(value, CONTENT_TOPIC)


@PROPERTY
@given(_mutated(_CONVERSATION))
def test_conversation_records_decode_as_pydantic_decodes_them(value: bytes) -> None:
    _assert_agrees(value, CONVERSATION_TOPIC)


@PROPERTY
@given(_datetime())
def test_created_at_reads_the_same_instant_and_offset_on_either_path(stamp: bytes) -> None:
    _assert_agrees(b'{"id":"e1","text":"hi","created_at":' + stamp + b"}", CONTENT_TOPIC)
