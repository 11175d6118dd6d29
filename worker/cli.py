"""The ``modworker`` command line.

``run`` starts the worker; ``produce`` publishes JSONL events (how a platform tries the
worker), refusing lines the worker would dead-letter; ``tail`` prints what arrives on a
topic (from the end, as Kafka's console consumer, unless ``--from-beginning``; a missing
topic is an error, never created); ``schemas export`` writes the JSON Schemas. Commands
that talk to Kafka take ``-b/--bootstrap-server``, which wins over every other source.
Results go to stdout; progress, notes and errors to stderr.

The offline tools' commands (``train``, ``eval``, ``calibrate``, ``demo``, ``bench``, ``labels``) register themselves
from the modules in ``COMMAND_MODULES`` (each exposes ``add_command(subparsers)`` and sets
``func``); a module is imported only when its command is the one asked for (or for the
full help), so ``modworker run`` never loads them.

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
from typing import TYPE_CHECKING, Any

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
    "labels": "worker.offline.labels",
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
    from worker import __version__

    parser = argparse.ArgumentParser(prog="modworker", description="Streaming content moderation for Kafka.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    run.add_argument("--config", type=Path, help="YAML settings file (environment variables win over it)")
    _add_bootstrap_server(run)
    run.set_defaults(func=cmd_run)

    produce = sub.add_parser("produce", help="publish JSONL events to a topic, one per line")
    produce.add_argument("file", type=Path, help="JSONL file ('-' for stdin)")
    produce.add_argument("--topic", required=True)
    produce.add_argument("--key-field", help="JSON field used as the key (default: conversation_id, else id)")
    produce.add_argument(
        "--allow-invalid",
        action="store_true",
        help="publish lines the worker would dead-letter too (each is still reported); default: publish nothing",
    )
    produce.add_argument("--config", type=Path)
    _add_bootstrap_server(produce)
    produce.set_defaults(func=cmd_produce)

    tail = sub.add_parser(
        "tail", help="print records of a topic: those that arrive from now on, or all with --from-beginning"
    )
    tail.add_argument("topic")
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest record, not at the end")
    tail.add_argument(
        "-o",
        "--offset",
        metavar="OFFSET",
        help="where to start: earliest, latest (the default), or an offset N of the --partition read",
    )
    tail.add_argument("--partition", type=int, metavar="P", help="read this partition only")
    tail.add_argument("--max-messages", type=int, default=0, metavar="N", help="exit after N records (default: never)")
    tail.add_argument(
        "--timeout-ms", type=int, default=0, metavar="MS", help="exit when no record came for MS (default: never)"
    )
    tail.add_argument("--json", action="store_true", help="print each value as it is")
    tail.add_argument(
        "--read-committed",
        action="store_true",
        help="show only records of committed transactions (isolation_level=read_committed), as consumers of "
        "MODWORKER_DELIVERY=exactly_once outputs must read",
    )
    for part in PRINTABLE_PARTS:
        tail.add_argument(f"--print-{part}", action="store_true", help=f"print each record's {part} before it")
    tail.add_argument("--config", type=Path)
    _add_bootstrap_server(tail)
    tail.set_defaults(func=cmd_tail)

    topics = sub.add_parser("topics", help="create or check the topics the worker reads and writes")
    topics_sub = topics.add_subparsers(dest="topics_command", metavar="ACTION")
    for action, text in (
        ("create", "create the missing topics as stated; compare the existing ones (exit 1 on a difference)"),
        ("check", "compare every topic with the statement, create nothing (exit 1 on a difference or a missing one)"),
    ):
        topic_action = topics_sub.add_parser(action, help=text, description=text)
        _add_topic_statement(topic_action)
        topic_action.add_argument("--config", type=Path)
        _add_bootstrap_server(topic_action)
        topic_action.set_defaults(func=cmd_topics, create=action == "create")

    schemas = sub.add_parser("schemas", help="message contract tools")
    schemas_sub = schemas.add_subparsers(dest="schemas_command", metavar="ACTION")
    export = schemas_sub.add_parser("export", help="write the JSON Schema files into DIR")
    export.add_argument("dir", type=Path)
    export.set_defaults(func=cmd_schemas_export)
    asyncapi = schemas_sub.add_parser("asyncapi", help="print the AsyncAPI 3 document of every topic (YAML)")
    asyncapi.set_defaults(func=cmd_schemas_asyncapi)

    settings_options = argparse.ArgumentParser(add_help=False)
    settings_options.add_argument("--config", type=Path, help="YAML settings file (environment variables win over it)")
    _add_bootstrap_server(settings_options)
    config = sub.add_parser(
        "config",
        parents=[settings_options],
        help="print the effective settings (secrets masked); 'config check' validates them and the policy",
    )
    config.add_argument("--changed", action="store_true", help="print only the settings that differ from the default")
    config.set_defaults(func=cmd_config)
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate the settings, the backend's credentials and the policy; exit 2 with one line per problem",
    )
    # Accepted before or after 'check' alike: without a default here, the sub-command
    # does not undo what was given before it.
    check.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="YAML settings file")
    _add_bootstrap_server(check, default=argparse.SUPPRESS)
    check.set_defaults(func=cmd_config_check)
    reference = config_sub.add_parser("reference", help="every setting with its default, as a Markdown table")
    reference.add_argument(
        "--write",
        type=Path,
        metavar="PAGE",
        help="replace the table at the end of PAGE (docs/configuration.md) instead",
    )
    reference.set_defaults(func=cmd_config_reference)

    dsa = sub.add_parser("dsa", help="EU DSA statements of reasons")
    dsa_sub = dsa.add_subparsers(dest="dsa_command", metavar="ACTION")
    submit = dsa_sub.add_parser(
        "submit",
        help="post the statements of reasons topic to the DSA Transparency Database until SIGTERM, committing "
        "what it took",
    )
    submit.add_argument("--config", type=Path, help="YAML settings file (environment variables win over it)")
    _add_bootstrap_server(submit)
    submit.set_defaults(func=cmd_dsa_submit)

    for name in _offline_commands(argv, builtin=set(sub.choices)):
        importlib.import_module(COMMAND_MODULES[name]).add_command(sub)
    return parser


def _add_bootstrap_server(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument(
        "-b",
        "--bootstrap-server",
        default=default,
        metavar="HOST:PORT[,...]",
        help="Kafka brokers to connect to (wins over KAFKA_BOOTSTRAP_SERVERS and the --config file)",
    )


def _add_topic_statement(parser: argparse.ArgumentParser) -> None:
    from worker.ops import topics

    parser.add_argument(
        "--partitions",
        type=int,
        default=topics.DEFAULT_PARTITIONS,
        help="partitions of every topic (the changelog follows the conversation topic's) (default: %(default)s)",
    )
    parser.add_argument(
        "--replication-factor", type=int, default=topics.DEFAULT_REPLICATION_FACTOR, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--min-insync-replicas",
        type=int,
        default=topics.DEFAULT_MIN_INSYNC_REPLICAS,
        help="replicas that must have a write before acks=all acknowledges it (default: %(default)s)",
    )
    parser.add_argument(
        "--retention-ms",
        type=int,
        default=topics.DEFAULT_RETENTION_MS,
        help="retention of the input and output topics; the changelog is compacted instead (default: 7 days)",
    )


def print_setting_warnings(settings: Settings) -> None:
    """The start-up warnings of a command that does not log (deprecated and unknown
    settings), one line each on stderr; ``run`` logs them instead."""
    for note in [*settings.deprecations, *settings.unknown_variables]:
        print(f"modworker: warning: {note}", file=sys.stderr)


def kafka_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``load_settings`` keyword arguments for what the command line says about Kafka."""
    servers = getattr(args, "bootstrap_server", None)
    return {"kafka": {"bootstrap_servers": servers}} if servers else {}


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
    from worker.backends import create_backend, create_fallback, load_policy
    from worker.backends.base import BackendStartError
    from worker.ops.event_loop import loop_factory
    from worker.ops.logs import Event, configure_logging
    from worker.pipeline.policy import PolicyError
    from worker.pipeline.shadow import create_shadow
    from worker.pipeline.statements import dsa_problem

    settings = load_settings(args.config, **kafka_overrides(args))
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=secrets_of(settings))
    for note in settings.deprecations:
        structlog.get_logger("worker.cli").warning(Event.SETTING_DEPRECATED, message=note)
    for note in settings.unknown_variables:
        structlog.get_logger("worker.cli").warning(Event.SETTING_UNKNOWN, message=note)
    try:
        policy = load_policy(settings)
    except PolicyError as err:
        raise ConfigError(f"MODWORKER_POLICY_FILE: {err}") from None
    if settings.dsa.enabled and (problem := dsa_problem(policy, _policy_origin(settings))) is not None:
        raise ConfigError(f"MODWORKER_DSA__ENABLED=true: {problem}")
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
    values = [
        settings.mistral.api_key,
        settings.openai.api_key,
        settings.llm.api_key,
        settings.kafka.sasl_password,
        settings.dsa.api_token,
    ]
    return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]


