"""The HTTP layer every remote backend uses: one pooled client, retries, limits, a breaker.

``RemoteApi.post(path, body)`` sends one JSON request and returns the decoded answer, or
raises one of:

- ``BackendAuthError`` on 401/403: fatal, the message names the environment variable to
  fix and never contains the key;
- ``ApiRejected`` on 400/413/422: the API refuses this body for good (an input over the
  context, a body it cannot parse); never retried. Backends bisect a batch on it;
- ``BackendUnavailable`` when the retry budget is spent (its message says why), when the
  circuit breaker is open (``CircuitOpenError``; also when this call's own failed try opened
  it: the call stops there rather than take the next probe), or on an answer no retry can fix (404:
  wrong base URL).

What is retried: connection errors, timeouts, connection resets and HTTP 429, 500, 502,
503 and 504, with exponential backoff and full jitter (``random.uniform(0, min(max_wait,
base * 2 ** n))``), except that a ``Retry-After`` header (seconds or an HTTP date) is
honoured: the next try waits at least that long. A call gives up after
``http.retry_attempts`` tries, or as soon as the next wait would end past
``http.retry_budget_s`` since the call began (a ``Retry-After`` beyond the budget gives up
at once rather than retry early).

Before each try, in order: the circuit breaker may refuse (``worker.backends.breaker``;
a failed try counts towards opening it unless the caller made the call inside
``suspect_input()``);
the connection bound (``http.max_connections`` requests in flight; the pipeline bounds
batches in flight separately, ``scoring.max_concurrency``) and the client-side
rate limits (``worker.backends.pacing``: requests/s, tokens/min, and slowing down when the
API's ``x-ratelimit-remaining-*`` headers run low) may make it wait.

The API key is sent in the ``Authorization`` header and appears nowhere else: not in
log events, exception messages or reprs.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import structlog
from pydantic import SecretStr

from worker.backends.base import Backend, BackendAuthError, BackendError, BackendUnavailable
from worker.backends.breaker import CircuitBreaker, CircuitOpenError, input_suspected
from worker.backends.engine import TIMEOUTS, AiohttpClient, Answer, Poster, failure_name
from worker.backends.pacing import RateLimitHeaderNames, RequestPacer
from worker.config import HttpSettings
from worker.ops import metrics
from worker.ops.logs import HttpEvent

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REJECT_STATUSES = frozenset({400, 413, 422})
AUTH_STATUSES = frozenset({401, 403})


class ApiRejected(BackendError):
    """The API refused the request body for good (HTTP 400/413/422); retrying cannot help.

    ``message`` is the API's own explanation, for the dead-letter reason; ``body`` the
    decoded JSON error body (None when it was not JSON), for APIs whose refusals are
    structured (per-item errors of a batch).
    """

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


@dataclass(frozen=True)
class ApiDialect:
    """What differs between remote APIs at the HTTP level."""

    name: str
    """Human name for messages (``Mistral``)."""
    key_env: str
    """The environment variable holding the key (``MISTRAL_API_KEY``), named in auth errors."""
    base_url_env: str
    """The setting for the base URL (``MODWORKER_MISTRAL__BASE_URL``), named on 404."""
    rate_limit_headers: RateLimitHeaderNames
    """Reads the API's ``x-ratelimit-*`` headers."""
    requires_key: bool = True
    """False for servers that need no key (a self-hosted model): without one, no ``Authorization``."""


