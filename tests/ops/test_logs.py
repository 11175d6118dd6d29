"""One logging pipeline: library lines are JSON too, secrets scrubbed, repeats held back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from worker.ops.logs import RepeatFilter


def record(msg: str = "Unable connect to %s", name: str = "aiokafka", level: int = logging.ERROR):
    return logging.LogRecord(name, level, __file__, 1, msg, ("node",), None)


def test_a_repeated_library_error_passes_once_per_interval_with_the_count_held_back():
    now = [0.0]
    repeat = RepeatFilter(10.0, clock=lambda: now[0])
    assert repeat.filter(record())
    passed = [repeat.filter(record()) for _ in range(50)]
    assert not any(passed)
    assert repeat.filter(record("another template"))
    now[0] = 10.0
    again = record()
    assert repeat.filter(again)
    assert again.repeated == 50  # type: ignore[attr-defined]


def test_a_worker_in_json_mode_prints_only_json_while_kafka_is_unreachable():
    """aiokafka's connection errors, the worker's own lines and the exit line: all JSON, no secret."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "MISTRAL_API_KEY": "sk-never-printed-123",
        "MODWORKER_LOG_FORMAT": "json",
        "MODWORKER_HTTP_PORT": "0",
        "MODWORKER_HTTP__FAIL_POLICY": "wait",  # a deprecated name: its warning is a JSON line too
    }
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"], env=env, capture_output=True, timeout=60, check=False
    )
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    events = [json.loads(line) for line in lines]  # raises on the first non-JSON line
    loggers = {event.get("logger") for event in events}
    assert "aiokafka" in loggers, f"expected aiokafka's own connection errors among {lines}"
    assert events[-1]["event"] == "worker.exit" and "cannot reach Kafka" in events[-1]["error"]
    assert any(event["event"] == "config.deprecated_setting" for event in events)
    assert "sk-never-printed-123" not in result.stderr.decode() + result.stdout.decode()


def test_json_lines_scrub_secrets_in_every_form_and_write_what_orjson_cannot():
    from worker.ops.logs import JsonLines

    secret = 'sk-"odd\\key'
    render = JsonLines([secret, "plain-secret-42"])

    class Thing:
        def __repr__(self) -> str:
            return "Thing(plain-secret-42)"

    line = render(
        None,
        "info",
        {
            "event": "backend.http.retry",
            "header": f"Bearer {secret}",
            "nested": {"list": ["plain-secret-42", {"deep": secret}]},
            "thing": Thing(),
            3: "a non-string key",
        },
    )
    assert "plain-secret-42" not in line and "odd" not in line
    parsed = json.loads(line)
    assert parsed["header"] == "Bearer ***"
    assert parsed["nested"] == {"list": ["***", {"deep": "***"}]}
    assert parsed["thing"] == "Thing(***)"
    assert parsed["3"] == "a non-string key"
    # orjson refuses these: the line goes through the standard json module, still scrubbed
    line = render(None, "info", {"event": "x", "big": 2**70, "surrogate": "\ud800", "key": "plain-secret-42"})
    parsed = json.loads(line)
    assert parsed["big"] == 2**70 and parsed["surrogate"] == "\ud800" and parsed["key"] == "***"