def _kafka_start_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError, OSError)


_KAFKA_START_ERRORS: tuple[type[BaseException], ...] = _kafka_start_errors()


# -- produce -------------------------------------------------------------------------


def cmd_produce(args: argparse.Namespace) -> int:
    """Publish every line, or none: a line the worker would dead-letter is named with its
    number and the reason, and refused (exit 1) unless ``--allow-invalid``."""
    settings = load_settings(args.config, require_backend=False, **kafka_overrides(args))
    print_setting_warnings(settings)
    if str(args.file) != "-" and not args.file.is_file():
        raise CommandError(f"no such file: {args.file}")
    origin = "<stdin>" if str(args.file) == "-" else str(args.file)
    stream = sys.stdin.buffer if str(args.file) == "-" else args.file.open("rb")
    with stream:
        lines = [(number, line.rstrip(b"\r\n")) for number, line in enumerate(stream, 1) if line.strip()]
    invalid = invalid_lines(settings, args.topic, lines)
    for number, reason in invalid[:MAX_REPORTED_LINES]:
        print(f"{origin}:{number}: {reason}", file=sys.stderr)
    if len(invalid) > MAX_REPORTED_LINES:
        print(f"{origin}: ... and {len(invalid) - MAX_REPORTED_LINES} more invalid lines", file=sys.stderr)
    numbers = _line_numbers([number for number, _ in invalid])
    if invalid and not args.allow_invalid:
        raise CommandError(
            f"{origin}: {len(invalid)} of {len(lines)} lines invalid ({numbers}); nothing published: fix them, or "
            "pass --allow-invalid to publish them anyway (the worker dead-letters them)"
        )
    count = asyncio.run(_produce(settings, [value for _, value in lines], args.topic, args.key_field))
    note = f" ({len(invalid)} invalid: {numbers})" if invalid else ""
    print(f"published {count} records to {args.topic}{note}", file=sys.stderr)
    return 0


