"""Chaos in ``MODWORKER_DELIVERY=exactly_once``: the mixed stream (10% malformed) through
real worker processes, one fault per scenario, tallied by a reader with
``isolation_level=read_committed`` (as exactly-once consumers must read). Every scenario
must end with lost 0 and duplicates 0: a crashed, revoked or fenced member's uncommitted
outputs are aborted or never sent, and its inputs are judged again from the committed
offsets. The notes count what fencing and aborting removed.

Run one: ``.venv/bin/python -m pytest -q -m chaos tests/chaos/test_exactly_once_chaos.py -k NAME``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from tests.chaos.conftest import ChaosRun
from tests.chaos.harness import Traffic
from tests.conftest import WorkerProcess
from tests.kafka_support import read_all

IN_FLIGHT = 200
EXACTLY_ONCE = {"MODWORKER_DELIVERY": "exactly_once", "MODWORKER_MAX_IN_FLIGHT": str(IN_FLIGHT)}


def _spawn(run: ChaosRun, **extra: str) -> WorkerProcess:
    return run.spawn(**EXACTLY_ONCE, **extra)


def _stream(run: ChaosRun, rate: int = 40) -> Traffic:
    run.traffic = Traffic(
        run.bootstrap, run.topics, rate=rate, idempotence=True, isolation_level="read_committed", **run.client
    ).start()
    return run.traffic


def _wait_started(run: ChaosRun, outputs: int = 50, timeout_s: float = 60) -> None:
    assert run.traffic is not None
    assert run.traffic.wait_for_outputs(outputs, timeout_s), "the stream never got going"


def _events(run: ChaosRun, name: str) -> list[dict[str, Any]]:
    found = []
    for worker in run.workers:
        for line in worker.log().splitlines():
            if line.startswith("{") and (entry := json.loads(line)).get("event") == name:
                found.append(entry)
    return found


def _assigned(worker: WorkerProcess) -> set[str]:
    held: set[str] = set()
    for line in worker.log().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "partitions.assigned":
            held |= set(entry["partitions"])
        elif entry.get("event") == "partitions.revoked":
            held -= set(entry["partitions"])
    return held


def _fencing_notes(run: ChaosRun) -> dict[str, Any]:
    """What fencing and aborting removed, from the workers' logs and the verdict topic."""
    fenced = _events(run, "transactions.producer_fenced")
    committed = asyncio.run(read_all(run.bootstrap, run.topics.verdict, idle_s=1.0, isolation_level="read_committed"))
    written = asyncio.run(read_all(run.bootstrap, run.topics.verdict, idle_s=1.0))
    return {
        "delivery": "exactly_once",
        "reader": "read_committed",
        "fenced_producers": len(fenced),
        "fenced_late_outputs_dropped": sum(int(e.get("dropped", 0)) for e in fenced),
        "transactions_aborted": len(_events(run, "transactions.aborted")),
        "verdict_records_aborted_in_log": len(written) - len(committed),
    }


def _record_fencing(run: ChaosRun, outcome) -> dict[str, Any]:
    """Add what fencing and aborting removed to the outcome's notes (read once it settled)."""
    notes = _fencing_notes(run)
    outcome.notes.update(notes)
    outcome.record()
    return notes


def _exactly_once(outcome) -> None:
    assert outcome.notes["settled"], f"not every input got an output: {outcome}"
    assert outcome.lost == 0, outcome
    assert outcome.duplicates == 0, outcome
    assert outcome.dead_letters >= 1, "the malformed tenth must be dead-lettered"
    assert outcome.dead_letter_types.get("backend_failed", 0) == 0, outcome


