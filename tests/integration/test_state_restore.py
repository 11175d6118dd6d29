"""The conversation state's restore read on a real broker: it ends, also when a partition never answers."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.kafka_support import create_topics, produce
from worker.config import KafkaSettings
from worker.pipeline.state_changelog import ChangelogUnavailable, StateChangelog


def changelog(broker, topics, stall_timeout_s: float) -> StateChangelog:
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    return StateChangelog(
        kafka, topic=topics.conversation_state, source_topic=topics.conversation, stall_timeout_s=stall_timeout_s
    )


async def test_a_restore_reads_each_partition_to_its_highwater_mark(broker, topics) -> None:
    await create_topics(broker.bootstrap_servers, [topics.conversation_state], partitions=2)
    await produce(broker.bootstrap_servers, topics.conversation_state, [(b"conv-1", b"a"), (b"conv-1", b"b")])
    latest, read = await asyncio.wait_for(changelog(broker, topics, 30).read([0, 1]), 60)
    assert read == 2
    assert {key: value for values in latest.values() for key, value in values.items()} == {"conv-1": b"b"}


async def test_a_partition_that_never_answers_ends_the_restore_naming_it(broker, topics) -> None:
    """Partition 5 of a 2-partition topic: no broker ever answers a fetch of it."""
    await create_topics(broker.bootstrap_servers, [topics.conversation_state], partitions=2)
    await produce(broker.bootstrap_servers, topics.conversation_state, [(b"conv-1", b"a")])
    started = time.monotonic()
    with pytest.raises(ChangelogUnavailable) as raised:
        await asyncio.wait_for(changelog(broker, topics, 2.0).read([0, 5]), 60)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert f"{topics.conversation_state}-5 (no fetch response)" in message
    assert f"{topics.conversation_state}-0" not in message, "the partition that answered is not blamed"
    assert "MODWORKER_CONVERSATION__RESTORE_TIMEOUT_S" in message and "\n" not in message
    assert elapsed < 30, f"the restore gave up after {elapsed:.1f}s, bound 2s"
