"""Faults out of the consume loop and a shutdown that must not hang (issue 10, defects 3, 6, 8).

The broker cannot be made to refuse authorisation, so the error is injected where aiokafka
would raise it: ``Source.poll``. Everything else is real: the broker, the loopback API,
the worker (in-process or as ``python -m worker.cli run``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from tests.chaos.harness import create_topics
from tests.conftest import WorkerProcess, worker_env
from tests.kafka_support import TopicSet, committed, produce, read_all, wait_for_count
from worker.app import ModerationWorker, WorkerFatal
from worker.backends import create_backend
from worker.config import load_settings
from worker.pipeline.policy import Policy
from worker.testing.broker import BrokerHandle
from worker.testing.kafka_broker import KafkaBroker, missing_tools


def _records(n: int, tag: str = "e") -> list[tuple[bytes, bytes]]:
    return [(f"{tag}-{i}".encode(), json.dumps({"id": f"{tag}-{i}", "text": f"hello {i}"}).encode()) for i in range(n)]


def _worker(monkeypatch, env: dict[str, str]) -> ModerationWorker:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    return ModerationWorker(settings, backend=create_backend(settings), policy=Policy.load(None))


async def test_an_error_out_of_poll_drains_commits_and_names_the_real_error(
    broker, topics, mistral, api_key, monkeypatch
):
    bootstrap = broker.bootstrap_servers
    await produce(bootstrap, topics.content, _records(40))
    mistral.latency_s = 0.2  # the records read are still in flight when the error comes
    worker = _worker(monkeypatch, worker_env(broker, topics, mistral, api_key))
    real_poll = worker.source.poll
    read = 0

    async def poll(**kwargs):
        nonlocal read
        if read:
            raise TopicAuthorizationFailedError("not authorized to read ugc.content")
        records = await real_poll(**kwargs)
        read += len(records)
        return records

    monkeypatch.setattr(worker.source, "poll", poll)
    with pytest.raises(WorkerFatal, match="TopicAuthorizationFailedError"):
        await asyncio.wait_for(worker.run(), 60)
    assert read > 0
    verdicts = await read_all(bootstrap, topics.verdict, expected=read, idle_s=0.5, timeout_s=20)
    assert len(verdicts) == read, "what was read before the error must be finished, not abandoned"
    offsets = await committed(bootstrap, topics.group_id, topics.inputs)
    assert sum(offsets.values()) == read, "and committed"


def test_the_cli_reports_a_loop_error_in_one_line_naming_it(broker, topics, mistral, api_key, tmp_path: Path):
    asyncio.run(produce(broker.bootstrap_servers, topics.content, _records(5)))
    # The same injection in a real ``modworker run`` process: poll fails after the first records.
    script = (
        "import sys\n"
        "from aiokafka.errors import TopicAuthorizationFailedError\n"
        "from worker.pipeline import source\n"
        "real = source.Source.poll\n"
        "state = {'read': 0}\n"
        "async def poll(self, **kw):\n"
        "    if state['read']:\n"
        "        raise TopicAuthorizationFailedError('not authorized')\n"
        "    records = await real(self, **kw)\n"
        "    state['read'] += len(records)\n"
        "    return records\n"
        "source.Source.poll = poll\n"
        "from worker.cli import main\n"
        "sys.exit(main(['run']))\n"
    )
    env = worker_env(broker, topics, mistral, api_key)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    out = (result.stdout + result.stderr).decode()
    assert result.returncode == 1, out
    assert "Traceback" not in out and "cannot reach Kafka" not in out
    lines = [json.loads(line) for line in out.strip().splitlines()]  # JSON mode: every line is JSON
    last = lines[-1]
    assert last["event"] == "worker.exit" and "TopicAuthorizationFailedError" in last["error"], last
    assert api_key not in out


async def test_an_offset_reset_within_an_assignment_is_handled(broker, topics, mistral, api_key, monkeypatch):
    """The consumer's position moves back (as after log truncation with auto_offset_reset
    earliest): the worker judges the records again instead of dying on a traceback."""
    bootstrap = broker.bootstrap_servers
    await produce(bootstrap, topics.content, _records(12))
    worker = _worker(monkeypatch, worker_env(broker, topics, mistral, api_key))
    task = asyncio.create_task(worker.run())
    try:
        await wait_for_count(bootstrap, topics.verdict, 12, timeout_s=60)
        for tp in worker.source.assignment():
            worker.source._consumer.seek(tp, 0)  # what aiokafka does on a reset to earliest
        await wait_for_count(bootstrap, topics.verdict, 24, timeout_s=60)
        assert not task.done(), task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)  # raises what ended the worker, if anything did
    offsets = await committed(bootstrap, topics.group_id, topics.inputs)
    assert sum(offsets.values()) == 12


@pytest.mark.slow
def test_sigterm_while_the_broker_is_gone_exits_within_the_drain_bound(mistral, api_key, tmp_path: Path):
    """Outputs unacknowledged, commits retried forever by aiokafka: SIGTERM still ends the
    process within MODWORKER_DRAIN_TIMEOUT_S plus the shutdown grace (and not by a kill)."""
    if missing_tools() is not None:
        pytest.skip(missing_tools())
    broker = KafkaBroker(tmp_path / "kafka").start()
    worker: WorkerProcess | None = None
    try:
        topics = TopicSet.unique()
        asyncio.run(create_topics(broker.bootstrap_servers, topics.inputs + topics.outputs))
        asyncio.run(produce(broker.bootstrap_servers, topics.content, _records(30)))
        handle = BrokerHandle(broker.bootstrap_servers, "kafka")
        # Nothing committed before the broker goes: the final commit has work, and no one to do it.
        env = worker_env(
            handle,
            topics,
            mistral,
            api_key,
            MODWORKER_DRAIN_TIMEOUT_S="2",
            MODWORKER_COMMIT_INTERVAL_MS="600000",
            MODWORKER_COMMIT_EVERY="100000",
        )
        worker = WorkerProcess(env, tmp_path / "worker.log")
        asyncio.run(wait_for_count(broker.bootstrap_servers, topics.verdict, 30, timeout_s=60))
        broker.kill()
        time.sleep(1)
        worker.process.send_signal(signal.SIGTERM)
        try:
            code = worker.process.wait(timeout=2 + 15 + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker ignored SIGTERM with the broker gone:\n{worker.log()[-3000:]}")
        assert code in (0, 1), worker.log()[-3000:]
        assert "Traceback" not in worker.log(), worker.log()[-4000:]
    finally:
        if worker is not None:
            worker.close()
        broker.close()
