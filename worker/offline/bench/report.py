"""Turn bench results into the JSON report, the console table and the PNG plot.

Every scenario's entry carries the keys the issue fixes (``limit_msgs_per_s``,
``worker_msgs_per_s``, ``ratio``, ``latency_ms`` {p50, p95, p99}, ``peak_rss_mb``,
``calls_per_1000``) and more; ``targets`` lists the issue's targets that apply to it,
each with the measured value and whether it was met.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.offline.bench.runner import Drain, LimitResult, ScenarioResult

RSS_TARGET_MB = 300.0
ZERO_LATENCY_RATIO = 0.6
BOUND_EFFICIENCY = 0.85
LATENCY_SLACK_MS = 50.0


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/p99 (nearest rank on the sorted values), or None without values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))], 2)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99)}


def machine() -> dict[str, Any]:
    """What the figures came from: CPU count and model, Python, OS, load when measured."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def limit_entry(limit: LimitResult) -> dict[str, Any]:
    drain, latency = limit.drain, limit.latency
    return {
        "msgs_per_s": round(drain.msgs_per_s, 1),
        "events": drain.events,
        "outputs": drain.outputs,
        "completed": drain.completed,
        "cpu_s_per_1000": round(drain.cpu_s_per_1000, 4),
        "broker_cpu_s_per_1000": _round(drain.broker_cpu_s_per_1000, 4),
        "peak_rss_mb": round(drain.peak_rss_mb, 1),
        "latency_ms": percentiles(latency.end_to_end_ms) if latency else None,
        "latency_offered_msgs_per_s": round(latency.offered_msgs_per_s, 1) if latency else None,
    }


def scenario_entry(
    result: ScenarioResult, limit: Drain, limit_latency: dict[str, float] | None = None
) -> dict[str, Any]:
    """The JSON object of one worker scenario (see the module docstring).

    Latency fields (ms, p50/p95/p99): ``latency_ms`` event timestamp to verdict readable;
    ``added_latency_ms`` that minus the backend's per-call latency; ``added_over_limit_ms``
    that minus the limit's own latency at the same percentile (the two Kafka hops any
    consumer pays; a difference of percentiles, not a percentile of differences), which
    the p99 target is checked on when the limit's latency was measured.
    """
    s, drain, latency = result.scenario, result.drain, result.latency
    ratio = drain.msgs_per_s / limit.msgs_per_s if limit.msgs_per_s > 0 else None
    ideal = s.ideal_msgs_per_s()
    bound = min(ideal, limit.msgs_per_s) if ideal is not None else limit.msgs_per_s
    e2e = percentiles(latency.end_to_end_ms) if latency else None
    added = percentiles([v - s.backend_latency_ms for v in latency.end_to_end_ms]) if latency else None
    over_limit = (
        {p: round(value - limit_latency[p], 2) for p, value in added.items()}
        if added is not None and limit_latency is not None
        else None
    )
    entry: dict[str, Any] = {
        "name": s.name,
        "delivery": s.delivery,
        "backend_latency_ms": s.backend_latency_ms,
        "batch_size": s.batch_size,
        "concurrency": s.concurrency,
        "max_wait_ms": s.max_wait_ms,
        "events": s.events,
        "completed": drain.completed,
        "outputs": drain.outputs,
        "limit_msgs_per_s": round(limit.msgs_per_s, 1),
        "worker_msgs_per_s": round(drain.msgs_per_s, 1),
        "ratio": round(ratio, 3) if ratio is not None else None,
        "backend_bound_msgs_per_s": round(ideal, 1) if ideal is not None else None,
        "efficiency": round(drain.msgs_per_s / bound, 3) if bound > 0 else None,
        "latency_ms": e2e,
        "added_latency_ms": added,
        "added_over_limit_ms": over_limit,
        "decision_latency_ms": percentiles(latency.decision_ms) if latency else None,
        "produced_latency_ms": percentiles(latency.produced_ms) if latency else None,
        "latency_offered_msgs_per_s": round(latency.offered_msgs_per_s, 1) if latency else None,
        "latency_events": latency.events if latency else 0,
        "latency_received": latency.received if latency else 0,
        "peak_rss_mb": round(drain.peak_rss_mb, 1),
        "calls_per_1000": round(drain.calls / drain.outputs * 1000, 2) if drain.outputs else None,
        "backend_calls": drain.calls,
        "backend_inputs": drain.inputs_sent,
        "inputs_per_call": round(drain.inputs_sent / drain.calls, 2) if drain.calls else None,
        "cpu_s_per_1000": round(drain.cpu_s_per_1000, 4),
        "broker_cpu_s_per_1000": _round(drain.broker_cpu_s_per_1000, 4),
        "drain_wall_s": round(drain.wall_s, 2),
        "rss_timeline_mb": drain.rss_timeline,
        "progress_timeline": drain.progress_timeline,
        "exit_code": result.exit_code,
        "log": str(result.log_path),
        "profile": str(result.profile_path) if result.profile_path else None,
    }
    entry["targets"] = _targets(entry, bound)
    return entry


