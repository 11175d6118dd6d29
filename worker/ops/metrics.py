"""Prometheus metrics: every metric of the worker declared once, here.

All names start with ``moderation_worker_``. They live in this module's own ``REGISTRY``
(with the process and Python platform collectors), which ``worker.ops.health`` serves on
``/metrics``; nothing is registered in prometheus-client's global default registry, so
importing this module twice-over in tests or next to other libraries never collides.

Three kinds of metric, by how they are updated:

- **Event counters and histograms** updated on the hot path by the stage where the event
  happens (``worker.pipeline.source``, ``worker.app``, ``worker.pipeline.batching``,
  ``worker.backends.http``). Per-message updates go through ``LabelCache`` children, bound
  once per label set, so a message costs a dict lookup and a locked add, never a
  ``.labels()`` call with its validation; records read are counted once per partition
  and poll.
- **Gauges read at scrape time** (in-flight messages, paused and assigned partitions):
  ``bind_worker`` points them at the running worker; nothing is done per message.
- **Collectors**: the circuit-breaker state and openings of every watched breaker
  (``watch_breaker``), the dedup cache's hits and misses (``cache_stats()`` of the bound
  worker's backend), and the consumer lag, which ``worker.ops.lag.LagSampler`` refreshes just
  before each scrape (lag needs an ``await`` on the consumer, a collector cannot await).

The README's operations section (docs/operations.md) lists every metric; keep it in step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.ops.status import WorkerStatus

PREFIX = "moderation_worker"

# ``*_created`` series double the output and no dashboard here uses them (process-wide).
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
"""The registry ``/metrics`` serves."""

ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Latency buckets (seconds). Backend calls: tens of ms to the 60 s retry budget. End to
# end: from the producer's timestamp to the verdict's acknowledgement, so a backlog shows
# up here as minutes.
_FAST_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BACKEND_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_END_TO_END_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# -- pipeline ---------------------------------------------------------------------------

MESSAGES_CONSUMED = Counter(
    f"{PREFIX}_messages_consumed", "Records read from the input topics.", ["topic"], registry=REGISTRY
)
MESSAGES_DECODED = Counter(
    f"{PREFIX}_messages_decoded", "Records decoded into a valid event.", ["topic"], registry=REGISTRY
)
MESSAGES_DEAD_LETTERED = Counter(
    f"{PREFIX}_messages_dead_lettered",
    "Records sent to the dead-letter topic, by origin topic, stage (decode, backend) and error type.",
    ["topic", "stage", "error_type"],
    registry=REGISTRY,
)
VERDICTS = Counter(
    f"{PREFIX}_verdicts",
    "Verdicts acknowledged by the broker, by kind (content, conversation), action and whether degraded.",
    ["kind", "action", "degraded"],
    registry=REGISTRY,
)
VIOLATIONS = Counter(
    f"{PREFIX}_violations",
    "Policy categories over threshold in acknowledged verdicts (one verdict may count in several).",
    ["category"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    f"{PREFIX}_batch_size", "Inputs per backend batch.", ["kind"], buckets=_BATCH_SIZES, registry=REGISTRY
)
BATCH_WAIT = Histogram(
    f"{PREFIX}_batch_wait_seconds",
    "Time a batch stayed open: from its first input to its flush (count, bytes or max wait).",
    ["kind"],
    buckets=_FAST_S,
    registry=REGISTRY,
)
END_TO_END_LATENCY = Histogram(
    f"{PREFIX}_end_to_end_latency_seconds",
    "From the input record's timestamp to its verdict's acknowledgement by the broker.",
    ["kind"],
    buckets=_END_TO_END_S,
    registry=REGISTRY,
)
COMMIT_LATENCY = Histogram(
    f"{PREFIX}_commit_latency_seconds", "Offset commits to the group coordinator.", buckets=_FAST_S, registry=REGISTRY
)
COMMIT_FAILURES = Counter(
    f"{PREFIX}_commit_failures",
    "Offset commits the coordinator refused (retried by the next commit).",
    registry=REGISTRY,
)
TRANSACTIONS = Counter(
    f"{PREFIX}_transactions",
    "Per-partition transactions in MODWORKER_DELIVERY=exactly_once, by outcome: committed, aborted (the partition "
    "goes back to the group; its next owner reads from the committed offset), fenced (a newer owner took the partition's transactional id: this member's producer of it "
    "is a zombie and publishes nothing more for it).",
    ["outcome"],
    registry=REGISTRY,
)
REBALANCES = Counter(
    f"{PREFIX}_rebalances",
    "Rebalances this member took part in (event=assigned, one per completed rebalance) and those that took "
    "partitions away from it (event=revoked).",
    ["event"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    f"{PREFIX}_in_flight_messages", "Messages read and not yet finished (outputs acknowledged).", registry=REGISTRY
)
IN_FLIGHT_BYTES = Gauge(
    f"{PREFIX}_in_flight_bytes",
    "Input value bytes of the messages read and not yet finished (against MODWORKER_MAX_IN_FLIGHT_BYTES).",
    registry=REGISTRY,
)
PAUSED_PARTITIONS = Gauge(
    f"{PREFIX}_paused_partitions", "Assigned partitions paused for backpressure.", registry=REGISTRY
)
ASSIGNED_PARTITIONS = Gauge(
    f"{PREFIX}_assigned_partitions", "Input partitions assigned to this member.", registry=REGISTRY
)
CONSUMER_LAG = Gauge(
    f"{PREFIX}_consumer_lag",
    "Messages in the partition not yet read by this member: highwater minus position (sampled per scrape).",
    ["topic", "partition"],
    registry=REGISTRY,
)
TASK_FAILURES = Counter(
    f"{PREFIX}_task_failures",
    "Batch tasks that raised (a bug); each one stops the worker with its messages uncommitted.",
    registry=REGISTRY,
)
OUTPUTS_TRIMMED = Counter(
    f"{PREFIX}_outputs_trimmed",
    "Outputs made to fit MODWORKER_MAX_OUTPUT_BYTES: verdicts without metadata/text, dead letters truncated.",
    ["output"],
    registry=REGISTRY,
)
PARTITION_STUCK_OFFSET = Gauge(
    f"{PREFIX}_partition_stuck_offset",
    "Partitions held (not read) because their uncommitted span passed MODWORKER_MAX_UNCOMMITTED_SPAN: "
    "the offset each is stuck at. Absent when none is.",
    ["topic", "partition"],
    registry=REGISTRY,
)
WORKER_INFO = Info(
    f"{PREFIX}_build", "The running worker: version, backend, policy version, consumer group.", registry=REGISTRY
)

# -- conversation state -----------------------------------------------------------------

CONVERSATIONS_HELD = Gauge(
    f"{PREFIX}_conversations_held",
    "Conversations held in the conversation state, over all owned partitions.",
    registry=REGISTRY,
)
CONVERSATION_STATE_BYTES = Gauge(
    f"{PREFIX}_conversation_state_bytes",
    "Approximate memory of the conversation state (bounded by MODWORKER_CONVERSATION__MAX_BYTES).",
    registry=REGISTRY,
)
CONVERSATION_EVICTIONS = Counter(
    f"{PREFIX}_conversation_evictions",
    "Conversations forgotten, by reason: ttl (idle too long) or memory (least recently active at the bound).",
    ["reason"],
    registry=REGISTRY,
)
CONVERSATION_RESTORE = Histogram(
    f"{PREFIX}_conversation_restore_seconds",
    "Restoring the conversation state of newly assigned partitions from the changelog topic.",
    buckets=_BACKEND_S,
    registry=REGISTRY,
)

# -- backend ----------------------------------------------------------------------------

BACKEND_REQUEST_LATENCY = Histogram(
    f"{PREFIX}_backend_request_duration_seconds",
    "One HTTP try to a remote moderation API, answered or failed.",
    ["api", "path"],
    buckets=_BACKEND_S,
    registry=REGISTRY,
)
BACKEND_REQUESTS = Counter(
    f"{PREFIX}_backend_requests",
    "HTTP tries to a remote moderation API, by status (the HTTP code, or timeout / transport_error).",
    ["api", "status"],
    registry=REGISTRY,
)
BACKEND_ERRORS = Counter(
    f"{PREFIX}_backend_errors",
    "Backend calls that failed for the pipeline after retries, by error (unavailable, circuit_open, auth, rejected).",
    ["api", "error"],
    registry=REGISTRY,
)
BACKEND_RETRIES = Counter(
    f"{PREFIX}_backend_retries", "Tries repeated after a transient failure.", ["api"], registry=REGISTRY
)
LLM_TOKENS = Counter(
    f"{PREFIX}_llm_tokens",
    "Tokens a chat-completions server counted for the llm backend (its usage), by dialect and kind (prompt, "
    "completion); every try, retries included.",
    ["dialect", "kind"],
    registry=REGISTRY,
)
LLM_REQUESTS = Counter(
    f"{PREFIX}_llm_requests",
    "Chat completions the llm backend sent, by dialect; every try, retries included (a guard that takes one "
    "policy category a request sends one per category per input).",
    ["dialect"],
    registry=REGISTRY,
)
LLM_UNPARSEABLE = Counter(
    f"{PREFIX}_llm_unparseable_answers",
    "Answers of the llm backend's model that did not follow the dialect's format (each try; the input is "
    "dead-lettered as llm_unparseable when its retries are spent).",
    ["dialect"],
    registry=REGISTRY,
)
LLM_UNKNOWN_CATEGORIES = Counter(
    f"{PREFIX}_llm_unknown_categories",
    "Keys of a json-dialect answer naming no category the prompt asked about, ignored, by that key "
    "(each try; cut to 40 characters, and past 20 distinct keys counted as _other).",
    ["category"],
    registry=REGISTRY,
)
LLM_MISSING_CATEGORIES = Counter(
    f"{PREFIX}_llm_missing_categories",
    "Policy categories a json-dialect answer gave no score for, by category (each try; asked again, and when "
    "every try leaves one out the verdict is degraded).",
    ["category"],
    registry=REGISTRY,
)
POISON_SPLITS = Counter(
    f"{PREFIX}_backend_batch_splits",
    "Batches split in halves because they failed while the backend answered other batches (poison search).",
    registry=REGISTRY,
)
BACKEND_PROBES = Counter(
    f"{PREFIX}_backend_probes",
    "One-input calls made by a batch that waited with no success meanwhile, to tell an outage "
    "(failed) from a batch the backend fails alone (answered).",
    ["result"],
    registry=REGISTRY,
)
POISON_INPUTS = Counter(
    f"{PREFIX}_backend_poison_inputs",
    "Inputs dead-lettered as backend_failed: they failed alone MODWORKER_SCORING__POISON_ATTEMPTS times "
    "while the backend answered others.",
    registry=REGISTRY,
)

# -- shadow evaluation ------------------------------------------------------------------

SHADOW_DECISIONS = Counter(
    f"{PREFIX}_shadow_decisions",
    "Shadow verdicts by the live verdict's action and the shadow's (agreement when equal).",
    ["live_action", "shadow_action"],
    registry=REGISTRY,
)
SHADOW_CATEGORIES = Counter(
    f"{PREFIX}_shadow_categories",
    "Violated categories of shadowed inputs: found by both, by the live verdict only, or by the shadow only.",
    ["category", "outcome"],
    registry=REGISTRY,
)
SHADOW_DROPPED = Counter(
    f"{PREFIX}_shadow_dropped", "Sampled inputs dropped because the shadow queue was full.", registry=REGISTRY
)
SHADOW_FAILURES = Counter(
    f"{PREFIX}_shadow_failures",
    "Shadow inputs lost to a failure, by stage (offer, start, score, decide, publish); the live path is unaffected.",
    ["stage"],
    registry=REGISTRY,
)
# -- human review decisions -------------------------------------------------------------

REVIEW_DECISIONS = Counter(
    f"{PREFIX}_review_decisions",
    "Review decisions applied, by the machine verdict's action (unknown: not remembered) and the reviewer's.",
    ["machine_action", "human_action"],
    registry=REGISTRY,
)
REVIEW_CATEGORIES = Counter(
    f"{PREFIX}_review_categories",
    "Categories of review decisions against the machine verdict's: confirmed (both), added (the reviewer only) "
    "or removed (the machine only).",
    ["category", "outcome"],
    registry=REGISTRY,
)
CASCADE_INPUTS = Counter(
    f"{PREFIX}_cascade_inputs",
    "Inputs scored by the cascade, by the stage that decided (first, then) or unavailable (then stage down).",
    ["decided_by"],
    registry=REGISTRY,
)
CASCADE_THEN_CALL_SIZE = Histogram(
    f"{PREFIX}_cascade_then_call_size",
    "Inputs per cascade second-stage call (escalated inputs of concurrent batches, pooled); its count: the calls.",
    ["kind"],
    buckets=_BATCH_SIZES,
    registry=REGISTRY,
)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
"""Value of ``moderation_worker_backend_circuit_state`` for each breaker state."""


# -- cheap label binding ----------------------------------------------------------------

M = TypeVar("M", Counter, Histogram, Gauge)


class LabelCache(Generic[M]):
    """``cache(*labels)`` returns the metric's child for those label values, bound once.

    For label sets that are small and never removed (topics, kinds, actions, categories).
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


