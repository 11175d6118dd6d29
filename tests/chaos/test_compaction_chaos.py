"""The conversation-state changelog as Apache Kafka really compacts it, then a restore from it.

The changelog is created before the worker starts, compacted with a cleaner that runs at
once (segments roll every second, ``min.cleanable.dirty.ratio`` 0.01, tombstones kept 1 s),
so within the scenario most of the state writes are cleaned away. The worker is SIGKILLed
after the broker compacted, and its successor restores from what compaction left: the
latest state of every live conversation, and nothing lost.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from tests.chaos.conftest import ChaosRun
from tests.chaos.harness import TansuDurableBroker
from tests.chaos.test_chaos import IN_FLIGHT, _no_loss, _wait_started

COMPACT_FAST = {
    "cleanup.policy": "compact",
    "segment.ms": "1000",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "1000",
}


async def _create_changelog(bootstrap: str, topic: str, partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=COMPACT_FAST)])
    finally:
        await admin.close()


async def _changelog_counts(bootstrap: str, topic: str, partitions: int = 4) -> tuple[int, int, int]:
    """(records ever written: the sum of end offsets; records still readable; distinct live keys)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        readable = 0
        latest: dict[bytes | None, bytes | None] = {}

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                readable += len(records)
                latest.update((r.key, r.value) for r in records)
        live = sum(1 for value in latest.values() if value is not None)
        return sum(ends.values()), readable, live
    finally:
        await consumer.stop()


def test_restore_from_a_really_compacted_changelog(chaos: ChaosRun):
    if isinstance(chaos.broker, TansuDurableBroker):
        pytest.skip("Tansu never compacts: this scenario needs Apache Kafka")
    changelog = chaos.topics.conversation_state
    asyncio.run(_create_changelog(chaos.bootstrap, changelog))
    first = chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    chaos.stream()
    _wait_started(chaos)

    deadline = time.monotonic() + 90
    written = readable = live = 0
    while time.monotonic() < deadline:  # until the cleaner removed most of what was written
        time.sleep(2)
        written, readable, live = asyncio.run(_changelog_counts(chaos.bootstrap, changelog))
        if written >= 200 and readable <= written // 2:
            break
    assert written >= 200 and readable <= written // 2, f"never compacted: {written} written, {readable} readable"

    first.stop(signal.SIGKILL)
    killed = time.time()
    second = chaos.spawn(MODWORKER_MAX_IN_FLIGHT=str(IN_FLIGHT))
    second.wait_for_log('"conversation_state.restored"', timeout_s=60)
    time.sleep(6)
    outcome = chaos.finish(
        "conversation-state changelog compacted by the broker, then restored",
        fault_end=killed,
        changelog_written=written,
        changelog_after_compaction=readable,
    )
    restores = [json.loads(line) for line in second.log().splitlines() if '"conversation_state.restored"' in line]
    outcome.notes["restored_records"] = sum(r["records"] for r in restores)
    outcome.notes["restored_conversations"] = sum(r["conversations"] for r in restores)
    outcome.record()
    _no_loss(outcome, crashes=1)
    # The successor read the compacted log, not the history: about one record per conversation
    # (plus what was written since the last cleaning), and restored every live conversation.
    assert outcome.notes["restored_records"] < written, outcome.notes
    assert outcome.notes["restored_conversations"] >= live, outcome.notes
