"""The ``modworker`` command line.

``run`` starts the worker; ``produce`` publishes JSONL events (how a platform tries the
worker); ``tail`` prints what arrives on an output topic; ``schemas export`` writes the
JSON Schemas. The offline tools' commands (``train``, ``eval``, ``demo``, ``bench``)
register themselves from the modules in ``COMMAND_MODULES`` (each exposes
``add_command(subparsers)`` and sets ``func``); a module is imported only when its command
is the one asked for (or for the full help), so ``modworker run`` never loads them.

Every expected failure ends with one line on stderr and a non-zero exit code, never a
traceback: 2 for a configuration problem, 1 for a runtime one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from worker.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

    from worker.app import ModerationWorker

COMMAND_MODULES: dict[str, str] = {
    "bench": "worker.offline.bench",
    "train": "worker.offline.train",
    "eval": "worker.offline.evaluate",
    "calibrate": "worker.offline.calibrate",
    "demo": "worker.offline.demo",
}
"""Offline commands and the module that adds each."""


class CommandError(Exception):
    """An expected failure of a command; the message is printed as is (exit code 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        _report_exit(err)
        return 2
    except CommandError as err:
        _report_exit(err)
        return 1
    except KeyboardInterrupt:
        return 130


def _report_exit(err: Exception) -> None:
    """The one line saying why the command failed: JSON when logging is in JSON mode."""
    from worker.ops.logs import Event, json_logging

    if json_logging():
        structlog.get_logger("worker.cli").error(Event.WORKER_EXIT, error=str(err))
    else:
        print(f"modworker: {err}", file=sys.stderr)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; ``argv`` decides which offline commands are loaded (all when None)."""
    parser = argparse.ArgumentParser(prog="modworker", description="Streaming content moderation for Kafka.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    run.add_argument("--config", type=Path, help="YAML settings file (environment variables win over it)")
    run.set_defaults(func=cmd_run)

    produce = sub.add_parser("produce", help="publish JSONL events to a topic, one per line")
    produce.add_argument("file", type=Path, help="JSONL file ('-' for stdin)")
    produce.add_argument("--topic", required=True)
    produce.add_argument("--key-field", help="JSON field used as the key (default: conversation_id, else id)")
    produce.add_argument("--config", type=Path)
    produce.set_defaults(func=cmd_produce)

    tail = sub.add_parser("tail", help="print records of an output topic as they arrive")
    tail.add_argument("topic")
    tail.add_argument("--json", action="store_true", help="print each value as it is")
    tail.add_argument("--max", type=int, default=0, help="stop after this many records (0: never)")
    tail.add_argument("--timeout", type=float, default=0, help="stop after this many idle seconds (0: never)")
    tail.add_argument("--config", type=Path)
    tail.set_defaults(func=cmd_tail)

    schemas = sub.add_parser("schemas", help="message contract tools")
    schemas_sub = schemas.add_subparsers(dest="schemas_command", metavar="ACTION")
    export = schemas_sub.add_parser("export", help="write the JSON Schema files into DIR")
    export.add_argument("dir", type=Path)
    export.set_defaults(func=cmd_schemas_export)

    config = sub.add_parser("config", help="print every setting with its default, as a Markdown table")
    config.set_defaults(func=cmd_config)

    for name in _offline_commands(argv, builtin=set(sub.choices)):
        importlib.import_module(COMMAND_MODULES[name]).add_command(sub)
    return parser


def _offline_commands(argv: Sequence[str] | None, *, builtin: set[str]) -> list[str]:
    """The offline commands to register: the one asked for, none for a service command, or
    all of them (no command, or an unknown one: the help lists everything)."""
    command = next((arg for arg in argv or () if not arg.startswith("-")), None)
    if command in COMMAND_MODULES:
        return [command]
    if command in builtin:
        return []
    return list(COMMAND_MODULES)


# -- run -----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from worker.app import ModerationWorker, WorkerFatal
    from worker.backends import create_backend, create_fallback, default_policy_file
    from worker.backends.base import BackendStartError
    from worker.ops.event_loop import loop_factory
    from worker.ops.logs import Event, configure_logging
    from worker.pipeline.policy import Policy, PolicyError
    from worker.pipeline.shadow import create_shadow

    settings = load_settings(args.config)
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=secrets_of(settings))
    for note in settings.deprecations:
        structlog.get_logger("worker.cli").warning(Event.SETTING_DEPRECATED, message=note)
    try:
        policy = Policy.load(default_policy_file(settings))
    except PolicyError as err:
        raise ConfigError(f"MODWORKER_POLICY_FILE: {err}") from None
    backend = create_backend(settings, policy)
    fallback = create_fallback(settings, policy)
    try:
        shadow = create_shadow(settings, policy)
    except PolicyError as err:
        raise ConfigError(f"MODWORKER_SHADOW__POLICY_FILE: {err}") from None
    # Start-up objects (modules, settings, policy) live as long as the process: keep them
    # out of the collector's scans (measured +6-10% throughput, docs/benchmarks.md).
    gc.freeze()
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(
                _serve(
                    settings,
                    lambda: ModerationWorker(
                        settings, backend=backend, policy=policy, fallback=fallback, shadow=shadow
                    ),
                )
            )
    except (WorkerFatal, ShutdownTimeout) as err:
        raise CommandError(str(err)) from None
    except BackendStartError as err:
        raise CommandError(f"cannot start the {settings.backend} backend: {err}") from None
    except _KAFKA_START_ERRORS as err:
        raise CommandError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers} ({type(err).__name__}: {err}"
            f"{_tls_failure(settings)}); check KAFKA_BOOTSTRAP_SERVERS and the MODWORKER_KAFKA__SECURITY_* settings"
        ) from None
    return 0


def _tls_failure(settings: Settings) -> str:
    """What one TLS handshake with the first bootstrap server shows, as '; TLS: ...', or ''.

    aiokafka reports a failed handshake (a wrong CA) or a plaintext client on a TLS port
    only as "Unable to bootstrap"; this names the cause in the start-up line."""
    import socket
    import ssl

    from worker.pipeline.source import client_options

    kafka = settings.kafka
    if not kafka.bootstrap_servers:
        return ""
    tls = kafka.security_protocol in ("SSL", "SASL_SSL")
    if tls:
        context: ssl.SSLContext = client_options(kafka)["ssl_context"]
    else:  # only asking whether the port speaks TLS at all
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    host, _, port = kafka.bootstrap_servers.split(",")[0].strip().rpartition(":")
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return "" if tls else "; TLS: the port speaks TLS, set MODWORKER_KAFKA__SECURITY_PROTOCOL=SSL"
    except ssl.SSLError as err:
        return f"; TLS: {err.reason or err}" if tls else ""
    except (OSError, ValueError):
        return ""


SHUTDOWN_GRACE_S = 15.0
"""After SIGTERM the worker has ``drain_timeout_s`` for in-flight work plus this for the
final commit and leaving the group; past that the process gives up (exit code 1)."""


class ShutdownTimeout(Exception):
    """The worker did not stop within ``drain_timeout_s + SHUTDOWN_GRACE_S`` of SIGTERM."""


async def _serve(settings: Settings, make_worker: Callable[[], ModerationWorker]) -> None:
    from worker.ops.health import serve_health
    from worker.ops.logs import Event

    worker = make_worker()  # inside the loop: aiokafka clients need a running loop
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    def on_signal() -> None:
        worker.stop()
        signalled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    async with serve_health(worker, settings):  # /metrics, /livez, /readyz until the worker has drained
        running = asyncio.ensure_future(worker.run())
        waiting = asyncio.ensure_future(signalled.wait())
        await asyncio.wait((running, waiting), return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not running.done():  # signalled: a hard deadline, whatever blocks in aiokafka
            bound = settings.drain_timeout_s + SHUTDOWN_GRACE_S
            await asyncio.wait((running,), timeout=bound)
            if not running.done():
                running.cancel()
                message = (
                    f"did not stop within {bound:g}s of the signal (MODWORKER_DRAIN_TIMEOUT_S + {SHUTDOWN_GRACE_S:g}s)"
                )
                structlog.get_logger("worker.cli").error(Event.SHUTDOWN_TIMEOUT, error=message)
                raise ShutdownTimeout(message)
        await running


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings, for log redaction."""
    values = [settings.mistral.api_key, settings.openai.api_key, settings.llm.api_key, settings.kafka.sasl_password]
    return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]