consumed = LabelCache(MESSAGES_CONSUMED)
decoded = LabelCache(MESSAGES_DECODED)
dead_lettered = LabelCache(MESSAGES_DEAD_LETTERED)
verdicts = LabelCache(VERDICTS)
violations = LabelCache(VIOLATIONS)
batch_size = LabelCache(BATCH_SIZE)
batch_wait = LabelCache(BATCH_WAIT)
end_to_end_latency = LabelCache(END_TO_END_LATENCY)
rebalances = LabelCache(REBALANCES)
transactions = LabelCache(TRANSACTIONS)
backend_request_latency = LabelCache(BACKEND_REQUEST_LATENCY)
backend_requests = LabelCache(BACKEND_REQUESTS)
backend_errors = LabelCache(BACKEND_ERRORS)
backend_retries = LabelCache(BACKEND_RETRIES)
llm_tokens = LabelCache(LLM_TOKENS)
llm_requests = LabelCache(LLM_REQUESTS)
llm_unparseable = LabelCache(LLM_UNPARSEABLE)
llm_missing_categories = LabelCache(LLM_MISSING_CATEGORIES)
_llm_unknown_categories = LabelCache(LLM_UNKNOWN_CATEGORIES)
_UNKNOWN_CATEGORY_CHARS = 40
_UNKNOWN_CATEGORY_NAMES = 20


