"""Moderation backends: one protocol (``worker.backends.base.Backend``), several implementations.

``create_backend(settings)`` picks one by ``settings.backend``:

- ``mistral``: ``worker.backends.mistral.MistralBackend`` (moderation or classifier endpoints);
- ``openai``: ``worker.backends.openai.OpenAIBackend``;
- ``local``: ``worker.backends.local.LocalBackend`` (imported only when chosen: it needs the
  ``local`` extra);
- ``llm``: ``worker.backends.llm.LlmBackend`` (a chat model or guard model behind any
  OpenAI-compatible chat-completions server; the json dialect asks about ``policy``'s
  categories, so pass the policy the worker applies);
- ``cascade``: ``worker.backends.cascade.CascadeBackend`` over ``cascade.first`` and
  ``cascade.then`` (each built as above); it needs the policy (its thresholds and bands);

and, unless ``cache.enabled`` is false, wraps each scoring backend in the dedup cache
(``worker.backends.cache.CachingBackend``, which has ``cache_stats()``); a cascade's stages
are cached each, the cascade itself is not. ``create_named(settings, name)`` builds one
scoring backend by name: the fallback and shadow backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from worker.backends.base import Backend
from worker.config import Settings

if TYPE_CHECKING:
    from worker.pipeline.policy import Policy


def default_policy_file(settings: Settings) -> Path | None:
    """The policy to use when ``MODWORKER_POLICY_FILE`` is unset: the starter model's own
    (its thresholds were tuned on validation data) for the bundled local model, else None
    (the built-in default policy)."""
    if settings.policy_file is not None:
        return settings.policy_file
    if settings.backend == "local":
        from worker.backends.local_model import BUNDLED, starter_model_dir

        if settings.local.model in BUNDLED:
            return starter_model_dir(settings.local.model) / "policy.yaml"
    return None


def load_policy(settings: Settings) -> Policy:
    """The policy ``modworker run`` applies with ``settings`` (``default_policy_file``, else
    the built-in default). The one resolution: the worker, ``config check``, the llm backend
    and the offline commands (``eval``, ``calibrate``) all call it. Raises ``PolicyError``."""
    from worker.pipeline.policy import Policy

    return Policy.load(default_policy_file(settings))


def create_backend(settings: Settings, policy: Policy | None = None) -> Backend:
    """The backend ``settings.backend`` names, not yet started (``await backend.start()``).

    ``policy`` is the policy the worker applies: ``cascade`` needs it (its thresholds and
    bands; ``ValueError`` without it), ``llm`` reads it (unset: it loads the configured
    one itself), the others ignore it.
    """
    if settings.backend == "cascade":
        from worker.backends.cascade import CascadeBackend, UncertaintyBands

        if policy is None:
            raise ValueError("the cascade backend needs the policy: create_backend(settings, policy)")
        bands = UncertaintyBands(policy, default_band=settings.cascade.default_band)
        return CascadeBackend(
            create_named(settings, settings.cascade.first, policy),
            create_named(settings, settings.cascade.then, policy),
            bands,
            batch_size=settings.cascade.then_batch_size or settings.batch.max_size,
            max_wait_s=settings.cascade.max_wait_ms / 1000,
        )
    return create_named(settings, settings.backend, policy)


def create_fallback(settings: Settings, policy: Policy | None = None) -> Backend | None:
    """The fallback backend (fail policy ``fallback``), not yet started; None without one."""
    if settings.scoring.fail_policy != "fallback" or settings.fallback.backend is None:
        return None
    return create_named(settings, settings.fallback.backend, policy)


def create_named(settings: Settings, name: str, policy: Policy | None = None) -> Backend:
    """The scoring backend ``name`` (mistral, openai, local, llm), cached unless disabled."""
    backend = _bare_backend(settings, name, policy)
    if not settings.cache.enabled:
        return backend
    from worker.backends.cache import CachingBackend

    return CachingBackend(backend, max_entries=settings.cache.max_entries, ttl_s=settings.cache.ttl_s)


def _bare_backend(settings: Settings, name: str, policy: Policy | None) -> Backend:
    if name == "mistral":
        from worker.backends.mistral import MistralBackend

        return MistralBackend(settings)
    if name == "openai":
        from worker.backends.openai import OpenAIBackend

        return OpenAIBackend(settings)
    if name == "local":
        from worker.backends.local import LocalBackend

        return LocalBackend(settings)
    if name == "llm":
        from worker.backends.llm import LlmBackend

        return LlmBackend(settings, policy=policy)
    raise ValueError(f"unknown backend {name!r}: set MODWORKER_BACKEND to mistral, openai, local, llm or cascade")