def _kafka_start_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError, OSError)


_KAFKA_START_ERRORS: tuple[type[BaseException], ...] = _kafka_start_errors()


# -- produce -------------------------------------------------------------------------


def cmd_produce(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, require_backend=False)
    if str(args.file) != "-" and not args.file.is_file():
        raise CommandError(f"no such file: {args.file}")
    count = asyncio.run(_produce(settings, args.file, args.topic, args.key_field))
    print(f"published {count} records to {args.topic}", file=sys.stderr)
    return 0


async def _produce(settings: Settings, path: Path, topic: str, key_field: str | None) -> int:
    from worker.pipeline.source import make_producer

    producer = make_producer(settings.kafka, linger_ms=20)
    try:
        await producer.start()
    except _KAFKA_START_ERRORS as err:
        raise CommandError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {err}") from None
    count = 0
    try:
        stream = sys.stdin.buffer if str(path) == "-" else path.open("rb")
        with stream:
            futures = []
            for line in stream:
                value = line.rstrip(b"\r\n")
                if not value.strip():
                    continue
                futures.append(await producer.send(topic, value, key=key_of(value, key_field)))
                count += 1
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


def key_of(value: bytes, key_field: str | None) -> bytes | None:
    """The event's natural key: ``key_field``, else ``conversation_id``, else ``id``."""
    try:
        event = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict):
        return None
    for field in (key_field,) if key_field else ("conversation_id", "id"):
        found = event.get(field)
        if isinstance(found, str):
            return found.encode()
    return None


