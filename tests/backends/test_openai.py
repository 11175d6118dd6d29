"""OpenAIBackend against a real loopback server speaking OpenAI's moderation wire format."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from schemas import Turn
from tests.backends.conftest import started
from worker.backends import create_backend
from worker.backends.base import BackendAuthError, Conversation, Rejected, Scored
from worker.backends.openai import OpenAIBackend
from worker.config import Settings
from worker.testing import OPENAI_CATEGORIES, Fault, OpenAIServer, RateLimit, fake_scores
from worker.testing.openai_server import openai_request_validator

SettingsFor = Callable[..., Settings]
MODEL = "omni-moderation-2024-09-26"


def server(api_key: str, **options: object) -> OpenAIServer:
    return OpenAIServer(api_key=api_key, validator=openai_request_validator(), **options)  # type: ignore[arg-type]


async def test_text_batch_wire_format_categories_and_model(api_key: str, settings_for: SettingsFor) -> None:
    texts = ["have a nice day", "I will find you <<harassment/threatening:0.95>>"]
    with server(api_key) as srv:
        async with started(OpenAIBackend(settings_for(srv, backend="openai"))) as backend:
            outcomes = await backend.score_texts(texts)
        (request,) = srv.requests
        assert srv.violations == []
    assert request.path == "/v1/moderations"
    assert request.body == {"model": "omni-moderation-latest", "input": texts}
    assert outcomes == [Scored(fake_scores(t, OPENAI_CATEGORIES), MODEL) for t in texts]
    assert isinstance(outcomes[1], Scored) and len(outcomes[1].scores) == 13


async def test_conversations_are_scored_on_the_judged_turn(api_key: str, settings_for: SettingsFor) -> None:
    judged = "here is how <<illicit:0.8>>"
    conversation = Conversation(
        turn=Turn(role="assistant", content=judged), context=(Turn(role="user", content="how?"),)
    )
    with server(api_key) as srv:
        async with started(OpenAIBackend(settings_for(srv, backend="openai"))) as backend:
            (outcome,) = await backend.score_conversations([conversation])
        assert srv.requests[0].body["input"] == [judged]
    assert outcome == Scored(fake_scores(judged, OPENAI_CATEGORIES), MODEL)


async def test_bad_key_names_openai_api_key_and_copies_nothing_from_the_body(
    api_key: str, settings_for: SettingsFor
) -> None:
    with server(api_key) as srv:
        backend = OpenAIBackend(settings_for(srv, backend="openai", key="sk-proj-wrong-123456"))
        async with started(backend):
            with pytest.raises(BackendAuthError) as raised:
                await backend.score_texts(["a"])
    message = str(raised.value)
    assert "OPENAI_API_KEY" in message
    assert "sk-proj-wrong-123456" not in message and "Incorrect API key" not in message


async def test_400_for_one_input_is_bisected(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, max_input_tokens=100) as srv:
        settings = settings_for(srv, backend="openai", openai={"max_input_tokens": 10_000})
        async with started(OpenAIBackend(settings)) as backend:
            outcomes = await backend.score_texts(["ok", "x" * 1_000, "fine"])
    assert isinstance(outcomes[0], Scored) and isinstance(outcomes[2], Scored)
    assert isinstance(outcomes[1], Rejected) and "maximum context length is 100 tokens" in outcomes[1].reason


async def test_openai_rate_limit_headers_with_reset_durations_drive_the_pacer(
    api_key: str, settings_for: SettingsFor
) -> None:
    with server(api_key, rate_limit=RateLimit(requests_per_minute=10, enforce=False, window_s=60)) as srv:
        settings = settings_for(srv, backend="openai", http={"rate_limit_low_watermark": 0.5})
        async with started(OpenAIBackend(settings)) as backend:
            for text in ("a", "b", "c", "d", "e", "f"):
                await backend.score_texts([text])
            headers = srv.requests[-1].response_headers
            assert headers["x-ratelimit-remaining-requests"] == "4"
            reset_s = float(headers["x-ratelimit-reset-requests"].removesuffix("s"))
            # 4 of 10 left, below half: spread the 4 over the reset time the API announced.
            assert backend.api.pacer.interval_s == pytest.approx(reset_s / 4)


async def test_a_503_then_success_loses_nothing(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key, fault_plan=[Fault(status=503)]) as srv:
        async with started(OpenAIBackend(settings_for(srv, backend="openai"))) as backend:
            outcomes = await backend.score_texts(["a", "b"])
        assert [r.status for r in srv.requests] == [503, 200]
    assert [o.model for o in outcomes if isinstance(o, Scored)] == [MODEL, MODEL]


def test_create_backend_builds_openai(api_key: str, settings_for: SettingsFor) -> None:
    with server(api_key) as srv:
        backend = create_backend(settings_for(srv, backend="openai", cache={"enabled": False}))
    assert isinstance(backend, OpenAIBackend) and backend.name == "openai"
