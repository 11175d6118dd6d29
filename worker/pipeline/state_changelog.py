"""The conversation state's changelog topic: created when missing, read back on assignment.

The topic is compacted (``cleanup.policy=compact``), keyed by conversation id, with the
conversation topic's partition count: the state of input partition ``p`` lives in
changelog partition ``p`` (the worker writes there explicitly, whatever the key hashes
to). Writing happens through the sink with the turn's verdict (``worker.pipeline.outputs``);
this module only ensures the topic and reads partitions back.

Reading stops at each partition's highwater mark as the first fetch response reports it,
not at ``end_offsets()``: the embedded test broker reports end offsets wrongly
(../shared/BROKER.md), the highwater mark is right there and on Kafka.

A restore is bounded: a partition that gives no fetch response, or whose read does not
advance, for ``stall_timeout_s`` (``MODWORKER_CONVERSATION__RESTORE_TIMEOUT_S``) ends the
read with ``ChangelogUnavailable`` naming it (its leader unavailable, the partition missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from worker.config import KafkaSettings
from worker.ops.logs import Event
from worker.pipeline.source import client_options, fetch_options

log = structlog.get_logger("worker.pipeline.state_changelog")

_FETCH_WAIT_MS = 100
"""A restore fetch waits this long at most for data: an empty partition is done after one."""


CHANGELOG_CONFIGS = {"cleanup.policy": "compact", "segment.ms": "3600000"}
"""Compacted; segments roll hourly because the cleaner never compacts the active segment
(default: up to 7 days or 1 GB), and a restore reads everything not yet compacted."""


class ChangelogUnavailable(Exception):
    """The changelog topic is missing and cannot be created, or cannot hold the state."""


class StateChangelog:
    """The changelog ``topic`` of the conversation ``source_topic``'s state."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        topic: str,
        source_topic: str,
        read_committed: bool = False,
        stall_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topic = topic
        self.read_committed = read_committed
        """Exactly-once: restore only what committed transactions wrote, up to the last stable offset."""
        self.source_topic = source_topic
        self.stall_timeout_s = stall_timeout_s
        """How long one partition may go without a fetch response or progress before ``read`` gives up."""
        self._clock = clock
        self._kafka = kafka
        self._ensured = False
        self._lock = asyncio.Lock()

    async def ensure(self) -> None:
        """Create the topic when missing (compacted, the source's partitions and replicas).

        Raises ``ChangelogUnavailable`` with a one-line reason when it is missing and cannot
        be created, or has fewer partitions than the source topic. Checked once per process.
        """
        async with self._lock:
            if self._ensured:
                return
            admin = AIOKafkaAdminClient(**client_options(self._kafka))
            try:
                await admin.start()
                await self._ensure(admin)
            except ChangelogUnavailable:
                raise
            except Exception as err:  # noqa: BLE001 - every admin failure becomes the one-line reason
                raise ChangelogUnavailable(
                    f"conversation state: cannot check or create changelog topic {self.topic!r}: "
                    f"{type(err).__name__}: {err}; create it (cleanup.policy=compact, as many partitions as "
                    f"{self.source_topic!r}) or set MODWORKER_CONVERSATION__ENABLED=false"
                ) from None
            finally:
                await admin.close()
            self._ensured = True

    async def _ensure(self, admin: AIOKafkaAdminClient) -> None:
        # Describe only topics known to exist: describing a missing one auto-creates it on
        # brokers that allow auto-creation (with the broker's default partition count).
        source = _describe(await admin.describe_topics([self.source_topic]), self.source_topic)
        partitions = len(source["partitions"])
        if self.topic in set(await admin.list_topics()):
            existing = _describe(await admin.describe_topics([self.topic]), self.topic)
            if len(existing["partitions"]) < partitions:
                raise ChangelogUnavailable(
                    f"conversation state: changelog topic {self.topic!r} has {len(existing['partitions'])} "
                    f"partitions, {self.source_topic!r} has {partitions}: recreate it with {partitions} or set "
                    "MODWORKER_CONVERSATION__CHANGELOG_TOPIC to another topic"
                )
            return
        replicas = max(1, min(len(p["replicas"]) for p in source["partitions"])) if partitions else 1
        topic = NewTopic(self.topic, partitions, replicas, topic_configs=CHANGELOG_CONFIGS)
        answer = await admin.create_topics([topic])
        for _name, code, *message in getattr(answer, "topic_errors", ()):
            if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (another member was first)
                raise ChangelogUnavailable(
                    f"conversation state: cannot create changelog topic {self.topic!r} (error {code}: "
                    f"{message[0] if message else ''}); create it (cleanup.policy=compact, {partitions} partitions) "
                    "or set MODWORKER_CONVERSATION__ENABLED=false"
                )
        log.info(
            Event.STATE_CHANGELOG_CREATED,
            topic=self.topic,
            partitions=partitions,
            replication_factor=replicas,
            configs=CHANGELOG_CONFIGS,
        )

    async def read(self, partitions: list[int]) -> tuple[dict[int, dict[str, bytes | None]], int]:
        """The latest value per key of each partition, read from the beginning up to its
        highwater mark at the time of the first fetch; and the number of records read.

        Raises ``ChangelogUnavailable`` naming the partitions that gave no fetch response, or
        did not advance towards their highwater mark, for ``stall_timeout_s``.
        """
        consumer = AIOKafkaConsumer(
            **client_options(self._kafka),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=_FETCH_WAIT_MS,
            **fetch_options(self._kafka),
            isolation_level="read_committed" if self.read_committed else "read_uncommitted",
        )
        latest: dict[int, dict[str, bytes | None]] = {p: {} for p in partitions}
        read = 0
        bound = self.stall_timeout_s
        try:
            async with asyncio.timeout(bound):  # start and seek: bounded by request timeouts too
                await consumer.start()
        except TimeoutError:
            await consumer.stop()
            raise self._stalled([f"{self.topic}-{p} (no connection to the cluster)" for p in partitions]) from None
        try:
            tps = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(tps)
            moved: dict[TopicPartition, float] = dict.fromkeys(tps, self._clock())  # when each last made progress
            # The seek waits for every partition's offset lookup (up to request_timeout_ms);
            # one that never completes is named below, through its missing fetch responses.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bound):
                    await consumer.seek_to_beginning(*tps)
            targets: dict[TopicPartition, int] = {}
            remaining = set(tps)
            positions: dict[TopicPartition, int] = {}
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=_FETCH_WAIT_MS * 2)
                now = self._clock()
                for tp, records in batches.items():
                    values = latest[tp.partition]
                    for record in records:
                        if record.key is not None:
                            values[record.key.decode("utf-8", "replace")] = record.value
                    read += len(records)
                    if records:
                        moved[tp] = now
                for tp in list(remaining):
                    highwater = consumer.last_stable_offset(tp) if self.read_committed else consumer.highwater(tp)
                    if highwater is None:  # no fetch response yet
                        continue
                    target = targets.setdefault(tp, highwater)
                    position = await consumer.position(tp)
                    if positions.get(tp) != position:  # the first fetch response, or the read advanced
                        positions[tp] = position
                        moved[tp] = now
                    if position >= target:
                        remaining.discard(tp)
                        consumer.pause(tp)
                stalled = sorted((tp for tp in remaining if now - moved[tp] > bound), key=lambda tp: tp.partition)
                if stalled:
                    raise self._stalled(
                        [
                            f"{tp.topic}-{tp.partition} "
                            + (
                                f"(read to {positions[tp]} of {targets[tp]})"
                                if tp in targets
                                else "(no fetch response)"
                            )
                            for tp in stalled
                        ]
                    )
        finally:
            await consumer.stop()
        return latest, read

    def _stalled(self, partitions: list[str]) -> ChangelogUnavailable:
        return ChangelogUnavailable(
            f"conversation state: restore of changelog partition{'s' if len(partitions) > 1 else ''} "
            f"{', '.join(partitions)} made no progress for {self.stall_timeout_s:g}s; check that the partitions "
            "exist and have a leader (kafka-topics --describe), or raise MODWORKER_CONVERSATION__RESTORE_TIMEOUT_S"
        )


def _describe(answer: Any, topic: str) -> dict[str, Any]:
    for entry in answer:
        if entry.get("topic") == topic:
            if entry.get("error_code", 0) != 0:
                raise ChangelogUnavailable(
                    f"conversation state: cannot describe topic {topic!r} (error {entry['error_code']})"
                )
            return dict(entry)
    raise ChangelogUnavailable(f"conversation state: topic {topic!r} is not described by the broker")
