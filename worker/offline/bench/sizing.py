"""Sizing from a bench report: pods, partitions, backend load, outage lag and cost per rate.

    python -m worker.offline.bench.sizing docs/benchmarks/sizing.json
    python -m worker.offline.bench.sizing REPORT.json --rates 10000,100000,1000000 --batch 64 \\
        --utilisation 0.7 --tokens-per-message 162 --outage-s 60

Reads a ``modworker bench --json`` report (the worker's CPU per message at a 0 ms backend,
per batch size: ``cpu_s_per_1000``, ``inputs_per_call``), takes the rest as parameters
(backend rate limits and prices, the conversation mix, the core price) and prints the table
of docs/operations.md ("Sizing"), whose formulas are these functions. Every parameter has
a default that the guide names the source of; a limit or price you know better goes on the
command line.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.pipeline.conversation_state import (
    CONVERSATION_OVERHEAD_BYTES,
    REPLAY_MARGIN_TURNS,
    TURN_OVERHEAD_BYTES,
)


@dataclass(frozen=True)
class Backend:
    """A backend's published limits and price (None: no such limit, or not published)."""

    name: str
    requests_per_s: float | None
    tokens_per_min: float | None
    usd_per_million_tokens: float


# Defaults; docs/operations.md ("Sizing") cites where each comes from.
MISTRAL_FREE = Backend("mistral (free tier)", requests_per_s=1, tokens_per_min=500_000, usd_per_million_tokens=0.10)
OPENAI_TIER_5 = Backend(
    "openai omni-moderation (tier 5)", requests_per_s=5_000 / 60, tokens_per_min=500_000, usd_per_million_tokens=0.0
)


@dataclass(frozen=True)
class Inputs:
    rate: float
    """Messages per second to sustain."""
    cpu_s_per_message: float
    """Worker CPU seconds per message at the batch size (bench, 0 ms backend)."""
    inputs_per_call: float
    utilisation: float = 0.7
    """Share of its core a pod may use at the sustained rate (the rest is headroom)."""
    partitions_per_pod: int = 2
    min_pods: int = 2
    """At least this many pods, whatever the load: one pod's restart is not an outage."""
    tokens_per_message: float = 162.0
    cache_hit: float = 0.0
    """Share of inputs the dedup cache answers (no backend call)."""
    conversation_share: float = 0.2
    conversation_turn_chars: float = 300.0
    active_conversations: float = 1_000_000.0
    """Conversations active within the state's TTL, over all pods."""
    max_turns: int = 10
    state_max_bytes: float = 128 * 1024 * 1024
    outage_s: float = 60.0
    usd_per_core_hour: float = 0.04
    escalated: float = 0.873
    """Cascade: share of inputs the first (local) stage escalates to the second."""
    local_texts_per_cpu_s: float = 150.0
    """Cascade: the local first stage's texts per CPU-second (starter model, int8, on CPU)."""


@dataclass(frozen=True)
class Plan:
    pods: int
    cores: int
    partitions: int
    pod_capacity: float
    calls_per_s: float
    tokens_per_min: float
    state_bytes_per_pod: float
    state_bytes_needed_per_pod: float
    lag_after_outage: float
    drain_s: float
    worker_usd_per_million: float


def plan(i: Inputs) -> Plan:
    """The formulas of docs/operations.md ("Sizing")."""
    pod_capacity = i.utilisation / i.cpu_s_per_message  # msg/s one pod (one core) sustains
    pods = max(i.min_pods, math.ceil(i.rate / pod_capacity))
    backend_inputs = i.rate * (1 - i.cache_hit)
    calls_per_s = backend_inputs / i.inputs_per_call
    tokens_per_min = backend_inputs * i.tokens_per_message * 60
    keep = i.max_turns + 1 + REPLAY_MARGIN_TURNS
    per_conversation = CONVERSATION_OVERHEAD_BYTES + keep * (TURN_OVERHEAD_BYTES + i.conversation_turn_chars)
    needed = i.active_conversations / pods * per_conversation if i.conversation_share > 0 else 0.0
    lag = i.rate * i.outage_s  # consumption stops (fail policy wait); the backlog is what arrived
    catch_up = pods / i.cpu_s_per_message  # every pod at a full core once the backend is back
    drain_s = lag / (catch_up - i.rate) if catch_up > i.rate else math.inf
    worker_usd = pods * i.usd_per_core_hour / (i.rate * 3600) * 1e6
    return Plan(
        pods=pods,
        cores=pods,
        partitions=pods * i.partitions_per_pod,
        pod_capacity=pod_capacity,
        calls_per_s=calls_per_s,
        tokens_per_min=tokens_per_min,
        state_bytes_per_pod=min(needed, i.state_max_bytes),
        state_bytes_needed_per_pod=needed,
        lag_after_outage=lag,
        drain_s=drain_s,
        worker_usd_per_million=worker_usd,
    )


def accounts_needed(p: Plan, backend: Backend) -> int:
    """Accounts (workspaces, organisations) whose limits together carry the load: the API's
    limits are per account, so one account caps the whole group, whatever the pod count."""
    needs = [1.0]
    if backend.requests_per_s:
        needs.append(p.calls_per_s / backend.requests_per_s)
    if backend.tokens_per_min:
        needs.append(p.tokens_per_min / backend.tokens_per_min)
    return math.ceil(max(needs))


