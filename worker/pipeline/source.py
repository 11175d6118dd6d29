"""Source stage: the consumer-group member.

One aiokafka consumer per process, subscribed to the input topics, with manual commits
(auto-commit off: only the offset tracker decides what is committed), a rebalance
listener calling the app's ``on_assign``/``on_revoke``, pause/resume of all assigned partitions for
backpressure, and ``hold``/``release`` of single partitions (``span_guard``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import TopicPartition

from worker.config import KafkaSettings, Settings
from worker.ops import metrics


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka keyword arguments shared by consumer, producer and admin clients."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
    if kafka.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return options


def fetch_options(kafka: KafkaSettings) -> dict[str, int]:
    """aiokafka keyword arguments bounding what a consumer's fetch responses hold."""
    return {
        "max_partition_fetch_bytes": kafka.max_partition_fetch_bytes,
        "fetch_max_bytes": kafka.fetch_max_bytes,
    }


def make_producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """The producer all outputs go through: acks from all in-sync replicas."""
    options = {
        **client_options(kafka),
        "acks": "all",
        "enable_idempotence": kafka.enable_idempotence,
        "linger_ms": 5,
        **overrides,
    }
    return AIOKafkaProducer(**options)


class KafkaAccessDenied(Exception):
    """The brokers refused the worker's credentials or its ACLs deny what it needs.
    ``str(err)`` is one line naming the setting or the ACL to fix (never the password)."""


def access_denied(err: BaseException, settings: Settings) -> KafkaAccessDenied | None:
    """The one-line reason for an authorization error of a Kafka client, or None when
    ``err`` is something else."""
    from aiokafka import errors

    principal = f"User:{settings.kafka.sasl_username}" if settings.kafka.sasl_username else "the worker's principal"
    if isinstance(err, errors.TopicAuthorizationFailedError):
        inputs = {settings.content_topic, settings.conversation_topic}
        if settings.reviews.enabled:
            inputs.add(settings.reviews.topic)
        known = inputs | {settings.verdict_topic, settings.violation_topic, settings.dead_letter_topic}
        named = sorted({str(t) for arg in err.args for t in (arg if isinstance(arg, set | list | tuple) else [arg])})
        topics = [t for t in named if t in known or t == settings.conversation.changelog_topic]
        if not topics:  # the error names no topic of ours: say what it said and what is needed
            return KafkaAccessDenied(
                f"Kafka denied access to a topic (TopicAuthorizationFailedError: {err}): grant {principal} READ "
                "on the input topics and WRITE on the output topics"
            )
        what = "READ" if set(topics) & inputs else "WRITE"
        return KafkaAccessDenied(
            f"Kafka denied access to topic {', '.join(topics)} (TopicAuthorizationFailedError): grant {principal} "
            f"{what} on it"
        )
    if isinstance(err, errors.GroupAuthorizationFailedError):
        return KafkaAccessDenied(
            f"Kafka denied access to consumer group {settings.group_id} (GroupAuthorizationFailedError): grant "
            f"{principal} READ on the group (MODWORKER_GROUP_ID)"
        )
    if isinstance(err, errors.ClusterAuthorizationFailedError):
        return KafkaAccessDenied(
            f"Kafka denied a cluster operation (ClusterAuthorizationFailedError): grant {principal} IDEMPOTENT_WRITE on "
            "the cluster, or WRITE on the output topics"
        )
    return None


async def authentication_failure(kafka: KafkaSettings) -> KafkaAccessDenied | None:
    """With SASL, whether the first bootstrap server rejects the credentials: aiokafka
    reports that only as "Unable to bootstrap"; this names the settings to fix."""
    from aiokafka import errors
    from aiokafka.conn import create_conn

    if not kafka.security_protocol.startswith("SASL") or not kafka.bootstrap_servers:
        return None
    options = client_options(kafka)
    host, _, port = kafka.bootstrap_servers.split(",")[0].strip().rpartition(":")
    try:
        conn = await create_conn(
            host,
            int(port),
            request_timeout_ms=5000,
            ssl_context=options.get("ssl_context"),
            security_protocol=kafka.security_protocol,
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=options["sasl_plain_password"],
        )
    except errors.SaslAuthenticationFailed:
        return KafkaAccessDenied(
            f"Kafka at {kafka.bootstrap_servers} rejected the SASL credentials of user {kafka.sasl_username!r} "
            f"({kafka.sasl_mechanism}): check MODWORKER_KAFKA__SASL_USERNAME and MODWORKER_KAFKA__SASL_PASSWORD"
        )
    except (errors.KafkaError, OSError, ValueError, TimeoutError):
        return None
    conn.close()
    return None


