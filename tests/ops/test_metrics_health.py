"""/metrics, /livez and /readyz of a real ``modworker run`` on the test broker.

Each test starts the worker as a child process (``spawn_worker``) with its HTTP server on a
free loopback port, talks to it over HTTP like Prometheus and the kubelet would, and drives
it with real records and the loopback Mistral server. Expected numbers are derived from
what the test sends, never read back from the worker.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections import Counter

import httpx
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import worker_env
from tests.kafka_support import produce, read_all, wait_for_count
from worker.testing.broker import free_port

DEFAULT_ACTIONS = {"sexual": "block", "selfharm": "review", "pii": "flag"}
SEVERITY = ["allow", "flag", "review", "block"]


# -- talking to the worker ------------------------------------------------------------


class Probe:
    """HTTP access to one worker's server, the way a scraper or the kubelet sees it."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self._client = httpx.AsyncClient(timeout=3.0, trust_env=False)

    async def get(self, path: str) -> httpx.Response:
        return await self._client.get(self.base + path)

    async def samples(self) -> dict[tuple[str, frozenset], float]:
        response = await self.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    async def wait_for(self, path: str, status: int, timeout_s: float = 30.0) -> httpx.Response:
        deadline = asyncio.get_running_loop().time() + timeout_s
        last = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                last = await self.get(path)
                if last.status_code == status:
                    return last
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"{path} did not answer {status} within {timeout_s}s; last: "
            f"{last.status_code if last else None} {last.text if last else ''}"
        )

    async def close(self) -> None:
        await self._client.aclose()


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def series(samples: dict, name: str) -> list[dict[str, str]]:
    return [dict(ls) for (n, ls) in samples if n == name]


