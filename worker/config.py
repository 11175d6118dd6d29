"""The one configuration object, read once at start-up.

Sources, highest precedence first: environment variables (prefix ``MODWORKER_``, nested
sections joined with ``__``, e.g. ``MODWORKER_BATCH__MAX_SIZE``), then an optional YAML
file (``modworker run --config FILE``), then the defaults below. A few well-known names
are accepted without the prefix: ``KAFKA_BOOTSTRAP_SERVERS``, ``MISTRAL_API_KEY``,
``OPENAI_API_KEY``.

No other module reads the environment. ``load_settings`` raises ``ConfigError`` whose
message is one line per problem naming the environment variable and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_origin

from pydantic import BaseModel, Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "MODWORKER_"

FailPolicy = Literal["wait", "review", "allow", "fallback"]

BackendName = Literal["mistral", "openai", "local", "llm"]
"""The backends that score by themselves (``cascade`` composes two of them)."""


class ConfigError(Exception):
    """A missing or invalid setting. ``str(err)`` is ready to print to the user."""


class KafkaSettings(BaseModel):
    """Connection to the Kafka cluster; security options pass through to aiokafka."""

    bootstrap_servers: str | None = Field(
        default=None, description="Comma-separated host:port list (or KAFKA_BOOTSTRAP_SERVERS)."
    )
    client_id: str = Field(default="moderation-worker", description="Client id sent to the brokers.")
    enable_idempotence: bool = Field(
        default=True, description="Idempotent producer; the embedded test broker needs false."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*)."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password (secret).")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle for TLS (SSL / SASL_SSL).")
    group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        description="Static group membership: a name unique and stable per worker (a StatefulSet pod name); "
        "a worker restarted within the session timeout keeps its partitions, no rebalance.",
    )
    session_timeout_ms: int = Field(default=10_000, ge=1_000, description="Group session timeout.")
    heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="Group heartbeat interval.")
    max_poll_records: int = Field(default=500, ge=1, description="Records per poll, at most.")
    fetch_max_wait_ms: int = Field(
        default=500, ge=0, description="Longest a fetch waits at the broker for data; lower trades CPU for latency."
    )
    max_partition_fetch_bytes: int = Field(
        default=128 * 1024,
        ge=1_024,
        description="Record bytes one fetch response brings per partition, at most (aiokafka's default 1 MiB per "
        "partition was the largest holder of the worker's memory while draining). A record batch larger than "
        "this still comes whole, in a fetch where its partition is first (Kafka's KIP-74): it bounds memory, "
        "not the largest record.",
    )
    fetch_max_bytes: int = Field(
        default=512 * 1024,
        ge=1_024,
        description="Record bytes of one fetch response across its partitions, at most (aiokafka's default: 50 MiB); "
        "a first record batch larger than this still comes whole. Read records count against "
        "MODWORKER_MAX_IN_FLIGHT_BYTES only once polled: keep this well below it.",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a new group starts reading."
    )

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError(
                    "MODWORKER_KAFKA__SASL_MECHANISM is required with SASL_*: set PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(
                    "MODWORKER_KAFKA__SASL_USERNAME and MODWORKER_KAFKA__SASL_PASSWORD are required with SASL_*"
                )
        if self.ssl_cafile is not None and not self.ssl_cafile.is_file():
            raise ValueError(f"MODWORKER_KAFKA__SSL_CAFILE: no such file {self.ssl_cafile}")
        return self


class BatchSettings(BaseModel):
    """Micro-batching: a batch is flushed at whichever limit it reaches first."""

    max_size: int = Field(default=32, ge=1, le=10_000, description="Inputs per backend call.")
    max_bytes: int = Field(default=256_000, ge=1_024, description="Total UTF-8 bytes of text per backend call.")
    max_wait_ms: int = Field(default=50, ge=0, description="Longest an input waits for its batch to fill.")


class MistralSettings(BaseModel):
    """Mistral moderation API (``MODWORKER_BACKEND=mistral``)."""

    api_key: SecretStr | None = Field(default=None, description="Or MISTRAL_API_KEY.")
    base_url: str = Field(default="https://api.mistral.ai", description="Mistral API root.")
    model: str = Field(
        default="mistral-moderation-latest", description="Moderation model, or a fine-tuned classifier id."
    )
    endpoint: Literal["moderation", "classifier"] = Field(
        default="moderation",
        description="moderation: /v1/(chat/)moderations; classifier: /v1/(chat/)classifications with a "
        "fine-tuned classifier as model (each target/label becomes a category).",
    )
    max_input_tokens: int = Field(
        default=8_000, ge=64, description="Context per input (2411: 8k; 2603: 128k); longer inputs are chunked."
    )


class OpenAISettings(BaseModel):
    """OpenAI moderation API (``MODWORKER_BACKEND=openai``)."""

    api_key: SecretStr | None = Field(default=None, description="Or OPENAI_API_KEY.")
    base_url: str = Field(default="https://api.openai.com", description="OpenAI API root.")
    model: str = Field(default="omni-moderation-latest", description="OpenAI moderation model.")
    max_input_tokens: int = Field(default=32_000, ge=64, description="Context per input; longer inputs are chunked.")


class LlmSettings(BaseModel):
    """A chat model as judge (``MODWORKER_BACKEND=llm``): any OpenAI-compatible chat-completions server."""

    base_url: str = Field(
        default="https://api.mistral.ai",
        description="Server root; requests go to {base_url}/v1/chat/completions (vLLM, TGI, SGLang, llama.cpp ...).",
    )
    model: str = Field(default="mistral-small-latest", description="Model name the server knows.")
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key; falls back to MISTRAL_API_KEY for Mistral's URL; a local server needs none.",
    )
    dialect: Literal["json", "llama-guard", "qwen3guard", "shieldstral", "gpt-oss-safeguard", "granite-guardian"] = (
        Field(
            default="json",
            description="json: a chat model judges the policy's categories (their descriptions); "
            "llama-guard / qwen3guard: a guard model's own labels; shieldstral / gpt-oss-safeguard / "
            "granite-guardian: a guard model judges the policy's categories (docs/backends.md).",
        )
    )
    parse_retries: int = Field(
        default=1, ge=0, le=10, description="Extra tries for an answer that cannot be parsed; then llm_unparseable."
    )
    json_mode: bool = Field(
        default=True, description="json dialect: send response_format json_object (false for servers without it)."
    )
    logprobs: bool = Field(
        default=True, description="Guard dialects: ask for logprobs to score P(unsafe); without them scores are labels."
    )
    max_answer_tokens: int | None = Field(
        default=None, ge=1, description="max_tokens of each answer; unset: enough for the dialect's answer."
    )
    max_input_tokens: int = Field(
        default=8_000, ge=64, description="Context per input; longer texts are chunked, long conversations trimmed."
    )
    max_questions_in_flight: int = Field(
        default=4,
        ge=1,
        le=64,
        description="shieldstral / granite-guardian: requests in flight per input (one per policy category).",
    )
    reasoning_effort: Literal["low", "medium", "high"] = Field(
        default="low", description="gpt-oss-safeguard: reasoning_effort of each request (more: slower, dearer)."
    )
    think: bool = Field(
        default=False, description="granite-guardian: thinking mode (reasons before the score: far more answer tokens)."
    )


class LocalSettings(BaseModel):
    """Local model (``MODWORKER_BACKEND=local``, needs ``moderation-worker[local]``)."""

    model: str = Field(
        default="starter",
        description="'starter' (the bundled fine-tuned MiniLM), 'starter-frozen-head' (the previous starter), "
        "a model directory, or an installed package shipping one.",
    )
    kind: Literal["auto", "sequence-classification", "embedding-head"] = Field(
        default="auto",
        description="auto: embedding-head when the directory has head.json, else sequence-classification.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Model label -> category name; an empty name drops the label."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA when torch sees a GPU, else CPU."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: float16 on CUDA, float32 on CPU; half precision needs CUDA."
    )
    max_tokens_per_batch: int | None = Field(
        default=None, ge=16, description="Padded tokens per forward pass; unset: 1024 on CPU, 16384 on CUDA."
    )
    max_length: int = Field(default=256, ge=8, description="Tokens per input; longer inputs are truncated.")
    context_turns: int | None = Field(
        default=None,
        ge=0,
        description="Earlier turns given with a judged conversation turn; unset: what the model was trained with "
        "(head.json's context_turns: 1 for the starter), else 0.",
    )
    threads: int | None = Field(default=None, ge=1, description="CPU threads for inference (torch default when unset).")
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="int8: dynamic int8 linear layers on CPU, ~1.5-1.8x the texts/s; scores move (docs/local-model.md).",
    )
    allow_download: bool = Field(default=False, description="Let a model name be fetched from the Hugging Face hub.")


class HttpSettings(BaseModel):
    """The HTTP layer shared by remote backends."""

    engine: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp",
        description="What sends the requests: aiohttp, directly (about a quarter of the CPU per request), "
        "or httpx on its own httpcore.",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=16, ge=1)
    max_concurrency: int | None = Field(
        default=None, ge=1, exclude=True, description="Deprecated alias of MODWORKER_SCORING__MAX_CONCURRENCY."
    )
    write_timeout_s: float = Field(default=30.0, gt=0)
    pool_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for a free pooled connection.")
    keepalive_expiry_s: float = Field(default=20.0, ge=0, description="Idle pooled connections close after this.")
    retry_attempts: int = Field(default=6, ge=1, description="Tries per call, the first included.")
    retry_base_wait_s: float = Field(
        default=0.5, gt=0, description="Backoff before the 2nd try (doubles, full jitter)."
    )
    retry_max_wait_s: float = Field(
        default=10.0, gt=0, description="Longest backoff between tries (Retry-After may exceed it)."
    )
    retry_budget_s: float = Field(
        default=60.0, gt=0, description="A call gives up (BackendUnavailable) rather than wait past this in total."
    )
    requests_per_second: float | None = Field(default=None, gt=0, description="Client-side request limit; unset: none.")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Client-side input-token limit; unset: none.")
    rate_limit_low_watermark: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Spread requests out when x-ratelimit-remaining-* falls below this fraction.",
    )
    breaker_failure_threshold: int = Field(
        default=5, ge=1, description="Consecutive failed tries that open the circuit."
    )
    breaker_first_open_s: float = Field(
        default=0.5, gt=0, description="Open circuit: seconds before the first probe; each failed probe doubles it."
    )
    breaker_reset_s: float = Field(
        default=10.0, gt=0, description="Open circuit: the longest wait between probes (the doubling stops here)."
    )
    chunk_overlap_tokens: int = Field(default=200, ge=0, description="Overlap between chunks of an over-long text.")
    fail_policy: FailPolicy | None = Field(
        default=None, exclude=True, description="Deprecated alias of MODWORKER_SCORING__FAIL_POLICY."
    )


class ScoringSettings(BaseModel):
    """How the pipeline calls whichever backend is chosen (remote or local)."""

    max_concurrency: int = Field(default=4, ge=1, description="Backend calls (batches) in flight at once.")
    fail_policy: FailPolicy = Field(
        default="wait",
        description="When the backend gives up: keep waiting (nothing passes unmoderated), "
        "publish a degraded verdict with action review/allow, or score with MODWORKER_FALLBACK__BACKEND (fallback).",
    )
    poison_attempts: int = Field(
        default=3,
        ge=2,
        description="Under wait: an input that fails alone this many times while the backend answers other "
        "batches is dead-lettered as backend_failed (a failing batch is split in halves to find it). At least 2: "
        "one failure alone can race an outage's start (another call answered just before it); a second needs an "
        "answer to a call sent after the first.",
    )


class CascadeSettings(BaseModel):
    """``MODWORKER_BACKEND=cascade``: the first backend decides confident inputs, the second the rest."""

    first: BackendName = Field(default="local", description="Backend that scores every input first.")
    then: BackendName = Field(default="mistral", description="Backend that decides the inputs the first is unsure of.")
    default_band: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Uncertainty band on each side of a threshold, for categories the policy's cascade section "
        "does not give.",
    )
    then_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Inputs per second-stage call, at most: the escalated inputs of concurrent batches are pooled "
        "up to it. Unset: MODWORKER_BATCH__MAX_SIZE.",
    )
    max_wait_ms: int = Field(
        default=20,
        ge=0,
        description="Longest an escalated input waits for the pool to fill before its second-stage call is sent; "
        "0: no pooling (one second-stage call per first-stage batch with any escalated input).",
    )


class FallbackSettings(BaseModel):
    """``MODWORKER_SCORING__FAIL_POLICY=fallback``: who scores while the backend is down."""

    backend: BackendName | None = Field(
        default=None, description="Backend that scores a batch when the primary gives up (e.g. local)."
    )


class ShadowSettings(BaseModel):
    """Shadow evaluation: a candidate backend and/or policy judges a sample beside the live path."""

    backend: BackendName | None = Field(default=None, description="Candidate backend; unset: reuse the live scores.")
    model: str | None = Field(
        default=None, description="Model of the candidate backend (e.g. mistral-moderation-2603); unset: its own."
    )
    policy_file: Path | None = Field(default=None, description="Candidate policy YAML; unset: the live policy.")
    sample: float = Field(default=0.0, ge=0, le=1, description="Fraction of inputs shadowed (by event id hash).")
    queue_size: int = Field(default=1_000, ge=1, description="Shadow queue bound; a full queue drops (counted).")
    batch_size: int = Field(default=32, ge=1, description="Inputs per shadow backend call, at most.")
    topic: str = Field(default="moderation.shadow-verdicts", description="Output: a ShadowVerdict per shadowed input.")

    @property
    def enabled(self) -> bool:
        return self.sample > 0 and (self.backend is not None or self.policy_file is not None)


_DEPRECATED_ALIASES = (("fail_policy", "FAIL_POLICY"), ("max_concurrency", "MAX_CONCURRENCY"))
"""Settings that moved from ``http`` to ``scoring``: old names work for one release, with a warning."""


class CacheSettings(BaseModel):
    """Dedup cache in front of the backend: the same exact text, model and endpoint reuse scores."""

    enabled: bool = True
    max_entries: int = Field(default=100_000, ge=1, description="LRU bound on cached inputs.")
    ttl_s: float = Field(default=3_600.0, gt=0, description="Cached scores expire after this.")


class ConversationSettings(BaseModel):
    """Conversation state: earlier turns kept per input partition, backed by a changelog topic."""

    enabled: bool = Field(
        default=True, description="Judge a turn published without context with its conversation's earlier turns."
    )
    max_turns: int = Field(default=10, ge=1, le=1_000, description="Earlier turns given as context, at most.")
    max_context_chars: int = Field(
        default=8_000,
        ge=1,
        description="Characters of context per judged turn (the turn itself is never cut); the oldest turn given "
        "is cut to its end to fit.",
    )
    ttl_s: float = Field(default=86_400.0, gt=0, description="A conversation idle this long is forgotten.")
    max_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1_024,
        description="Approximate memory for all conversations held; least recently active ones are forgotten first.",
    )
    changelog_topic: str = Field(
        default="moderation.conversation-state",
        min_length=1,
        description="Compacted topic the state is written to and restored from; one per consumer group.",
    )
    restore_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A changelog partition that answers no fetch, or whose restore read does not advance, for this "
        "long fails the restore: the worker stops naming it (the partitions stay unread meanwhile).",
    )


class ExactlyOnceSettings(BaseModel):
    """``MODWORKER_DELIVERY=exactly_once``: one transactional producer per owned input partition."""

    transactional_id_prefix: str = Field(
        default="",
        description="Prepended to each transactional id ({prefix}{group_id}-{topic}-{partition}); must be the same "
        "on every member of the group.",
    )
    transaction_timeout_ms: int = Field(
        default=60_000,
        ge=1_000,
        le=900_000,
        description="Broker-side timeout: an open transaction of a vanished producer is aborted after this.",
    )
    call_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Bound on each transactional step (init, commit, abort); on expiry the transaction is abandoned "
        "and the partition goes back to the group (a rebalance; its next owner reads from the committed offset).",
    )


class DsaSettings(BaseModel):
    """EU DSA statements of reasons: one per verdict that restricts content (docs/dsa.md)."""

    enabled: bool = Field(
        default=False,
        description="Publish a StatementOfReasons with each restricting verdict; the policy must have a dsa section.",
    )
    topic: str = Field(
        default="moderation.statements-of-reasons",
        min_length=1,
        description="Output: a StatementOfReasons per restricting verdict, in the verdict's acknowledged group.",
    )
    api_url: str = Field(
        default="https://transparency.dsa.ec.europa.eu",
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="dsa submit: root of the DSA Transparency Database (or its sandbox); statements go to "
        "{api_url}/api/v1/statements.",
    )
    api_token: SecretStr | None = Field(
        default=None, description="dsa submit: the platform's API token (secret), sent as a Bearer token."
    )
    batch_size: int = Field(
        default=100, ge=1, le=100, description="dsa submit: statements per API call, at most (the API takes 100)."
    )
    group_id: str = Field(
        default="moderation-dsa-submit",
        min_length=1,
        description="dsa submit: consumer group reading the statements topic; offsets commit once the API took them.",
    )


class ReviewsSettings(BaseModel):
    """Human review decisions flowing back: each ReviewDecision becomes a superseding verdict (docs/design.md)."""

    enabled: bool = Field(
        default=False,
        description="Consume ReviewDecisions from the reviews topic (same consumer group) and publish a superseding "
        "Verdict for each; the topic must exist and the worker needs READ on it.",
    )
    topic: str = Field(
        default="moderation.reviews",
        min_length=1,
        description="Input: ReviewDecision, key = the verdict's key (the content id or the conversation id).",
    )
    recent_events: int = Field(
        default=100_000,
        ge=1,
        description="Events whose verdicts this process remembers (LRU, about 500 bytes each): what tells a "
        "decision the machine's action and scores, and a verdict_id unknown for the event.",
    )
    recent_reviews: int = Field(
        default=100_000,
        ge=1,
        description="review_ids remembered to dead-letter a duplicate (LRU, per process: best-effort).",
    )


class Settings(BaseSettings):
    """All of the worker's configuration. Every setting is listed in docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    group_id: str = Field(default="moderation-worker", description="Consumer group of the worker pods.")
    content_topic: str = Field(default="ugc.content", description="Input: ContentEvent.")
    conversation_topic: str = Field(default="ugc.conversations", description="Input: ConversationEvent.")
    verdict_topic: str = Field(default="moderation.verdicts", description="Output: a Verdict per valid input.")
    violation_topic: str = Field(default="moderation.violations", description="Output: a Violation per flagged input.")
    dead_letter_topic: str = Field(
        default="moderation.dead-letter", description="Output: inputs that could not be judged."
    )

    backend: Literal["mistral", "openai", "local", "llm", "cascade"] = Field(
        default="mistral", description="mistral, openai, local, llm or cascade."
    )
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    mistral: MistralSettings = Field(default_factory=MistralSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    conversation: ConversationSettings = Field(default_factory=ConversationSettings)
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description="exactly_once: each input partition's outputs and offsets commit in one Kafka transaction "
        "(consumers must read with isolation_level=read_committed).",
    )
    exactly_once: ExactlyOnceSettings = Field(default_factory=ExactlyOnceSettings)
    dsa: DsaSettings = Field(default_factory=DsaSettings)
    reviews: ReviewsSettings = Field(default_factory=ReviewsSettings)

    policy_file: Path | None = Field(default=None, description="Policy YAML; the built-in default when unset.")
    max_text_chars: int = Field(default=100_000, ge=1, description="Longer inputs are dead-lettered as too_long.")
    max_in_flight: int = Field(
        default=5_000, ge=1, description="Messages read but not finished; at the cap, partitions pause."
    )
    max_in_flight_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1_024,
        description="Input value bytes read but not finished; at the cap, partitions pause (with "
        "MODWORKER_MAX_IN_FLIGHT: whichever is reached first; they resume once both have halved). A single "
        "larger record still passes, alone.",
    )
    max_uncommitted_span: int = Field(
        default=50_000,
        ge=2,
        description="A partition whose offsets from the lowest unfinished one on pass this is paused alone "
        "(and /livez fails naming it) until the span halves.",
    )
    commit_interval_ms: int = Field(default=1_000, ge=0, description="Commit finished offsets at least this often.")
    commit_every: int = Field(default=1_000, ge=1, description="Commit after this many finished messages, if sooner.")
    drain_timeout_s: float = Field(default=25.0, ge=0, description="On SIGTERM, how long in-flight work may finish.")
    revoke_timeout_s: float = Field(
        default=10.0, ge=0, description="On rebalance, how long revoked partitions' in-flight work may finish."
    )
    include_text: bool = Field(default=False, description="Copy the judged text into verdicts.")
    max_output_bytes: int = Field(
        default=1_048_588,
        ge=4_096,
        description="Largest output record (Kafka's max.message.bytes of the output topics): bigger dead letters are "
        "truncated, bigger verdicts lose metadata and text (trimmed: true).",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", description="auto: uvloop when installed (less CPU per message), else asyncio's own."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug logs a line per verdict."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON lines otherwise."
    )
    http_port: int = Field(
        default=9000, ge=0, le=65535, description="Port of /metrics, /livez and /readyz; 0 disables the server."
    )
    http_host: str = Field(default="0.0.0.0", description="Address the metrics and probe server listens on.")
    liveness_timeout_s: float = Field(
        default=30.0, gt=0, description="/livez fails when the consume loop or a partition with lag stalls this long."
    )

    _deprecations: list[str] = PrivateAttr(default_factory=list)
    _unknown_variables: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_requirements(self) -> Settings:
        if self.policy_file is not None and not self.policy_file.is_file():
            raise ValueError(f"MODWORKER_POLICY_FILE: no such file {self.policy_file}")
        if self.scoring.fail_policy == "fallback" and self.fallback.backend is None:
            raise ValueError(
                "MODWORKER_FALLBACK__BACKEND is required with MODWORKER_SCORING__FAIL_POLICY=fallback: set e.g. local"
            )
        if self.scoring.fail_policy == "fallback" and self.fallback.backend == self.backend:
            raise ValueError(
                "MODWORKER_FALLBACK__BACKEND must differ from MODWORKER_BACKEND: it scores while that one is down"
            )
        if self.backend == "cascade" and self.cascade.first == self.cascade.then:
            raise ValueError(
                "MODWORKER_CASCADE__THEN must differ from MODWORKER_CASCADE__FIRST: a cascade of one backend saves nothing"
            )
        if self.shadow.policy_file is not None and not self.shadow.policy_file.is_file():
            raise ValueError(f"MODWORKER_SHADOW__POLICY_FILE: no such file {self.shadow.policy_file}")
        if self.delivery == "exactly_once" and not self.kafka.enable_idempotence:
            raise ValueError(
                "MODWORKER_DELIVERY=exactly_once needs the idempotent producer: unset "
                "MODWORKER_KAFKA__ENABLE_IDEMPOTENCE (or set it true), or use MODWORKER_DELIVERY=at_least_once"
            )
        return self

    def backends_in_use(self) -> list[str]:
        """Every backend this configuration calls: the chosen one (both stages of a cascade),
        the fallback and the shadow backend."""
        names = [self.cascade.first, self.cascade.then] if self.backend == "cascade" else [self.backend]
        if self.scoring.fail_policy == "fallback" and self.fallback.backend is not None:
            names.append(self.fallback.backend)
        if self.shadow.enabled and self.shadow.backend is not None:
            names.append(self.shadow.backend)
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _apply_deprecated_aliases(self) -> Settings:
        for name, env in _DEPRECATED_ALIASES:
            old = getattr(self.http, name)
            if old is None:
                continue
            new_env = f"{ENV_PREFIX}SCORING__{env}"
            if name in self.scoring.model_fields_set:
                note = f"{ENV_PREFIX}HTTP__{env} is deprecated and ignored: {new_env} is set"
            else:
                setattr(self.scoring, name, old)
                note = f"{ENV_PREFIX}HTTP__{env} is deprecated: rename it {new_env} (the old name goes in the next release)"
            self._deprecations.append(note)
        return self

    @property
    def deprecations(self) -> list[str]:
        """One line per deprecated setting in use, for the start-up log."""
        return list(self._deprecations)

    @property
    def unknown_variables(self) -> list[str]:
        """One warning line per ``MODWORKER_*`` variable that no setting reads (filled by
        ``load_settings``), naming the closest real setting, for the start-up log."""
        return list(self._unknown_variables)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (
            init_settings,
            env_settings,
            _UnprefixedEnvSource(settings_cls),
        )
        if settings_cls.model_config.get("yaml_file"):
            sources += (YamlConfigSettingsSource(settings_cls),)
        return sources


