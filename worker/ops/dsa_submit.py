"""``modworker dsa submit``: statements of reasons from their topic to the EU DSA Transparency Database.

A consumer of its own (group ``dsa.group_id``), apart from the worker: it reads
``dsa.topic`` (``StatementOfReasons`` records, each a request body of the database API as
it stands) and posts them in batches of at most ``dsa.batch_size`` (the API takes 100 per
call) to ``{dsa.api_url}/api/v1/statements`` with the platform's token as a Bearer token.

The API, as its documentation states it (transparency.dsa.ec.europa.eu, "API
Documentation": "Creating Multiple Statements", "Errors when Creating Multiple Statements
of Reason", "PUID Error"; and its source, github.com/digital-services-act/transparency-database,
``StatementMultipleAPIController``): a call is **all or nothing**. 201 means every statement
of the call was stored. 422 means none was: either ``errors`` names, per position in the
array (``statement_<i>``), the fields that break its rules, or a ``puid`` is already stored
for the platform (``errors.existing_puids``). So each 422 is resolved and the rest sent
again, until every statement of the batch has an outcome:

- **accepted**: stored by a 201;
- **duplicate**: its ``puid`` is already stored (a statement published twice under
  at-least-once, or submitted before a crash and again after): taken as done. A ``puid``
  repeated within one batch is sent once; its repeats share its outcome;
- **dead-lettered**: the API refused its fields (the API's messages, ``field: message``,
  in ``x-modworker-dlq-message``), or its value is not a JSON object. It goes to the
  dead-letter topic unchanged, with ``x-modworker-dlq-stage: submit`` and
  ``x-modworker-dlq-error-type`` ``submission_refused`` or ``not_json``
  (``schemas.DeadLetterHeaders``); a replay is a copy back to the statements topic. A call
  refused as a whole without naming a statement (400, 413, a 422 of another shape) is split
  in halves until the one refused is found.

Transport (``worker.backends.http.RemoteApi``, the HTTP layer of the backends, with the
``MODWORKER_HTTP__*`` settings): 429 and 5xx, timeouts and connection errors are retried
with exponential backoff and jitter, waiting at least a ``Retry-After``. When that budget
is spent the batch waits and is tried again, for as long as it takes: a statement is never
skipped. 401/403 stop the command (exit 1) with a line naming ``MODWORKER_DSA__API_TOKEN``.
Any other answer (404: a wrong ``MODWORKER_DSA__API_URL``) is retried the same way, logged.

Offsets: a partition's offset is committed only past records that have an outcome, and a
dead letter counts only once the broker acknowledged it. A crash resubmits at most the
uncommitted batch, which the API refuses as duplicates: nothing is stored twice, nothing
skipped. A new group starts at the topic's beginning, whatever ``kafka.auto_offset_reset``
says (what was already stored comes back as duplicates). Records are read
``read_committed`` (statements of exactly-once workers are transactional).

SIGTERM/SIGINT: the batch in flight gets ``drain_timeout_s`` to finish; what has an outcome
is committed, the group left, and the command exits 0. On a rebalance, revoked partitions
get ``revoke_timeout_s`` the same way.

The token is sent in the ``Authorization`` header only: never logged, never in a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from worker.backends.base import BackendAuthError, BackendUnavailable
from worker.backends.http import ApiDialect, ApiRejected, RemoteApi
from worker.backends.pacing import RateLimitHeaderNames
from worker.config import ConfigError, Settings
from worker.ops.logs import DsaSubmitEvent
from worker.pipeline.sink import dead_letter_record
from worker.pipeline.source import client_options, fetch_options, make_producer
from worker.pipeline.types import Record

log = structlog.get_logger("worker.ops.dsa_submit")

STATEMENTS_PATH = "/api/v1/statements"
MAX_BATCH = 100
"""Statements per call the API takes (``'statements' => 'required|array|between:1,100'``)."""

DSA_API = ApiDialect(
    name="DSA Transparency Database",
    key_env="MODWORKER_DSA__API_TOKEN",
    base_url_env="MODWORKER_DSA__API_URL",
    # Laravel's ThrottleRequests: X-RateLimit-Limit / X-RateLimit-Remaining per window.
    rate_limit_headers=RateLimitHeaderNames(
        limit_requests="x-ratelimit-limit", remaining_requests="x-ratelimit-remaining"
    ),
)

Outcome = Literal["accepted", "duplicate", "dead_lettered"]


class SubmitFailed(Exception):
    """``dsa submit`` cannot go on (the token refused, the topic missing); ``str(err)`` says what to fix."""


def check_submit_settings(settings: Settings) -> None:
    """Raise ``ConfigError`` (one line) when ``settings`` cannot submit: no token."""
    token = settings.dsa.api_token
    if token is None or not token.get_secret_value():
        raise ConfigError(
            "configuration error: MODWORKER_DSA__API_TOKEN is not set: export the platform's token of the DSA "
            "Transparency Database (its user profile, 'Generate New Token')"
        )


@dataclass(eq=False, slots=True)
class _Item:
    """One record of a batch and what became of it."""

    record: Record
    statement: dict[str, Any] | None
    """The decoded value; None when it is not a JSON object."""
    problem: str | None = None
    """Why ``statement`` is None."""
    outcome: Outcome | None = None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)

    @property
    def puid(self) -> str | None:
        puid = self.statement.get("puid") if self.statement is not None else None
        return puid if isinstance(puid, str) else None


def _item(record: Record) -> _Item:
    if record.value is None:
        return _Item(record, None, "the record has no value (a tombstone), not a statement of reasons")
    try:
        value = json.loads(record.value)
    except (ValueError, UnicodeDecodeError) as err:
        return _Item(record, None, f"the value is not JSON: {err}")
    if not isinstance(value, dict):
        return _Item(record, None, f"the value is JSON {type(value).__name__}, not a statement object")
    return _Item(record, value)


def refused_statements(body: Any, count: int) -> dict[int, str]:
    """Position -> the API's messages (``field: message; ...``) of each statement a 422 of the
    multiple endpoint refused on its fields (``{"errors": {"statement_<i>": {field: [msg]}}}``).
    Empty when the body names no statement within ``count``."""
    errors = body.get("errors") if isinstance(body, Mapping) else None
    if not isinstance(errors, Mapping):
        return {}
    refused: dict[int, str] = {}
    for name, fields in errors.items():
        index = str(name).removeprefix("statement_")
        if not str(name).startswith("statement_") or not index.isdigit() or int(index) >= count:
            continue
        if isinstance(fields, Mapping):
            parts = [
                f"{field}: {' '.join(str(m) for m in messages) if isinstance(messages, list) else messages}"
                for field, messages in fields.items()
            ]
            refused[int(index)] = "; ".join(parts) or "refused"
        else:
            refused[int(index)] = str(fields)
    return refused


def existing_puids(body: Any) -> set[str]:
    """The ``puid`` values a 422 says are already stored: ``errors.existing_puids`` (the multiple
    endpoint) or ``existing.puid`` (the single one)."""
    if not isinstance(body, Mapping):
        return set()
    found: set[str] = set()
    errors = body.get("errors")
    if isinstance(errors, Mapping) and isinstance(errors.get("existing_puids"), list):
        found.update(str(puid) for puid in errors["existing_puids"])
    existing = body.get("existing")
    if isinstance(existing, Mapping) and isinstance(existing.get("puid"), str):
        found.add(existing["puid"])
    return found


def done_offsets(items: list[_Item]) -> dict[TopicPartition, int]:
    """Per partition, the offset to commit: past the records with an outcome, up to the
    first one without (``items`` in offset order per partition)."""
    offsets: dict[TopicPartition, int] = {}
    blocked: set[TopicPartition] = set()
    for item in items:
        tp = item.tp
        if tp in blocked:
            continue
        if item.outcome is None:
            blocked.add(tp)
            continue
        offsets[tp] = item.record.offset + 1
    return offsets


class DsaSubmitter:
    """Reads ``dsa.topic`` as group ``dsa.group_id`` and submits every statement (see the
    module docstring). ``await run()`` until ``stop()``; raises ``SubmitFailed`` when it
    cannot go on. ``transport`` is for tests needing a custom httpx transport."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        dsa = settings.dsa
        self._settings = settings
        self._batch_size = min(dsa.batch_size, MAX_BATCH)
        self._api = RemoteApi(
            DSA_API, base_url=dsa.api_url, api_key=dsa.api_token, http=settings.http, transport=transport
        )
        self._stopping = asyncio.Event()
        self._in_flight: list[_Item] | None = None
        self._batch_done = asyncio.Event()
        self._batch_done.set()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer = make_producer(settings.kafka)
        self.totals: dict[str, int] = {"accepted": 0, "duplicate": 0, "dead_lettered": 0}
        """Outcomes so far, for the stop line and tests."""

    def stop(self) -> None:
        """Ask ``run`` to finish the batch in flight (within ``drain_timeout_s``), commit and return."""
        self._stopping.set()

    async def run(self) -> None:
        settings = self._settings
        kafka = settings.kafka
        dsa = settings.dsa
        self._consumer = consumer = AIOKafkaConsumer(
            **client_options(kafka),
            group_id=dsa.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            max_poll_records=self._batch_size,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            **fetch_options(kafka),
            isolation_level="read_committed",
        )
        await self._api.start()
        try:
            await self._producer.start()
            await consumer.start()
            if dsa.topic not in await consumer.topics():
                raise SubmitFailed(
                    f"topic {dsa.topic} does not exist: create it (modworker topics create, with "
                    "MODWORKER_DSA__ENABLED=true) or set MODWORKER_DSA__TOPIC"
                )
            consumer.subscribe([dsa.topic], listener=_Listener(self._on_revoke))
            log.info(
                DsaSubmitEvent.STARTED,
                topic=dsa.topic,
                group_id=dsa.group_id,
                api_url=dsa.api_url,
                batch_size=self._batch_size,
            )
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=self._batch_size)
                records = [record for part in batches.values() for record in part]
                if records:
                    await self._batch([_item(record) for record in records])
        finally:
            await self._close()
        log.info(DsaSubmitEvent.STOPPED, **self.totals)

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        with contextlib.suppress(KafkaError, OSError):
            if consumer is not None:
                await consumer.stop()  # leaves the group
        with contextlib.suppress(KafkaError, OSError):
            await self._producer.stop()
        await self._api.close()

    # -- one batch ---------------------------------------------------------------------------

    async def _batch(self, items: list[_Item]) -> None:
        """Give every item an outcome (or stop trying on SIGTERM past the drain timeout), then
        commit what has one."""
        self._in_flight = items
        self._batch_done.clear()
        work = asyncio.ensure_future(self._resolve(items))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((work, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await asyncio.wait((work,), timeout=self._settings.drain_timeout_s)
            if not work.done():
                work.cancel()
                log.warning(DsaSubmitEvent.DRAIN_TIMEOUT, pending=sum(1 for i in items if i.outcome is None))
            with contextlib.suppress(asyncio.CancelledError):
                await work  # raises SubmitFailed
        finally:
            stopping.cancel()
            try:
                await self._commit(items)
            finally:
                self._in_flight = None
                self._batch_done.set()
        counts = {name: sum(1 for i in items if i.outcome == name) for name in self.totals}
        for name, count in counts.items():
            self.totals[name] += count
        log.info(DsaSubmitEvent.BATCH, records=len(items), **counts)

    async def _resolve(self, items: list[_Item]) -> None:
        for item in items:
            if item.statement is None:
                await self._dead_letter(item, "not_json", item.problem or "not a statement of reasons")
        pending = [item for item in items if item.outcome is None]
        while pending:
            # One statement per puid per call: the API refuses a call that repeats one.
            sent: list[_Item] = []
            held: list[_Item] = []
            puids: set[str] = set()
            for item in pending:
                puid = item.puid
                if puid is not None and puid in puids:
                    held.append(item)
                    continue
                if puid is not None:
                    puids.add(puid)
                sent.append(item)
            await self._submit(sent)
            done = {item.puid for item in sent if item.outcome in ("accepted", "duplicate")}
            for item in held:
                if item.puid in done:
                    item.outcome = "duplicate"
            pending = [item for item in held if item.outcome is None]

    async def _submit(self, items: list[_Item]) -> None:
        """Post ``items`` (distinct puids) until each has an outcome."""
        while items:
            try:
                await self._post(items)
            except ApiRejected as err:
                refused = refused_statements(err.body, len(items))
                if refused:
                    for index, message in sorted(refused.items()):
                        await self._dead_letter(items[index], "submission_refused", message)
                    items = [item for item in items if item.outcome is None]
                    continue
                existing = existing_puids(err.body)
                known = [item for item in items if item.puid in existing]
                if known:
                    for item in known:
                        item.outcome = "duplicate"
                    log.info(DsaSubmitEvent.DUPLICATES, count=len(known))
                    items = [item for item in items if item.outcome is None]
                    continue
                if len(items) == 1:
                    await self._dead_letter(items[0], "submission_refused", f"HTTP {err.status}: {err.message}")
                    return
                half = len(items) // 2  # refused as a whole: find the statement it is about
                await self._submit(items[:half])
                await self._submit(items[half:])
                return
            for item in items:
                item.outcome = "accepted"
            return

    async def _post(self, items: list[_Item]) -> None:
        """One accepted call, however long the API takes to answer; raises ``ApiRejected``
        (4xx on the content) or ``SubmitFailed`` (the token refused)."""
        body = {"statements": [item.statement for item in items]}
        while True:
            try:
                await self._api.post(STATEMENTS_PATH, body)
                return
            except BackendAuthError:
                raise SubmitFailed(
                    "the DSA Transparency Database refused the token (HTTP 401/403): check MODWORKER_DSA__API_TOKEN "
                    "(generating a new token invalidates the old one) and MODWORKER_DSA__API_URL (sandbox or "
                    "production)"
                ) from None
            except BackendUnavailable as err:
                wait = max(err.retry_in_s or 0.0, self._settings.http.retry_max_wait_s)
                log.warning(DsaSubmitEvent.API_UNAVAILABLE, reason=str(err), statements=len(items), wait_s=wait)
                await asyncio.sleep(wait)

    async def _dead_letter(self, item: _Item, error_type: str, message: str) -> None:
        settings = self._settings
        out = dead_letter_record(
            item.record,
            topic=settings.dead_letter_topic,
            stage="submit",
            error_type=error_type,
            message=message,
            max_bytes=settings.max_output_bytes,
        )
        await self._producer.send_and_wait(out.topic, out.value, key=out.key, headers=out.headers)
        item.outcome = "dead_lettered"
        log.warning(
            DsaSubmitEvent.REFUSED,
            puid=item.puid,
            partition=item.record.partition,
            offset=item.record.offset,
            error_type=error_type,
            reason=message,
        )

    # -- offsets -------------------------------------------------------------------------------

    async def _commit(self, items: list[_Item]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        owned = consumer.assignment()
        offsets = {tp: OffsetAndMetadata(o, "") for tp, o in done_offsets(items).items() if tp in owned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as err:  # a rebalance took the partitions: their new owner resubmits
            log.warning(DsaSubmitEvent.COMMIT_FAILED, error=f"{type(err).__name__}: {err}")

    async def _on_revoke(self, revoked: set[TopicPartition]) -> None:
        items = self._in_flight
        if items is None or not any(item.tp in revoked for item in items):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._batch_done.wait(), self._settings.revoke_timeout_s)
        if not self._batch_done.is_set():
            await self._commit(items)  # what has an outcome; the new owner resubmits the rest


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoke: Callable[[set[TopicPartition]], Awaitable[None]]) -> None:
        self._on_revoke = on_revoke

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._on_revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None


async def submit_until_signalled(settings: Settings) -> None:
    """Run a ``DsaSubmitter`` until SIGTERM or SIGINT (then it drains, commits and returns)."""
    submitter = DsaSubmitter(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, submitter.stop)
    try:
        await submitter.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
