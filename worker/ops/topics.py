"""The topics the worker reads and writes, created or checked against what is stated.

``modworker topics create`` states partitions, replication factor, ``min.insync.replicas``
and retention once for every topic the configuration names: the two inputs (and the
reviews topic when reviews are on), the three outputs (plus the shadow topic when shadowing is on, and the statements of reasons' when DSA is) and the conversation state's
changelog (compacted, no retention, as many partitions as the conversation topic, since
changelog partition = input partition). Missing topics are created; existing ones are
compared with the statement, and every difference is named. Nothing existing is altered:
a partition count or a replication factor cannot be changed in place without moving data,
so the operator decides.

The producer writes with ``acks=all``: a write is acknowledged once every in-sync replica
has it, and ``min.insync.replicas`` is how many that must be at least. With replication 3
and ``min.insync.replicas=2``, one broker can be down and no acknowledged write is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from worker.config import Settings
from worker.pipeline.source import client_options
from worker.pipeline.state_changelog import CHANGELOG_CONFIGS

DEFAULT_PARTITIONS = 12
DEFAULT_REPLICATION_FACTOR = 3
DEFAULT_MIN_INSYNC_REPLICAS = 2
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000

CHECKED_CONFIGS = ("cleanup.policy", "retention.ms", "min.insync.replicas", "max.message.bytes")
"""The topic configs compared with what is stated (a new changelog also gets the worker's
own ``segment.ms``); configs not stated are left as they are."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic as stated: its role, partitions, replication factor and configs."""

    name: str
    role: str
    """``input``, ``output`` or ``changelog``."""
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        configs = ", ".join(f"{key}={value}" for key, value in sorted(self.configs.items()))
        return f"{self.partitions} partitions, replication factor {self.replication_factor}, {configs}"


@dataclass(frozen=True)
class TopicReport:
    """What ``ensure_topics`` found or did for one topic."""

    spec: TopicSpec
    outcome: str
    """``created``, ``ok``, ``differs`` (see ``differences``), ``missing`` (check only) or ``failed``."""
    differences: tuple[str, ...] = ()

    @property
    def good(self) -> bool:
        return self.outcome in ("created", "ok")

    def line(self) -> str:
        if self.outcome == "created":
            return f"created {self.spec.name} ({self.spec.role}): {self.spec.describe()}"
        if self.outcome == "ok":
            return f"ok {self.spec.name} ({self.spec.role})"
        if self.outcome == "missing":
            return f"missing {self.spec.name} ({self.spec.role}): would be created with {self.spec.describe()}"
        return f"{self.outcome} {self.spec.name} ({self.spec.role}): {'; '.join(self.differences)}"


def planned_topics(
    settings: Settings,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    replication_factor: int = DEFAULT_REPLICATION_FACTOR,
    min_insync_replicas: int = DEFAULT_MIN_INSYNC_REPLICAS,
    retention_ms: int = DEFAULT_RETENTION_MS,
) -> list[TopicSpec]:
    """Every topic ``settings`` names, as stated. Outputs also get ``max.message.bytes`` =
    ``MODWORKER_MAX_OUTPUT_BYTES``, the largest record the worker writes there."""
    retained = {"cleanup.policy": "delete", "retention.ms": str(retention_ms)}
    durable = {"min.insync.replicas": str(min_insync_replicas)}
    output = {**retained, **durable, "max.message.bytes": str(settings.max_output_bytes)}

    def spec(name: str, role: str, configs: dict[str, str]) -> TopicSpec:
        return TopicSpec(name, role, partitions, replication_factor, configs)

    topics = [
        spec(settings.content_topic, "input", {**retained, **durable}),
        spec(settings.conversation_topic, "input", {**retained, **durable}),
        spec(settings.verdict_topic, "output", output),
        spec(settings.violation_topic, "output", output),
        spec(settings.dead_letter_topic, "output", output),
    ]
    if settings.reviews.enabled:
        topics.append(spec(settings.reviews.topic, "input", {**retained, **durable}))
    if settings.shadow.enabled:
        topics.append(spec(settings.shadow.topic, "output", output))
    if settings.dsa.enabled:
        topics.append(spec(settings.dsa.topic, "output", output))
    if settings.conversation.enabled:
        topics.append(spec(settings.conversation.changelog_topic, "changelog", {**CHANGELOG_CONFIGS, **durable}))
    return list({t.name: t for t in topics}.values())