MAX_REPORTED_LINES = 20
"""Invalid lines ``produce`` names one by one; the rest are counted."""


def invalid_lines(settings: Settings, topic: str, lines: Sequence[tuple[int, bytes]]) -> list[tuple[int, str]]:
    """``(line number, reason)`` of each line the worker would dead-letter when read from
    ``topic``: judged by the worker's own decoder on its input topics and its reviews topic
    (as ``ReviewDecision``); on any other topic a line only has to be JSON."""
    from aiokafka.structs import ConsumerRecord, TopicPartition

    from worker.pipeline.decode import Decoder
    from worker.pipeline.types import DecodeFailure, PartitionOffsets

    inputs = (settings.content_topic, settings.conversation_topic)
    decoder = Decoder(
        content_topic=settings.content_topic,
        conversation_topic=settings.conversation_topic,
        max_text_chars=settings.max_text_chars,
    )
    slot = PartitionOffsets(TopicPartition(topic, 0))
    invalid = []
    for number, value in lines:
        if topic == settings.reviews.topic:
            record = ConsumerRecord(topic, 0, number, 0, 0, None, value, None, 0, len(value), ())
            review = Decoder.decode_review(record, slot)
            if isinstance(review, DecodeFailure):
                invalid.append((number, f"{review.error_type}: {review.message}"))
            continue
        if topic not in inputs:
            try:
                json.loads(value)
            except (ValueError, RecursionError) as err:
                invalid.append((number, f"not_json: value is not JSON: {err}"))
            continue
        record = ConsumerRecord(topic, 0, number, 0, 0, None, value, None, 0, len(value), ())
        outcome = decoder.decode(record, slot)
        if isinstance(outcome, DecodeFailure):
            invalid.append((number, f"{outcome.error_type}: {outcome.message}"))
    return invalid


def _line_numbers(numbers: Sequence[int], shown: int = 10) -> str:
    words = ", ".join(str(n) for n in numbers[:shown])
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"line{'s' if len(numbers) > 1 else ''} {words}{more}"


