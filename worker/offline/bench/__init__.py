"""``modworker bench``: the pipeline's throughput, latency, memory and API cost against the
raw-Kafka limit, measured in one run (docs/benchmarks.md has the method and the figures).

Parts: ``workload`` (the events), ``limit`` (the plain aiokafka loop), ``process`` (a
child process with CPU and RSS sampled), ``streams`` (the bench's own Kafka I/O),
``runner`` (the scenarios), ``report`` (JSON, table, PNG). This module only registers the
command; heavy imports happen when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_EVENTS = 20_000
DEFAULT_LATENCIES_MS = "0,50,200"
DEFAULT_BATCH_SIZES = "16,64,256"
DEFAULT_CONCURRENCY = "8"
DEFAULT_SWEEP = "1,4,16"
DEFAULT_SWEEP_AT = "50:64"


def add_command(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="measure throughput, latency, memory and API calls against the raw-Kafka limit",
        description="Runs the limit (a plain aiokafka loop) and the worker over the same events on the embedded "
        "broker (or KAFKA_BOOTSTRAP_SERVERS / --bootstrap-servers) against a loopback Mistral server. "
        "The default run takes a few minutes on 2 cores.",
    )
    bench.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events per scenario (default %(default)s)")
    bench.add_argument(
        "--latencies-ms", default=DEFAULT_LATENCIES_MS, help="backend latencies per call (default %(default)s)"
    )
    bench.add_argument(
        "--batch-sizes", default=DEFAULT_BATCH_SIZES, help="MODWORKER_BATCH__MAX_SIZE values (default %(default)s)"
    )
    bench.add_argument(
        "--concurrency",
        default=DEFAULT_CONCURRENCY,
        help="MODWORKER_SCORING__MAX_CONCURRENCY values, crossed with latencies and batch sizes (default %(default)s)",
    )
    bench.add_argument(
        "--sweep-concurrency",
        default=DEFAULT_SWEEP,
        help="extra concurrency values run at --sweep-at only ('' for none; default %(default)s)",
    )
    bench.add_argument(
        "--sweep-at", default=DEFAULT_SWEEP_AT, help="LATENCY_MS:BATCH of the sweep (default %(default)s)"
    )
    bench.add_argument("--max-wait-ms", type=int, default=50, help="MODWORKER_BATCH__MAX_WAIT_MS (default %(default)s)")
    bench.add_argument(
        "--drain-seconds",
        type=float,
        default=20.0,
        help="with a backend latency, fewer events where the backend bound would need longer (default %(default)s s)",
    )
    bench.add_argument(
        "--conversation-share", type=float, default=0.2, help="share of conversation events (default %(default)s)"
    )
    bench.add_argument(
        "--latency-load",
        type=float,
        default=0.5,
        help="latency phase: offered load as a share of the drained throughput (default %(default)s)",
    )
    bench.add_argument(
        "--latency-seconds", type=float, default=5.0, help="latency phase length (default %(default)s s)"
    )
    bench.add_argument("--no-latency", action="store_true", help="skip the latency phases")
    bench.add_argument(
        "--limit-latency-rate",
        type=float,
        default=1000.0,
        help="offered load (msg/s) of the limit's own latency phase (default %(default)s)",
    )
    bench.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=None,
        help="consumer fetch wait of the limit and the worker (MODWORKER_KAFKA__FETCH_MAX_WAIT_MS); "
        "default: 10 on the embedded broker, whose fetches wait the full time even when data arrives, "
        "else the client default",
    )
    bench.add_argument(
        "--backlog",
        type=int,
        default=0,
        metavar="N",
        help="memory run instead of the grid: one worker drains N events (e.g. 1000000)",
    )
    bench.add_argument("--backlog-latency-ms", type=int, default=0, help="backend latency of the --backlog run")
    bench.add_argument(
        "--cache", action="store_true", help="keep the dedup cache on (off by default: repeats hit the backend)"
    )
    bench.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra worker setting for every scenario, e.g. MODWORKER_MAX_IN_FLIGHT=2000",
    )
    bench.add_argument(
        "--delivery",
        default="at_least_once",
        help="MODWORKER_DELIVERY modes, comma-separated; with both, each scenario runs in each mode back to back "
        "and the table ends with exactly-once over at-least-once ratios (default %(default)s)",
    )
    bench.add_argument(
        "--broker",
        choices=["auto", "kafka", "tansu"],
        default="auto",
        help="auto: Apache Kafka from the test jars where Java and Maven are installed, else Tansu; "
        "kafka or tansu: that one (default %(default)s)",
    )
    bench.add_argument(
        "--bootstrap-servers",
        help="an existing Kafka (PLAINTEXT); default KAFKA_BOOTSTRAP_SERVERS, else the embedded broker",
    )
    bench.add_argument("--data-dir", type=Path, help="folder with texts.jsonl and conversations.jsonl")
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--out-dir", type=Path, default=Path("bench-results"), help="logs and default outputs")
    bench.add_argument("--json", type=Path, metavar="OUT", help="write the report as JSON")
    bench.add_argument("--plot", type=Path, metavar="PNG", help="plot path (default OUT_DIR/bench.png)")
    bench.add_argument("--no-plot", action="store_true")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to each worker; a summary lands beside its log (OUT_DIR/NN-SCENARIO.profile.txt)",
    )
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from worker.cli import CommandError
    from worker.offline.bench.workload import Workload, WorkloadError, find_data_dir

    try:
        workload = Workload(find_data_dir(args.data_dir), conversation_share=args.conversation_share, seed=args.seed)
    except WorkloadError as err:
        raise CommandError(str(err)) from None
    scenarios = plan(args)
    if args.profile:
        from worker.offline.bench.profile import ProfilerUnavailable, py_spy

        try:
            py_spy()
        except ProfilerUnavailable as err:
            raise CommandError(str(err)) from None
    if args.events < 2 or any(s.events < 2 for s in scenarios):
        raise CommandError("--events and --backlog need at least 2 events")
    worker_env = _pairs(args.worker_env)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(_bench(args, workload, scenarios, worker_env))

    from worker.offline.bench.report import plot, table, write_json

    print(table(report))
    if args.json:
        write_json(report, args.json)
        print(f"report: {args.json}", file=sys.stderr)
    if not args.no_plot:
        path = args.plot or args.out_dir / "bench.png"
        plot(report, path)
        print(f"plot: {path}", file=sys.stderr)
    failed = [s["name"] for s in report["scenarios"] if s["exit_code"] != 0]
    if failed:
        raise CommandError(f"worker did not exit cleanly in {', '.join(failed)}; see the logs in {args.out_dir}")
    return 0


def plan(args: argparse.Namespace) -> list[Any]:
    """The scenarios the options ask for, in run order."""
    from worker.offline.bench.runner import Scenario

    if args.backlog:
        return [Scenario(args.backlog_latency_ms, 64, 8, args.max_wait_ms, args.backlog, latency_phase=False)]
    latencies, sizes, concurrency = _ints(args.latencies_ms), _ints(args.batch_sizes), _ints(args.concurrency)
    combos = [(lat, size, conc) for lat in latencies for size in sizes for conc in concurrency]
    if args.sweep_concurrency.strip():
        at = _ints(args.sweep_at.replace(":", ","))
        if len(at) != 2:
            from worker.cli import CommandError

            raise CommandError(f"--sweep-at wants LATENCY_MS:BATCH, got {args.sweep_at!r}")
        combos += [(at[0], at[1], conc) for conc in _ints(args.sweep_concurrency) if (at[0], at[1], conc) not in combos]
    modes = [m.strip() for m in args.delivery.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"at_least_once", "exactly_once"})
    if unknown or not modes:
        from worker.cli import CommandError

        raise CommandError(f"--delivery takes at_least_once and/or exactly_once, got {args.delivery!r}")
    scenarios = []
    for lat, size, conc in combos:
        events = args.events
        if lat > 0:  # a slow backend: as many events as it clears in about --drain-seconds
            events = min(events, max(1_000, int(conc * size / (lat / 1000) * args.drain_seconds)))
        for mode in modes:
            scenarios.append(
                Scenario(lat, size, conc, args.max_wait_ms, events, latency_phase=not args.no_latency, delivery=mode)
            )
    return scenarios


async def _bench(args: argparse.Namespace, workload: Any, scenarios: list[Any], worker_env: dict[str, str]) -> dict:
    from worker.offline.bench import report as reports
    from worker.offline.bench.api_process import ApiServerProcess
    from worker.offline.bench.runner import BenchContext, find_broker_pid, run_limit, run_worker
    from worker.offline.bench.streams import Cluster
    from worker.testing.broker import test_broker

    progress = _progress_factory(enabled=not args.no_progress)
    say = _printer(progress)
    machine_info = reports.machine()
    api_key = "bench-" + secrets.token_hex(8)
    with (
        test_broker(_configured_bootstrap(args.bootstrap_servers), prefer=args.broker) as broker,
        ApiServerProcess(api_key) as server,
    ):
        cluster = Cluster(broker.bootstrap_servers, idempotence=not broker.embedded)
        fetch_wait = _fetch_max_wait_ms(args.fetch_max_wait_ms, embedded=broker.embedded, say=say)
        ctx = BenchContext(
            cluster,
            workload,
            server,
            api_key,
            args.out_dir,
            cache=args.cache,
            broker_pid=find_broker_pid() if broker.kind in ("tansu", "kafka") else None,
            profile=args.profile,
            fetch_max_wait_ms=fetch_wait,
            worker_env=worker_env,
            progress=progress,
        )
        say(
            f"broker: {broker.description or broker.kind}; data: {workload.data_dir}; "
            f"{len(scenarios)} worker scenario(s)"
        )
        started = time.monotonic()
        limit = await run_limit(
            ctx,
            args.events,
            latency_rate=0 if args.no_latency else args.limit_latency_rate,
            latency_seconds=args.latency_seconds,
        )
        say(f"limit: {limit.drain.msgs_per_s:,.0f} msg/s over {limit.drain.outputs} events")
        results = []
        for index, scenario in enumerate(scenarios):
            result = await run_worker(
                ctx, scenario, index, latency_load=args.latency_load, latency_seconds=args.latency_seconds
            )
            results.append(result)
            lat = reports.percentiles(result.latency.end_to_end_ms) if result.latency else None
            say(
                f"{scenario.name}: {result.drain.msgs_per_s:,.0f} msg/s "
                f"({result.drain.msgs_per_s / limit.drain.msgs_per_s:.2f} x limit)"
                + (f", p99 {lat['p99']:.0f} ms" if lat else "")
                + f", peak RSS {result.drain.peak_rss_mb:.0f} MB"
            )
        settings = {
            "events": args.events,
            "max_wait_ms": args.max_wait_ms,
            "conversation_share": args.conversation_share,
            "latency_load": args.latency_load,
            "latency_seconds": args.latency_seconds,
            "cache": args.cache,
            "worker_env": worker_env,
            "flagged_share": round(workload.flagged_share, 3),
            "seed": args.seed,
            "fetch_max_wait_ms": fetch_wait,
            "backlog": args.backlog,
            "duration_s": round(time.monotonic() - started, 1),
        }
    machine_info["load_average_1m_end"] = reports.machine().get("load_average_1m")
    return reports.build_report(
        limit=limit, results=results, broker=broker.kind, settings=settings, machine_info=machine_info
    )


def _fetch_max_wait_ms(requested: int | None, *, embedded: bool, say) -> int | None:
    """The consumer fetch wait both processes get, or None for the client default.

    The embedded broker answers a fetch only when its wait expires, even once data has
    arrived (a real Kafka answers at once), so with the default 500 ms every hop through
    it adds ~250 ms on average. The worker takes the wait as a setting when its
    ``KafkaSettings`` has ``fetch_max_wait_ms``; without it, both keep the default so the
    limit and the worker are measured alike.
    """
    from worker.config import KafkaSettings

    wanted = requested if requested is not None else (10 if embedded else None)
    if wanted is None:
        return None
    if "fetch_max_wait_ms" not in KafkaSettings.model_fields:
        say(
            f"note: the worker has no MODWORKER_KAFKA__FETCH_MAX_WAIT_MS setting; both processes keep the client's "
            f"500 ms fetch wait instead of {wanted} ms (latency figures include it)"
        )
        return None
    return wanted


def _configured_bootstrap(explicit: str | None) -> str | None:
    """``--bootstrap-servers``, else the configured KAFKA_BOOTSTRAP_SERVERS, else None (embedded)."""
    if explicit:
        return explicit
    from worker.config import ConfigError, load_settings

    with contextlib.suppress(ConfigError):  # nothing configured: the embedded broker
        return load_settings(require_backend=False).kafka.bootstrap_servers
    return None


def _progress_factory(*, enabled: bool):
    if not enabled:
        return None
    from functools import partial

    from tqdm import tqdm

    # disable=None: bars only on a terminal; elsewhere the one line per scenario remains.
    return partial(tqdm, file=sys.stderr, dynamic_ncols=True, disable=None)


def _printer(progress):
    if progress is None:
        return lambda line: print(line, file=sys.stderr, flush=True)
    from tqdm import tqdm

    return lambda line: tqdm.write(line, file=sys.stderr)


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        from worker.cli import CommandError

        raise CommandError(f"expected comma-separated integers, got {text!r}") from None


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            from worker.cli import CommandError

            raise CommandError(f"--worker-env wants NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs
