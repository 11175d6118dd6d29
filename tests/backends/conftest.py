"""Fixtures for backend tests: settings that point a backend at a loopback server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from worker.backends.base import Backend
from worker.config import Settings, load_settings
from worker.testing.loopback import LoopbackApiServer

# Retries fast enough for tests; the behaviour (backoff, Retry-After, budget) is the same.
FAST_HTTP: dict[str, Any] = {
    "retry_base_wait_s": 0.01,
    "retry_max_wait_s": 0.05,
    "retry_budget_s": 20.0,
    "connect_timeout_s": 2.0,
    "read_timeout_s": 5.0,
}


@pytest.fixture
def settings_for(api_key: str) -> Callable[..., Settings]:
    """``settings_for(server, backend="mistral", http={...}, mistral={...}, ...)``: Settings aimed at ``server``.

    The key defaults to the ``api_key`` fixture (the server's key); pass ``key=`` to send another.
    """

    def build(
        server: LoopbackApiServer, *, backend: str = "mistral", key: str | None = None, **sections: Any
    ) -> Settings:
        section = dict(sections.pop(backend, {}))
        section.setdefault("api_key", key if key is not None else api_key)
        section.setdefault("base_url", server.base_url)
        http = {**FAST_HTTP, **sections.pop("http", {})}
        return load_settings(
            kafka={"bootstrap_servers": "127.0.0.1:9"}, backend=backend, http=http, **{backend: section}, **sections
        )

    return build


@asynccontextmanager
async def started(backend: Backend) -> AsyncIterator[Backend]:
    """``async with started(backend)``: start, then always close."""
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()
