"""Fixtures of the chaos suite: a broker per scenario that can be SIGKILLed and restarted,
fresh topics, the loopback API and a ``ChaosRun`` that starts workers, runs the stream and
tallies the outcome per scenario.

The broker is Apache Kafka (``worker.testing.kafka_broker``), restarted on its own log dir.
Where Java or Maven is missing the suite says so once and falls back to Tansu on an S3
bucket served by moto (``TansuDurableBroker``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import (
    ChaosBroker,
    Outcome,
    RssSampler,
    TansuDurableBroker,
    TlsFront,
    Traffic,
    create_topics,
    moto_server_command,
    self_signed_certificate,
    stunnel_command,
)
from tests.conftest import WorkerProcess, worker_env
from tests.kafka_support import TopicSet
from worker.testing.broker import BrokerHandle, free_port
from worker.testing.kafka_broker import KafkaBroker, Tls, missing_tools
from worker.testing.mistral_server import MistralServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.timeout(420))


class ChaosRun:
    """One scenario: workers on the durable broker, the stream, the tally."""

    def __init__(self, broker: ChaosBroker, topics: TopicSet, mistral: MistralServer, api_key: str, tmp: Path):
        self.broker = broker
        self.topics = topics
        self.mistral = mistral
        self.api_key = api_key
        self.tmp = tmp
        self.workers: list[WorkerProcess] = []
        self.rss = RssSampler()
        self.traffic: Traffic | None = None
        self.client: dict[str, Any] = {}
        self.ca: Path | None = None

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers

    def env(self, **extra: str) -> dict[str, str]:
        handle = BrokerHandle(self.bootstrap, "tansu" if isinstance(self.broker, TansuDurableBroker) else "kafka")
        return worker_env(handle, self.topics, self.mistral, self.api_key, MODWORKER_LOG_LEVEL="info", **extra)

    def spawn(self, **extra: str) -> WorkerProcess:
        worker = WorkerProcess(self.env(**extra), self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        self.rss.watch(worker.process.pid)
        return worker

    def stream(self, rate: int = 40) -> Traffic:
        idempotence = not isinstance(self.broker, TansuDurableBroker)
        self.traffic = Traffic(self.bootstrap, self.topics, rate=rate, idempotence=idempotence, **self.client).start()
        return self.traffic

    def finish(self, name: str, *, fault_end: float | None, settle_s: float = 90, **notes: Any) -> Outcome:
        """Stop the stream, wait for every input's output, SIGTERM the workers, tally.
        Checks what holds in every scenario: the API key is in no output."""
        assert self.traffic is not None
        self.traffic.stop_producing()
        settled = self.traffic.settle(settle_s)
        exits = [w.stop(signal.SIGTERM, timeout_s=60) for w in self.workers if w.process.poll() is None]
        outcome = self.traffic.outcome(name, fault_end=fault_end, rss=self.rss)
        outcome.notes = {
            "settled": settled,
            "workers": len(self.workers),
            "sigterm_exit_codes": exits,
            "reader_errors": len(self.traffic.errors),
            **notes,
        }
        outcome.record()
        logs = "".join(w.log() for w in self.workers)
        assert self.api_key not in logs, "the API key appeared in a worker's output"
        return outcome

    def note_start_up_failure(self, name: str, notes: dict[str, Any]) -> None:
        """Record a scenario that ends at start-up (no stream): its one line and exit code."""
        Outcome(name, 0, 0, 0, 0, 0, 0, self.rss.peak_mb or None, None, notes=notes).record()

    def close(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
        for worker in self.workers:
            worker.close()
        self.rss.close()


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[ChaosBroker]:
    """Apache Kafka on a fresh log dir (its ``kill``/``start`` keep the data), else Tansu on moto."""
    broker: ChaosBroker
    if missing_tools() is None:
        broker = KafkaBroker(tmp_path / "kafka").start()
    else:
        if moto_server_command() is None:
            pytest.skip("moto_server missing: pip install 'moderation-worker[test]' (moto[server])")
        broker = TansuDurableBroker(tmp_path)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def chaos(durable: ChaosBroker, mistral: MistralServer, api_key: str, tmp_path: Path) -> Iterator[ChaosRun]:
    topics = TopicSet.unique()
    asyncio.run(create_topics(durable.bootstrap_servers, topics.inputs + topics.outputs, partitions=4))
    run = ChaosRun(durable, topics, mistral, api_key, tmp_path)
    try:
        yield run
    finally:
        run.close()


class TlsRun(ChaosRun):
    """A ``ChaosRun`` whose workers and harness clients all use the broker's TLS listener."""

    @property
    def bootstrap(self) -> str:
        if isinstance(self.broker, KafkaBroker):
            return self.broker.ssl_bootstrap_servers
        return self.broker.bootstrap_servers


@pytest.fixture
def tls_chaos(mistral: MistralServer, api_key: str, tmp_path: Path) -> Iterator[ChaosRun]:
    """A ``ChaosRun`` on the broker's TLS port; the harness's own clients use the CA.

    Apache Kafka serves TLS itself (its SSL listener, a fresh self-signed certificate).
    Where Java is missing: Tansu behind stunnel, the broker advertising the TLS port."""
    from aiokafka.helpers import create_ssl_context

    cert, key = self_signed_certificate(tmp_path)
    client = {"security_protocol": "SSL", "ssl_context": create_ssl_context(cafile=str(cert))}
    front = None
    run = None
    broker: ChaosBroker
    if missing_tools() is None:
        broker = KafkaBroker(tmp_path / "kafka", tls=Tls(cert, key)).start()
    else:
        if moto_server_command() is None:
            pytest.skip("moto_server missing: pip install 'moderation-worker[test]' (moto[server])")
        if stunnel_command() is None:
            pytest.skip("stunnel missing: `make` installs Debian's stunnel4 when run as root")
        tls_port = free_port()
        broker = TansuDurableBroker(tmp_path, advertised_port=tls_port)
    try:
        if isinstance(broker, TansuDurableBroker):
            front = TlsFront(tmp_path, port=broker.advertised_port, plain_port=broker.port, cert=cert, key=key)
        run = TlsRun(broker, TopicSet.unique(), mistral, api_key, tmp_path)
        topics = run.topics
        asyncio.run(create_topics(run.bootstrap, topics.inputs + topics.outputs, partitions=4, **client))
        run.client = client
        run.ca = cert
        yield run
    finally:
        if run is not None:
            run.close()
        if front is not None:
            front.close()
        broker.close()