class _UnprefixedEnvSource(PydanticBaseSettingsSource):
    """Well-known unprefixed names users already export (``KAFKA_BOOTSTRAP_SERVERS`` ...).

    A source of its own, between ``MODWORKER_*`` and the YAML file, so that the
    environment wins over the file for these names too, and the prefixed name wins over
    the unprefixed one.
    """

    NAMES: ClassVar[dict[str, tuple[str, str]]] = {
        "KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
        "MISTRAL_API_KEY": ("mistral", "api_key"),
        "OPENAI_API_KEY": ("openai", "api_key"),
    }

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for env_name, (section, key) in self.NAMES.items():
            if value := os.environ.get(env_name):
                values.setdefault(section, {})[key] = value
        return values


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


MISTRAL_HOST = "api.mistral.ai"


def is_mistral_url(url: str) -> bool:
    """True when ``url`` points at Mistral's hosted API."""
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "").lower() == MISTRAL_HOST


def llm_api_key(settings: Settings) -> SecretStr | None:
    """The key of the llm backend: ``llm.api_key``, else ``MISTRAL_API_KEY`` when the URL is Mistral's."""
    if _secret(settings.llm.api_key):
        return settings.llm.api_key
    if is_mistral_url(settings.llm.base_url) and _secret(settings.mistral.api_key):
        return settings.mistral.api_key
    return None


