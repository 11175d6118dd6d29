"""The chaos suite: each scenario runs a steady stream of mixed content and conversation
events (10% malformed) through real worker processes (``python -m worker.cli run``) on the
durable embedded broker, injects one fault, and tallies inputs, verdicts, dead letters,
lost, duplicates, peak RSS and recovery time into ``tests/chaos/results.json``
(``python -m tests.chaos.report`` turns that into docs/reliability.md's table).

Promises checked everywhere: lost == 0 (every input gets a verdict or a dead letter), and
the API key appears in no worker output. Duplicates only where a worker crashed (at most
the in-flight window of the crashed worker). Run: ``make chaos``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest

from tests.chaos.conftest import ChaosRun
from tests.chaos.harness import TansuDurableBroker, self_signed_certificate
from tests.kafka_support import set_topic_configs
from worker.testing.faults import Fault, when_input_contains

IN_FLIGHT = 200
"""MODWORKER_MAX_IN_FLIGHT in these scenarios: the bound on a crashed worker's duplicates."""


def _wait_started(run: ChaosRun, outputs: int = 50, timeout_s: float = 60) -> None:
    assert run.traffic is not None
    assert run.traffic.wait_for_outputs(outputs, timeout_s), "the stream never got going"


def _no_loss(outcome, *, crashes: int = 0, poison: int = 0) -> None:
    assert outcome.notes["settled"], f"not every input got an output: {outcome}"
    assert outcome.lost == 0, outcome
    assert outcome.duplicates <= crashes * IN_FLIGHT, outcome
    assert outcome.dead_letters >= 1, "the malformed tenth must be dead-lettered"
    # Only a poison input is dead-lettered for the backend's failures: an outage, a blip or a
    # flapping API never dead-letters an input (answers from the dedup cache are no evidence).
    assert outcome.dead_letter_types.get("backend_failed", 0) == poison, outcome


def test_malformed_inputs_at_ten_percent(chaos: ChaosRun):
    """Baseline: the mixed stream with 10% malformed inputs, no other fault."""
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    traffic = chaos.stream()
    _wait_started(chaos)
    time.sleep(8)
    outcome = chaos.finish("malformed 10%", fault_end=None)
    _no_loss(outcome)
    assert outcome.duplicates == 0
    malformed = outcome.dead_letter_types
    assert set(malformed) <= {"not_utf8", "not_json", "schema"}, malformed
    assert 0.05 * outcome.inputs <= outcome.dead_letters <= 0.15 * outcome.inputs, outcome
    assert traffic.inputs() == outcome.inputs


def test_worker_sigkill_mid_stream(chaos: ChaosRun):
    first = chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)
    time.sleep(3)
    first.stop(signal.SIGKILL)
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    fault_end = time.time()
    time.sleep(8)
    outcome = chaos.finish("worker SIGKILL mid-stream", fault_end=fault_end)
    _no_loss(outcome, crashes=1)


@pytest.mark.parametrize("down_s", [5, 30])
def test_broker_sigkill_and_restart(chaos: ChaosRun, down_s: int):
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)
    time.sleep(3)
    killed = time.time()
    chaos.broker.kill()
    time.sleep(down_s)
    chaos.broker.start()
    fault_end = time.time()
    time.sleep(8)
    lines = _log_lines_between(chaos.workers[0].log(), killed, fault_end + 5)
    outcome = chaos.finish(
        f"broker SIGKILL, down {down_s} s", fault_end=fault_end, settle_s=120, log_lines_during_outage=lines
    )
    # Defect 8: in JSON mode every line is JSON (aiokafka's too) and a repeated library
    # error is logged once per interval: the outage costs tens of lines, not thousands.
    assert lines < 20 + 4 * down_s, f"{lines} log lines for a {down_s} s outage"
    # The worker never crashed, but what finished and was not committed when the broker
    # died is judged again once the group re-forms, and a produce whose ack the broker's
    # death swallowed is sent again (idempotence is off here): within one window.
    _no_loss(outcome, crashes=1)
    assert all(w.process.poll() is not None for w in chaos.workers)
    assert outcome.notes["sigterm_exit_codes"] == [0], "the worker must ride out the outage and stop cleanly"


PER_MESSAGE_EVENTS = frozenset({"message.verdict", "message.flagged", "message.dead_lettered"})
"""One line per input: they follow the traffic (and the backlog judged once the broker is
back), not the outage, so they are not counted as the outage's noise."""


def _log_lines_between(log: str, start: float, end: float) -> int:
    """Lines logged in [start, end], per-message records aside; fails on any line that is not JSON."""
    from datetime import datetime

    count = 0
    for line in log.splitlines():
        record = json.loads(line)  # JSON mode: a plain-text line is a failure
        if record.get("event") in PER_MESSAGE_EVENTS:
            continue
        at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
        count += start <= at <= end
    return count


