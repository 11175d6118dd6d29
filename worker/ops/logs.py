"""Logging: structlog set up once, and every log event name declared here.

JSON lines when stderr is not a terminal (what log shippers want), a readable console
renderer when it is. ``redact_secrets`` scrubs every configured secret from every event,
as a last line of defence: code should never log a secret in the first place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import structlog


class Event:
    """Log event names (the ``event`` field). Grep-able, stable, declared once."""

    WORKER_STARTING = "worker.starting"
    WORKER_READY = "worker.ready"
    WORKER_STOPPING = "worker.stopping"
    WORKER_STOPPED = "worker.stopped"
    WORKER_FATAL = "worker.fatal"
    PARTITIONS_ASSIGNED = "partitions.assigned"
    PARTITIONS_REVOKED = "partitions.revoked"
    REVOKE_ABANDONED = "partitions.revoke_abandoned"
    CONSUMPTION_PAUSED = "consumption.paused"
    CONSUMPTION_RESUMED = "consumption.resumed"
    OFFSETS_COMMITTED = "offsets.committed"
    COMMIT_FAILED = "offsets.commit_failed"
    DRAIN_TIMEOUT = "drain.timeout"
    MESSAGE_DEAD_LETTERED = "message.dead_lettered"
    MESSAGE_VERDICT = "message.verdict"
    MESSAGE_FLAGGED = "message.flagged"
    BACKEND_UNAVAILABLE = "backend.unavailable"
    BACKEND_DEGRADED = "backend.degraded_verdicts"
    BACKEND_WAITING = "backend.waiting"


def configure_logging(*, level: str = "info", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    """Configure structlog (and stdlib logging, for aiokafka's own lines) once at start-up."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    scrub = _Redactor([s for s in secrets if s])
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrub,
    ]
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SecretFilterFormatter(scrub))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))  # library chatter only from WARNING up


class _Redactor:
    """structlog processor replacing secret values anywhere in an event's strings."""

    def __init__(self, secrets: list[str]) -> None:
        self._secrets = secrets

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        if self._secrets:
            for key, value in event.items():
                event[key] = self._scrub_value(value)
        return event

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, (int, float, bool, type(None))):
            return value
        if isinstance(value, (list, tuple)):
            return [self._scrub_value(item) for item in value]
        if isinstance(value, dict):
            return {key: self._scrub_value(item) for key, item in value.items()}
        return self.scrub(str(value))  # exceptions and other objects: as the renderer would show them


class _SecretFilterFormatter(logging.Formatter):
    def __init__(self, redactor: _Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor.scrub(super().format(record))