async def _produce(settings: Settings, values: Sequence[bytes], topic: str, key_field: str | None) -> int:
    from worker.pipeline.source import make_producer

    producer = make_producer(settings.kafka, linger_ms=20)
    try:
        await producer.start()
    except _KAFKA_START_ERRORS as err:
        raise CommandError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {err}") from None
    try:
        futures = [await producer.send(topic, value, key=key_of(value, key_field)) for value in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(futures)


def key_of(value: bytes, key_field: str | None) -> bytes | None:
    """The event's natural key: ``key_field``, else ``conversation_id``, else ``id``, else
    ``event_id`` (a content ``ReviewDecision``: the key of the verdict it decides on)."""
    try:
        event = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict):
        return None
    for field in (key_field,) if key_field else ("conversation_id", "id", "event_id"):
        found = event.get(field)
        if isinstance(found, str):
            return found.encode()
    return None


# -- tail ----------------------------------------------------------------------------


PRINTABLE_PARTS = ("partition", "offset", "headers", "key")
"""What ``tail --print-PART`` adds before each value, in this order (as Kafka's console consumer)."""


def cmd_tail(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, require_backend=False, **kafka_overrides(args))
    print_setting_warnings(settings)
    shown = [part for part in PRINTABLE_PARTS if getattr(args, f"print_{part}")]
    start = tail_start(args.offset, from_beginning=args.from_beginning, partition=args.partition)
    with contextlib.suppress(KeyboardInterrupt):
        seen = asyncio.run(
            _tail(
                settings,
                args.topic,
                start=start,
                partition=args.partition,
                as_json=args.json,
                shown=shown,
                limit=args.max_messages,
                idle_timeout_s=args.timeout_ms / 1000,
                read_committed=args.read_committed,
            )
        )
        print(f"tail: {seen} records", file=sys.stderr)
    return 0


async def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partitions of ``topic``, read from the cluster's metadata without naming the
    topic (a request naming it may auto-create it). Raises ``CommandError`` when the
    topic does not exist, naming the closest existing one."""
    import difflib

    from aiokafka.admin import AIOKafkaAdminClient

    from worker.pipeline.source import client_options

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    try:
        await admin.start()
        described = await admin.describe_topics()  # every topic: no topic is created
    except _KAFKA_START_ERRORS as err:
        raise CommandError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {err}") from None
    finally:
        await admin.close()
    found = {entry["topic"]: entry for entry in described}
    if topic not in found:
        closest = difflib.get_close_matches(topic, [t for t in found if not t.startswith("__")], n=1)
        hint = f" (did you mean {closest[0]}?)" if closest else ""
        raise CommandError(f"no such topic: {topic}{hint} at {settings.kafka.bootstrap_servers}")
    return sorted(p["partition"] for p in found[topic]["partitions"])


def tail_start(offset: str | None, *, from_beginning: bool, partition: int | None) -> str | int:
    """``earliest``, ``latest`` or an offset, from ``-o``/``--from-beginning`` as Kafka's
    console consumer reads them; ``CommandError`` naming the flag when they do not fit."""
    if offset is None:
        return "earliest" if from_beginning else "latest"
    if from_beginning:
        raise CommandError("tail: give --from-beginning or -o/--offset, not both")
    if offset in ("earliest", "latest"):
        return offset
    if not offset.isdigit():
        raise CommandError(f"tail: -o/--offset takes earliest, latest or a non-negative offset, got {offset!r}")
    if partition is None:
        raise CommandError("tail: -o/--offset N needs --partition P (an offset belongs to one partition)")
    return int(offset)


async def _tail(
    settings: Settings,
    topic: str,
    *,
    start: str | int,
    partition: int | None = None,
    as_json: bool,
    shown: Sequence[str],
    limit: int,
    idle_timeout_s: float,
    read_committed: bool = False,
) -> int:
    """Print records of every partition of ``topic`` until ``limit`` records or
    ``idle_timeout_s`` without one (0: no bound); the number printed. With
    ``read_committed``, records of aborted or still open transactions are not shown."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from worker.pipeline.source import client_options, fetch_options

    existing = await topic_partitions(settings, topic)
    if partition is not None and partition not in existing:
        raise CommandError(f"no partition {partition} in {topic} (it has {len(existing)})")
    partitions = [TopicPartition(topic, p) for p in existing if partition is None or p == partition]
    isolation = "read_committed" if read_committed else "read_uncommitted"
    consumer = AIOKafkaConsumer(
        **client_options(settings.kafka),
        **fetch_options(settings.kafka),
        group_id=None,
        enable_auto_commit=False,
        isolation_level=isolation,
    )
    try:
        await consumer.start()
    except _KAFKA_START_ERRORS as err:
        raise CommandError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {err}") from None
    seen = 0
    try:
        consumer.assign(partitions)
        if start == "earliest":
            await consumer.seek_to_beginning(*partitions)
        elif start == "latest":
            await consumer.seek_to_end(*partitions)
        else:
            for tp in partitions:
                consumer.seek(tp, int(start))
        for tp in partitions:  # resolve the start now: records from here on are printed
            await consumer.position(tp)
        where = {"earliest": "the beginning", "latest": "the end"}.get(str(start), f"offset {start}")
        which = f"partition {partition}" if partition is not None else f"{len(partitions)} partitions"
        print(f"tail: reading {topic} ({which}) from {where}", file=sys.stderr, flush=True)
        last = time.monotonic()
        while not limit or seen < limit:
            batches = await consumer.getmany(timeout_ms=200)
            records = [r for rs in batches.values() for r in rs]
            if not records:
                if idle_timeout_s and time.monotonic() - last > idle_timeout_s:
                    break
                continue
            last = time.monotonic()
            for record in records:
                print(format_record(record, as_json=as_json, shown=shown), flush=True)
                seen += 1
                if limit and seen >= limit:
                    break
    finally:
        await consumer.stop()
    return seen


