"""A rolling restart of three workers, with static group membership and without.

Each worker in turn gets SIGTERM (drain, commit, close) and is replaced by a new process
under the same ``MODWORKER_KAFKA__GROUP_INSTANCE_ID`` (a StatefulSet's pod name), within
the session timeout. Measured from the workers' own log lines: the rebalances the members
that were not restarted went through (``partitions.assigned`` events: the eager protocol
calls every member on every rebalance) and the conversations restored from the changelog,
by the restarted worker and by the others. Both variants print their figures and record a
row for docs/reliability.md's table; lost stays 0 in both.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime

import pytest

from tests.chaos.conftest import ChaosRun

WORKERS = 3
SESSION_TIMEOUT_MS = 20_000
"""Long enough for a replacement process to start and join on this 2-core machine."""


def _events(log: str, name: str, since: float) -> list[dict]:
    out = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") != name:
            continue
        at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
        if at >= since:
            out.append(record)
    return out


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_rolling_restart(chaos: ChaosRun, static: bool):
    def spawn(index: int):
        extra = {"MODWORKER_MAX_IN_FLIGHT": "200", "MODWORKER_KAFKA__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS)}
        if static:
            extra["MODWORKER_KAFKA__GROUP_INSTANCE_ID"] = f"moderation-worker-{index}"
        return chaos.spawn(**extra)

    current = [spawn(i) for i in range(WORKERS)]
    traffic = chaos.stream()
    assert traffic.wait_for_outputs(100, 90), "the stream never got going"
    time.sleep(5)  # the group is stable, every member has restored its partitions

    rebalances = 0
    restored_by_restarted = restored_by_others = 0
    for index in range(WORKERS):
        step = time.time()
        old = current[index]
        assert old.stop(signal.SIGTERM, timeout_s=60) == 0
        current[index] = new = spawn(index)
        new.wait_for_log('"partitions.assigned"', timeout_s=60)
        time.sleep(6)  # what the restart set off has reached every member
        others = [w for i, w in enumerate(current) if i != index]
        rebalances += max(len(_events(w.log(), "partitions.assigned", step)) for w in others)
        restored_by_others += sum(
            r["conversations"] for w in others for r in _events(w.log(), "conversation_state.restored", step)
        )
        restored_by_restarted += sum(
            r["conversations"] for r in _events(new.log(), "conversation_state.restored", step)
        )

    name = f"rolling restart of {WORKERS} workers, {'static' if static else 'dynamic'} membership"
    outcome = chaos.finish(
        name,
        fault_end=None,
        settle_s=120,
        rebalances=rebalances,
        restored_by_others=restored_by_others,
        restored_by_restarted=restored_by_restarted,
    )
    print(
        f"\n{name}: rebalances {rebalances}, conversations restored by the other members {restored_by_others}, "
        f"by the restarted ones {restored_by_restarted}, lost {outcome.lost}, duplicates {outcome.duplicates}"
    )
    assert outcome.notes["settled"] and outcome.lost == 0, outcome
    if static:
        assert rebalances == 0, f"{rebalances} rebalances in a rolling restart with static membership"
        assert restored_by_others == 0
    else:
        assert rebalances >= WORKERS, "the control: every restart of a dynamic member rebalances the group"