class _Transient(Exception):
    """One failed try that may succeed later. Private: callers see BackendUnavailable."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None, counts_for_breaker: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.counts_for_breaker = counts_for_breaker


_SUSPECT_ATTEMPTS = 2
"""Tries per call made inside ``breaker.suspect_input()`` (see ``RemoteApi.post``)."""


class RemoteApi:
    """One remote API: a pooled client (on ``http.engine``: see ``worker.backends.engine``)
    with retries, limits and a breaker.

    ``await start()`` before ``post``; ``await close()`` releases the pool (safe twice).
    ``transport`` is for tests that need a custom httpx transport; normally unset.
    """

    def __init__(
        self,
        dialect: ApiDialect,
        *,
        base_url: str,
        api_key: SecretStr | None,
        http: HttpSettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.dialect = dialect
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._http = http
        self._transport = transport
        self._client: Poster | None = None
        self._failures: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
        """What a failed try raises under the engine in use (``start`` adds httpx's)."""
        self._in_flight = asyncio.Semaphore(http.max_connections)
        self._answered = asyncio.Event()
        """Set (and replaced) whenever a try gets an answer: wakes calls sleeping in their backoff."""
        self.breaker = CircuitBreaker(
            failure_threshold=http.breaker_failure_threshold,
            reset_timeout_s=http.breaker_reset_s,
            first_open_s=http.breaker_first_open_s,
            name=dialect.name,
        )
        metrics.watch_breaker(dialect.name, self.breaker)
        self.pacer = RequestPacer(
            requests_per_second=http.requests_per_second,
            tokens_per_minute=http.tokens_per_minute,
            low_watermark=http.rate_limit_low_watermark,
        )

    def __repr__(self) -> str:
        return f"RemoteApi({self.dialect.name}, {self.base_url})"

    async def start(self) -> None:
        if self._client is not None:
            return
        key = self._api_key.get_secret_value() if self._api_key is not None else ""
        if not key and self.dialect.requires_key:
            raise BackendAuthError(f"{self.dialect.key_env} is not set: export {self.dialect.key_env}=<your key>")
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        http = self._http
        if self._transport is None and http.engine == "aiohttp":
            self._client = AiohttpClient(
                self.base_url,
                headers=headers,
                max_connections=http.max_connections,
                keepalive_expiry_s=http.keepalive_expiry_s,
                connect_timeout_s=http.connect_timeout_s,
                read_timeout_s=http.read_timeout_s,
                pool_timeout_s=http.pool_timeout_s,
            )
            return
        import httpx  # only for its own engine: the default one does not load it

        self._failures = (httpx.TransportError, aiohttp.ClientError, TimeoutError)  # the transport may leave aiohttp's
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=http.connect_timeout_s,
                read=http.read_timeout_s,
                write=http.write_timeout_s,
                pool=http.pool_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=http.max_connections,
                max_keepalive_connections=http.max_connections,
                keepalive_expiry=http.keepalive_expiry_s,
            ),
            transport=self._transport,
            follow_redirects=False,
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def post(self, path: str, body: Mapping[str, Any], *, tokens: int = 0) -> Any:
        """POST ``body`` as JSON to ``path`` and return the decoded JSON answer.

        ``tokens`` is the caller's estimate of the input tokens, for the tokens/min limit.
        Raises ``BackendAuthError``, ``ApiRejected`` or ``BackendUnavailable`` (see the
        module docstring); nothing else escapes.
        """
        if self._client is None:
            raise BackendUnavailable(f"{self.dialect.name} backend not started: call start() first")
        http = self._http
        started = time.monotonic()
        # A call under suspicion (the API answers other batches; this one is being searched
        # for a poison input) gets two tries: one more covers a passing fault, and the full
        # retry schedule would only stretch each step of the search by its backoff.
        attempts = min(http.retry_attempts, _SUSPECT_ATTEMPTS) if input_suspected() else http.retry_attempts
        # The retry loop by hand: a retry library's per-call objects cost ~50 µs of CPU a call
        # (tenacity, in a py-spy profile of the worker), a tenth of a whole request.
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._try_once(path, body, tokens)
            except _Transient as failure:
                wait = self._wait(attempt, failure)
                elapsed = time.monotonic() - started
                if attempt >= attempts or elapsed + wait >= http.retry_budget_s:
                    log.warning(
                        HttpEvent.GAVE_UP, api=self.dialect.name, path=path, attempts=attempt, reason=failure.reason
                    )
                    metrics.backend_errors(self.dialect.name, "unavailable").inc()
                    raise BackendUnavailable(
                        f"{self.dialect.name} API unavailable: {failure.reason}; gave up after {attempt} tries in "
                        f"{elapsed:.1f}s (limits: MODWORKER_HTTP__RETRY_ATTEMPTS={http.retry_attempts}, "
                        f"MODWORKER_HTTP__RETRY_BUDGET_S={http.retry_budget_s:g})"
                    ) from None
                self._log_retry(path, attempt, failure, wait)
                await self._backoff(wait, server_set=failure.retry_after_s is not None)
            except BackendError as err:
                metrics.backend_errors(self.dialect.name, _error_label(err)).inc()
                raise

    async def _try_once(self, path: str, body: Mapping[str, Any], tokens: int) -> Any:
        assert self._client is not None
        self.breaker.before_call()  # raises CircuitOpenError (a BackendUnavailable) when open
        try:
            async with self._in_flight:
                await self.pacer.wait(tokens)
                sent = time.monotonic()
                try:
                    response = await self._client.post(path, content=encode_json(body), headers=_JSON_BODY)
                except self._failures as err:
                    # Under either engine (an aiohttp error the transport left unwrapped included).
                    name = failure_name(err)
                    timeout = name in TIMEOUTS
                    label = "timeout" if timeout else "transport_error"
                    metrics.observe_backend_request(self.dialect.name, path, label, time.monotonic() - sent)
                    reason = f"{name} on POST {path}"
                    raise _Transient(reason if timeout else f"{reason}: {err}") from None
                metrics.observe_backend_request(
                    self.dialect.name, path, str(response.status_code), time.monotonic() - sent
                )
            self.pacer.observe(self.dialect.rate_limit_headers.read(response.headers))
            result = self._interpret(path, response)
        except _Transient as failure:
            if failure.counts_for_breaker and not input_suspected():
                self.breaker.record_failure()
                if self.breaker.state == "open":
                    # This try opened the circuit (or failed its probe): the call stops here.
                    # Its next try would be the probe, sure to fail if its input is the
                    # trouble, doubling the open time for everyone; others will probe.
                    raise CircuitOpenError(self.dialect.name, self.breaker.open_for_s) from None
            else:
                self.breaker.record_neutral()
            raise
        except BackendError:
            self.breaker.record_success()  # the API answered: it is up, even if it said no
            self._note_answered()
            raise
        except BaseException:  # cancelled: says nothing about the API's health
            self.breaker.record_neutral()
            raise
        self.breaker.record_success()
        self._note_answered()
        return result

    def _interpret(self, path: str, response: Answer) -> Any:
        status = response.status_code
        if 200 <= status < 300:
            try:
                return decode_json(response.content)
            except ValueError:
                raise _Transient(f"HTTP {status} on POST {path} with a body that is not JSON") from None
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            reason = f"HTTP {status} on POST {path}"
            if retry_after is not None:
                reason += f" (Retry-After {retry_after:g}s)"
                # The API's limits are per organisation: hold every request, not only this one.
                self.pacer.hold(retry_after)
            # 429 is the API pacing us, not failing: it must not open the breaker.
            raise _Transient(reason, retry_after_s=retry_after, counts_for_breaker=status != 429)
        if status in AUTH_STATUSES:
            log.error(HttpEvent.AUTH_FAILED, api=self.dialect.name, path=path, status=status)
            raise BackendAuthError(
                f"{self.dialect.name} API refused the credentials (HTTP {status}): "
                f"check {self.dialect.key_env} (missing, mistyped, revoked or without access to this model)"
            )
        if status in REJECT_STATUSES:
            message = _error_message(response)
            log.info(HttpEvent.REJECTED, api=self.dialect.name, path=path, status=status, message=message)
            try:
                body = decode_json(response.content)
            except ValueError:
                body = None
            raise ApiRejected(status, message, body)
        if status == 404:
            raise BackendUnavailable(
                f"{self.dialect.name} API answered 404 for POST {self.base_url}{path}: check {self.dialect.base_url_env}"
            )
        raise BackendUnavailable(
            f"{self.dialect.name} API answered HTTP {status} for POST {path}: {_error_message(response)}"
        )

    def _wait(self, attempt: int, failure: _Transient) -> float:
        """The wait after failed try number ``attempt``: full-jitter exponential backoff, but
        never less than the server's Retry-After."""
        http = self._http
        ceiling = min(http.retry_max_wait_s, http.retry_base_wait_s * 2 ** (attempt - 1))
        backoff = random.uniform(0, ceiling)
        if failure.retry_after_s is not None:
            # A little jitter on top so that many workers told the same time do not return in step.
            return failure.retry_after_s + random.uniform(0, min(1.0, 0.1 * failure.retry_after_s))
        return backoff

    async def _backoff(self, seconds: float, *, server_set: bool) -> None:
        """Sleep between tries; a backoff of our own choosing ends early once any call got an
        answer meanwhile (the API is back: waiting out a long backoff only delays recovery).
        A wait the server set (``server_set``: Retry-After) is always slept in full."""
        if server_set:
            await asyncio.sleep(seconds)
            return
        answered = self._answered
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), seconds)

    def _note_answered(self) -> None:
        """Some try got an answer: wake every call sleeping in its own backoff."""
        self._answered.set()
        self._answered = asyncio.Event()

    def _log_retry(self, path: str, attempt: int, failure: _Transient, wait_s: float) -> None:
        metrics.backend_retries(self.dialect.name).inc()
        log.warning(
            HttpEvent.RETRY,
            api=self.dialect.name,
            path=path,
            attempt=attempt,
            reason=failure.reason,
            retry_after_s=failure.retry_after_s,
            wait_s=round(wait_s, 3),
        )