def format_record(record: ConsumerRecord[bytes, bytes], *, as_json: bool, shown: Sequence[str] = ()) -> str:
    """The line ``tail`` prints: the ``shown`` parts (``PRINTABLE_PARTS``), tab-separated,
    then the value as it is (``as_json``) or described (``describe_record``)."""
    fields = []
    for part in PRINTABLE_PARTS:
        if part not in shown:
            continue
        if part == "partition":
            fields.append(f"Partition:{record.partition}")
        elif part == "offset":
            fields.append(f"Offset:{record.offset}")
        elif part == "headers":
            headers = ",".join(f"{k}:{v.decode('utf-8', 'replace')}" for k, v in record.headers or ())
            fields.append(headers or "NO_HEADERS")
        else:
            fields.append("null" if record.key is None else record.key.decode("utf-8", "replace"))
    value = (record.value or b"").decode("utf-8", "replace") if as_json else describe_record(record)
    return "\t".join([*fields, value])


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
    """Every setting as ``NAME=value``, as this command line, environment and ``--config``
    file make it; secrets that are set show as ``********``."""
    from worker.config import effective_settings

    settings = load_settings(args.config, require_backend=False, require_kafka=False, **kafka_overrides(args))
    print_setting_warnings(settings)
    for env, value, is_default in effective_settings(settings):
        if not (args.changed and is_default):
            print(f"{env}={value}")
    return 0


def _policy_origin(settings: Settings) -> str:
    """How a start-up error names the policy in use."""
    from worker.backends import default_policy_file

    path = default_policy_file(settings)
    return "the built-in default policy" if path is None else f"policy file {path}"


