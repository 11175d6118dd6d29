"""Both HTTP engines under the httpx API (``MODWORKER_HTTP__ENGINE``) behave alike: the same
answers, and each failed try named and counted the same way (the request metric's
``timeout`` / ``transport_error`` label, the ``BackendUnavailable`` message), against a
real loopback Mistral server."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.backends.conftest import started
from worker.backends.base import BackendUnavailable, Scored
from worker.backends.engine import environment_proxy
from worker.backends.mistral import MistralBackend
from worker.config import Settings
from worker.ops import metrics
from worker.testing import Fault, MistralServer, fake_scores, first

SettingsFor = Callable[..., Settings]
ENGINES = pytest.mark.parametrize("engine", ["aiohttp", "httpx"])


def requests_labelled(label: str) -> float:
    return metrics.backend_requests("Mistral", label)._value.get()


@ENGINES
async def test_both_engines_score_alike(engine: str, api_key: str, settings_for: SettingsFor) -> None:
    with MistralServer(api_key=api_key) as server:
        async with started(MistralBackend(settings_for(server, http={"engine": engine}))) as backend:
            outcomes = await backend.score_texts(["a", "b"])
        (request,) = server.requests
    assert outcomes == [Scored(fake_scores(t), "mistral-moderation-2411") for t in ("a", "b")]
    assert request.headers["authorization"] == f"Bearer {api_key}"
    assert request.headers["content-type"] == "application/json"


@ENGINES
async def test_a_refused_connection_is_a_connect_error_not_a_timeout(
    engine: str, api_key: str, settings_for: SettingsFor
) -> None:
    with MistralServer(api_key=api_key) as server:
        settings = settings_for(server, http={"engine": engine, "retry_attempts": 1})
    before = requests_labelled("transport_error"), requests_labelled("timeout")
    async with started(MistralBackend(settings)) as backend:  # nothing listens on the port now
        with pytest.raises(BackendUnavailable, match="ConnectError on POST /v1/moderations"):
            await backend.score_texts(["a"])
    assert (requests_labelled("transport_error"), requests_labelled("timeout")) == (before[0] + 1, before[1])


@ENGINES
async def test_a_slow_answer_is_a_read_timeout(engine: str, api_key: str, settings_for: SettingsFor) -> None:
    with MistralServer(api_key=api_key, fault_plan=first(1, Fault(delay_s=1.0))) as server:
        settings = settings_for(server, http={"engine": engine, "retry_attempts": 1, "read_timeout_s": 0.2})
        before = requests_labelled("timeout")
        async with started(MistralBackend(settings)) as backend:
            with pytest.raises(BackendUnavailable, match="ReadTimeout on POST /v1/moderations"):
                await backend.score_texts(["a"])
    assert requests_labelled("timeout") == before + 1


@ENGINES
async def test_a_reset_connection_is_a_transport_error_and_retried(
    engine: str, api_key: str, settings_for: SettingsFor
) -> None:
    with MistralServer(api_key=api_key, fault_plan=first(1, Fault(reset=True))) as server:
        settings = settings_for(server, http={"engine": engine, "retry_attempts": 2})
        before = requests_labelled("transport_error")
        async with started(MistralBackend(settings)) as backend:
            (outcome,) = await backend.score_texts(["a"])
    assert outcome == Scored(fake_scores("a"), "mistral-moderation-2411")
    assert requests_labelled("transport_error") == before + 1


def test_the_proxy_comes_from_the_environment_once_as_httpx_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert environment_proxy("https://api.mistral.ai") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("https://api.mistral.ai") == "http://proxy.internal:3128"
    assert environment_proxy("http://vllm.internal:8000") is None, "HTTPS_PROXY is for https URLs only"
    monkeypatch.setenv("NO_PROXY", "api.mistral.ai")
    assert environment_proxy("https://api.mistral.ai") is None


@pytest.mark.parametrize("variable", [None, "SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_the_default_engine_trusts_the_certificates_httpx_trusts(monkeypatch, tmp_path, variable):
    import certifi
    import httpx

    from worker.backends.engine import tls_context

    if variable == "SSL_CERT_FILE":
        monkeypatch.setenv(variable, certifi.where())
    elif variable == "SSL_CERT_DIR":
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.setenv(variable, str(tmp_path))  # an empty directory: nothing loaded up front
    else:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ours, theirs = tls_context(), httpx.create_ssl_context()
    assert ours.cert_store_stats() == theirs.cert_store_stats()
    assert sorted(c["serialNumber"] for c in ours.get_ca_certs()) == sorted(
        c["serialNumber"] for c in theirs.get_ca_certs()
    )
    assert (ours.verify_mode, ours.check_hostname, ours.minimum_version) == (
        theirs.verify_mode,
        theirs.check_hostname,
        theirs.minimum_version,
    )
    if variable is None:
        assert ours.cert_store_stats()["x509_ca"] > 50  # certifi's bundle, not an empty store
