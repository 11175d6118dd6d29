"""The ``modworker`` command line as a user runs it: produce, tail, schemas, start-up errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from schemas import json_schemas
from tests.conftest import worker_env
from tests.kafka_support import read_all, wait_for_count


def modworker(*args: str, env: dict[str, str] | None = None, timeout: float = 60, stdin: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, timeout=timeout, input=stdin
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MODWORKER_", "MISTRAL_", "OPENAI_")) and k != "KAFKA_BOOTSTRAP_SERVERS"
    }
    env.update(extra)
    return env


def test_a_bad_setting_stops_start_up_with_one_line_naming_it():
    result = modworker(
        "run",
        env=clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", MISTRAL_API_KEY="k", MODWORKER_BATCH__MAX_SIZE="lots"),
    )
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "MODWORKER_BATCH__MAX_SIZE" in err


def test_a_missing_key_or_broker_names_the_setting_and_the_fix():
    missing_key = modworker("run", env=clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"))
    assert missing_key.returncode == 2 and "MISTRAL_API_KEY" in missing_key.stderr.decode()
    assert "export MISTRAL_API_KEY" in missing_key.stderr.decode()
    missing_broker = modworker("run", env=clean_env(MISTRAL_API_KEY="k"))
    assert missing_broker.returncode == 2 and "KAFKA_BOOTSTRAP_SERVERS" in missing_broker.stderr.decode()
    assert "Traceback" not in missing_key.stderr.decode() + missing_broker.stderr.decode()


def test_unreachable_kafka_is_one_line_not_a_traceback():
    secret = "sk-never-print-me-123"
    result = modworker(
        "run",
        env=clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", MISTRAL_API_KEY=secret, MODWORKER_HTTP_PORT="0"),
        timeout=120,
    )
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in out and "Traceback" not in out
    assert secret not in out


def test_schemas_export_writes_the_checked_in_files(tmp_path: Path):
    result = modworker("schemas", "export", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    written = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert written == json_schemas()
    assert set(written) == {
        "content_event.schema.json",
        "conversation_event.schema.json",
        "verdict.schema.json",
        "violation.schema.json",
        "shadow_verdict.schema.json",
    }


async def test_produce_run_tail_round_trip_with_the_key_in_no_output(
    broker, topics, mistral, api_key, spawn_worker, tmp_path: Path
):
    events = [
        {"id": f"p-{i}", "text": f"hello {i}" + (" <<hate_and_discrimination:0.9>>" if i == 2 else "")}
        for i in range(5)
    ]
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json at all\n")
    env = worker_env(broker, topics, mistral, api_key)
    produced = modworker("produce", str(source), "--topic", topics.content, env=env)
    assert produced.returncode == 0, produced.stderr.decode()
    assert "published 6 records" in produced.stderr.decode()
    records = await read_all(broker.bootstrap_servers, topics.content, expected=6, idle_s=0.5)
    assert sorted(r.key for r in records if r.key) == [f"p-{i}".encode() for i in range(5)]  # keyed by id

    worker = spawn_worker(env)
    await wait_for_count(broker.bootstrap_servers, topics.verdict, 5)
    await wait_for_count(broker.bootstrap_servers, topics.dead_letter, 1)
    assert worker.stop(signal.SIGTERM) == 0

    tailed = modworker("tail", topics.verdict, "--max", "5", "--timeout", "20", env=env)
    lines = tailed.stdout.decode().strip().splitlines()
    assert tailed.returncode == 0 and len(lines) == 5
    assert sum(line.startswith("block") for line in lines) == 1
    assert any("hate_and_discrimination=0.90" in line for line in lines)
    dead = modworker("tail", topics.dead_letter, "--max", "1", "--timeout", "20", env=env)
    assert "dead-letter not_json" in dead.stdout.decode()

    assert api_key not in worker.log() + produced.stderr.decode() + tailed.stdout.decode()
    verdicts = await read_all(broker.bootstrap_servers, topics.verdict, expected=5, idle_s=0.5)
    assert all(api_key.encode() not in r.value for r in verdicts)


def test_a_local_model_that_fails_to_load_stops_the_worker_with_one_line(tmp_path: Path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    starter = Path(__file__).parents[2] / "worker" / "models" / "starter"
    (broken / "head.json").write_text((starter / "head.json").read_text())
    (broken / "head.safetensors").write_bytes(b"not a safetensors file")
    for model in ("/nonexistent/model", str(broken)):
        result = modworker(
            "run",
            env=clean_env(
                KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
                MODWORKER_BACKEND="local",
                MODWORKER_LOCAL__MODEL=model,
                MODWORKER_HTTP_PORT="0",
                MODWORKER_LOG_FORMAT="console",
            ),
            timeout=300,
        )
        out = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 1, out
        assert "Traceback" not in out and "Unclosed" not in out, out
        last = out.strip().splitlines()[-1]
        assert "local" in last and model in last, last