async def metrics_when(probe: Probe, ready, timeout_s: float = 30.0) -> dict:
    """Scrape until ``ready(samples)`` holds (acks are counted just after the broker answers)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    samples = await probe.samples()
    while not ready(samples) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        samples = await probe.samples()
    return samples


def probed_env(broker, topics, mistral, api_key, **extra: str) -> tuple[dict[str, str], int]:
    port = free_port()
    env = worker_env(
        broker, topics, mistral, api_key, MODWORKER_HTTP_PORT=str(port), MODWORKER_HTTP_HOST="127.0.0.1", **extra
    )
    return env, port


def content(i: int, marks: dict[str, float] | None = None, text: str | None = None) -> dict:
    text = text or f"comment number {i} about the weather"
    for category, score in (marks or {}).items():
        text += f" <<{category}:{score}>>"
    return {"id": f"c-{i}", "text": text, "tenant": "acme"}


def turn(conversation: str, i: int, marks: dict[str, float] | None = None) -> dict:
    text = f"turn {i} of {conversation}"
    for category, score in (marks or {}).items():
        text += f" <<{category}:{score}>>"
    return {"id": f"{conversation}-t{i}", "conversation_id": conversation, "role": "user", "content": text}


def action_of(marks: dict[str, float]) -> str:
    hits = [DEFAULT_ACTIONS[c] for c, s in marks.items() if s >= 0.5]
    return max(hits, key=SEVERITY.index) if hits else "allow"


# -- the tests --------------------------------------------------------------------------


async def test_metrics_move_as_messages_flow(broker, topics, mistral, api_key, spawn_worker):
    bootstrap = broker.bootstrap_servers
    env, port = probed_env(broker, topics, mistral, api_key, MODWORKER_BATCH__MAX_SIZE="5")
    worker = spawn_worker(env)
    probe = Probe(port)
    try:
        await probe.wait_for("/readyz", 200)
        before = await probe.samples()
        assert total(before, "moderation_worker_messages_consumed_total") == 0
        build = series(before, "moderation_worker_build_info")
        assert build and build[0]["backend"] == "mistral" and build[0]["group_id"] == topics.group_id

        content_marks = {2: {"sexual": 0.93}, 5: {"pii": 0.7}, 9: {"selfharm": 0.81, "pii": 0.55}, 12: {"sexual": 0.4}}
        contents = [content(i, content_marks.get(i)) for i in range(20)]
        turn_marks = {("conv-a", 1): {"selfharm": 0.9}}
        turns = [turn(c, i, turn_marks.get((c, i))) for c in ("conv-a", "conv-b") for i in range(4)]
        bad = [(b"bad-json", b'{"id": "x", "text": '), (b"bad-empty", json.dumps({"id": "e", "text": " "}).encode())]
        await produce(bootstrap, topics.content, [(e["id"].encode(), json.dumps(e).encode()) for e in contents] + bad)
        await produce(
            bootstrap, topics.conversation, [(t["conversation_id"].encode(), json.dumps(t).encode()) for t in turns]
        )
        valid = len(contents) + len(turns)
        await wait_for_count(bootstrap, topics.verdict, valid)
        await wait_for_count(bootstrap, topics.dead_letter, len(bad))

        samples = await metrics_when(
            probe,
            lambda s: (
                total(s, "moderation_worker_verdicts_total") >= valid
                and total(s, "moderation_worker_in_flight_messages") == 0
            ),
        )

        # consumed, decoded, dead-lettered by topic
        assert total(samples, "moderation_worker_messages_consumed_total", topic=topics.content) == len(contents) + len(
            bad
        )
        assert total(samples, "moderation_worker_messages_consumed_total", topic=topics.conversation) == len(turns)
        assert total(samples, "moderation_worker_messages_decoded_total", topic=topics.content) == len(contents)
        assert total(samples, "moderation_worker_messages_decoded_total", topic=topics.conversation) == len(turns)
        assert (
            total(
                samples,
                "moderation_worker_messages_dead_lettered_total",
                topic=topics.content,
                stage="decode",
                error_type="not_json",
            )
            == 1
        )
        assert (
            total(
                samples,
                "moderation_worker_messages_dead_lettered_total",
                topic=topics.content,
                stage="decode",
                error_type="empty_text",
            )
            == 1
        )

        # verdicts by kind and action, violations by category: as the marks and the policy imply
        expected_actions = Counter(("content", action_of(content_marks.get(i, {}))) for i in range(len(contents)))
        expected_actions += Counter(
            ("conversation", action_of(turn_marks.get((c, i), {}))) for c in ("conv-a", "conv-b") for i in range(4)
        )
        for (kind, action), count in expected_actions.items():
            assert (
                total(samples, "moderation_worker_verdicts_total", kind=kind, action=action, degraded="false") == count
            ), (kind, action)
        assert total(samples, "moderation_worker_verdicts_total") == valid
        expected_hits = Counter(
            c for marks in [*content_marks.values(), *turn_marks.values()] for c, s in marks.items() if s >= 0.5
        )
        for category, count in expected_hits.items():
            assert total(samples, "moderation_worker_violations_total", category=category) == count, category
        assert total(samples, "moderation_worker_violations_total") == sum(expected_hits.values())

        # batches: every valid input in exactly one batch, none over the configured size
        assert total(samples, "moderation_worker_batch_size_sum") == valid
        batches = total(samples, "moderation_worker_batch_size_count")
        assert batches >= valid / 5
        assert total(samples, "moderation_worker_batch_wait_seconds_count") == batches

        # end to end: one observation per acknowledged verdict
        assert total(samples, "moderation_worker_end_to_end_latency_seconds_count") == valid
        assert total(samples, "moderation_worker_end_to_end_latency_seconds_count", kind="conversation") == len(turns)

        # backend: every request the loopback server answered, all 200, circuit closed
        requests = mistral.request_count
        assert requests >= 2
        assert total(samples, "moderation_worker_backend_requests_total", api="Mistral", status="200") == requests
        assert total(samples, "moderation_worker_backend_request_duration_seconds_count") == requests
        assert total(samples, "moderation_worker_backend_errors_total") == 0
        assert total(samples, "moderation_worker_backend_circuit_state", api="Mistral") == 0

        # offsets committed, group joined, partitions assigned and read to the end
        assert total(samples, "moderation_worker_commit_latency_seconds_count") >= 1
        assert total(samples, "moderation_worker_rebalances_total", event="assigned") >= 1
        assert total(samples, "moderation_worker_assigned_partitions") == 8
        assert total(samples, "moderation_worker_paused_partitions") == 0
        lag = series(samples, "moderation_worker_consumer_lag")
        assert {(s["topic"], s["partition"]) for s in lag} == {(t, str(p)) for t in topics.inputs for p in range(4)}
        assert total(samples, "moderation_worker_consumer_lag") == 0

        # the same texts again: answered from the dedup cache, no new backend request
        hits_before = total(samples, "moderation_worker_cache_hits_total")
        again = [content(100 + i, text=contents[i]["text"]) for i in range(6)]
        await produce(bootstrap, topics.content, [(e["id"].encode(), json.dumps(e).encode()) for e in again])
        samples = await metrics_when(
            probe, lambda s: total(s, "moderation_worker_verdicts_total") >= valid + len(again)
        )
        assert total(samples, "moderation_worker_cache_hits_total") - hits_before == len(again)
        assert mistral.request_count == requests
        assert total(samples, "moderation_worker_backend_requests_total") == requests
    finally:
        await probe.close()
    assert worker.stop(signal.SIGTERM) == 0


async def test_paused_partitions_and_lag_show_backpressure(broker, topics, mistral, api_key, spawn_worker):
    """At the in-flight cap the worker pauses: the pause and the backlog are visible."""
    bootstrap = broker.bootstrap_servers
    env, port = probed_env(
        broker,
        topics,
        mistral,
        api_key,
        MODWORKER_MAX_IN_FLIGHT="4",
        MODWORKER_KAFKA__MAX_POLL_RECORDS="4",
        MODWORKER_BATCH__MAX_SIZE="4",
    )
    mistral.latency_s = 1.5
    events = [content(i) for i in range(60)]
    await produce(bootstrap, topics.content, [(e["id"].encode(), json.dumps(e).encode()) for e in events])
    worker = spawn_worker(env)
    probe = Probe(port)
    try:
        await probe.wait_for("/readyz", 200)

        def backlog_accounted(s: dict) -> bool:
            # Every record is either read (consumed) or still waiting (lag). The two are read
            # a moment apart, so a scrape racing a resume may disagree: take a consistent one.
            return (
                total(s, "moderation_worker_paused_partitions") > 0
                and total(s, "moderation_worker_consumer_lag") > 0
                and total(s, "moderation_worker_consumer_lag") + total(s, "moderation_worker_messages_consumed_total")
                == len(events)
            )

        samples = await metrics_when(probe, backlog_accounted)
        assert backlog_accounted(samples)
        assert total(samples, "moderation_worker_paused_partitions") == 8
        assert 0 < total(samples, "moderation_worker_in_flight_messages") <= 4
        # paused for backpressure is not a stalled consumer
        assert (await probe.get("/livez")).status_code == 200
    finally:
        await probe.close()
        mistral.latency_s = 0.0
    assert worker.stop(signal.SIGTERM) == 0


async def test_readyz_turns_unready_as_soon_as_the_drain_starts(broker, topics, mistral, api_key, spawn_worker):
    bootstrap = broker.bootstrap_servers
    env, port = probed_env(broker, topics, mistral, api_key, MODWORKER_DRAIN_TIMEOUT_S="20")
    worker = spawn_worker(env)
    probe = Probe(port)
    try:
        await probe.wait_for("/readyz", 200)
        assert (await probe.get("/status")).json()["backend_ready"] is True
        assert (await probe.get("/livez")).status_code == 200

        mistral.latency_s = 3.0  # the drain has a slow backend call to wait for
        await produce(bootstrap, topics.content, [(b"c-1", json.dumps(content(1)).encode())])
        deadline = asyncio.get_running_loop().time() + 30
        while mistral.request_count == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert mistral.request_count == 1, "the worker never called the backend"

        worker.process.send_signal(signal.SIGTERM)
        unready = await probe.wait_for("/readyz", 503, timeout_s=10)
        assert unready.json() == {"status": "fail", "reason": "shutting down", "started": True, "draining": True}
        assert worker.process.poll() is None, "the worker must still be draining"
        # draining is bounded by MODWORKER_DRAIN_TIMEOUT_S: liveness must not kill it meanwhile
        live = await probe.get("/livez")
        assert live.status_code == 200 and live.json()["phase"] == "draining"
    finally:
        await probe.close()
    assert worker.stop(signal.SIGTERM, timeout_s=30) == 0
    # the drain waited for the slow call: its verdict was published before the exit
    assert len(await read_all(bootstrap, topics.verdict, expected=1, idle_s=0.5, timeout_s=10)) == 1


async def test_livez_fails_when_the_consume_loop_is_stuck(broker, topics, mistral, api_key, spawn_worker):
    """A rebalance that cannot complete blocks the consume loop: /livez must say so.

    The worker owns work that cannot finish (the backend takes longer than the test) and is
    allowed a long revoke timeout; a second member joining the group starts a rebalance,
    whose revoke callback then waits for that work. aiokafka's ``getmany`` blocks until
    the rebalance completes, so the loop stops iterating, exactly as it does when a
    consumer hangs in a rebalance after a broker failure. The HTTP server, on the same
    event loop, keeps answering.
    """
    bootstrap = broker.bootstrap_servers
    env, port = probed_env(
        broker, topics, mistral, api_key, MODWORKER_REVOKE_TIMEOUT_S="60", MODWORKER_LIVENESS_TIMEOUT_S="1"
    )
    worker = spawn_worker(env)
    probe = Probe(port)
    intruder = AIOKafkaConsumer(
        *topics.inputs,
        bootstrap_servers=bootstrap,
        group_id=topics.group_id,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        enable_auto_commit=False,
    )
    joining = None
    try:
        await probe.wait_for("/readyz", 200)
        await probe.wait_for("/livez", 200)
        mistral.latency_s = 60.0
        await produce(
            bootstrap, topics.content, [(f"c-{i}".encode(), json.dumps(content(i)).encode()) for i in range(8)]
        )
        deadline = asyncio.get_running_loop().time() + 30
        while mistral.request_count == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert mistral.request_count >= 1, "the worker never called the backend"
        assert (await probe.get("/livez")).status_code == 200, "live while the backend is merely slow"

        async def join() -> None:
            await intruder.start()  # returns once the group has rebalanced: after the test
            await intruder.getmany(timeout_ms=30_000)

        joining = asyncio.create_task(join())
        try:
            failed = await probe.wait_for("/livez", 503, timeout_s=30)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{worker.log()[-6000:]}") from None
        assert "consume loop has not iterated" in failed.json()["reason"]
        assert worker.process.poll() is None
    finally:
        if joining is not None:
            joining.cancel()
        await asyncio.gather(*(t for t in [joining] if t), return_exceptions=True)
        await intruder.stop()
        await probe.close()
        mistral.latency_s = 0.0
    worker.stop(signal.SIGKILL)


async def test_server_answers_only_what_it_serves(broker, topics, mistral, api_key, spawn_worker):
    env, port = probed_env(broker, topics, mistral, api_key)
    worker = spawn_worker(env)
    probe = Probe(port)
    try:
        await probe.wait_for("/readyz", 200)
        assert (await probe.get("/nope")).status_code == 404
        async with httpx.AsyncClient(trust_env=False, timeout=3.0) as client:
            posted = await client.post(probe.base + "/metrics")
            openmetrics = await client.get(
                probe.base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
        assert posted.status_code == 405
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")
        assert api_key not in (await probe.get("/metrics")).text
    finally:
        await probe.close()
    assert worker.stop(signal.SIGTERM) == 0


def test_busy_port_stops_start_up_with_one_line(broker, topics, mistral, api_key, spawn_worker):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = worker_env(
            broker, topics, mistral, api_key, MODWORKER_HTTP_PORT=str(port), MODWORKER_HTTP_HOST="127.0.0.1"
        )
        worker = spawn_worker(env)
        assert worker.process.wait(timeout=30) == 2
    log = worker.log()
    assert f"MODWORKER_HTTP_PORT: cannot listen on 127.0.0.1:{port}" in log
    assert "Traceback" not in log