# -- tail ----------------------------------------------------------------------------


def cmd_tail(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, require_backend=False)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(settings, args.topic, as_json=args.json, limit=args.max, idle_timeout=args.timeout))
    return 0


async def _tail(settings: Settings, topic: str, *, as_json: bool, limit: int, idle_timeout: float) -> None:
    from aiokafka import AIOKafkaConsumer

    from worker.pipeline.source import client_options

    consumer = AIOKafkaConsumer(
        topic, **client_options(settings.kafka), group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    try:
        await consumer.start()
    except _KAFKA_START_ERRORS as err:
        raise CommandError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {err}") from None
    seen = 0
    last = time.monotonic()
    try:
        while not limit or seen < limit:
            batches = await consumer.getmany(timeout_ms=200)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                if idle_timeout and time.monotonic() - last > idle_timeout:
                    return
                continue
            last = time.monotonic()
            for record in records:
                print(record.value.decode("utf-8", "replace") if as_json else describe_record(record), flush=True)
                seen += 1
                if limit and seen >= limit:
                    return
    finally:
        await consumer.stop()


def describe_record(record: ConsumerRecord[bytes, bytes]) -> str:
    """One readable line for a verdict, violation or dead letter."""
    try:
        value = json.loads(record.value)
    except (ValueError, TypeError):
        value = None
    if isinstance(value, dict) and "action" in value:
        hits = value.get("violations") or []
        cats = ", ".join(f"{h['category']}={h['score']:.2f}" for h in hits) or "-"
        degraded = f" degraded ({value.get('degraded_reason')})" if value.get("degraded") else ""
        return f"{value['action']:<6} {value.get('kind', ''):<12} {value.get('event_id')}  {cats}{degraded}"
    headers = dict(record.headers or ())
    reason = headers.get("x-modworker-dlq-error-type")
    if reason is not None:
        message = headers.get("x-modworker-dlq-message", b"").decode("utf-8", "replace")
        return f"dead-letter {reason.decode()}: {message}"
    return record.value.decode("utf-8", "replace") if record.value else "<empty>"


# -- config --------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


def settings_table() -> str:
    """The README's configuration table."""
    from worker.config import settings_reference

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, text in settings_reference():
        name = f"`{env}`".replace(" (or ", "` (or `").replace(")`", "`)")
        lines.append(f"| {name} | {f'`{default}`' if default else ''} | {text} |")
    return "\n".join(lines)


# -- schemas -------------------------------------------------------------------------


def cmd_schemas_export(args: argparse.Namespace) -> int:
    from schemas import export_json_schemas

    for path in export_json_schemas(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