_JSON_BODY = {"Content-Type": "application/json"}


def encode_json(body: Mapping[str, Any]) -> bytes:
    """``body`` as compact UTF-8 JSON, the bytes httpx's ``json=`` sends (its encoder took
    ~0.7 ms of CPU for a batch of 64 texts here, orjson ~5 µs). ``json`` only for what
    orjson refuses (an int beyond 64 bits), so every body encodes exactly as before. Copied
    to its own length: orjson's result keeps a buffer of ~10x the body (260 KB for 64 texts)."""
    try:
        return bytes(memoryview(orjson.dumps(body)))
    except TypeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def decode_json(content: bytes) -> Any:
    """An answer's JSON (orjson: ~1/3 of ``json``'s CPU on 64 results). What orjson refuses
    and ``json`` accepts (NaN literals, ints beyond 64 bits) falls back to ``json``, so
    every answer decodes to what ``response.json()`` gave; raises ``ValueError`` if neither can
    (also for a body nested deeper than the parsers follow)."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        try:
            return json.loads(content)
        except RecursionError:
            raise ValueError("the body is nested too deeply to parse as JSON") from None


def _error_label(err: BackendError) -> str:
    """The ``error`` label of ``moderation_worker_backend_errors_total`` for a failed call."""
    if isinstance(err, CircuitOpenError):
        return "circuit_open"
    if isinstance(err, BackendAuthError):
        return "auth"
    if isinstance(err, ApiRejected):
        return "rejected"
    return "unavailable"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date).

    ``None`` when absent or unreadable (``inf`` and ``nan`` too: an endless hold would stop
    every request for good); never negative.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a zone offset past C ints
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _error_message(response: Answer) -> str:
    """The API's own explanation from an error body (Mistral, OpenAI and FastAPI shapes)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str):
            return message
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(
                f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg', '')}"
                for item in detail
                if isinstance(item, dict)
            )
    return str(body)[:500]


class ApiBackend(Backend):
    """A backend whose every call goes through one ``RemoteApi`` (``self.api``, set by the
    subclass): started and closed with it, ready while its circuit is not open."""

    api: RemoteApi

    async def start(self) -> None:
        await self.api.start()

    async def close(self) -> None:
        await self.api.close()

    async def ready(self) -> bool:
        return self.api.breaker.state != "open"