def check_backend_credentials(settings: Settings) -> None:
    """Raise ``ConfigError`` when the chosen backend lacks its API key.

    Separate from validation so that commands that never call a backend (``produce``,
    ``tail``) run without a key.
    """
    in_use = settings.backends_in_use()
    if "mistral" in in_use and not _secret(settings.mistral.api_key):
        raise ConfigError(
            "configuration error: MISTRAL_API_KEY is not set: export MISTRAL_API_KEY=<your key>, "
            "or choose another backend with MODWORKER_BACKEND"
        )
    if "openai" in in_use and not _secret(settings.openai.api_key):
        raise ConfigError(
            "configuration error: OPENAI_API_KEY is not set: export OPENAI_API_KEY=<your key>, "
            "or choose another backend with MODWORKER_BACKEND"
        )
    if settings.backend == "llm" and is_mistral_url(settings.llm.base_url) and llm_api_key(settings) is None:
        raise ConfigError(
            "configuration error: MISTRAL_API_KEY is not set: export MISTRAL_API_KEY=<your key> (or "
            "MODWORKER_LLM__API_KEY), or point MODWORKER_LLM__BASE_URL at your own server"
        )


def load_settings(
    config_file: Path | None = None, *, require_backend: bool = True, require_kafka: bool = True, **overrides: Any
) -> Settings:
    """Read the settings once: environment over ``config_file`` (YAML) over defaults.

    ``overrides`` are keyword arguments that win over everything (used by tests and the
    demo). With ``require_backend`` the chosen backend's credentials must be present; with
    ``require_kafka`` a bootstrap address (offline tools such as train/eval need none).
    Raises ``ConfigError`` with one line per problem; a YAML key that no setting reads or
    a file that is not valid YAML is such a problem, named with its line and column and the
    closest real key. A ``MODWORKER_*`` variable that no setting reads is only a warning
    (``Settings.unknown_variables``, logged at start-up): a newer ConfigMap must not stop
    an older image from starting.
    """
    unknown_variables = unknown_environment_names(os.environ)
    problems: list[str] = []
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"--config: no such file {config_file}")
        problems += unknown_file_keys(config_file)
    if problems:
        raise ConfigError("\n".join(f"configuration error: {line}" for line in problems))
    if config_file is not None:
        settings_cls = type(
            "Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": str(config_file)}}
        )
    try:
        settings = settings_cls(**overrides)
    except ValidationError as err:
        raise ConfigError("\n".join(_describe(e) for e in err.errors())) from None
    except ValueError as err:  # e.g. a YAML file that does not parse
        raise ConfigError(f"configuration error: {err}") from None
    if require_kafka and not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "configuration error: KAFKA_BOOTSTRAP_SERVERS is not set: export KAFKA_BOOTSTRAP_SERVERS=host:9092"
        )
    if require_backend:
        check_backend_credentials(settings)
    settings._unknown_variables = unknown_variables
    return settings