def test_rebalance_storm(chaos: ChaosRun):
    """Three workers; every 4 s one is SIGKILLed and a new one added, four times."""
    for _ in range(3):
        chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)
    kills = 4
    for round_ in range(kills):
        alive = [w for w in chaos.workers if w.process.poll() is None]
        alive[round_ % len(alive)].stop(signal.SIGKILL)
        chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
        time.sleep(4)
    fault_end = time.time()
    time.sleep(6)
    outcome = chaos.finish("rebalance storm", fault_end=fault_end, settle_s=120, kills=kills)
    _no_loss(outcome, crashes=kills)


def test_backend_503_burst(chaos: ChaosRun):
    """A burst of 503s: every request for 3 s."""
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)
    chaos.mistral.fault_plan = lambda request: Fault(status=503)
    time.sleep(3)
    chaos.mistral.fault_plan = None
    fault_end = time.time()
    time.sleep(6)
    outcome = chaos.finish("backend 503 burst", fault_end=fault_end, settle_s=150)
    _no_loss(outcome)
    assert outcome.duplicates == 0


def test_backend_503_burst_recovers_within_seconds(chaos: ChaosRun):
    """Six 503s in a row, then healthy: moderation resumes within about 2 s, end to end."""
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)
    start = chaos.mistral.request_count
    chaos.mistral.fault_plan = lambda request: Fault(status=503) if request.index < start + 6 else None
    deadline = time.monotonic() + 30  # today's breaker slows the six down to minutes
    while chaos.mistral.request_count < start + 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    fault_end = time.time()
    time.sleep(6)
    outcome = chaos.finish("backend 6x503 then healthy", fault_end=fault_end, settle_s=60)
    _no_loss(outcome)
    # The promise is ~2 s end to end; on Apache Kafka it measures 1.4 s here (on the
    # S3-backed Tansu, 8.7-13.2 s: its produce and fetch rounds took most of that). The
    # bound leaves room for a loaded 2-core machine; the table states the measured figure.
    assert outcome.recovery_s is not None and outcome.recovery_s <= 4, outcome


def test_backend_flapping(chaos: ChaosRun):
    """The API down (503) 20 s, up 20 s, down 20 s, then up; fail policy ``wait``."""
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)
    down = Fault(status=503)
    for _ in range(2):
        chaos.mistral.fault_plan = lambda request: down
        time.sleep(20)
        chaos.mistral.fault_plan = None
        fault_end = time.time()
        time.sleep(20)
    outcome = chaos.finish("backend flapping 20 s / 20 s", fault_end=fault_end, settle_s=150)
    _no_loss(outcome)
    assert outcome.duplicates == 0


def test_backend_outage_60s_under_wait_keeps_memory_flat(chaos: ChaosRun):
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    traffic = chaos.stream()
    _wait_started(chaos)
    chaos.mistral.fault_plan = lambda request: Fault(status=503)
    outage_start = time.time()
    time.sleep(60)
    chaos.mistral.fault_plan = None
    fault_end = time.time()
    time.sleep(5)
    early = chaos.rss.between(outage_start + 10, outage_start + 20)
    late = chaos.rss.between(fault_end - 10, fault_end)
    growth = round(max(late) - max(early), 1)
    produced_during = traffic.inputs()
    outcome = chaos.finish(
        "backend outage 60 s (wait)",
        fault_end=fault_end,
        settle_s=150,
        rss_growth_mb=growth,
        inputs_at_end=produced_during,
    )
    _no_loss(outcome)
    assert outcome.duplicates == 0
    assert growth < 15, f"RSS grew {growth} MB over the outage's last 40 s"


def test_backend_429_storm(chaos: ChaosRun):
    """Every other request gets 429 with Retry-After: 1 for 15 s."""
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)
    chaos.mistral.fault_plan = lambda request: Fault(status=429, retry_after="1") if request.index % 2 == 0 else None
    time.sleep(15)
    chaos.mistral.fault_plan = None
    fault_end = time.time()
    time.sleep(5)
    outcome = chaos.finish("backend 429 storm", fault_end=fault_end, settle_s=150)
    _no_loss(outcome)
    assert outcome.duplicates == 0


@pytest.mark.parametrize("stream_on_s", [8, 0.5], ids=["stream-goes-on", "stream-stops"])
def test_one_poison_input(chaos: ChaosRun, stream_on_s: float):
    """One input the API answers with 500 every time, while it answers everything else; the
    stream goes on 8 s after it, or stops half a second after it (no other traffic then
    answers during the search: the worker's own probes are the evidence)."""
    chaos.mistral.fault_plan = when_input_contains("POISON-PILL", Fault(status=500))
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    traffic = chaos.stream()
    _wait_started(chaos)
    poison = {"id": "poison-1", "text": "this one always fails POISON-PILL"}
    traffic.inject("content", b"poison-1", json.dumps(poison).encode())
    time.sleep(stream_on_s)
    name = "one poison input" if stream_on_s > 1 else "one poison input, then the stream stops"
    outcome = chaos.finish(name, fault_end=None, settle_s=60)
    _no_loss(outcome, poison=1)


