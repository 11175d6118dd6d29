"""The bench's scenarios: the limit, then the worker across backend latencies, batch sizes
and concurrency, each on fresh topics of one broker, against one loopback Mistral server.

Method, per scenario (docs/benchmarks.md says why):

1. **Drain.** Fresh input topics are filled with the scenario's events before the process
   starts, so it meets a backlog. The process (the limit loop or ``modworker run``) runs
   in a child process; the bench waits until the group's committed offsets cover every
   event, then reads the output topic back. Throughput is (records - 1) / (last - first
   output record timestamp): the producer stamps each output when it is sent, so group
   join and start-up are left out and both the limit and the worker are timed the same
   way. CPU seconds per 1,000 messages are the child's CPU time interpolated between the
   same two instants; peak RSS is the child's high-water mark. Backend calls are the
   requests the loopback server answered during the drain.
2. **Latency.** The same process, now idle, is offered new events (the worker at
   ``latency_load`` times the throughput it just reached, the limit at a fixed rate) for
   ``latency_seconds``. Each event's Kafka timestamp is the instant the bench sends it;
   the bench's consumer of the output topic notes when each output arrives. End-to-end
   latency = arrival - event timestamp: a record is readable only once the broker has
   acknowledged it (acks=all), so this is "event to verdict acknowledged" as a downstream
   consumer sees it (plus its fetch wait, at most 20 ms). Beside it: the verdict's
   ``latency_ms`` (event timestamp to the worker's decision) and the verdict record's
   timestamp (when the worker's producer took it), which show where the time went.
   ``worker.offline.bench.report`` derives the added latency from these.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.offline.bench.api_process import ApiServerProcess
from worker.offline.bench.process import MeasuredProcess
from worker.offline.bench.profile import Profiler
from worker.offline.bench.streams import (
    Cluster,
    OutputReader,
    committed_total,
    create_topics,
    delete_topics,
    fill,
    paced,
)
from worker.offline.bench.workload import BenchEvent, Workload

POLL_S = 0.5


@dataclass(frozen=True)
class Scenario:
    """One worker configuration and how many events it drains."""

    backend_latency_ms: int
    batch_size: int
    concurrency: int
    max_wait_ms: int
    events: int
    latency_phase: bool = True
    delivery: str = "at_least_once"
    """``MODWORKER_DELIVERY`` of the worker."""

    @property
    def name(self) -> str:
        mode = "-eos" if self.delivery == "exactly_once" else ""
        return f"lat{self.backend_latency_ms}ms-b{self.batch_size}-c{self.concurrency}{mode}"

    def ideal_msgs_per_s(self) -> float | None:
        """What the backend allows: concurrency x batch / latency (None at 0 ms: unbounded)."""
        if self.backend_latency_ms <= 0:
            return None
        return self.concurrency * self.batch_size / (self.backend_latency_ms / 1000)


@dataclass
class Drain:
    """What one process did with a backlog."""

    events: int
    outputs: int
    completed: bool
    msgs_per_s: float
    first_ms: int
    last_ms: int
    cpu_s_per_1000: float
    peak_rss_mb: float
    wall_s: float
    calls: int = 0
    inputs_sent: int = 0
    broker_cpu_s_per_1000: float | None = None
    """The broker's CPU over the whole drain (start-up included) per 1,000 events."""
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the first output, RSS MB) of the process while it drained."""
    progress_timeline: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the first output, outputs so far)."""


@dataclass
class Latency:
    offered_msgs_per_s: float
    events: int
    received: int
    end_to_end_ms: list[float] = field(default_factory=list)
    """Event timestamp to the output's arrival at the bench's consumer (acknowledged, readable)."""
    produced_ms: list[float] = field(default_factory=list)
    """Event timestamp to the output record's own timestamp (handed to the producer)."""
    decision_ms: list[float] = field(default_factory=list)
    """The verdict's ``latency_ms``: event timestamp to the worker's decision."""


@dataclass
class LimitResult:
    drain: Drain
    latency: Latency | None


@dataclass
class ScenarioResult:
    scenario: Scenario
    drain: Drain
    latency: Latency | None
    exit_code: int
    log_path: Path
    profile_path: Path | None = None


@dataclass
class BenchContext:
    """What every scenario of one run shares."""

    cluster: Cluster
    workload: Workload
    server: ApiServerProcess
    api_key: str
    log_dir: Path
    cache: bool = False
    broker_pid: int | None = None
    """The embedded broker's process, whose CPU time is reported beside the worker's."""
    profile: bool = False
    """Attach py-spy to each worker and keep a profile summary beside its log."""
    fetch_max_wait_ms: int | None = None
    """Consumer fetch wait of the limit and the worker; None: the client default (500 ms)."""
    worker_env: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    progress: Callable[..., Any] | None = None  # tqdm-like factory, or None for silence