def llm_unknown_category(key: str) -> Counter:
    """The counter child of an unknown answer key: the key comes from a model's answer, so its
    label is cut and the distinct labels are capped (the rest are ``_other``)."""
    label = key[:_UNKNOWN_CATEGORY_CHARS]
    known = _llm_unknown_categories._children
    if (label,) not in known and len(known) >= _UNKNOWN_CATEGORY_NAMES:
        label = "_other"
    return _llm_unknown_categories(label)


outputs_trimmed = LabelCache(OUTPUTS_TRIMMED)
conversation_evictions = LabelCache(CONVERSATION_EVICTIONS)
shadow_decisions = LabelCache(SHADOW_DECISIONS)
shadow_categories = LabelCache(SHADOW_CATEGORIES)
shadow_failures = LabelCache(SHADOW_FAILURES)
cascade_inputs = LabelCache(CASCADE_INPUTS)
cascade_then_call_size = LabelCache(CASCADE_THEN_CALL_SIZE)
review_decisions = LabelCache(REVIEW_DECISIONS)
review_categories = LabelCache(REVIEW_CATEGORIES)


def observe_backend_request(api: str, path: str, status: str, seconds: float) -> None:
    """One HTTP try finished: ``status`` is the HTTP code, ``timeout`` or ``transport_error``."""
    backend_request_latency(api, path).observe(seconds)
    backend_requests(api, status).inc()