def _targets(entry: dict[str, Any], bound: float) -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = {}
    if entry["backend_latency_ms"] == 0 and entry["ratio"] is not None:
        targets["throughput_vs_limit"] = _check(
            f">= {ZERO_LATENCY_RATIO} x limit", entry["ratio"], entry["ratio"] >= ZERO_LATENCY_RATIO
        )
    elif entry["efficiency"] is not None:
        targets["throughput_vs_bound"] = _check(
            f">= {BOUND_EFFICIENCY:.0%} of min(concurrency x batch / latency, limit) = {bound:.0f} msg/s",
            entry["efficiency"],
            entry["efficiency"] >= BOUND_EFFICIENCY,
        )
    added = entry["added_over_limit_ms"] or entry["added_latency_ms"]
    if added is not None:
        allowed = entry["max_wait_ms"] + LATENCY_SLACK_MS
        basis = "over the limit's latency" if entry["added_over_limit_ms"] else "over the backend's latency"
        targets["p99_added_latency"] = _check(
            f"<= max-wait + {LATENCY_SLACK_MS:.0f} ms = {allowed:.0f} ms at {entry['latency_offered_msgs_per_s']} msg/s "
            f"({basis})",
            added["p99"],
            added["p99"] <= allowed,
        )
    targets["peak_rss"] = _check(
        f"<= {RSS_TARGET_MB:.0f} MB (backlog of {entry['events']} messages)",
        entry["peak_rss_mb"],
        entry["peak_rss_mb"] <= RSS_TARGET_MB,
    )
    return targets


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _check(target: str, value: Any, met: bool) -> dict[str, Any]:
    return {"target": target, "value": value, "met": bool(met)}


