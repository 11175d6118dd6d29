"""The output topics' own size limit, read from the brokers at start-up.

A broker refuses a record batch larger than the topic's ``max.message.bytes``; the worker
would stop on that refusal. So at start-up the worker asks for the output topics' configs
(DescribeConfigs) and lowers its own output limit (``MODWORKER_MAX_OUTPUT_BYTES``) to the
smallest topic limit it finds: outputs are then made to fit what the brokers accept, with
no setting to keep in step. Where the configs cannot be read (no DESCRIBE_CONFIGS ACL, a
broker that reports none) the setting stands alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from worker.config import KafkaSettings
from worker.pipeline.source import client_options

MAX_MESSAGE_BYTES = "max.message.bytes"


@dataclass(frozen=True)
class OutputLimit:
    """The limit outputs must fit, and where it comes from."""

    max_bytes: int
    source: str
    """``MODWORKER_MAX_OUTPUT_BYTES``, or ``max.message.bytes of TOPIC``."""
    note: str | None = None
    """Why the topics' configs were not used (the error), or None."""


async def output_limit(kafka: KafkaSettings, topics: Iterable[str], configured: int) -> OutputLimit:
    """The smaller of ``configured`` and each existing topic's ``max.message.bytes``. Never raises."""
    names = sorted(set(topics))
    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=10_000)
    try:
        await admin.start()
        answers = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs={MAX_MESSAGE_BYTES: None}) for name in names]
        )
    except (KafkaError, OSError, TimeoutError) as err:
        return OutputLimit(configured, "MODWORKER_MAX_OUTPUT_BYTES", f"{type(err).__name__}: {err}")
    finally:
        await admin.close()
    limit = OutputLimit(configured, "MODWORKER_MAX_OUTPUT_BYTES")
    for answer in answers:
        for error_code, _message, _type, name, entries in answer.resources:
            if error_code != 0:
                continue
            for entry in entries:
                key, value = entry[0], entry[1]
                if key == MAX_MESSAGE_BYTES and value is not None and value.isdigit() and int(value) < limit.max_bytes:
                    limit = OutputLimit(int(value), f"{MAX_MESSAGE_BYTES} of {name}")
    return limit
