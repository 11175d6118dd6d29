"""The worker's own HTTP server: ``/metrics``, ``/livez``, ``/readyz`` and ``/status``.

It runs on the worker's event loop (``asyncio.start_server``, a few dozen lines of
HTTP/1.1: one request per connection, ``GET`` and ``HEAD`` only), so it needs no thread
and no web framework, and it answers only while that loop runs: a loop blocked by
synchronous work does not answer at all, which a probe counts as a failure too.

- ``/metrics``: ``worker.ops.metrics.REGISTRY`` in the Prometheus text format (OpenMetrics
  when the scraper asks for it), after refreshing the consumer lag.
- ``/livez`` (restart me if this fails): 200 unless the consume loop has stopped
  iterating for ``liveness_timeout_s`` (a consumer stuck in ``getmany``, a rebalance that
  never completes, a commit that never returns), or an unpaused partition has had records
  waiting (highwater above position) without its position moving for that long (a
  consumer that no longer fetches), or a partition's committed offset is stuck (its
  uncommitted span passed ``max_uncommitted_span``; the reason names the partition and
  offset: see ``worker.pipeline.span_guard``). Before the worker started (model loading, joining the
  group) and while it drains it counts as live: both have bounds of their own. Its body
  names the partitions not being read and why: ``held_partitions`` (kept paused for a
  reason: ``conversation-restore`` while the conversation state is read back, whose
  restore has its own bound and stops the worker when a partition makes no progress;
  ``uncommitted-span``; ``transactions-lost``) and ``paused_partitions`` (paused by
  backpressure, resumed as in-flight work drains).
- ``/readyz`` (count me as available): 200 once the worker started (its backend started,
  a local model loaded and warmed up; subscribed: partitions assigned or awaited) and
  while it is not shutting down. It turns 503 as soon as SIGTERM starts the drain. It
  reflects only what the pod itself controls: a remote backend's open circuit is an
  outage of a dependency every pod shares, and failing readiness for it would make every
  pod unready at once and stall a rollout (the fix being rolled out included).
- ``/status`` (for people and dashboards, never a probe): always 200 while the server
  answers, with the phase, the assigned partitions, the messages in flight, the policy
  version and the backend's state (``backend_ready``: for remote APIs the circuit is not
  open). The circuit's state is also the metric ``moderation_worker_backend_circuit_state``.

The probes and ``/status`` answer a small JSON document saying what was checked. ``serve_health`` is
the one entry point: ``async with serve_health(worker, settings): await worker.run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka.structs import TopicPartition
from prometheus_client.exposition import choose_encoder

from worker import __version__
from worker.config import ConfigError, Settings
from worker.ops import metrics
from worker.ops.lag import LagSampler, PartitionLag
from worker.ops.logs import HealthEvent
from worker.ops.status import WorkerStatus

log = structlog.get_logger("worker.ops.health")

_REQUEST_TIMEOUT_S = 5.0
_BACKEND_READY_TIMEOUT_S = 2.0
_MAX_REQUEST_HEAD = 16 * 1024


@dataclass
class Check:
    """A probe's answer: ``ok`` decides the status (200 or 503), ``details`` the JSON body."""

    ok: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def body(self) -> bytes:
        document = {
            "status": "ok" if self.ok else "fail",
            **({"reason": self.reason} if self.reason else {}),
            **self.details,
        }
        return (json.dumps(document, sort_keys=True) + "\n").encode()


class StallDetector:
    """Finds partitions the consumer no longer reads although records wait there.

    ``observe`` is called with successive lag samples. A partition is stalled when, in
    every sample over more than ``bound_s``, it was unpaused, had lag, and its position
    did not move. Paused partitions (backpressure) and partitions without lag reset the
    watch; so does any movement.
    """

    def __init__(self, bound_s: float) -> None:
        self._bound_s = bound_s
        self._since: dict[TopicPartition, tuple[int, float]] = {}

    def observe(self, lags: dict[TopicPartition, PartitionLag], now: float) -> list[TopicPartition]:
        stalled = []
        watching: dict[TopicPartition, tuple[int, float]] = {}
        for tp, state in lags.items():
            if state.paused or not state.lag:
                continue
            position, since = self._since.get(tp, (state.position, now))
            if position != state.position:
                since = now
            watching[tp] = (state.position, since)
            if now - since > self._bound_s:
                stalled.append(tp)
        self._since = watching
        return stalled


