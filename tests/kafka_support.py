"""Test-side Kafka tools: topics, producing, reading everything back, committed offsets.

Works against any Kafka-protocol broker, Apache Kafka first; written around the Tansu
fallback's gaps too (no reliable end offsets: reads stop on a count or an idle period).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

IDEMPOTENT = True
"""Whether the tests' own producers are idempotent, as the worker's are by default. The
session turns it off only on the Tansu fallback, which rejects idempotent producers."""


@dataclass(frozen=True)
class TopicSet:
    """Unique topic names for one test, matching the worker's MODWORKER_*_TOPIC settings."""

    content: str
    conversation: str
    verdict: str
    violation: str
    dead_letter: str
    group_id: str
    conversation_state: str
    """The conversation state's changelog: per test, so no test restores another's state."""

    @classmethod
    def unique(cls) -> TopicSet:
        tag = uuid.uuid4().hex[:8]
        return cls(
            f"ugc.content.{tag}",
            f"ugc.conversations.{tag}",
            f"moderation.verdicts.{tag}",
            f"moderation.violations.{tag}",
            f"moderation.dead-letter.{tag}",
            f"modworker-{tag}",
            f"moderation.conversation-state.{tag}",
        )

    @property
    def inputs(self) -> list[str]:
        return [self.content, self.conversation]

    @property
    def outputs(self) -> list[str]:
        return [self.verdict, self.violation, self.dead_letter]

    def env(self) -> dict[str, str]:
        return {
            "MODWORKER_CONTENT_TOPIC": self.content,
            "MODWORKER_CONVERSATION_TOPIC": self.conversation,
            "MODWORKER_VERDICT_TOPIC": self.verdict,
            "MODWORKER_VIOLATION_TOPIC": self.violation,
            "MODWORKER_DEAD_LETTER_TOPIC": self.dead_letter,
            "MODWORKER_GROUP_ID": self.group_id,
            "MODWORKER_CONVERSATION__CHANGELOG_TOPIC": self.conversation_state,
        }


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def set_topic_configs(bootstrap: str, names: Iterable[str], configs: dict[str, str]) -> None:
    """Set topic-level configs (AlterConfigs: the topics' other overrides are reset)."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    names = list(names)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, n, configs=configs) for n in names])
        # The change reaches the brokers through the metadata log: wait until they report it.
        wanted = [ConfigResource(ConfigResourceType.TOPIC, n, configs=dict.fromkeys(configs)) for n in names]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answers = await admin.describe_configs(wanted)
            seen = {(r[3], e[0]): e[1] for a in answers for r in a.resources for e in r[4]}
            if all(seen.get((n, k)) == v for n in names for k, v in configs.items()):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the brokers never reported {configs} for {names}")
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
    """Publish (key, value) pairs in order, acks=all; the default partitioner keys them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=IDEMPOTENT, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def event_record(event: dict, key_field: str = "id") -> tuple[bytes, bytes]:
    return event[key_field].encode(), json.dumps(event).encode()


async def read_all(
    bootstrap: str,
    topic: str,
    *,
    expected: int | None = None,
    idle_s: float = 3.0,
    timeout_s: float = 60.0,
    isolation_level: str = "read_uncommitted",
) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the start. Stops at ``expected`` records (then waits
    ``idle_s`` more to catch extras), or after ``idle_s`` without news, or at ``timeout_s``.
    ``isolation_level="read_committed"`` reads as exactly-once consumers must."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        last_news = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            got = [r for rs in batches.values() for r in rs]
            now = time.monotonic()
            if got:
                records.extend(got)
                last_news = now
            elif now - last_news > idle_s and (expected is None or len(records) >= expected):
                break
            elif expected is not None and len(records) < expected:
                continue
    finally:
        await consumer.stop()
    return records


async def wait_for_count(bootstrap: str, topic: str, count: int, timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Read until at least ``count`` records are there (no idle wait afterwards)."""
    return await read_all(bootstrap, topic, expected=count, idle_s=0.0, timeout_s=timeout_s)


async def committed(
    bootstrap: str, group_id: str, topics: Iterable[str], partitions: int = 4
) -> dict[TopicPartition, int]:
    """Committed offsets of ``group_id`` (partitions named: the embedded broker needs that)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        result = await admin.list_consumer_group_offsets(group_id, partitions=tps)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in result.items() if meta is not None and meta.offset >= 0}


def log_events(log: str, name: str) -> list[dict]:
    """The JSON log lines of ``log`` (a process's output) whose ``event`` is ``name``."""
    return [e for line in log.splitlines() if line.startswith("{") and (e := json.loads(line)).get("event") == name]