class _Topics:
    def __init__(self, tag: str) -> None:
        self.content = f"bench.{tag}.content"
        self.conversation = f"bench.{tag}.conversations"
        self.verdict = f"bench.{tag}.verdicts"
        self.violation = f"bench.{tag}.violations"
        self.dead_letter = f"bench.{tag}.dead-letter"
        # Each scenario's own conversation state: with the default changelog topic a worker
        # would first restore every conversation earlier runs left there (CPU and memory that
        # are not the drain's).
        self.changelog = f"bench.{tag}.conversation-state"
        self.group = f"bench-{tag}"

    @property
    def inputs(self) -> list[str]:
        return [self.content, self.conversation]

    def of(self, event: BenchEvent) -> str:
        return self.content if event.kind == "content" else self.conversation


async def run_limit(ctx: BenchContext, events: int, *, latency_rate: float, latency_seconds: float) -> LimitResult:
    """The plain aiokafka loop over ``events`` events, then its own latency at ``latency_rate``."""
    topics = _Topics(f"{ctx.run_id}-limit")
    await create_topics(ctx.cluster, [*topics.inputs, topics.verdict])
    try:
        await _fill(ctx, topics, ctx.workload.iter_events(events), events, "limit: filling")
        command = [
            sys.executable,
            "-m",
            "worker.offline.bench.limit",
            "--bootstrap",
            ctx.cluster.bootstrap,
            "--inputs",
            ",".join(topics.inputs),
            "--output",
            topics.verdict,
            "--group",
            topics.group,
        ]
        if ctx.fetch_max_wait_ms is not None:
            command += ["--fetch-max-wait-ms", str(ctx.fetch_max_wait_ms)]
        if ctx.cluster.idempotence:
            command.append("--idempotence")
        async with MeasuredProcess(command, env=_child_env({}), log_path=ctx.log_dir / "limit.log") as process:
            drain, reader, _ = await _drain(
                ctx, process, topics, events, label="limit", max_s=_max_drain_s(events, None)
            )
            latency = None
            try:
                if latency_rate > 0 and drain.completed:
                    latency = await _latency_phase(
                        ctx,
                        process,
                        topics,
                        reader,
                        "limit",
                        "limit",
                        rate=latency_rate,
                        seconds=latency_seconds,
                        event_id=_input_event_id,
                    )
            finally:
                await reader.stop()
            code = await process.stop()
        if code != 0:
            raise RuntimeError(f"the limit loop exited with {code}:\n{process.log_tail()}")
        drain.peak_rss_mb = process.peak_rss_mb()
        return LimitResult(drain, latency)
    finally:
        await delete_topics(ctx.cluster, [*topics.inputs, topics.verdict])


async def run_worker(
    ctx: BenchContext, scenario: Scenario, index: int, *, latency_load: float, latency_seconds: float
) -> ScenarioResult:
    """One worker scenario: drain its backlog, then (optionally) the paced latency phase."""
    topics = _Topics(f"{ctx.run_id}-{index}")
    names = [*topics.inputs, topics.verdict, topics.violation, topics.dead_letter, topics.changelog]
    await create_topics(ctx.cluster, names)
    ctx.server.latency_s = scenario.backend_latency_ms / 1000
    log_path = ctx.log_dir / f"{index:02d}-{scenario.name}.log"
    try:
        await _fill(
            ctx, topics, ctx.workload.iter_events(scenario.events), scenario.events, f"{scenario.name}: filling"
        )
        env = _child_env(_worker_settings(ctx, scenario, topics))
        command = [sys.executable, "-m", "worker.cli", "run"]
        async with MeasuredProcess(command, env=env, log_path=log_path) as process:
            profiler: Profiler | None = None

            def start_profiler() -> None:  # once the drain is under way: start-up is not the hot path
                nonlocal profiler
                if ctx.profile:
                    profiler = Profiler(process.pid, log_path.with_suffix(".profile.raw"))

            drain, reader, calls = await _drain(
                ctx,
                process,
                topics,
                scenario.events,
                label=scenario.name,
                max_s=_max_drain_s(scenario.events, scenario.ideal_msgs_per_s()),
                on_first_progress=start_profiler,
            )
            drain.calls, drain.inputs_sent = calls
            latency = None
            try:
                if scenario.latency_phase and drain.completed and drain.msgs_per_s > 0:
                    latency = await _latency_phase(
                        ctx,
                        process,
                        topics,
                        reader,
                        scenario.name,
                        f"p{index}",
                        rate=latency_load * drain.msgs_per_s,
                        seconds=latency_seconds,
                        event_id=_verdict_event_id,
                    )
            finally:
                await reader.stop()
            code = await process.stop()
        drain.peak_rss_mb = process.peak_rss_mb()
        profile_path = None
        if profiler is not None and (summary := await asyncio.to_thread(profiler.wait)) is not None:
            profile_path = log_path.with_suffix(".profile.txt")
            profile_path.write_text(summary.text())
        return ScenarioResult(scenario, drain, latency, code, log_path, profile_path)
    finally:
        await delete_topics(ctx.cluster, names)


