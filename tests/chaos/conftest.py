"""Fixtures of the chaos suite: one durable broker, fresh topics, the loopback API and a
``ChaosRun`` that starts workers, runs the stream and tallies the outcome per scenario."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import DurableBroker, Outcome, RssSampler, Traffic, create_topics, moto_server_command
from tests.conftest import WorkerProcess, worker_env
from tests.kafka_support import TopicSet
from worker.testing.broker import BrokerHandle
from worker.testing.mistral_server import MistralServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.timeout(420))


class ChaosRun:
    """One scenario: workers on the durable broker, the stream, the tally."""

    def __init__(self, broker: DurableBroker, topics: TopicSet, mistral: MistralServer, api_key: str, tmp: Path):
        self.broker = broker
        self.topics = topics
        self.mistral = mistral
        self.api_key = api_key
        self.tmp = tmp
        self.workers: list[WorkerProcess] = []
        self.rss = RssSampler()
        self.traffic: Traffic | None = None
        self.client: dict[str, Any] = {}

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers

    def env(self, **extra: str) -> dict[str, str]:
        handle = BrokerHandle(self.bootstrap, "tansu")
        return worker_env(handle, self.topics, self.mistral, self.api_key, MODWORKER_LOG_LEVEL="info", **extra)

    def spawn(self, **extra: str) -> WorkerProcess:
        worker = WorkerProcess(self.env(**extra), self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        self.rss.watch(worker.process.pid)
        return worker

    def stream(self, rate: int = 40) -> Traffic:
        self.traffic = Traffic(self.bootstrap, self.topics, rate=rate, **self.client).start()
        return self.traffic

    def finish(self, name: str, *, fault_end: float | None, settle_s: float = 90, **notes: Any) -> Outcome:
        """Stop the stream, wait for every input's output, SIGTERM the workers, tally.
        Checks what holds in every scenario: the API key is in no output."""
        assert self.traffic is not None
        self.traffic.stop_producing()
        settled = self.traffic.settle(settle_s)
        exits = [w.stop(signal.SIGTERM, timeout_s=60) for w in self.workers if w.process.poll() is None]
        outcome = self.traffic.outcome(name, fault_end=fault_end, rss=self.rss)
        outcome.notes = {"settled": settled, "workers": len(self.workers), "sigterm_exit_codes": exits, **notes}
        outcome.record()
        logs = "".join(w.log() for w in self.workers)
        assert self.api_key not in logs, "the API key appeared in a worker's output"
        return outcome

    def close(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
        for worker in self.workers:
            worker.close()
        self.rss.close()


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[DurableBroker]:
    if moto_server_command() is None:
        pytest.skip("moto_server missing: pip install 'moderation-worker[test]' (moto[server])")
    broker = DurableBroker(tmp_path)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def chaos(durable: DurableBroker, mistral: MistralServer, api_key: str, tmp_path: Path) -> Iterator[ChaosRun]:
    topics = TopicSet.unique()
    asyncio.run(create_topics(durable.bootstrap_servers, topics.inputs + topics.outputs, partitions=4))
    run = ChaosRun(durable, topics, mistral, api_key, tmp_path)
    try:
        yield run
    finally:
        run.close()


def now() -> float:
    return time.time()
