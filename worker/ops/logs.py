"""Logging: one structlog pipeline for every line, and every log event name declared here.

JSON lines when stderr is not a terminal (what log shippers want), a readable console
renderer when it is. Standard-library records (aiokafka's, asyncio's) go through
structlog's ``ProcessorFormatter`` with the same processors and renderer, so JSON mode
emits only JSON lines and ``redact_secrets`` scrubs every line, as a last line of defence:
code should never log a secret in the first place.

A library that repeats one error (aiokafka while the broker is down: one line per
reconnect attempt) is logged once per ``repeat_interval_s`` per (logger, level, message
template); the next line that passes carries ``repeated``, the number held back.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger


class Event:
    """Log event names of the worker (the ``event`` field). Grep-able, stable, declared once."""

    WORKER_STARTING = "worker.starting"
    WORKER_READY = "worker.ready"
    WORKER_STOPPING = "worker.stopping"
    WORKER_STOPPED = "worker.stopped"
    WORKER_FATAL = "worker.fatal"
    OUTPUT_LIMIT = "outputs.limit"
    SETTING_DEPRECATED = "config.deprecated_setting"
    SETTING_UNKNOWN = "config.unknown_setting"
    PARTITIONS_ASSIGNED = "partitions.assigned"
    PARTITIONS_REVOKED = "partitions.revoked"
    REVOKE_ABANDONED = "partitions.revoke_abandoned"
    CONSUMPTION_PAUSED = "consumption.paused"
    CONSUMPTION_RESUMED = "consumption.resumed"
    OFFSETS_COMMITTED = "offsets.committed"
    COMMIT_FAILED = "offsets.commit_failed"
    TRANSACTION_ABORTED = "transactions.aborted"
    TRANSACTION_FAILED = "transactions.failed"
    PRODUCER_FENCED = "transactions.producer_fenced"
    DRAIN_TIMEOUT = "drain.timeout"
    MESSAGE_DEAD_LETTERED = "message.dead_lettered"
    MESSAGE_VERDICT = "message.verdict"
    MESSAGE_FLAGGED = "message.flagged"
    REVIEW_APPLIED = "review.applied"
    BACKEND_UNAVAILABLE = "backend.unavailable"
    BACKEND_DEGRADED = "backend.degraded_verdicts"
    BACKEND_WAITING = "backend.waiting"
    BACKEND_BATCH_SPLIT = "backend.batch_split"
    PARTITION_STUCK = "partition.stuck"
    PARTITION_UNSTUCK = "partition.unstuck"
    BACKEND_POISON_INPUT = "backend.poison_input"
    BACKEND_PROBE = "backend.probe"
    BACKEND_FALLBACK = "backend.fallback_scored"
    FALLBACK_FAILED = "backend.fallback_failed"
    CASCADE_CLOSE_FAILED = "cascade.close_failed"
    SHADOW_FAILED = "shadow.failed"
    SHADOW_STARTED = "shadow.started"
    TASK_FAILED = "worker.task_failed"
    CONSUME_FAILED = "worker.consume_failed"
    OFFSET_RESET = "partitions.offset_reset"
    SHUTDOWN_TIMEOUT = "worker.shutdown_timeout"
    WORKER_EXIT = "worker.exit"
    STATE_RESTORED = "conversation_state.restored"
    STATE_CHANGELOG_CREATED = "conversation_state.changelog_created"
    STATE_CHANGELOG_UNAVAILABLE = "conversation_state.changelog_unavailable"
    STATE_RECORD_INVALID = "conversation_state.invalid_record"


class HealthEvent:
    """Log event names of the health server."""

    LISTENING = "health.listening"
    STOPPED = "health.stopped"
    NOT_LIVE = "health.not_live"
    BOUND_TOO_SHORT = "health.liveness_bound_too_short"
    REQUEST_FAILED = "health.request_failed"


class HttpEvent:
    """Log event names of the HTTP layer."""

    RETRY = "backend.http.retry"
    GAVE_UP = "backend.http.gave_up"
    REJECTED = "backend.http.rejected"
    AUTH_FAILED = "backend.http.auth_failed"


class PacingEvent:
    """Log event names of the pacer."""

    SLOWING_DOWN = "backend.rate.slowing_down"
    PACE_RESTORED = "backend.rate.pace_restored"


class CacheEvent:
    """Log event names of the dedup cache."""

    STATS = "backend.cache.stats"


class LlmEvent:
    """Log event names of the llm backend (``worker.backends.llm``)."""

    UNPARSEABLE = "backend.llm.unparseable"
    UNKNOWN_CATEGORIES = "backend.llm.unknown_categories"
    MISSING_CATEGORIES = "backend.llm.missing_categories"


class DsaSubmitEvent:
    """Log event names of ``modworker dsa submit`` (``worker.ops.dsa_submit``)."""

    STARTED = "dsa.submit.started"
    BATCH = "dsa.submit.batch"
    DUPLICATES = "dsa.submit.duplicates"
    REFUSED = "dsa.submit.refused"
    API_UNAVAILABLE = "dsa.submit.api_unavailable"
    DRAIN_TIMEOUT = "dsa.submit.drain_timeout"
    COMMIT_FAILED = "dsa.submit.commit_failed"
    STOPPED = "dsa.submit.stopped"


class BreakerEvent:
    """Log event names of the circuit breaker."""

    OPENED = "backend.circuit.opened"
    HALF_OPEN = "backend.circuit.half_open"
    CLOSED = "backend.circuit.closed"


_json_mode = False


def json_logging() -> bool:
    """True once ``configure_logging`` chose JSON lines."""
    return _json_mode


REPEAT_INTERVAL_S = 10.0
"""Library records repeating one (logger, level, template) pass once per this many seconds."""


def configure_logging(
    *, level: str = "info", fmt: str = "auto", secrets: Iterable[str] = (), repeat_interval_s: float = REPEAT_INTERVAL_S
) -> None:
    """Configure structlog and stdlib logging (aiokafka's own lines) once at start-up."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    global _json_mode  # noqa: PLW0603 - one process, one logging set-up
    _json_mode = use_json
    kept = [s for s in secrets if s]
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # JSON lines are scrubbed once rendered (one substring test per secret on one string);
    # the console renderer's layout is its own, so its values are scrubbed one by one first.
    scrubbing: list[Processor] = [] if use_json else [_Redactor(kept)]
    renderer: Processor = JsonLines(kept) if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            *scrubbing,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
                _add_repeat_count,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                *scrubbing,
                renderer,
            ],
        )
    )
    handler.addFilter(RepeatFilter(repeat_interval_s))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))  # library chatter only from WARNING up