RebalanceCallback = Callable[[list[TopicPartition]], Awaitable[None]]
"""Called with the partitions (sorted) a rebalance revokes or assigns."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assign: RebalanceCallback, on_revoke: RebalanceCallback) -> None:
        self._on_assign = on_assign
        self._on_revoke = on_revoke

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._on_revoke(sorted(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._on_assign(sorted(assigned))


class Source:
    """Reads records of the input topics as a member of ``settings.group_id``."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_assign: RebalanceCallback,
        on_revoke: RebalanceCallback,
        rebalance_timeout_ms: int,
    ) -> None:
        kafka = settings.kafka
        self._kafka = kafka
        self._topics = [settings.content_topic, settings.conversation_topic]
        if settings.reviews.enabled:
            self._topics.append(settings.reviews.topic)
        self._listener = _Listener(on_assign, on_revoke)
        self._consumer = AIOKafkaConsumer(
            **client_options(kafka),
            group_id=settings.group_id,
            # Static membership: a restart within the session timeout keeps this member's
            # partitions (the broker waits for it; aiokafka sends no LeaveGroup on close).
            group_instance_id=kafka.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=kafka.auto_offset_reset,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            rebalance_timeout_ms=rebalance_timeout_ms,
            max_poll_records=kafka.max_poll_records,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            **fetch_options(kafka),
            # Exactly-once: inputs written in transactions upstream are read once committed.
            isolation_level="read_committed" if settings.delivery == "exactly_once" else "read_uncommitted",
        )
        self.paused = False
        self._held: dict[TopicPartition, set[str]] = {}

    async def start(self) -> None:
        """Start the consumer and join the group. Raises ``KafkaAccessDenied`` when an
        input topic is not authorized: aiokafka would only log it and read the others."""
        await self._consumer.start()
        await self._check_topics_authorized()
        self._consumer.subscribe(self._topics, listener=self._listener)

    async def _check_topics_authorized(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient
        from aiokafka.errors import TopicAuthorizationFailedError

        admin = AIOKafkaAdminClient(**client_options(self._kafka))
        await admin.start()
        try:
            described = await admin.describe_topics(self._topics)
        finally:
            await admin.close()
        denied = [t["topic"] for t in described if t.get("error_code") == TopicAuthorizationFailedError.errno]
        if denied:
            raise TopicAuthorizationFailedError(*denied)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self, *, timeout_ms: int, max_records: int) -> list[ConsumerRecord]:
        """Records of all assigned, unpaused partitions, each partition in offset order."""
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        for tp, records in batches.items():  # counted per partition and poll, not per record
            metrics.consumed(tp.topic).inc(len(records))
        if len(batches) == 1:
            return next(iter(batches.values()))
        return [record for records in batches.values() for record in records]

    def pause(self, tps: list[TopicPartition] | None = None) -> None:
        """Stop fetching ``tps`` (default: everything assigned) until ``resume``."""
        self._consumer.pause(*(tps if tps is not None else self._consumer.assignment()))
        self.paused = True

    def resume(self) -> None:
        """Resume every assigned partition except those held (``hold``)."""
        self._consumer.resume(*(self._consumer.assignment() - set(self._held)))
        self.paused = False

    def hold(self, tps: list[TopicPartition], reason: str) -> None:
        """Keep ``tps`` paused for ``reason`` until ``release(tps, reason)``, whatever
        ``pause``/``resume`` do meanwhile. Holds of different reasons add up: a partition
        resumes only when every reason released it (e.g. a state restore and a stuck span)."""
        for tp in tps:
            self._held.setdefault(tp, set()).add(reason)
        self._consumer.pause(*tps)

    def release(self, tps: list[TopicPartition], reason: str) -> None:
        """End ``reason``'s hold: partitions no longer held for any reason resume, if still
        assigned and unless backpressure has everything paused."""
        freed = []
        for tp in tps:
            reasons = self._held.get(tp)
            if reasons is None:
                continue
            reasons.discard(reason)
            if not reasons:
                del self._held[tp]
                freed.append(tp)
        if not self.paused and freed:
            assigned = self._consumer.assignment()
            self._consumer.resume(*(tp for tp in freed if tp in assigned))

    def holds(self) -> dict[TopicPartition, tuple[str, ...]]:
        """The partitions held now (``hold``), each with its reasons, sorted."""
        return {tp: tuple(sorted(reasons)) for tp, reasons in self._held.items()}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on, from the next poll."""
        self._consumer.seek(tp, offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def paused_partitions(self) -> set[TopicPartition]:
        return set(self._consumer.paused())

    async def position(self, tp: TopicPartition) -> int:
        """The offset of the next record the consumer will hand out for ``tp``."""
        position: int = await self._consumer.position(tp)
        return position

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end as of the last fetch response (None before the first)."""
        highwater: int | None = self._consumer.highwater(tp)
        return highwater

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await self._consumer.commit(offsets)

    async def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp``, asked of the coordinator now (None: none)."""
        offset: int | None = await self._consumer.committed(tp)
        return offset

    async def seek_to_committed(self, tps: list[TopicPartition]) -> None:
        """Read ``tps`` from the group's committed offsets as the coordinator has them now.

        Exactly-once: aiokafka fetches committed offsets as the rebalance completes, which
        can be before the previous owner's last transaction has written its markers; once
        this member's ``init_transactions`` returned, that transaction has ended."""
        offsets = await asyncio.gather(*(self.committed(tp) for tp in tps))
        for tp, offset in zip(tps, offsets, strict=True):
            if offset is not None and offset >= 0:
                self._consumer.seek(tp, offset)

    def request_rejoin(self) -> None:
        """Ask the group for a rebalance (a fenced partition: let the group settle who owns it)."""
        self._consumer._coordinator.request_rejoin()  # aiokafka has no public call for it
