"""``modworker bench`` end to end at a tiny size: the report's shape and its internal sense.

No timing thresholds (throughput on a shared test machine proves nothing); what must hold
whatever the machine: every event was moved by the limit and judged by the worker, each
exactly once by the backend, and the figures agree with each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.cli import main

SAMPLE = Path(__file__).parents[1] / "worker" / "offline" / "bench" / "data"
EVENTS = 300
BATCH = 32


@pytest.mark.slow
def test_tiny_bench_writes_a_consistent_report_and_plot(tmp_path: Path, capsys):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(
        [
            "bench",
            "--events",
            str(EVENTS),
            "--latencies-ms",
            "0",
            "--batch-sizes",
            str(BATCH),
            "--concurrency",
            "2",
            "--sweep-concurrency",
            "",
            "--latency-seconds",
            "1",
            "--limit-latency-rate",
            "200",
            "--data-dir",
            str(SAMPLE),
            "--out-dir",
            str(tmp_path),
            "--json",
            str(report_path),
            "--plot",
            str(plot_path),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err

    report = json.loads(report_path.read_text())
    assert report["machine"]["cpus"] >= 1 and report["settings"]["events"] == EVENTS
    limit = report["limit"]
    assert limit["completed"] and limit["outputs"] == EVENTS and limit["msgs_per_s"] > 0
    assert limit["latency_ms"]["p50"] <= limit["latency_ms"]["p99"]

    [scenario] = report["scenarios"]
    for key in (
        "limit_msgs_per_s",
        "worker_msgs_per_s",
        "ratio",
        "latency_ms",
        "peak_rss_mb",
        "calls_per_1000",
        "cpu_s_per_1000",
        "added_latency_ms",
        "decision_latency_ms",
        "targets",
    ):
        assert key in scenario, key
    assert (scenario["backend_latency_ms"], scenario["batch_size"], scenario["concurrency"]) == (0, BATCH, 2)
    assert scenario["completed"] and scenario["exit_code"] == 0
    assert scenario["events"] == scenario["outputs"] == EVENTS

    # every event reached the backend exactly once (dedup cache off), in batches no larger than the setting
    assert scenario["backend_inputs"] == EVENTS
    assert EVENTS / BATCH <= scenario["backend_calls"] <= EVENTS
    assert scenario["calls_per_1000"] == pytest.approx(scenario["backend_calls"] / EVENTS * 1000, abs=0.01)
    assert scenario["inputs_per_call"] <= BATCH

    assert scenario["limit_msgs_per_s"] == limit["msgs_per_s"] > 0 and scenario["worker_msgs_per_s"] > 0
    assert scenario["ratio"] == pytest.approx(scenario["worker_msgs_per_s"] / scenario["limit_msgs_per_s"], abs=1e-3)
    latency = scenario["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert scenario["added_latency_ms"] == latency  # a 0 ms backend adds nothing to subtract
    assert scenario["latency_received"] == scenario["latency_events"] > 0
    assert scenario["peak_rss_mb"] > 10 and scenario["cpu_s_per_1000"] > 0
    assert {"throughput_vs_limit", "p99_added_latency", "peak_rss"} <= set(scenario["targets"])
    assert all(isinstance(t["met"], bool) for t in scenario["targets"].values())

    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lat0ms-b32-c2" in capsys.readouterr().out


@pytest.mark.slow
def test_a_bench_of_both_delivery_modes_on_apache_kafka_ends_with_their_ratios(tmp_path: Path, capsys):
    """Each scenario in each mode, back to back in one run, on Apache Kafka (exactly-once
    needs transactions), and the table's closing ratios computed from the two entries."""
    from worker.testing.kafka_broker import missing_tools

    if missing_tools() is not None:
        pytest.skip(missing_tools())
    report_path = tmp_path / "bench.json"
    code = main(
        [
            *("bench", "--events", str(EVENTS), "--latencies-ms", "0", "--batch-sizes", str(BATCH)),
            *("--concurrency", "2", "--sweep-concurrency", "", "--no-latency", "--data-dir", str(SAMPLE)),
            *("--out-dir", str(tmp_path), "--json", str(report_path), "--no-plot", "--no-progress"),
            *("--broker", "kafka", "--delivery", "at_least_once,exactly_once"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Apache Kafka" in err, "the bench names the broker it ran on"
    report = json.loads(report_path.read_text())
    assert report["broker"] == "kafka"
    alo, eos = report["scenarios"]
    assert (alo["delivery"], eos["delivery"]) == ("at_least_once", "exactly_once")
    assert eos["name"] == alo["name"] + "-eos"
    for scenario in (alo, eos):
        assert scenario["completed"] and scenario["exit_code"] == 0 and scenario["outputs"] == EVENTS
    ratio = eos["worker_msgs_per_s"] / alo["worker_msgs_per_s"]
    assert f"exactly-once / at-least-once, {alo['name']}: msg/s {ratio:.2f}x" in out


def test_a_profile_sample_belongs_to_the_innermost_stage_its_stack_names():
    from worker.offline.bench.profile import stage_of

    root = ["_run_module_as_main (<frozen runpy>)", "Runner.run (asyncio/runners.py)"]
    conclude = [
        *root,
        "Outputs.conclude_all (worker/pipeline/outputs.py)",
        "Outputs._verdict (worker/pipeline/outputs.py)",
    ]
    assert stage_of([*conclude, "VerdictBuilder.scored (worker/pipeline/verdicts.py)"]) == "verdict assembly and id"
    assert stage_of([*conclude, "Policy.decide (worker/pipeline/policy.py)"]) == "policy"
    assert stage_of([*conclude, "PrintLogger.msg (structlog/_output.py)"]) == "logging (structlog)"
    assert stage_of(conclude) == "outputs (the rest)"
    assert stage_of(root) == "event loop, start-up and the rest"