def test_oversized_input(chaos: ChaosRun):
    """A 900 KB input (over MODWORKER_MAX_TEXT_CHARS): dead-lettered as too_long, the stream goes on."""
    chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    traffic = chaos.stream()
    _wait_started(chaos)
    big = {"id": "big-1", "text": "x" * 900_000}
    traffic.inject("content", b"big-1", json.dumps(big).encode())
    time.sleep(6)
    outcome = chaos.finish("oversized input (900 KB)", fault_end=None)
    _no_loss(outcome)
    assert outcome.dead_letter_types.get("too_long") == 1, outcome
    assert outcome.duplicates == 0


OUTPUT_LIMIT = 64 * 1024


def test_oversized_output(chaos: ChaosRun):
    """Output topics created with a broker-side ``max.message.bytes`` of 64 KB (on Apache
    Kafka; the worker's own limit on Tansu, which has none). Outputs larger than that (a
    60 KB input with 40 KB of metadata, its text copied into the verdict; a 100 KB too_long
    input dead-lettered): the worker reads the limit, every output fits it, nothing is fatal."""
    limit: dict[str, str] = {}
    if isinstance(chaos.broker, TansuDurableBroker):
        limit["MODWORKER_MAX_OUTPUT_BYTES"] = str(OUTPUT_LIMIT)
    else:
        asyncio.run(set_topic_configs(chaos.bootstrap, chaos.topics.outputs, {"max.message.bytes": str(OUTPUT_LIMIT)}))
    chaos.spawn(
        MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT),
        **limit,
        MODWORKER_INCLUDE_TEXT="true",
        MODWORKER_MAX_TEXT_CHARS="80000",
    )
    traffic = chaos.stream()
    _wait_started(chaos)
    fat = {"id": "fat-1", "text": "y" * 60_000, "metadata": {"blob": "z" * 40_000}}
    traffic.inject("content", b"fat-1", json.dumps(fat).encode())
    long = {"id": "long-1", "text": "w" * 100_000}
    traffic.inject("content", b"long-1", json.dumps(long).encode())
    time.sleep(6)
    outcome = chaos.finish("oversized outputs (broker limit 64 KB)", fault_end=None, largest_output_bytes=None)
    outcome.notes["largest_output_bytes"] = traffic.largest_output
    outcome.record()
    _no_loss(outcome)
    assert outcome.notes["sigterm_exit_codes"] == [0], "an oversized output must never be fatal"
    assert traffic.largest_output <= OUTPUT_LIMIT, traffic.largest_output


def test_end_to_end_over_tls(tls_chaos: ChaosRun):
    """The broker's TLS listener (Kafka's own; stunnel on the Tansu fallback): worker, producer and
    reader all over SSL."""
    tls_chaos.spawn(
        MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT),
        MODWORKER_KAFKA__SECURITY_PROTOCOL="SSL",
        MODWORKER_KAFKA__SSL_CAFILE=str(tls_chaos.ca),
    )
    tls_chaos.stream()
    _wait_started(tls_chaos)
    time.sleep(6)
    outcome = tls_chaos.finish("end to end over TLS", fault_end=None)
    _no_loss(outcome)
    assert outcome.duplicates == 0


@pytest.mark.parametrize("client", ["wrong CA", "plaintext"])
def test_a_bad_tls_client_stops_start_up_with_one_line(tls_chaos: ChaosRun, tmp_path, client: str):
    if client == "wrong CA":
        other, _ = self_signed_certificate(tmp_path, "other")
        extra = {"MODWORKER_KAFKA__SECURITY_PROTOCOL": "SSL", "MODWORKER_KAFKA__SSL_CAFILE": str(other)}
    else:
        extra = {"MODWORKER_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT"}
    worker = tls_chaos.spawn(**extra)
    try:
        code = worker.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{client}: the worker did not stop at start-up:\n{worker.log()[-3000:]}")
    log = worker.log()
    assert code == 1, log
    assert "Traceback" not in log and tls_chaos.api_key not in log
    last = json.loads(log.strip().splitlines()[-1])
    assert last["event"] == "worker.exit" and "cannot reach Kafka" in last["error"], last
    named = "CERTIFICATE_VERIFY_FAILED" if client == "wrong CA" else "the port speaks TLS"
    assert named in last["error"], last
    note = {"client": client, "exit_code": code, "line": last["error"]}
    tls_chaos.note_start_up_failure(f"TLS port, {client} client", note)
