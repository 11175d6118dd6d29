"""The machinery shared by the loopback API servers (Mistral, OpenAI): a real HTTP/1.1 server.

``LoopbackApiServer`` listens on ``127.0.0.1`` on an ephemeral port, in a background
thread (``http.server.ThreadingHTTPServer``, keep-alive, one thread per connection), and
answers ``POST`` requests the way a hosted moderation API does. Subclasses declare the
routes and the API's own shapes (error bodies, rate-limit header names, token counting);
this class does everything else, for every request, in this order:

1. record it (``requests``: index, path, headers, parsed body, monotonic timestamps);
2. validate the body with the optional ``validator`` and record every violation
   (``violations``), so a test can assert that the client never sent a bad body;
3. check ``Authorization: Bearer <api_key>`` (401 on mismatch);
4. answer a body that is not JSON or breaks the schema with the API's validation error;
5. apply the ``fault_plan`` (see ``worker.testing.faults``);
6. sleep ``latency_s`` (a remote API's service time);
7. apply the ``rate_limit`` window: past its limits, 429 with ``Retry-After``; otherwise
   the API's ``x-ratelimit-*`` headers on the answer;
8. answer with the route's handler.

Timestamps are ``time.monotonic()`` values of this process, comparable with the test's.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypedDict

import orjson

from worker.testing.faults import Fault, FaultPlan, fault_for
from worker.testing.openapi import BodyValidator

NOT_JSON = object()
"""``RecordedRequest.body`` of a request whose body did not parse as JSON."""


@dataclass
class RecordedRequest:
    """One request as the server saw it, and what it answered."""

    index: int
    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    raw_body: bytes
    body: Any
    received_at: float
    status: int | None = None
    """The status answered; ``None`` while in progress or when the connection was reset."""
    answered_at: float | None = None
    fault: Fault | None = None
    reset: bool = False
    violations: list[str] = field(default_factory=list)
    response_headers: dict[str, str] = field(default_factory=dict)
    """Header names lower-cased."""

    @property
    def retry_after(self) -> str | None:
        """The ``Retry-After`` value this request was answered with, if any."""
        return self.response_headers.get("retry-after")


@dataclass(frozen=True)
class RateLimit:
    """A fixed-window limit like a hosted API's per-organisation limits.

    ``None`` means unlimited. With ``enforce`` a request past a limit gets 429 and a
    ``Retry-After`` of the seconds left in the window; without, only the headers report it.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    window_s: float = 60.0
    enforce: bool = True


@dataclass
class RateWindow:
    """Usage of the current rate-limit window (what the headers report)."""

    started_at: float
    requests: int = 0
    tokens: int = 0
    limit: RateLimit = field(default_factory=RateLimit)

    def reset_in(self, now: float) -> float:
        return max(0.0, self.started_at + self.limit.window_s - now)

    @property
    def remaining_requests(self) -> int | None:
        rpm = self.limit.requests_per_minute
        return None if rpm is None else max(0, rpm - self.requests)

    @property
    def remaining_tokens(self) -> int | None:
        tpm = self.limit.tokens_per_minute
        return None if tpm is None else max(0, tpm - self.tokens)