TOOL_ENVIRONMENT = frozenset({"MODWORKER_KAFKA_JARS", "MODWORKER_CHAOS_RESULTS"})
"""``MODWORKER_*`` variables that the test tooling reads (the Kafka jars, the chaos
report); they are no settings and the worker ignores them."""


def unknown_environment_names(environ: Mapping[str, str]) -> list[str]:
    """One warning line per ``MODWORKER_*`` variable in ``environ`` that no setting reads,
    naming the closest real one. Names are matched without regard to case, as they are read."""
    exact, open_prefixes = _environment_names()
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in exact or upper in TOOL_ENVIRONMENT:
            continue
        if any(upper.startswith(prefix) for prefix in open_prefixes):
            continue
        short = sorted(env.removeprefix(ENV_PREFIX) for env in exact)
        closest = _closest(upper.removeprefix(ENV_PREFIX), short, prefix=ENV_PREFIX)
        problems.append(f"{name} is not a setting and is ignored{closest}; rename or unset it")
    return problems


def _environment_names() -> tuple[set[str], tuple[str, ...]]:
    """Every variable a setting reads, and the prefixes under which any name is a key of
    a mapping setting (``MODWORKER_LOCAL__LABELS__<label>``)."""
    exact: set[str] = set()
    open_prefixes: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            env = f"{prefix}{name.upper()}"
            exact.add(env)  # a section may also be given whole, as JSON
            section = _section_model(field.annotation)
            if section is not None:
                walk(section, env + "__")
            elif get_origin(field.annotation) is dict:
                open_prefixes.append(env + "__")

    walk(Settings, ENV_PREFIX)
    return exact, tuple(open_prefixes)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def unknown_file_keys(config_file: Path) -> list[str]:
    """One line per problem of a ``--config`` file that validation would not report: a
    file that is not valid YAML (its line and column), a top level that is no mapping,
    or a key that no setting reads (its line and column and the closest real key)."""
    import yaml

    try:
        root = yaml.compose(config_file.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError) as err:
        return [f"--config {config_file}: cannot read it ({err}); it must be a readable UTF-8 YAML file"]
    except yaml.YAMLError as err:
        return [f"--config {config_file}: not valid YAML: {_yaml_problem(err)}; fix it there"]
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        return [f"--config {config_file}: the top level must be a mapping of settings (kafka:, batch: ...)"]
    problems: list[str] = []

    def walk(node: yaml.MappingNode, model: type[BaseModel], path: str) -> None:
        for key_node, value_node in node.value:
            key = str(key_node.value)
            field = model.model_fields.get(key)
            if field is None:
                mark = key_node.start_mark
                closest = _closest(key, list(model.model_fields), prefix=path)
                problems.append(
                    f"--config {config_file}: unknown setting {path}{key} at line {mark.line + 1}, "
                    f"column {mark.column + 1}{closest}; fix or remove the key"
                )
                continue
            section = _section_model(field.annotation)
            if section is not None and isinstance(value_node, yaml.MappingNode):
                walk(value_node, section, f"{path}{key}.")

    walk(root, Settings, "")
    return problems


