"""Moderation backends: one protocol (``worker.backends.base.Backend``), several implementations.

``create_backend(settings)`` picks one by ``settings.backend``:

- ``mistral``: ``worker.backends.mistral.MistralBackend`` (moderation or classifier endpoints);
- ``openai``: ``worker.backends.openai.OpenAIBackend``;
- ``local``: ``worker.backends.local.LocalBackend`` (imported only when chosen: it needs the
  ``local`` extra);
- ``llm``: ``worker.backends.llm.LlmBackend`` (a chat model or guard model behind any
  OpenAI-compatible chat-completions server; the json dialect asks about ``policy``'s
  categories, so pass the policy the worker applies);

and, unless ``cache.enabled`` is false, wraps it in the dedup cache
(``worker.backends.cache.CachingBackend``, which has ``cache_stats()``).
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
        from worker.backends.local_model import STARTER, starter_model_dir

        if settings.local.model == STARTER:
            return starter_model_dir() / "policy.yaml"
    return None


def create_backend(settings: Settings, *, policy: Policy | None = None) -> Backend:
    """The backend ``settings.backend`` names, not yet started (``await backend.start()``).

    ``policy`` is the policy the worker applies; only the ``llm`` backend reads it (unset:
    it loads the configured one itself).
    """
    backend = _bare_backend(settings, policy)
    if not settings.cache.enabled:
        return backend
    from worker.backends.cache import CachingBackend

    return CachingBackend(backend, max_entries=settings.cache.max_entries, ttl_s=settings.cache.ttl_s)


def _bare_backend(settings: Settings, policy: Policy | None) -> Backend:
    if settings.backend == "mistral":
        from worker.backends.mistral import MistralBackend

        return MistralBackend(settings)
    if settings.backend == "openai":
        from worker.backends.openai import OpenAIBackend

        return OpenAIBackend(settings)
    if settings.backend == "local":
        from worker.backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "llm":
        from worker.backends.llm import LlmBackend

        return LlmBackend(settings, policy=policy)
    raise ValueError(f"unknown backend {settings.backend!r}: set MODWORKER_BACKEND to mistral, openai, local or llm")