class ApiAnswer(Exception):
    """Raised by a route handler to answer something other than 200."""

    def __init__(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


RouteHandler = Callable[[RecordedRequest], Any]


class LoopbackOptions(TypedDict, total=False):
    """``LoopbackApiServer``'s own constructor options, for subclasses to pass through as
    ``**options: Unpack[LoopbackOptions]`` rather than repeat them."""

    api_key: str | None
    validator: BodyValidator | None
    latency_s: float
    fault_plan: FaultPlan
    rate_limit: RateLimit | None


class LoopbackApiServer:
    """Base class of the loopback API servers; use as a context manager.

    ``with SomeServer(api_key="k") as srv: ... srv.base_url ...``. See the module docstring
    for what every request goes through. Thread-safe: handlers run on one thread per
    connection.
    """

    default_model: ClassVar[str] = ""

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        validator: BodyValidator | None = None,
        latency_s: float = 0.0,
        fault_plan: FaultPlan = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.api_key = api_key
        self.validator = validator
        self.latency_s = latency_s
        self.fault_plan = fault_plan
        self.rate_limit = rate_limit or RateLimit()
        self._lock = threading.Lock()
        self._log: list[RecordedRequest] = []
        self._window = RateWindow(started_at=time.monotonic(), limit=self.rate_limit)
        self._stopping = threading.Event()
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # ---- what a subclass provides -------------------------------------------------------

    def routes(self) -> Mapping[str, RouteHandler]:
        """Path -> handler returning the 200 body (or raising ``ApiAnswer``)."""
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> Any:
        """The API's error body for ``status``."""
        raise NotImplementedError

    def validation_error(self, errors: list[str]) -> ApiAnswer:
        """The API's answer to a body that breaks its schema."""
        raise NotImplementedError

    def rate_limit_headers(self, window: RateWindow, now: float) -> dict[str, str]:
        """The API's ``x-ratelimit-*`` headers for the current window."""
        return {}

    def count_tokens(self, body: Any) -> int:
        """Tokens a request consumes (for the tokens-per-minute window)."""
        return 0

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> LoopbackApiServer:
        """Bind an ephemeral port on 127.0.0.1 and serve in a daemon thread."""
        self._httpd = _HttpServer(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close every open connection."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_all_connections()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started: use it as a context manager or call start()")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- what tests read ------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._log)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._log)

    @property
    def bodies(self) -> list[Any]:
        return [request.body for request in self.requests]

    @property
    def violations(self) -> list[str]:
        """Every schema violation seen, as ``'#<index> <path> <message>'``."""
        return [f"#{r.index} {r.path} {v}" for r in self.requests for v in r.violations]

    def clear(self) -> None:
        """Forget the request log (the fault plan's request indexes restart at 0)."""
        with self._lock:
            self._log.clear()

    # ---- one request ----------------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body: Any = _decode(raw) if raw else NOT_JSON
        except ValueError:
            body = NOT_JSON
        with self._lock:
            record = RecordedRequest(
                index=len(self._log),
                method=handler.command,
                path=handler.path.split("?", 1)[0],
                headers={name.lower(): value for name, value in handler.headers.items()},
                raw_body=raw,
                body=body,
                received_at=time.monotonic(),
            )
            self._log.append(record)
        answer = self._decide(record)
        if answer is None:
            record.reset = True
            record.answered_at = time.monotonic()
            _reset_connection(handler)
            return
        payload = answer.body if isinstance(answer.body, bytes) else _encode(answer.status, answer.body)
        headers = {"content-type": "application/json", **{k.lower(): v for k, v in answer.headers.items()}}
        # Recorded before the answer leaves: a client may read the log as soon as it has it.
        record.response_headers = headers
        record.status = answer.status
        record.answered_at = time.monotonic()
        handler.send_response(answer.status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("content-length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _decide(self, record: RecordedRequest) -> ApiAnswer | None:
        """The answer for one request; ``None`` means reset the connection."""
        routes = self.routes()
        if record.body is NOT_JSON:
            record.violations.append("body is not JSON")
        elif self.validator is not None:
            record.violations.extend(self.validator(record.path, record.body))

        if self.api_key is not None and record.headers.get("authorization") != f"Bearer {self.api_key}":
            return ApiAnswer(401, self.error_body(401, "Unauthorized"))
        if record.path not in routes:
            return ApiAnswer(404, self.error_body(404, "Not Found"))
        if record.body is NOT_JSON:
            return self.validation_error(["body: JSON decode error"])
        if record.violations:
            return self.validation_error(record.violations)

        fault = fault_for(self.fault_plan, record)
        record.fault = fault
        if fault is not None:
            if fault.delay_s:
                self._stopping.wait(fault.delay_s)
            if fault.reset:
                return None
            if fault.status is not None:
                headers = dict(fault.headers)
                if fault.retry_after is not None:
                    headers["Retry-After"] = fault.retry_after
                body = fault.body if fault.body is not None else self.error_body(fault.status, _reason(fault.status))
                return ApiAnswer(fault.status, body, headers)

        if self.latency_s:
            self._stopping.wait(self.latency_s)

        limited = self._take_rate_limit(record)
        if limited is not None:
            return limited
        now = time.monotonic()
        with self._lock:
            rate_headers = self.rate_limit_headers(self._window, now)
        try:
            body = routes[record.path](record)
        except ApiAnswer as answer:
            answer.headers = {**rate_headers, **answer.headers}
            return answer
        return ApiAnswer(200, body, {**rate_headers, "x-request-id": uuid.uuid4().hex})

    def _take_rate_limit(self, record: RecordedRequest) -> ApiAnswer | None:
        limit = self.rate_limit
        tokens = self.count_tokens(record.body)
        now = time.monotonic()
        with self._lock:
            window = self._window
            if now - window.started_at >= limit.window_s:
                window = self._window = RateWindow(started_at=now, limit=limit)
            over = (limit.requests_per_minute is not None and window.requests + 1 > limit.requests_per_minute) or (
                limit.tokens_per_minute is not None and window.tokens + tokens > limit.tokens_per_minute
            )
            if over and limit.enforce:
                headers = self.rate_limit_headers(window, now)
                headers["Retry-After"] = str(max(1, math.ceil(window.reset_in(now))))
                return ApiAnswer(429, self.error_body(429, "Rate limit exceeded"), headers)
            window.requests += 1
            window.tokens += tokens
        return None


def _decode(raw: bytes) -> Any:
    """A request body's JSON: orjson (a fraction of ``json``'s CPU, which matters when the
    bench runs this server beside the worker), ``json`` for what orjson refuses (NaN)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _encode(status: int, body: Any) -> bytes:
    """An answer's JSON. Success bodies are built from ``fake_scores`` (finite floats) and go
    through orjson; error and fault bodies, which a test may fill with anything (NaN, which
    orjson would write as null), through ``json`` as written."""
    if status == 200:
        try:
            return orjson.dumps(body)
        except TypeError:
            pass
    return json.dumps(body).encode()


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _reset_connection(handler: BaseHTTPRequestHandler) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed proxy would."""
    handler.close_connection = True
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
    except OSError:
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many short-lived servers in one test run: reuse ports quickly.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], api: LoopbackApiServer) -> None:
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (its timeout fired) is expected here.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, the client's
    # delayed ACK would add ~40 ms to every answer.
    disable_nagle_algorithm = True
    server: _HttpServer

    def do_POST(self) -> None:
        self.server.api._serve(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is the record; stderr noise helps nobody