def _yaml_problem(err: Any) -> str:
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err).replace("\n", " ")


def _closest(name: str, candidates: list[str], *, prefix: str = "") -> str:
    import difflib

    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{found[0]}?)" if found else ""


def _describe(error: Any) -> str:
    loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        return f"configuration error: {message}"
    env_name = ENV_PREFIX + "__".join(part.upper() for part in loc)
    got = error.get("input")
    # A scalar where a section belongs (``mistral: sk-...`` in YAML) may well be the secret.
    section_shape = error.get("type") in ("model_type", "model_attributes_type", "dict_type")
    shown = "" if _looks_secret(loc) or section_shape or isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"configuration error: {env_name}: {message}{shown}; fix the value or unset it to use the default"


def _looks_secret(loc: list[str]) -> bool:
    return any(word in part.lower() for part in loc for word in ("key", "password", "secret", "token"))


_UNPREFIXED = {
    "KAFKA__BOOTSTRAP_SERVERS": "KAFKA_BOOTSTRAP_SERVERS",
    "MISTRAL__API_KEY": "MISTRAL_API_KEY",
    "OPENAI__API_KEY": "OPENAI_API_KEY",
}


def settings_reference() -> list[tuple[str, str, str]]:
    """``(environment variable, default, description)`` for every setting, in model order.

    docs/configuration.md's table is generated from this (``modworker config reference``), and a
    test keeps the two in step.
    """
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            path = f"{prefix}{name.upper()}"
            env = ENV_PREFIX + path
            if path in _UNPREFIXED:
                env = f"{_UNPREFIXED[path]} (or {env})"
            default = field.get_default(call_default_factory=True)
            shown = "" if default is None else (default.name if isinstance(default, Path) else str(default))
            if isinstance(default, bool):
                shown = str(default).lower()
            rows.append((env, shown, (field.description or "").replace("|", "\\|")))

    walk(Settings, "")
    return rows


MASKED = "********"
"""What ``effective_settings`` shows for a secret that is set."""


def effective_settings(settings: Settings) -> list[tuple[str, str, bool]]:
    """``(environment variable, value, is default)`` for every setting of ``settings``, in
    model order, as ``modworker config`` prints them: secrets that are set as ``MASKED``,
    unset values as ``""``, mappings as JSON."""
    import json

    rows: list[tuple[str, str, bool]] = []

    def shown(value: Any) -> str:
        if isinstance(value, SecretStr):
            return MASKED if value.get_secret_value() else ""
        if value is None:
            return ""
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True)
        return str(value)

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            if field.exclude:
                continue
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name.upper()}__")
                continue
            default = field.get_default(call_default_factory=True)
            rows.append((f"{ENV_PREFIX}{prefix}{name.upper()}", shown(value), shown(default) == shown(value)))

    walk(settings, "")
    return rows
