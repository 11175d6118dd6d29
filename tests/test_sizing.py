"""The sizing guide's arithmetic (worker/offline/bench/sizing.py), on numbers done by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from worker.offline.bench.sizing import (
    Backend,
    Inputs,
    accounts_needed,
    backend_usd_per_million,
    cascade_usd_per_million,
    from_report,
    plan,
)

# 50 µs per message at 70% of a core: 14,000 msg/s per pod.
BASE = Inputs(rate=100_000, cpu_s_per_message=50e-6, inputs_per_call=64, utilisation=0.7, tokens_per_message=100)


def test_pods_partitions_and_backend_load_follow_from_the_cpu_per_message():
    p = plan(BASE)
    assert p.pod_capacity == pytest.approx(14_000)
    assert p.pods == 8  # ceil(100,000 / 14,000) = ceil(7.14)
    assert p.cores == 8
    assert p.partitions == 16  # two per pod
    assert p.calls_per_s == pytest.approx(100_000 / 64)
    assert p.tokens_per_min == pytest.approx(100_000 * 100 * 60)


def test_the_dedup_cache_takes_its_hits_off_the_backend_and_the_bill():
    cached = Inputs(**{**BASE.__dict__, "cache_hit": 0.25})
    assert plan(cached).calls_per_s == pytest.approx(75_000 / 64)
    mistral = Backend("m", requests_per_s=None, tokens_per_min=None, usd_per_million_tokens=0.10)
    assert backend_usd_per_million(cached, mistral) == pytest.approx(0.75 * 100 * 0.10)


def test_there_are_never_fewer_pods_than_the_minimum():
    assert plan(Inputs(**{**BASE.__dict__, "rate": 10})).pods == 2


def test_an_outage_backlog_drains_at_the_spare_capacity():
    p = plan(BASE)
    assert p.lag_after_outage == pytest.approx(100_000 * 60)
    # 8 pods at a full core: 8 / 50 µs = 160,000 msg/s, 60,000 msg/s more than arrives.
    assert p.drain_s == pytest.approx(6_000_000 / 60_000)


def test_no_spare_capacity_never_drains():
    exact = Inputs(**{**BASE.__dict__, "rate": 20_000, "utilisation": 1.0, "min_pods": 1})  # 1 pod, 100% busy
    assert plan(exact).pods == 1
    assert math.isinf(plan(exact).drain_s)


def test_accounts_are_set_by_the_tighter_of_the_request_and_token_limits():
    p = plan(BASE)  # 1,562.5 calls/s, 600M tokens/min
    assert accounts_needed(p, Backend("r", requests_per_s=100, tokens_per_min=None, usd_per_million_tokens=0)) == 16
    assert (
        accounts_needed(p, Backend("t", requests_per_s=100, tokens_per_min=500_000, usd_per_million_tokens=0)) == 1200
    )
    assert accounts_needed(p, Backend("none", None, None, 0)) == 1


def test_conversation_state_per_pod_is_its_share_of_the_active_conversations_up_to_the_bound():
    small = Inputs(**{**BASE.__dict__, "active_conversations": 8_000, "conversation_turn_chars": 100})
    per_conversation = 600 + 16 * (160 + 100)  # overhead + (max_turns + 1 + 5) turns
    assert plan(small).state_bytes_per_pod == pytest.approx(1_000 * per_conversation)
    huge = Inputs(**{**BASE.__dict__, "active_conversations": 1e9})
    assert plan(huge).state_bytes_per_pod == 128 * 1024 * 1024
    assert plan(huge).state_bytes_needed_per_pod > plan(huge).state_bytes_per_pod


def test_a_cascade_costs_the_local_cores_and_the_escalated_share_of_the_second_stage():
    second = Backend("m", None, None, usd_per_million_tokens=0.10)
    i = Inputs(**{**BASE.__dict__, "escalated": 0.5, "local_texts_per_cpu_s": 100, "usd_per_core_hour": 0.036})
    local = 1e6 / 100 / 3600 * 0.036  # 2.78 core-hours per million texts
    assert cascade_usd_per_million(i, second) == pytest.approx(local + 0.5 * 100 * 0.10)


def test_worker_cost_per_million_is_the_pods_core_hours_over_the_messages_of_an_hour():
    p = plan(Inputs(**{**BASE.__dict__, "usd_per_core_hour": 0.05}))
    assert p.worker_usd_per_million == pytest.approx(8 * 0.05 / (100_000 * 3600) * 1e6)


def test_the_report_gives_the_cpu_per_message_of_the_0ms_scenario_at_the_batch_size(tmp_path: Path):
    report = {
        "scenarios": [
            {"backend_latency_ms": 50, "batch_size": 64, "cpu_s_per_1000": 0.09, "inputs_per_call": 64.0},
            {"backend_latency_ms": 0, "batch_size": 64, "cpu_s_per_1000": 0.05, "inputs_per_call": 63.1},
            {"backend_latency_ms": 0, "batch_size": 16, "cpu_s_per_1000": 0.08, "inputs_per_call": 16.0},
        ]
    }
    assert from_report(report, 64) == (pytest.approx(50e-6), 63.1)
    with pytest.raises(SystemExit, match="batch 256"):
        from_report(report, 256)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    out = subprocess.run(
        [sys.executable, "-m", "worker.offline.bench.sizing", str(path), "--batch", "16", "--rates", "10000"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "80.0 µs at batch 16" in out
    assert "| pods (one core each) | 2 |" in out  # ceil(10,000 / (0.7 / 80 µs)) = 2
