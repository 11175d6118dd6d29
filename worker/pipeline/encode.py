"""Output records' bytes: ``Verdict`` and ``Violation`` straight to JSON with orjson.

The pydantic models stay the contract and the JSON Schema source; this module only writes
the same bytes faster. ``model_dump_json`` cost ~5 µs per verdict here, orjson on the
model's own field values ~1 µs. The output is byte-identical to
``model.model_dump_json()``: same field order (a model's ``__dict__`` holds its fields in
declaration order, whether validated or assembled by ``verdicts``), same float and
string forms, UTC datetimes with ``Z``; tests/pipeline/test_encode.py checks it on varied
verdicts. What orjson cannot write the same way (an int beyond 64 bits in ``metadata``, a
string with a lone surrogate) raises ``TypeError`` and falls back to pydantic.

orjson hands back its whole working buffer (about ten times the output: 8 KB for an 800-byte
verdict), and a verdict lives until the broker acknowledges it, so ``right_sized`` copies the
output into bytes of its own length (~0.1 µs): 5,000 verdicts in flight hold 4 MB, not 40.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

from schemas import Verdict, Violation

_OPTIONS = orjson.OPT_UTC_Z


def _fields(value: Any) -> dict[str, Any]:
    """orjson's hook for nested models (``InputPosition``, ``CategoryHit``): their fields."""
    if isinstance(value, BaseModel) and not value.__pydantic_extra__:
        return value.__dict__
    raise TypeError(f"not serialisable here: {type(value).__name__}")


def verdict_bytes(verdict: Verdict) -> bytes:
    """``verdict.model_dump_json().encode()``, byte for byte, at a fraction of the CPU."""
    return _dump(verdict)


def violation_bytes(violation: Violation) -> bytes:
    """``violation.model_dump_json().encode()``, byte for byte, at a fraction of the CPU."""
    return _dump(violation)


def right_sized(output: bytes) -> bytes:
    """``output`` (orjson's) in bytes of its own length: orjson's result keeps the capacity of
    its working buffer, about ten times the output, for as long as it is held."""
    return bytes(memoryview(output))


def _dump(model: BaseModel) -> bytes:
    try:
        return right_sized(orjson.dumps(model.__dict__, default=_fields, option=_OPTIONS))
    except TypeError:
        return model.model_dump_json().encode()