# -- scrape-time gauges -----------------------------------------------------------------


def bind_worker(worker: WorkerStatus, *, version: str, group_id: str) -> None:
    """Point the scrape-time gauges at ``worker`` and label the build.

    Called once per process by whoever serves ``/metrics``; a later call rebinds (tests
    that run several workers in one process see the latest).
    """
    IN_FLIGHT.set_function(lambda: worker.in_flight)
    IN_FLIGHT_BYTES.set_function(lambda: worker.in_flight_bytes)
    ASSIGNED_PARTITIONS.set_function(lambda: len(worker.partitions.assignment()))
    PAUSED_PARTITIONS.set_function(lambda: len(worker.partitions.paused_partitions()))
    _backend_state.cache = worker.backend if hasattr(worker.backend, "cache_stats") else None
    WORKER_INFO.info(
        {
            "version": version,
            "backend": worker.backend.name,
            "policy_version": worker.policy_version,
            "group_id": group_id,
        }
    )


def bind_conversation_state(state: Any) -> None:
    """Point the conversation-state gauges at ``state`` (``conversations`` and ``bytes``
    attributes: ``worker.pipeline.conversation_state.ConversationState``); a later call rebinds."""
    CONVERSATIONS_HELD.set_function(lambda: state.conversations)
    CONVERSATION_STATE_BYTES.set_function(lambda: state.bytes)