def build_report(
    *,
    limit: LimitResult,
    results: Sequence[ScenarioResult],
    broker: str,
    settings: dict[str, Any],
    machine_info: dict[str, Any],
) -> dict[str, Any]:
    return {
        "machine": machine_info,
        "broker": broker,
        "settings": settings,
        "limit": limit_entry(limit),
        "scenarios": [
            scenario_entry(r, limit.drain, percentiles(limit.latency.end_to_end_ms) if limit.latency else None)
            for r in results
        ],
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def table(report: dict[str, Any]) -> str:
    """A fixed-width summary, one line per scenario."""
    limit = report["limit"]
    limit_latency = limit["latency_ms"]
    lines = [
        (
            f"limit (plain aiokafka loop): {limit['msgs_per_s']:.0f} msg/s, {limit['cpu_s_per_1000']:.3f} CPU s/1000, "
            f"peak RSS {limit['peak_rss_mb']:.0f} MB"
        )
        + (
            f", latency p50/p99 {limit_latency['p50']:.0f}/{limit_latency['p99']:.0f} ms "
            f"at {limit['latency_offered_msgs_per_s']:.0f} msg/s"
            if limit_latency
            else ""
        ),
        (
            f"{'scenario':<22}{'msg/s':>9}{'ratio':>7}{'eff':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'+p99':>8}"
            f"{'calls/1k':>10}{'cpu/1k':>8}{'rss MB':>8}{'brk/1k':>8}"
        ),
    ]
    for s in report["scenarios"]:
        lat = s["latency_ms"] or {}
        added = s["added_over_limit_ms"] or s["added_latency_ms"] or {}
        lines.append(
            f"{s['name']:<22}{s['worker_msgs_per_s']:>9.0f}{_num(s['ratio'], 2):>7}{_num(s['efficiency'], 2):>6}"
            f"{_num(lat.get('p50'), 0):>8}{_num(lat.get('p95'), 0):>8}{_num(lat.get('p99'), 0):>8}"
            f"{_num(added.get('p99'), 0):>8}{_num(s['calls_per_1000'], 1):>10}{s['cpu_s_per_1000']:>8.3f}"
            f"{s['peak_rss_mb']:>8.0f}{_num(s['broker_cpu_s_per_1000'], 3):>8}"
            + ("" if s["completed"] else "  (incomplete)")
        )
    lines += delivery_ratios(report["scenarios"])
    lines.append(
        "latency: ms from the event's timestamp to its verdict readable by a consumer; +p99: minus the backend's "
        "latency and the limit's own p99; cpu/1k, brk/1k: CPU seconds per 1,000 messages of the worker and of "
        "the broker"
    )
    return "\n".join(lines)


def delivery_ratios(scenarios: list[dict[str, Any]]) -> list[str]:
    """Exactly-once over at-least-once for each scenario run in both modes (same run):
    msg/s, worker CPU per message and p99 added latency, as ratios."""
    by_name = {s["name"]: s for s in scenarios}
    lines = []
    for name, eos in by_name.items():
        alo = by_name.get(name.removesuffix("-eos")) if name.endswith("-eos") else None
        if alo is None:
            continue
        added = [(s["added_over_limit_ms"] or s["added_latency_ms"] or {}).get("p99") for s in (eos, alo)]
        p99 = f"{added[0] / added[1]:.2f}x" if None not in added and added[1] else "-"
        lines.append(
            f"exactly-once / at-least-once, {alo['name']}: msg/s {eos['worker_msgs_per_s'] / alo['worker_msgs_per_s']:.2f}x, "
            f"CPU per message {eos['cpu_s_per_1000'] / alo['cpu_s_per_1000']:.2f}x, p99 added latency {p99} "
            f"({_num(added[0], 0)} vs {_num(added[1], 0)} ms)"
        )
    return lines


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and latency against batch size (one line per backend latency), and
    throughput against concurrency where the run varied it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    def log_y(ax: Any) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))

    scenarios = report["scenarios"]
    if report["settings"].get("backlog"):
        _plot_backlog(plt, report, path)
        return
    limit = report["limit"]["msgs_per_s"]
    by_conc: dict[int, int] = {}
    for s in scenarios:
        by_conc[s["concurrency"]] = by_conc.get(s["concurrency"], 0) + 1
    main_conc = max(by_conc, key=lambda c: by_conc[c])
    main = [s for s in scenarios if s["concurrency"] == main_conc]
    latencies = sorted({s["backend_latency_ms"] for s in main})
    grouped: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for s in scenarios:
        grouped.setdefault((s["backend_latency_ms"], s["batch_size"]), []).append(s)
    sweep = {k: sorted(v, key=lambda s: s["concurrency"]) for k, v in grouped.items() if len(v) > 1}

    panels = 3 if sweep else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    ax = axes[0]
    for latency in latencies:
        points = sorted((s["batch_size"], s["worker_msgs_per_s"]) for s in main if s["backend_latency_ms"] == latency)
        ax.plot(*zip(*points, strict=False), marker="o", label=f"backend {latency} ms")
    ax.axhline(limit, color="black", linestyle="--", linewidth=1, label="limit (plain loop)")
    ax.set(xscale="log", xlabel="batch size", ylabel="messages / s", title=f"Throughput (concurrency {main_conc})")
    log_y(ax)
    _batch_ticks(ax, main)
    ax.legend(fontsize=8)

    ax = axes[1]
    for latency in latencies:
        spread = sorted(
            (s["batch_size"], s["latency_ms"]["p50"], s["latency_ms"]["p99"])
            for s in main
            if s["backend_latency_ms"] == latency and s["latency_ms"]
        )
        if spread:
            sizes, p50, p99 = zip(*spread, strict=False)
            line = ax.plot(sizes, p99, marker="o", label=f"backend {latency} ms: p99")[0]
            ax.plot(sizes, p50, marker=".", linestyle=":", color=line.get_color(), label=f"backend {latency} ms: p50")
    ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="end-to-end latency (ms)",
        title="Latency at half the measured throughput",
    )
    log_y(ax)
    _batch_ticks(ax, main)
    if ax.lines:
        ax.legend(fontsize=7)

    if sweep:
        ax = axes[2]
        for (latency, batch), runs in sorted(sweep.items()):
            ax.plot(
                [s["concurrency"] for s in runs],
                [s["worker_msgs_per_s"] for s in runs],
                marker="o",
                label=f"backend {latency} ms, batch {batch}",
            )
            bound = [min(s["concurrency"] * batch * 1000 / latency, limit) if latency else limit for s in runs]
            ax.plot(
                [s["concurrency"] for s in runs],
                bound,
                linestyle=":",
                color=ax.lines[-1].get_color(),
                label="bound: min(c x batch / latency, limit)",
            )
        ax.set(xscale="log", xlabel="backend concurrency", ylabel="messages / s", title="Throughput vs concurrency")
        log_y(ax)
        concurrencies = sorted({s["concurrency"] for points in sweep.values() for s in points})
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=7)

    info = report["machine"]
    fig.suptitle(
        f"modworker bench: {info.get('cpus')} CPUs ({info.get('cpu_model', '')}), broker {report['broker']}", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _batch_ticks(ax: Any, scenarios: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import NullLocator

    sizes = sorted({s["batch_size"] for s in scenarios})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.xaxis.set_minor_locator(NullLocator())


def _plot_backlog(plt: Any, report: dict[str, Any], path: Path) -> None:
    """The memory run: the worker's RSS and the messages drained against time."""
    [scenario] = report["scenarios"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if scenario["rss_timeline_mb"]:
        seconds, rss = zip(*scenario["rss_timeline_mb"], strict=False)
        ax.plot(seconds, rss, color="tab:blue", label="worker RSS")
    ax.axhline(RSS_TARGET_MB, color="tab:red", linestyle="--", linewidth=1, label=f"target {RSS_TARGET_MB:.0f} MB")
    ax.set(
        xlabel="seconds since the first verdict",
        ylabel="RSS (MB)",
        ylim=(0, RSS_TARGET_MB * 1.15),
        title=f"Draining a backlog of {scenario['events']:,} messages ({scenario['name']})",
    )
    drained = ax.twinx()
    if scenario["progress_timeline"]:
        seconds, count = zip(*scenario["progress_timeline"], strict=False)
        drained.plot(seconds, count, color="tab:green", label="verdicts published")
    drained.set_ylabel("verdicts published")
    drained.yaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    handles = ax.get_legend_handles_labels()
    more = drained.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower right")
    info = report["machine"]
    fig.suptitle(
        f"modworker bench --backlog: {info.get('cpus')} CPUs ({info.get('cpu_model', '')}), broker {report['broker']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