def test_exactly_once_worker_sigkill_mid_transaction(chaos: ChaosRun):
    """Three SIGKILLs of the running worker, 3 s apart, each followed by a new one: what the
    killed member had sent in an open transaction is aborted by its successor's init."""
    _spawn(chaos)
    _stream(chaos)
    _wait_started(chaos)
    kills = 3
    for _ in range(kills):
        time.sleep(3)
        alive = [w for w in chaos.workers if w.process.poll() is None]
        alive[0].stop(signal.SIGKILL)
        _spawn(chaos)
    fault_end = time.time()
    time.sleep(8)
    outcome = chaos.finish("exactly-once: worker SIGKILL mid-transaction", fault_end=fault_end, kills=kills)
    _record_fencing(chaos, outcome)
    _exactly_once(outcome)


def test_exactly_once_rebalance_storm(chaos: ChaosRun):
    """Three workers; every 4 s one is SIGKILLed and a new one added, four times."""
    for _ in range(3):
        _spawn(chaos)
    _stream(chaos)
    _wait_started(chaos)
    kills = 4
    for round_ in range(kills):
        alive = [w for w in chaos.workers if w.process.poll() is None]
        alive[round_ % len(alive)].stop(signal.SIGKILL)
        _spawn(chaos)
        time.sleep(4)
    fault_end = time.time()
    time.sleep(6)
    outcome = chaos.finish("exactly-once: rebalance storm", fault_end=fault_end, settle_s=120, kills=kills)
    _record_fencing(chaos, outcome)
    _exactly_once(outcome)


def test_exactly_once_broker_sigkill_and_restart(chaos: ChaosRun):
    """The only broker (and so the transaction coordinator) SIGKILLed for 5 s: transactions
    under way time out or fail, are aborted, and retried with fresh producers."""
    _spawn(chaos)
    _stream(chaos)
    _wait_started(chaos)
    time.sleep(3)
    chaos.broker.kill()
    time.sleep(5)
    chaos.broker.start()
    fault_end = time.time()
    time.sleep(8)
    outcome = chaos.finish("exactly-once: broker SIGKILL, down 5 s", fault_end=fault_end, settle_s=120)
    _record_fencing(chaos, outcome)
    _exactly_once(outcome)
    assert outcome.notes["sigterm_exit_codes"] == [0], "the worker must ride out the outage and stop cleanly"


def test_exactly_once_zombie_is_fenced(chaos: ChaosRun):
    """Two workers; one is SIGSTOPped past its session timeout (6 s) while it holds judged,
    uncommitted outputs; the group gives its partitions to the other, whose producers fence
    it; then it is SIGCONTed and its late writes are refused."""
    # Long commit interval on the zombie: when it stops it holds seconds of finished outputs.
    zombie = _spawn(chaos, MODWORKER_COMMIT_INTERVAL_MS="5000", MODWORKER_COMMIT_EVERY="100000")
    other = _spawn(chaos)
    _stream(chaos)
    _wait_started(chaos)
    deadline = time.monotonic() + 60
    while not (_assigned(zombie) and _assigned(other)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _assigned(zombie) and _assigned(other), "both members must hold partitions"
    time.sleep(3)
    os.kill(zombie.process.pid, signal.SIGSTOP)
    stopped = time.time()
    try:
        deadline = time.monotonic() + 60
        while len(_assigned(other)) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        taken_over = len(_assigned(other)) == 8
        time.sleep(3)  # the new owner judges and commits the zombie's inputs again
    finally:
        os.kill(zombie.process.pid, signal.SIGCONT)
    fault_end = time.time()
    time.sleep(10)
    outcome = chaos.finish(
        "exactly-once: zombie (SIGSTOP past the session timeout, SIGCONT)",
        fault_end=fault_end,
        settle_s=120,
        stopped_s=round(fault_end - stopped, 1),
        taken_over=taken_over,
    )
    notes = _record_fencing(chaos, outcome)
    assert taken_over, "the group must move the stopped member's partitions"
    _exactly_once(outcome)
    assert notes["fenced_producers"] >= 1, "the zombie's producers must be fenced"
    assert notes["fenced_late_outputs_dropped"] >= 1, "the zombie held late outputs when it woke"
