"""Verdict and violation bytes: orjson writes exactly what pydantic's model_dump_json writes for their contracts.

Byte-identical (not only equal as JSON), on verdicts built the way the worker builds them
and on validated ones, with the values where two JSON writers usually differ: floats
(tiny, huge, integral, rounded), datetimes (with and without microseconds), escapes and
non-ASCII text, nested metadata, and the fallback for what orjson cannot write.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from aiokafka import ConsumerRecord

import schemas
from tests.pipeline.test_verdicts import decode
from worker.backends.base import Scored
from worker.pipeline.encode import verdict_bytes, violation_bytes
from worker.pipeline.policy import Policy
from worker.pipeline.verdict_data import CategoryHit, InputPosition, Verdict, to_contract
from worker.pipeline.verdicts import VerdictBuilder

TRICKY_TEXT = "".join(chr(i) for i in range(0x80)) + 'é\u2028\u2029😀\ufeff</script>"\\'
FLOATS = [0.0, 1.0, 0.5, 0.1, 1e-7, 3.3e-5, 0.999999, 1 / 3, 2 / 3, 123456789.0, 1e16, 1e-300, 5e-324]


def _job(index: int, rng: random.Random, *, conversation: bool, metadata: object, text: str):
    if conversation:
        value = {
            "id": f"t{index}",
            "conversation_id": f"conv-{index % 7}",
            "role": rng.choice(["user", "assistant"]),
            "content": text,
            "context": [{"role": "user", "content": "earlier"}],
            "tenant": rng.choice([None, "acme", "ünï"]),
            "metadata": metadata,
        }
        topic = "in.v"
    else:
        value = {"id": f"c{index}", "text": text, "source": rng.choice([None, "chat"]), "metadata": metadata}
        topic = "in.c"
    raw = json.dumps(value).encode()
    timestamp = rng.choice([1_700_000_000_000 + index, 0, -1])
    record = ConsumerRecord(topic, index % 4, index, timestamp, 0, rng.choice([b"k", None]), raw, None, 1, len(raw), [])
    job = decode(record)
    assert not hasattr(job, "error_type"), job
    return job


def _metadata(rng: random.Random) -> object:
    return rng.choice(
        [
            None,
            {},
            {"a": 1, "b": [1, 2.5, None, True], "c": {"d": "é\n"}},
            {"n": rng.choice(FLOATS), "big": 2**63 - 1, "neg": -(2**63)},
            {"s": TRICKY_TEXT},
        ]
    )


@pytest.mark.parametrize("include_text", [False, True])
def test_verdicts_and_violations_are_byte_identical_to_pydantic(include_text: bool) -> None:
    rng = random.Random(7)
    builder = VerdictBuilder(policy=Policy.load(None), backend_name="mistral", include_text=include_text)
    categories = ["sexual", "pii", "health", "law", "hate_and_discrimination", "selfharm", "unknown/label"]
    checked = flagged = 0
    for index in range(400):
        text = rng.choice(["hi", TRICKY_TEXT, "x" * 300, "über 😀"])
        job = _job(index, rng, conversation=index % 3 == 0, metadata=_metadata(rng), text=text)
        if index % 10 == 9:
            verdict = builder.degraded(job, action=rng.choice(["review", "allow"]), reason="backend down: é")
        else:
            scores = {c: rng.choice([*FLOATS, rng.random(), round(rng.random(), 3)]) for c in categories}
            verdict = builder.scored(job, Scored(scores=scores, model="mistral-moderation-2411"))
        written = verdict_bytes(verdict)
        assert written == to_contract(verdict).model_dump_json().encode()
        assert written == schemas.Verdict.model_validate_json(written).model_dump_json().encode()
        violation = builder.violation(verdict)
        if violation is not None:
            flagged += 1
            assert violation_bytes(violation) == to_contract(violation).model_dump_json().encode()
        checked += 1
    assert checked == 400 and 50 < flagged < 400  # both kinds of output were exercised


@pytest.mark.parametrize(
    "decided_at",
    [
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=timezone(timedelta(hours=2))),
    ],
)
def test_a_verdict_writes_what_its_validated_model_writes(decided_at: datetime) -> None:
    """Datetimes in any offset (a review decision's ``decided_at`` keeps its own)."""
    verdict = Verdict(
        verdict_id="v",
        event_id="e",
        kind="content",
        conversation_id=None,
        tenant=None,
        source=None,
        author_id=None,
        action="block",
        flagged=True,
        violations=[CategoryHit("sexual", 0.93, 0.5, "block")],
        scores={"sexual": 0.93, "pii": 1e-7},
        model=None,
        backend="mistral",
        backend_details=schemas.BackendDetails(score_kind="label", prompt_tokens=12),
        policy_version="p",
        degraded=False,
        degraded_reason=None,
        decided_by=None,
        stages=None,
        input=InputPosition("t", 0, 1),
        decided_at=decided_at,
        latency_ms=12.345,
        text=None,
        metadata={"k": [1, {"x": None}]},
        supersedes=None,
        reviewer_id=None,
        trimmed=False,
    )
    written = verdict_bytes(verdict)
    assert written == schemas.Verdict.model_validate_json(written).model_dump_json().encode()
    assert schemas.Verdict.model_validate_json(written) == to_contract(verdict)


def test_what_orjson_cannot_write_falls_back_to_pydantic() -> None:
    rng = random.Random(1)
    builder = VerdictBuilder(policy=Policy.load(None), backend_name="mistral", include_text=False)
    job = _job(1, rng, conversation=False, metadata={"huge": 2**70}, text="hi")
    verdict = builder.scored(job, Scored(scores={"sexual": 0.9}, model="m"))
    assert verdict.metadata == {"huge": 2**70}
    assert verdict_bytes(verdict) == to_contract(verdict).model_dump_json().encode()
    assert json.loads(verdict_bytes(verdict))["metadata"]["huge"] == 2**70


def test_verdict_bytes_hold_no_more_memory_than_their_length() -> None:
    """orjson's result keeps its working buffer (~10x the output); a verdict is held until the
    broker acknowledges it, so what is held must be about its own length."""
    import tracemalloc

    rng = random.Random(3)
    builder = VerdictBuilder(policy=Policy.load(None), backend_name="mistral", include_text=True)
    verdicts = [
        builder.scored(
            _job(i, rng, conversation=False, metadata=None, text="x" * 700), Scored(scores={"pii": 0.1}, model="m")
        )
        for i in range(200)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [verdict_bytes(verdict) for verdict in verdicts]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    length = sum(map(len, held))
    assert length > 200 * 700
    assert grown < 1.2 * length, f"{grown} bytes held for {length} bytes of verdicts"