def cmd_config_check(args: argparse.Namespace) -> int:
    """What ``run`` would refuse at start-up, without starting: settings, the bootstrap
    address, the backends' credentials, the policy and the shadow policy. Problems go to
    stderr, one line each (exit 2); a summary goes to stdout when there are none. Kafka and
    the backends are not contacted."""
    from worker.backends import default_policy_file
    from worker.config import check_backend_credentials
    from worker.pipeline.policy import Policy, PolicyError
    from worker.pipeline.statements import dsa_problem

    settings = load_settings(args.config, require_backend=False, require_kafka=False, **kafka_overrides(args))
    print_setting_warnings(settings)
    problems: list[str] = []
    if not settings.kafka.bootstrap_servers:
        problems.append("KAFKA_BOOTSTRAP_SERVERS is not set: export KAFKA_BOOTSTRAP_SERVERS=host:9092 (or pass -b)")
    try:
        check_backend_credentials(settings)
    except ConfigError as err:
        problems.append(str(err).removeprefix("configuration error: "))
    policy_file = default_policy_file(settings)
    policy: Policy | None = None
    try:
        policy = Policy.load(policy_file)
    except PolicyError as err:
        problems.append(f"MODWORKER_POLICY_FILE: {err}")
    else:
        if settings.dsa.enabled and (problem := dsa_problem(policy, _policy_origin(settings))) is not None:
            problems.append(f"MODWORKER_DSA__ENABLED=true: {problem}")
    if settings.shadow.policy_file is not None:
        try:
            Policy.load(settings.shadow.policy_file)
        except PolicyError as err:
            problems.append(f"MODWORKER_SHADOW__POLICY_FILE: {err}")
    for problem in problems:
        print(f"modworker: configuration error: {problem}", file=sys.stderr)
    if problems:
        return 2
    assert policy is not None
    print(
        f"configuration ok: backend {settings.backend}, policy {policy_file or 'built-in default'} "
        f"(version {policy.version}), Kafka {settings.kafka.bootstrap_servers}, group {settings.group_id}, "
        f"delivery {settings.delivery}"
    )
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    table = settings_table()
    if args.write is None:
        print(table)
        return 0
    page = args.write.read_text(encoding="utf-8")
    head, found, _ = page.partition(table.splitlines()[0])
    if not found:
        raise CommandError(f"{args.write}: no configuration table (a line '{table.splitlines()[0]}') to replace")
    args.write.write_text(head + table + "\n", encoding="utf-8")
    print(f"wrote the table of {len(table.splitlines()) - 2} settings into {args.write}", file=sys.stderr)
    return 0


def settings_table() -> str:
    """The configuration table of ``docs/configuration.md`` (``modworker config reference``)."""
    from worker.config import settings_reference

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, text in settings_reference():
        name = f"`{env}`".replace(" (or ", "` (or `").replace(")`", "`)")
        lines.append(f"| {name} | {f'`{default}`' if default else ''} | {text} |")
    return "\n".join(lines)


# -- topics --------------------------------------------------------------------------


def cmd_topics(args: argparse.Namespace) -> int:
    """One line per topic on stdout (created, ok, differs with each difference, missing);
    exit 1 when any differs, is missing (``check``) or could not be created."""
    from worker.ops.topics import ensure_topics, planned_topics

    settings = load_settings(args.config, require_backend=False, **kafka_overrides(args))
    print_setting_warnings(settings)
    if min(args.partitions, args.replication_factor, args.min_insync_replicas, args.retention_ms) < 1:
        raise ConfigError("--partitions, --replication-factor, --min-insync-replicas and --retention-ms must be >= 1")
    if args.min_insync_replicas > args.replication_factor:
        raise ConfigError(
            f"--min-insync-replicas {args.min_insync_replicas} exceeds --replication-factor "
            f"{args.replication_factor}: every acks=all write would be refused"
        )
    specs = planned_topics(
        settings,
        partitions=args.partitions,
        replication_factor=args.replication_factor,
        min_insync_replicas=args.min_insync_replicas,
        retention_ms=args.retention_ms,
    )
    try:
        reports = asyncio.run(ensure_topics(settings, specs, create=args.create))
    except _KAFKA_START_ERRORS as err:
        raise CommandError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {err}") from None
    for report in reports:
        print(report.line())
    bad = [report.spec.name for report in reports if not report.good]
    if bad:
        print(f"topics: {len(bad)} of {len(reports)} topics not as stated: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


# -- dsa -----------------------------------------------------------------------------


def cmd_dsa_submit(args: argparse.Namespace) -> int:
    from worker.ops.dsa_submit import SubmitFailed, check_submit_settings, submit_until_signalled
    from worker.ops.event_loop import loop_factory
    from worker.ops.logs import configure_logging

    settings = load_settings(args.config, require_backend=False, **kafka_overrides(args))
    check_submit_settings(settings)
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=secrets_of(settings))
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(submit_until_signalled(settings))
    except SubmitFailed as err:
        raise CommandError(str(err)) from None
    except _KAFKA_START_ERRORS as err:
        raise CommandError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers} ({type(err).__name__}: {err}); check "
            "KAFKA_BOOTSTRAP_SERVERS and the MODWORKER_KAFKA__SECURITY_* settings"
        ) from None
    return 0


# -- schemas -------------------------------------------------------------------------


def cmd_schemas_export(args: argparse.Namespace) -> int:
    from schemas import export_json_schemas

    for path in export_json_schemas(args.dir):
        print(path)
    return 0


def cmd_schemas_asyncapi(args: argparse.Namespace) -> int:
    from schemas.asyncapi import asyncapi_yaml

    sys.stdout.write(asyncapi_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