def _add_repeat_count(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """A stdlib record's message is its formatted text; ``repeated`` comes from ``RepeatFilter``."""
    record = event.get("_record")
    repeated = getattr(record, "repeated", 0)
    if repeated:
        event["repeated"] = repeated
    return event


class RepeatFilter(logging.Filter):
    """Lets one record per (logger, level, template) through per ``interval_s``; counts the rest.

    The record that passes after a quiet spell carries ``repeated``: how many were held
    back since the last one passed. ``clock`` is injectable for tests.
    """

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        record.repeated = last[1] if last is not None else 0
        self._seen[key] = (now, 0)
        if len(self._seen) > 1_000:  # bound the memory of distinct templates
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval_s}
        return True


class JsonLines:
    """structlog renderer: the event as one JSON object (orjson), secrets replaced by ``***``.

    Secrets are replaced in the rendered line, in their raw and their JSON-escaped forms, so
    a secret anywhere in a value (nested, inside an exception's text, an object's ``repr``)
    is scrubbed at the cost of one substring test per secret. A value orjson cannot write
    (an int beyond 64 bits, a lone surrogate) sends the line through the standard ``json``
    module instead; objects are written as their ``__structlog__()`` or ``repr``.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: dict[str, None] = {}
        for secret in secrets:
            forms[secret] = None
            forms[orjson.dumps(secret).decode()[1:-1]] = None
            forms[json.dumps(secret)[1:-1]] = None  # the fallback's ASCII escapes
        self._secrets = list(forms)

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> str:
        try:
            line = orjson.dumps(event, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            line = json.dumps(event, default=_fallback)
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "***")
        return line


def _fallback(value: Any) -> Any:
    structlog_form = getattr(value, "__structlog__", None)
    return structlog_form() if callable(structlog_form) else repr(value)


class _Redactor:
    """structlog processor replacing secret values anywhere in an event's strings."""

    def __init__(self, secrets: list[str]) -> None:
        self._secrets = secrets

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        if self._secrets:
            for key, value in event.items():
                if not key.startswith("_"):
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