class HealthServer:
    """Serves metrics and probes for one worker, seen through ``WorkerStatus``.

    ``settings`` gives the address, the liveness bound and the rebalance timing the bound
    is checked against. ``clock`` is injectable for tests (default ``time.monotonic``).
    """

    def __init__(
        self, worker: WorkerStatus, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._worker = worker
        self._settings = settings
        self._host = settings.http_host
        self._port = settings.http_port
        self._liveness_timeout_s = settings.liveness_timeout_s
        self._clock = clock
        self._lag = LagSampler(worker.partitions)
        self._stalls = StallDetector(settings.liveness_timeout_s)
        self._server: asyncio.Server | None = None
        metrics.bind_worker(worker, version=__version__, group_id=settings.group_id)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0 in tests); 0 before ``start``."""
        if self._server is None or not self._server.sockets:
            return 0
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Listen; raises ``ConfigError`` naming MODWORKER_HTTP_PORT when the port is taken."""
        try:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, limit=_MAX_REQUEST_HEAD, reuse_address=True
            )
        except OSError as err:
            raise ConfigError(
                f"MODWORKER_HTTP_PORT: cannot listen on {self._host}:{self._port} ({err.strerror or err}); "
                "choose a free port, or 0 to run without metrics and probes"
            ) from None
        log.info(
            HealthEvent.LISTENING, host=self._host, port=self.port, paths=["/metrics", "/livez", "/readyz", "/status"]
        )
        settings = self._settings
        # A rebalance blocks the consume loop until the group has re-formed: up to the
        # rebalance timeout the app gives the consumer. A shorter bound restarts healthy pods.
        rebalance_s = max(settings.kafka.session_timeout_ms / 1000, settings.revoke_timeout_s + 5)
        if self._liveness_timeout_s <= rebalance_s:
            log.warning(
                HealthEvent.BOUND_TOO_SHORT,
                liveness_timeout_s=self._liveness_timeout_s,
                rebalance_timeout_s=rebalance_s,
                fix="set MODWORKER_LIVENESS_TIMEOUT_S above MODWORKER_REVOKE_TIMEOUT_S + 5",
            )

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
            log.info(HealthEvent.STOPPED)

    # -- the checks -----------------------------------------------------------------

    async def liveness(self) -> Check:
        worker = self._worker
        if not worker.started:
            return Check(True, details={"phase": "starting"})
        if worker.draining:
            return Check(True, details={"phase": "draining"})
        now = self._clock()
        bound = self._liveness_timeout_s
        idle_s = now - worker.last_loop_at
        details: dict[str, Any] = {"phase": "running", "loop_idle_s": round(idle_s, 3), "bound_s": bound}
        held = worker.held_partitions
        if held:
            details["held_partitions"] = {f"{tp.topic}-{tp.partition}": list(why) for tp, why in sorted(held.items())}
        paused = worker.partitions.paused_partitions() - held.keys()
        if paused:
            details["paused_partitions"] = sorted(f"{tp.topic}-{tp.partition}" for tp in paused)
        if idle_s > bound:
            return Check(False, f"the consume loop has not iterated for {idle_s:.1f}s (bound {bound:g}s)", details)
        stuck = worker.stuck_partitions
        if stuck:
            names = ", ".join(f"{tp.topic}-{tp.partition} at offset {offset}" for tp, offset in sorted(stuck.items()))
            details["stuck_partitions"] = {f"{tp.topic}-{tp.partition}": offset for tp, offset in stuck.items()}
            return Check(False, f"committed offset stuck (uncommitted span over the cap) on {names}", details)
        stalled = self._stalls.observe(await self._lag.sample(), now)
        if stalled:
            names = ", ".join(f"{tp.topic}-{tp.partition}" for tp in stalled)
            return Check(False, f"records waiting and none read for over {bound:g}s on {names}", details)
        return Check(True, details=details)

    async def readiness(self) -> Check:
        """Started and not draining; the backend's state is deliberately not part of it."""
        worker = self._worker
        details: dict[str, Any] = {"started": worker.started, "draining": worker.draining}
        if worker.draining:
            return Check(False, "shutting down", details)
        if not worker.started:
            return Check(False, "starting: backend warming up or consumer joining", details)
        details["assigned_partitions"] = len(worker.partitions.assignment())
        return Check(True, details=details)

    async def status(self) -> Check:
        """What the worker is doing and how its backend is; ``ok`` is always true."""
        worker = self._worker
        phase = "draining" if worker.draining else "running" if worker.started else "starting"
        details: dict[str, Any] = {
            "phase": phase,
            "version": __version__,
            "group_id": self._settings.group_id,
            "policy_version": worker.policy_version,
            "in_flight": worker.in_flight,
            "in_flight_bytes": worker.in_flight_bytes,
            "backend": worker.backend.name,
        }
        if worker.started:
            details["assigned_partitions"] = sorted(
                f"{tp.topic}-{tp.partition}" for tp in worker.partitions.assignment()
            )
        try:
            details["backend_ready"] = bool(await asyncio.wait_for(worker.backend.ready(), _BACKEND_READY_TIMEOUT_S))
        except Exception as err:  # noqa: BLE001 - a failing check is reported, not raised
            details["backend_ready"] = False
            details["backend_error"] = f"{type(err).__name__}: {err}"
        return Check(True, details=details)

    async def metrics_payload(self, accept: str) -> tuple[bytes, str]:
        """The exposition body and its content type, lag refreshed first."""
        with contextlib.suppress(Exception):  # a lag read racing a rebalance must not fail the scrape
            await self._lag.refresh_metric()
        encoder, content_type = choose_encoder(accept)
        return encoder(metrics.REGISTRY), content_type

    # -- HTTP -------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_S)
            status, content_type, body, method = await self._respond(head)
            writer.write(_response(status, content_type, b"" if method == "HEAD" else body, len(body)))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went away or sent garbage: nothing to answer
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            log.warning(HealthEvent.REQUEST_FAILED, error=f"{type(err).__name__}: {err}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n", "GET"
        method, target, _version = parts
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", method
        if path == "/metrics":
            accept = next(
                (line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("accept:")), ""
            )
            body, content_type = await self.metrics_payload(accept)
            return 200, content_type, body, method
        if path == "/livez":
            check = await self.liveness()
            if not check.ok:
                log.warning(HealthEvent.NOT_LIVE, reason=check.reason)
        elif path == "/readyz":
            check = await self.readiness()
        elif path == "/status":
            check = await self.status()
        else:
            return 404, "text/plain", b"not found: try /metrics, /livez, /readyz or /status\n", method
        return (200 if check.ok else 503), "application/json", check.body(), method


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _response(status: int, content_type: str, body: bytes, length: int) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


@contextlib.asynccontextmanager
async def serve_health(worker: WorkerStatus, settings: Settings) -> AsyncIterator[HealthServer | None]:
    """Run the health server for ``worker`` around the block (none when the port is 0)."""
    if not settings.http_port:
        yield None
        return
    server = HealthServer(worker, settings)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