def backend_usd_per_million(i: Inputs, backend: Backend) -> float:
    """The backend's bill per million messages (the cache's hits cost nothing)."""
    return (1 - i.cache_hit) * i.tokens_per_message * backend.usd_per_million_tokens


def cascade_usd_per_million(i: Inputs, second: Backend) -> float:
    """A local first stage on every input (its cores) plus ``second`` on the escalated share."""
    local_core_hours = 1e6 / i.local_texts_per_cpu_s / 3600
    return local_core_hours * i.usd_per_core_hour + i.escalated * backend_usd_per_million(i, second)


def from_report(report: dict[str, Any], batch: int) -> tuple[float, float]:
    """(CPU seconds per message, inputs per call) of the 0 ms scenario at ``batch``."""
    for scenario in report["scenarios"]:
        if scenario["backend_latency_ms"] == 0 and scenario["batch_size"] == batch and scenario["cpu_s_per_1000"]:
            return scenario["cpu_s_per_1000"] / 1000, scenario["inputs_per_call"] or batch
    raise SystemExit(f"the report has no 0 ms scenario at batch {batch}: run modworker bench --batch-sizes {batch}")


def table(inputs: list[Inputs], backends: list[Backend]) -> str:
    rows = [
        "| | " + " | ".join(f"{i.rate:,.0f} msg/s" for i in inputs) + " |",
        "|---|" + "---:|" * len(inputs),
    ]
    plans = [plan(i) for i in inputs]

    def row(label: str, cells: list[str]) -> None:
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("pods (one core each)", [f"{p.pods:,}" for p in plans])
    row("input partitions per topic", [f"{p.partitions:,}" for p in plans])
    row("backend calls/s", [f"{p.calls_per_s:,.0f}" for p in plans])
    row("backend tokens/min", [f"{p.tokens_per_min / 1e6:,.1f}M" for p in plans])
    for backend in backends:
        row(f"accounts at {backend.name} limits", [f"{accounts_needed(p, backend):,}" for p in plans])
    row(
        "conversation state per pod (needed / held)",
        [f"{p.state_bytes_needed_per_pod / 2**20:,.0f} / {p.state_bytes_per_pod / 2**20:,.0f} MiB" for p in plans],
    )
    row("lag after the outage (messages)", [f"{p.lag_after_outage:,.0f}" for p in plans])
    row("time to drain it", [f"{p.drain_s:,.0f} s" for p in plans])
    row("worker cores, $ per million messages", [f"{p.worker_usd_per_million:.3f}" for p in plans])
    for backend in backends:
        row(f"{backend.name}, $ per million messages", [f"{backend_usd_per_million(i, backend):.2f}" for i in inputs])
    row(
        f"cascade (local, then {backends[0].name}), $ per million",
        [f"{cascade_usd_per_million(i, backends[0]):.2f}" for i in inputs],
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a modworker bench --json report")
    parser.add_argument("--rates", default="10000,100000,1000000")
    parser.add_argument("--batch", type=int, default=64)
    defaults = Inputs(rate=1, cpu_s_per_message=1, inputs_per_call=1)
    parser.add_argument("--utilisation", type=float, default=defaults.utilisation)
    parser.add_argument("--partitions-per-pod", type=int, default=defaults.partitions_per_pod)
    parser.add_argument("--min-pods", type=int, default=defaults.min_pods)
    parser.add_argument("--tokens-per-message", type=float, default=defaults.tokens_per_message)
    parser.add_argument("--cache-hit", type=float, default=defaults.cache_hit)
    parser.add_argument("--active-conversations", type=float, default=defaults.active_conversations)
    parser.add_argument("--outage-s", type=float, default=defaults.outage_s)
    parser.add_argument("--usd-per-core-hour", type=float, default=defaults.usd_per_core_hour)
    parser.add_argument("--escalated", type=float, default=defaults.escalated)
    parser.add_argument("--mistral-rps", type=float, default=MISTRAL_FREE.requests_per_s)
    parser.add_argument("--mistral-tpm", type=float, default=MISTRAL_FREE.tokens_per_min)
    parser.add_argument("--mistral-usd-per-mtok", type=float, default=MISTRAL_FREE.usd_per_million_tokens)
    parser.add_argument("--openai-rpm", type=float, default=5_000)
    parser.add_argument("--openai-tpm", type=float, default=OPENAI_TIER_5.tokens_per_min)
    args = parser.parse_args()
    cpu, per_call = from_report(json.loads(args.report.read_text()), args.batch)
    inputs = [
        Inputs(
            rate=float(rate),
            cpu_s_per_message=cpu,
            inputs_per_call=per_call,
            utilisation=args.utilisation,
            partitions_per_pod=args.partitions_per_pod,
            min_pods=args.min_pods,
            tokens_per_message=args.tokens_per_message,
            cache_hit=args.cache_hit,
            active_conversations=args.active_conversations,
            outage_s=args.outage_s,
            usd_per_core_hour=args.usd_per_core_hour,
            escalated=args.escalated,
        )
        for rate in args.rates.split(",")
    ]
    backends = [
        Backend("mistral", args.mistral_rps, args.mistral_tpm, args.mistral_usd_per_mtok),
        Backend("openai", args.openai_rpm / 60, args.openai_tpm, 0.0),
    ]
    print(f"worker CPU per message {cpu * 1e6:.1f} µs at batch {args.batch} ({per_call:.1f} inputs per call)\n")
    print(table(inputs, backends))


if __name__ == "__main__":
    main()