def _worker_settings(ctx: BenchContext, scenario: Scenario, topics: _Topics) -> dict[str, str]:
    settings = {
        "KAFKA_BOOTSTRAP_SERVERS": ctx.cluster.bootstrap,
        "MODWORKER_KAFKA__ENABLE_IDEMPOTENCE": "true" if ctx.cluster.idempotence else "false",
        "MODWORKER_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "MODWORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "MODWORKER_GROUP_ID": topics.group,
        "MODWORKER_CONTENT_TOPIC": topics.content,
        "MODWORKER_CONVERSATION_TOPIC": topics.conversation,
        "MODWORKER_VERDICT_TOPIC": topics.verdict,
        "MODWORKER_VIOLATION_TOPIC": topics.violation,
        "MODWORKER_DEAD_LETTER_TOPIC": topics.dead_letter,
        "MODWORKER_CONVERSATION__CHANGELOG_TOPIC": topics.changelog,
        "MODWORKER_BACKEND": "mistral",
        "MISTRAL_API_KEY": ctx.api_key,
        "MODWORKER_MISTRAL__BASE_URL": ctx.server.base_url,
        "MODWORKER_BATCH__MAX_SIZE": str(scenario.batch_size),
        "MODWORKER_BATCH__MAX_WAIT_MS": str(scenario.max_wait_ms),
        "MODWORKER_SCORING__MAX_CONCURRENCY": str(scenario.concurrency),
        "MODWORKER_DELIVERY": scenario.delivery,
        "MODWORKER_HTTP__MAX_CONNECTIONS": str(max(16, scenario.concurrency)),
        "MODWORKER_CACHE__ENABLED": "true" if ctx.cache else "false",
        "MODWORKER_LOG_FORMAT": "json",
        "MODWORKER_HTTP_PORT": "0",
    }
    if ctx.fetch_max_wait_ms is not None:
        settings["MODWORKER_KAFKA__FETCH_MAX_WAIT_MS"] = str(ctx.fetch_max_wait_ms)
    settings.update(ctx.worker_env)
    return settings


def _child_env(settings: dict[str, str]) -> dict[str, str]:
    # The child inherits PATH and the like, but none of the caller's worker settings:
    # the bench decides every setting it measures (``--worker-env`` adds more).
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MODWORKER_", "MISTRAL_", "OPENAI_", "KAFKA_BOOTSTRAP"))
    }
    return {**inherited, **settings}


