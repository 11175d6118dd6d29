"""Fuzz target ``headers``: the backends' readers of ``Retry-After`` and rate-limit headers.

Header values arrive as text decoded from any bytes (Latin-1 here, as HTTP allows).
Property: ``parse_retry_after`` gives ``None`` or a finite number of seconds >= 0;
``parse_duration`` ``None`` or a finite number; ``parse_int`` ``None`` or an int; and
``RateLimitHeaderNames.read`` reads a set of such headers; none of them raises.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from worker.backends.http import parse_retry_after
from worker.backends.pacing import RateLimitHeaderNames, parse_duration, parse_int

NOW = datetime(2026, 1, 1, tzinfo=UTC)
NAMES = RateLimitHeaderNames(
    limit_requests="l-r", remaining_requests="r-r", limit_tokens="l-t",
    remaining_tokens="r-t", reset_requests="x-r", reset_tokens="x-t",
)  # fmt: skip


def check(data: bytes) -> None:
    value = data.decode("latin-1")
    retry = parse_retry_after(value, now=NOW)
    assert retry is None or (type(retry) is float and math.isfinite(retry) and retry >= 0.0), f"Retry-After {retry!r}"
    duration = parse_duration(value)
    assert duration is None or (type(duration) is float and math.isfinite(duration)), f"duration {duration!r}"
    number = parse_int(value)
    assert number is None or type(number) is int, f"int {number!r}"
    parts = value.split("\n")
    NAMES.read(dict(zip(("l-r", "r-r", "l-t", "r-t", "x-r", "x-t"), parts, strict=False)))
