"""``/readyz`` says what the pod itself controls; the backend's state is in ``/status``.

A real Mistral backend whose circuit breaker is opened by real failures, behind the real
health server on a loopback port: an outage every pod shares must not make the pod
unready (it would stall a rollout), but it must show in ``/status``.
"""

from __future__ import annotations

import httpx
from aiokafka.structs import TopicPartition

from worker.backends.mistral import MistralBackend
from worker.config import Settings
from worker.ops.health import HealthServer

TP = TopicPartition("ugc.content", 2)


class Partitions:
    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def paused_partitions(self) -> set[TopicPartition]:
        return set()


class Worker:
    """The ``WorkerStatus`` a started, not draining worker shows."""

    in_flight, in_flight_bytes, policy_version = 3, 300, "policy-v1"
    partitions = Partitions()

    def __init__(self, backend: MistralBackend) -> None:
        self.backend = backend
        self.started, self.draining = True, False
        self.last_loop_at = 0.0
        self.stuck_partitions: dict[TopicPartition, int] = {}
        self.held_partitions: dict[TopicPartition, tuple[str, ...]] = {}


def open_circuit(backend: MistralBackend) -> None:
    breaker = backend.api.breaker
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()
    assert breaker.state == "open"


async def get(server: HealthServer, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        return await client.get(f"http://127.0.0.1:{server.port}{path}")


async def test_an_open_circuit_leaves_the_pod_ready_and_shows_in_status():
    settings = Settings(http_port=0, http_host="127.0.0.1", mistral={"api_key": "k"})
    backend = MistralBackend(settings)
    worker = Worker(backend)
    server = HealthServer(worker, settings)
    await server.start()
    try:
        healthy = (await get(server, "/status")).json()
        assert healthy["backend_ready"] is True and healthy["phase"] == "running"

        open_circuit(backend)
        assert await backend.ready() is False  # what the backend itself says
        ready = await get(server, "/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ok", "started": True, "draining": False, "assigned_partitions": 1}
        status = await get(server, "/status")
        assert status.status_code == 200
        assert status.json()["backend_ready"] is False
        assert status.json()["assigned_partitions"] == ["ugc.content-2"]
        assert status.json()["policy_version"] == "policy-v1" and status.json()["in_flight"] == 3

        worker.draining = True  # what the pod controls still counts
        draining = await get(server, "/readyz")
        assert draining.status_code == 503 and draining.json()["reason"] == "shutting down"
        assert (await get(server, "/status")).json()["phase"] == "draining"
    finally:
        await server.close()
        await backend.close()


async def test_a_worker_still_starting_is_not_ready():
    settings = Settings(http_port=0, mistral={"api_key": "k"})
    backend = MistralBackend(settings)
    worker = Worker(backend)
    worker.started = False
    check = await HealthServer(worker, settings).readiness()
    assert not check.ok and check.reason.startswith("starting")
    await backend.close()