class _BackendCollector(Collector):
    """Reads backend state at scrape time: watched circuit breakers and the dedup cache."""

    def __init__(self) -> None:
        self.breakers: dict[str, Any] = {}
        self.cache: Any = None
        """An object with ``cache_stats()`` (``worker.backends.cache.CachingBackend``), or None."""

    def describe(self) -> list[Any]:
        return list(self._families({}, None))

    def collect(self) -> Iterator[Any]:
        return self._families(dict(self.breakers), self.cache)

    @staticmethod
    def _families(breakers: dict[str, Any], cache: Any) -> Iterator[Any]:
        state = GaugeMetricFamily(
            f"{PREFIX}_backend_circuit_state",
            "Circuit breaker of a remote API: 0 closed, 1 half-open, 2 open.",
            labels=["api"],
        )
        opened = CounterMetricFamily(
            f"{PREFIX}_backend_circuit_opened", "Times the circuit breaker opened.", labels=["api"]
        )
        for api, breaker in breakers.items():
            state.add_metric([api], CIRCUIT_STATES.get(breaker.state, 2))
            opened.add_metric([api], breaker.times_opened)
        yield state
        yield opened
        stats = cache.cache_stats() if cache is not None else None
        hits = CounterMetricFamily(
            f"{PREFIX}_cache_hits", "Inputs whose scores came from the dedup cache (no backend call)."
        )
        misses = CounterMetricFamily(f"{PREFIX}_cache_misses", "Inputs looked up in the dedup cache and not found.")
        entries = GaugeMetricFamily(f"{PREFIX}_cache_entries", "Inputs held in the dedup cache.")
        if stats is not None:
            hits.add_metric([], stats.hits)
            misses.add_metric([], stats.misses)
            entries.add_metric([], stats.size)
        yield hits
        yield misses
        yield entries


_backend_state = _BackendCollector()
REGISTRY.register(_backend_state)


def watch_breaker(api: str, breaker: Any) -> None:
    """Report ``breaker`` (``worker.backends.breaker.CircuitBreaker``) under ``api``."""
    _backend_state.breakers[api] = breaker