def _progress_timeline(stamps: list[int], first_ms: int, points: int = 120) -> list[tuple[float, int]]:
    ordered = sorted(stamps)
    step = max(1, len(ordered) // points)
    timeline = [(round((ordered[i] - first_ms) / 1000, 2), i + 1) for i in range(0, len(ordered), step)]
    if ordered and timeline[-1][1] != len(ordered):
        timeline.append((round((ordered[-1] - first_ms) / 1000, 2), len(ordered)))
    return timeline


def find_broker_pid() -> int | None:
    """The broker this process started (Tansu, or Apache Kafka's JVM), among its children."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "tansu" in child.name() or (child.name() == "java" and "kafka.Kafka" in child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def _max_drain_s(events: int, ideal: float | None) -> float:
    """A generous bound: 5x the backend-bound time, and never under 2 minutes."""
    if ideal is None:
        return max(120.0, events / 500)
    return max(120.0, 5 * events / ideal)


async def _fill(ctx: BenchContext, topics: _Topics, events, count: int, label: str) -> None:
    bar = ctx.progress(total=count, desc=label, unit="msg", leave=False) if ctx.progress else None
    last = 0

    def advance(done: int) -> None:
        nonlocal last
        if bar is not None:
            bar.update(done - last)
        last = done

    try:
        await fill(ctx.cluster, topics.of, events, on_progress=advance)
    finally:
        if bar is not None:
            bar.close()


async def _drain(
    ctx: BenchContext,
    process: MeasuredProcess,
    topics: _Topics,
    events: int,
    *,
    label: str,
    max_s: float,
    on_first_progress: Callable[[], None] | None = None,
) -> tuple[Drain, OutputReader, tuple[int, int]]:
    """Wait until the group committed every event (or ``max_s``); read the outputs back."""
    started = time.monotonic()
    calls_before = ctx.server.snapshot()
    broker_cpu_before = _cpu_seconds(ctx.broker_pid)
    bar = ctx.progress(total=events, desc=label, unit="msg", leave=False) if ctx.progress else None
    done = 0
    try:
        while done < events and time.monotonic() - started < max_s:
            await asyncio.sleep(POLL_S)
            process.check_alive()
            committed = await committed_total(ctx.cluster, topics.group, topics.inputs)
            if committed > 0 and done == 0 and on_first_progress is not None:
                on_first_progress()
            if bar is not None and committed > done:
                bar.update(committed - done)
            done = max(done, committed)
    finally:
        if bar is not None:
            bar.close()
    wall_s = time.monotonic() - started
    calls_after = ctx.server.snapshot()
    broker_cpu = _cpu_seconds(ctx.broker_pid) - broker_cpu_before
    reader = OutputReader(ctx.cluster, topics.verdict)
    await reader.start()
    stamps = await reader.read(done, timeout_s=60)
    completed = done >= events and len(stamps) >= events
    first_ms, last_ms = (min(stamps), max(stamps)) if stamps else (0, 0)
    span_s = (last_ms - first_ms) / 1000
    rate = (len(stamps) - 1) / span_s if span_s > 0 else 0.0
    cpu = process.cpu_between(first_ms / 1000, last_ms / 1000)
    drain = Drain(
        events=events,
        outputs=len(stamps),
        completed=completed,
        msgs_per_s=rate,
        first_ms=first_ms,
        last_ms=last_ms,
        cpu_s_per_1000=cpu / len(stamps) * 1000 if stamps else 0.0,
        peak_rss_mb=0.0,
        wall_s=wall_s,
        broker_cpu_s_per_1000=broker_cpu / len(stamps) * 1000 if stamps and ctx.broker_pid else None,
        rss_timeline=process.rss_timeline(first_ms / 1000, last_ms / 1000),
        progress_timeline=_progress_timeline(stamps, first_ms),
    )
    calls = (calls_after[0] - calls_before[0], calls_after[1] - calls_before[1])
    return drain, reader, calls


async def _latency_phase(
    ctx: BenchContext,
    process: MeasuredProcess,
    topics: _Topics,
    reader: OutputReader,
    label: str,
    prefix: str,
    *,
    rate: float,
    seconds: float,
    event_id: Callable[[bytes], tuple[str, float | None]],
) -> Latency:
    """Offer ``rate`` events/s for ``seconds``; time each from its timestamp to its output's arrival."""
    count = max(100, int(rate * seconds))
    events = ctx.workload.events(count, prefix=prefix)
    sent: dict[str, float] = {}
    result = Latency(offered_msgs_per_s=rate, events=count, received=0)
    stop = asyncio.Event()

    def on_value(value: bytes, timestamp_ms: int, arrived: float) -> None:
        key, decision_ms = event_id(value)
        sent_at = sent.pop(key, None)
        if sent_at is None:
            return
        result.end_to_end_ms.append((arrived - sent_at) * 1000)
        result.produced_ms.append(timestamp_ms - sent_at * 1000)
        if decision_ms is not None:
            result.decision_ms.append(decision_ms)
        result.received += 1
        if result.received >= count:
            stop.set()

    receiving = asyncio.create_task(reader.receive(on_value, stop=stop))
    bar = ctx.progress(total=count, desc=f"{label}: latency", unit="msg", leave=False) if ctx.progress else None
    try:
        result.offered_msgs_per_s = await paced(
            ctx.cluster,
            topics.of,
            events,
            rate=rate,
            on_sent=lambda event, at: sent.__setitem__(event.event_id, at),
        )
        deadline = time.monotonic() + 30
        shown = 0
        while not stop.is_set() and time.monotonic() < deadline:
            process.check_alive()
            if bar is not None:
                bar.update(result.received - shown)
                shown = result.received
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await receiving
        if bar is not None:
            bar.close()
    return result


def _verdict_event_id(value: bytes) -> tuple[str, float | None]:
    """A verdict's ``event_id`` and the worker's own ``latency_ms`` (event to decision)."""
    verdict = json.loads(value)
    return verdict["event_id"], verdict.get("latency_ms")


def _input_event_id(value: bytes) -> tuple[str, float | None]:
    """The limit copies inputs as they are: the event's own ``id``."""
    return json.loads(value)["id"], None
