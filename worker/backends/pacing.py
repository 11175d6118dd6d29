"""Client-side rate limits for a remote API, and slowing down before the API has to say 429.

``RequestPacer.wait(tokens)`` is awaited before every try:

0. ``hold(seconds)``: after a 429 with ``Retry-After`` no request starts before that time
   (the API's limits are per organisation, so every concurrent call waits, not only the
   one that was told);
1. ``requests_per_second`` (an ``aiolimiter.AsyncLimiter``; unset: no limit);
2. ``tokens_per_minute`` on the caller's input-token estimate (another ``AsyncLimiter``;
   a request bigger than the whole minute's allowance waits for a full minute's worth);
3. header pacing: ``observe()`` reads each answer's ``x-ratelimit-remaining-*`` headers.
   When the remaining requests or tokens of the API's window fall below
   ``low_watermark`` of its limit, requests are spread evenly over what is left of the
   window (``interval = window / remaining requests``, or for tokens
   ``window * average request tokens / remaining tokens``; the window is the API's reset
   time when it says one, else 60 s, as Mistral's per-minute limits). Above the
   watermark the interval is 0 again.

Single event loop by contract.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from aiolimiter import AsyncLimiter

from worker.ops.logs import PacingEvent

log = structlog.get_logger(__name__)

DEFAULT_WINDOW_S = 60.0


@dataclass(frozen=True)
class RateLimitHeaders:
    """What an answer's rate-limit headers said; ``None`` where a header was absent."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True)
class RateLimitHeaderNames:
    """Which response headers carry an API's rate-limit state (``None``: it sends none).

    The APIs differ only in these names; ``read`` is the one reader.
    """

    limit_requests: str | None = None
    remaining_requests: str | None = None
    limit_tokens: str | None = None
    remaining_tokens: str | None = None
    reset_requests: str | None = None
    reset_tokens: str | None = None

    def read(self, headers: Mapping[str, str]) -> RateLimitHeaders:
        def number(name: str | None) -> int | None:
            return parse_int(headers.get(name)) if name else None

        def duration(name: str | None) -> float | None:
            return parse_duration(headers.get(name)) if name else None

        return RateLimitHeaders(
            limit_requests=number(self.limit_requests),
            remaining_requests=number(self.remaining_requests),
            limit_tokens=number(self.limit_tokens),
            remaining_tokens=number(self.remaining_tokens),
            reset_requests_s=duration(self.reset_requests),
            reset_tokens_s=duration(self.reset_tokens),
        )


class RequestPacer:
    """Client-side limits and header-driven pacing; see the module docstring."""

    def __init__(
        self,
        *,
        requests_per_second: float | None = None,
        tokens_per_minute: int | None = None,
        low_watermark: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._requests = _limiter(requests_per_second, 1.0) if requests_per_second else None
        self._tokens = AsyncLimiter(tokens_per_minute, 60.0) if tokens_per_minute else None
        self._tokens_per_minute = tokens_per_minute
        self.low_watermark = low_watermark
        self._clock = clock
        self.interval_s = 0.0
        """Current spacing between request starts imposed by the headers (0: none)."""
        self._next_start = 0.0
        self._hold_until = 0.0
        self._avg_tokens = 0.0

    def hold(self, seconds: float) -> None:
        """No request may start for ``seconds`` (the API said ``Retry-After``)."""
        self._hold_until = max(self._hold_until, self._clock() + seconds)

    async def wait(self, tokens: int = 0) -> None:
        """Return when a request of ``tokens`` input tokens may start."""
        if tokens:
            self._avg_tokens = tokens if not self._avg_tokens else 0.9 * self._avg_tokens + 0.1 * tokens
        held = self._hold_until - self._clock()
        if held > 0:
            await asyncio.sleep(held)
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None and tokens:
            assert self._tokens_per_minute is not None
            await self._tokens.acquire(min(tokens, self._tokens_per_minute))
        if self.interval_s > 0:
            now = self._clock()
            slot = max(now, self._next_start)
            self._next_start = slot + self.interval_s  # reserve before sleeping: concurrent callers queue up
            if slot > now:
                await asyncio.sleep(slot - now)

    def observe(self, headers: RateLimitHeaders) -> None:
        """Adjust the pace from one answer's rate-limit headers."""
        interval = 0.0
        if _low(headers.remaining_requests, headers.limit_requests, self.low_watermark):
            assert headers.remaining_requests is not None
            window = headers.reset_requests_s or DEFAULT_WINDOW_S
            interval = window / max(headers.remaining_requests, 1)
        if _low(headers.remaining_tokens, headers.limit_tokens, self.low_watermark):
            assert headers.remaining_tokens is not None
            window = headers.reset_tokens_s or DEFAULT_WINDOW_S
            per_request = max(self._avg_tokens, 1.0)
            interval = max(interval, window * per_request / max(headers.remaining_tokens, 1))
        interval = min(interval, DEFAULT_WINDOW_S)
        if interval > 0 and self.interval_s == 0:
            log.warning(
                PacingEvent.SLOWING_DOWN,
                remaining_requests=headers.remaining_requests,
                remaining_tokens=headers.remaining_tokens,
                interval_s=round(interval, 3),
            )
        elif interval == 0 and self.interval_s > 0:
            log.info(PacingEvent.PACE_RESTORED)
        self.interval_s = interval


def _low(remaining: int | None, limit: int | None, watermark: float) -> bool:
    return remaining is not None and limit is not None and limit > 0 and remaining < watermark * limit


def _limiter(rate: float, period: float) -> AsyncLimiter:
    # AsyncLimiter needs whole requests per period: 0.5/s becomes 1 per 2 s.
    if rate >= 1:
        return AsyncLimiter(rate, period)
    return AsyncLimiter(1, period / rate)


def parse_int(value: str | None) -> int | None:
    """An integer header value, or ``None`` when absent or unreadable (``inf``, ``nan`` too)."""
    if value is None:
        return None
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return None


def parse_duration(value: str | None) -> float | None:
    """Seconds from a reset header: ``"20"``, ``"1s"``, ``"6m0s"``, ``"150ms"``, ``"1h2m3.5s"``.

    ``None`` when absent or unreadable, or not finite."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) else None
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(text):
        char = text[i]
        if char in "0123456789.":  # not str.isdigit: it takes digits float() refuses (superscripts)
            number += char
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else char
        if unit not in units or not number or number.count(".") > 1 or number == ".":
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total if not number and math.isfinite(total) else None