async def ensure_topics(settings: Settings, specs: Sequence[TopicSpec], *, create: bool = True) -> list[TopicReport]:
    """Create the missing topics of ``specs`` (unless ``create`` is false) and compare the
    existing ones with them, one report per spec in order. Raises the admin client's
    errors (``KafkaError``, ``OSError``) when the cluster cannot be reached."""
    admin = AIOKafkaAdminClient(**client_options(settings.kafka), request_timeout_ms=30_000)
    await admin.start()
    try:
        # Every topic's metadata, no topic named: a request naming a missing topic
        # auto-creates it on brokers that allow that.
        existing = {entry["topic"]: entry for entry in await admin.describe_topics() if entry["error_code"] == 0}
        specs = _changelog_follows_conversations(settings, specs, existing)
        present = [spec for spec in specs if spec.name in existing]
        configs = await _configs(admin, [spec.name for spec in present]) if present else {}
        reports: dict[str, TopicReport] = {}
        for spec in present:
            differences = _differences(spec, existing[spec.name], configs.get(spec.name, {}))
            reports[spec.name] = TopicReport(spec, "differs" if differences else "ok", tuple(differences))
        missing = [spec for spec in specs if spec.name not in existing]
        if missing and create:
            reports.update(await _create(admin, missing))
        else:
            reports.update({spec.name: TopicReport(spec, "missing") for spec in missing})
    finally:
        await admin.close()
    return [reports[spec.name] for spec in specs]


def _changelog_follows_conversations(
    settings: Settings, specs: Sequence[TopicSpec], existing: dict[str, Any]
) -> list[TopicSpec]:
    """The changelog's partition count is the conversation topic's, when that exists."""
    conversations = existing.get(settings.conversation_topic)
    if conversations is None:
        return list(specs)
    count = len(conversations["partitions"])
    return [
        TopicSpec(s.name, s.role, count, s.replication_factor, s.configs) if s.role == "changelog" else s for s in specs
    ]


async def _configs(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, dict[str, str]]:
    answers = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name, configs=dict.fromkeys(CHECKED_CONFIGS)) for name in names]
    )
    found: dict[str, dict[str, str]] = {}
    for answer in answers:
        for error_code, _message, _type, name, entries in answer.resources:
            if error_code == 0:
                found[name] = {entry[0]: entry[1] for entry in entries if entry[1] is not None}
    return found


def _differences(spec: TopicSpec, described: dict[str, Any], configs: dict[str, str]) -> list[str]:
    differences = []
    partitions = described["partitions"]
    if len(partitions) != spec.partitions:
        differences.append(f"{len(partitions)} partitions (stated {spec.partitions})")
    replication = min((len(p["replicas"]) for p in partitions), default=0)
    if replication != spec.replication_factor:
        differences.append(f"replication factor {replication} (stated {spec.replication_factor})")
    for key, wanted in sorted(spec.configs.items()):
        if key not in CHECKED_CONFIGS:
            continue
        actual = configs.get(key)
        if actual is None:
            differences.append(f"{key} unreadable (stated {wanted})")
        elif actual != wanted:
            differences.append(f"{key}={actual} (stated {wanted})")
    return differences


async def _create(admin: AIOKafkaAdminClient, specs: Sequence[TopicSpec]) -> dict[str, TopicReport]:
    answer = await admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.configs)) for s in specs]
    )
    errors = {name: (code, message[0] if message else "") for name, code, *message in answer.topic_errors}
    reports = {}
    for spec in specs:
        code, message = errors.get(spec.name, (0, ""))
        if code == 0:
            reports[spec.name] = TopicReport(spec, "created")
        else:
            reports[spec.name] = TopicReport(spec, "failed", (f"the broker refused it (error {code}: {message})",))
    return reports
