"""The example consumers in examples/, run against the test broker: newest verdict per
event, replays dropped, unknown fields ignored, unknown contract versions skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import OUTPUT_HEADERS
from tests.integration.test_cli import produce_with_headers
from tests.kafka_support import TopicSet, create_topics

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def verdict(verdict_id: str, event_id: str, action: str, minutes: int, **extra) -> bytes:
    document = {
        "verdict_id": verdict_id, "event_id": event_id, "kind": "content", "action": action,
        "flagged": action != "allow", "violations": [], "scores": {"sexual": 0.1}, "model": "m",
        "backend": "mistral", "policy_version": "0123456789ab",
        "input": {"topic": "ugc.content", "partition": 0, "offset": minutes},
        "decided_at": (T0 + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z"), **extra,
    }  # fmt: skip
    return json.dumps(document).encode()


RECORDS = [
    (b"e1", verdict("a1", "e1", "allow", 0), OUTPUT_HEADERS),
    (b"e2", verdict("b1", "e2", "block", 1), OUTPUT_HEADERS),
    (b"e1", verdict("a1", "e1", "allow", 5), OUTPUT_HEADERS),  # a replay: same id, decided again
    (b"e1", verdict("a2", "e1", "review", 10), OUTPUT_HEADERS),  # the policy changed: a new id supersedes
    (b"e1", verdict("a0", "e1", "block", -10), OUTPUT_HEADERS),  # an older verdict arriving late: stale
    (b"e3", verdict("c1", "e3", "flag", 2, a_field_added_later={"x": 1}), OUTPUT_HEADERS),  # additive change
    (b"e4", verdict("d1", "e4", "block", 3), [("modworker-contract", b"3")]),  # a major version it does not know
    (b"e5", verdict("m5", "e5", "block", 30), OUTPUT_HEADERS),
    # a reviewer's verdict, its clock behind the worker's: it replaces the one it names all the same
    (b"e5", verdict("h5", "e5", "allow", 25, supersedes="m5", decided_by="human", reviewer_id="r1"), OUTPUT_HEADERS),
]
EXPECTED = {
    "newest": {
        "content:e1": ["a2", "review"],
        "content:e2": ["b1", "block"],
        "content:e3": ["c1", "flag"],
        "content:e5": ["h5", "allow"],
    },
    "counts": {"new": 4, "supersedes": 2, "duplicate": 1, "stale": 1, "unknown_version": 1},
}


async def verdict_topic(bootstrap: str) -> str:
    topic = TopicSet.unique().verdict
    await create_topics(bootstrap, [topic], partitions=2)
    await produce_with_headers(bootstrap, topic, RECORDS)
    return topic


async def test_the_python_example_keeps_the_newest_verdict_per_event_and_drops_replays(broker):
    topic = await verdict_topic(broker.bootstrap_servers)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "contracts")}  # moderation_contracts, as pip install ./contracts
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "verdict_consumer.py"), "-b", broker.bootstrap_servers, "--topic", topic,
         "--group", f"{topic}-py", "--from-beginning", "--max-messages", str(len(RECORDS)), "--idle-timeout-s", "20"],
        capture_output=True, text=True, timeout=120, env=env, cwd=EXAMPLES,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == EXPECTED


def test_the_python_example_imports_the_contracts_package_not_the_worker():
    source = (EXAMPLES / "verdict_consumer.py").read_text()
    assert "from moderation_contracts import" in source
    assert "from schemas" not in source and "import worker" not in source and "from worker" not in source


NODE = shutil.which("node")
NPM = shutil.which("npm")


@pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are not installed: the Node example cannot run")
async def test_the_node_example_keeps_the_newest_verdict_per_event_and_drops_replays(broker, tmp_path: Path):
    project = tmp_path / "node-consumer"
    shutil.copytree(EXAMPLES / "node-consumer", project, ignore=shutil.ignore_patterns("node_modules"))
    installed = subprocess.run(
        [NPM, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=project, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, f"npm ci failed (kafkajs from package-lock.json): {installed.stderr}"
    topic = await verdict_topic(broker.bootstrap_servers)
    result = subprocess.run(
        [NODE, "verdict-consumer.mjs", "-b", broker.bootstrap_servers, "--topic", topic, "--group", f"{topic}-node",
         "--from-beginning", "--max-messages", str(len(RECORDS)), "--idle-timeout-s", "20"],
        capture_output=True, text=True, timeout=120, cwd=project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == EXPECTED
