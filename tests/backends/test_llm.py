"""LlmBackend against a real loopback server speaking the OpenAI chat-completions wire format."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from schemas import Turn
from tests.backends.conftest import started
from worker.backends import create_backend
from worker.backends.base import BackendAuthError, BackendUnavailable, Conversation, Rejected, Scored
from worker.backends.cache import CachingBackend
from worker.backends.llm import LlmBackend
from worker.backends.llm_dialects import LLAMA_GUARD_HAZARDS
from worker.config import ConfigError, Settings, llm_api_key, load_settings
from worker.ops import metrics
from worker.pipeline.policy import Policy
from worker.testing import Fault, LlmServer, RecordedRequest, fake_scores
from worker.testing.llm_server import REFUSAL, count_prompt_tokens, tokenize

SettingsFor = Callable[..., Settings]

FORUM = Policy.from_mapping(
    {
        "categories": {
            "spam": {"threshold": 0.7, "action": "review", "description": "Unsolicited advertising or bulk links."},
            "off_topic": {"threshold": 0.8, "action": "flag", "description": "Unrelated to the forum's subject."},
            "hate_and_discrimination": {"threshold": 0.5, "action": "block"},
        }
    }
)
FORUM_CATEGORIES = ("spam", "off_topic", "hate_and_discrimination")


def llm_settings(settings_for: SettingsFor, srv: LlmServer, **llm: object) -> Settings:
    return settings_for(srv, backend="llm", llm={"model": "judge-1", **llm})


async def test_json_dialect_wire_format_prompt_from_the_policy_scores_and_usage(
    api_key: str, settings_for: SettingsFor
) -> None:
    texts = ["great thread, thanks", "BUY CHEAP WATCHES at example.com <<spam:0.95>>"]
    with LlmServer(api_key=api_key) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            outcomes = await backend.score_texts(texts)
        requests = srv.requests
        assert srv.violations == []
    assert len(requests) == 2, "one request per input"
    for text, outcome in zip(texts, outcomes, strict=True):
        (request,) = [r for r in requests if json.dumps(text)[1:-1] in r.body["messages"][1]["content"]]
        body = request.body
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {api_key}"
        assert set(body) == {"model", "messages", "temperature", "max_tokens", "response_format"}
        assert body["model"] == "judge-1" and body["temperature"] == 0
        assert body["response_format"] == {"type": "json_object"}
        system, user = body["messages"]
        assert "- spam: Unsolicited advertising or bulk links." in system["content"]
        assert "- hate_and_discrimination\n" in system["content"]
        assert json.loads(user["content"].split("\n", 1)[1]) == {"text": text}
        assert isinstance(outcome, Scored)
        assert outcome.scores == fake_scores(text, FORUM_CATEGORIES)
        assert outcome.model == "judge-1"
        assert outcome.details is not None and outcome.details.score_kind == "probability"
        answer = json.dumps({"scores": fake_scores(text, FORUM_CATEGORIES)})
        assert outcome.details.prompt_tokens == count_prompt_tokens(body["messages"])
        assert outcome.details.completion_tokens == len(tokenize(answer))
    assert isinstance(outcomes[1], Scored) and outcomes[1].scores["spam"] == 0.95


async def test_json_dialect_conversation_sends_the_turns_with_the_judged_one_last(
    api_key: str, settings_for: SettingsFor
) -> None:
    judged = "check out my channel <<spam:0.8>>"
    conversation = Conversation(
        turn=Turn(role="assistant", content=judged), context=(Turn(role="user", content="any tips?"),)
    )
    with LlmServer(api_key=api_key) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            (outcome,) = await backend.score_conversations([conversation])
        (request,) = srv.requests
        assert srv.violations == []
    task, payload = request.body["messages"][1]["content"].split("\n", 1)
    assert json.loads(payload) == {
        "conversation": [{"role": "user", "content": "any tips?"}, {"role": "assistant", "content": judged}]
    }
    assert "LAST message" in task and "assistant" in task
    assert outcome == Scored(fake_scores(judged, FORUM_CATEGORIES), "judge-1", outcome.details)  # type: ignore[union-attr]


async def test_the_builtin_policy_is_asked_when_none_is_given(api_key: str, settings_for: SettingsFor) -> None:
    with LlmServer(api_key=api_key) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv))) as backend:
            (outcome,) = await backend.score_texts(["hello"])
    assert isinstance(outcome, Scored)
    assert set(outcome.scores) == set(Policy.load(None).category_descriptions())


async def test_llama_guard_on_a_keyless_self_hosted_server_with_logprobs(settings_for: SettingsFor) -> None:
    texts = ["hello there", "I will hurt them <<S1:0.93>> <<S10:0.7>>"]
    with LlmServer(dialect="llama-guard", api_key=None) as srv:
        settings = settings_for(srv, backend="llm", key="", llm={"dialect": "llama-guard", "model": "llama-guard-3"})
        assert llm_api_key(settings) is None
        async with started(LlmBackend(settings)) as backend:
            safe, unsafe = await backend.score_texts(texts)
            (conversation,) = await backend.score_conversations(
                [Conversation(turn=Turn(role="assistant", content="<<S12:0.8>>"), context=())]
            )
        requests = srv.requests
        assert srv.violations == []
    assert all("authorization" not in r.headers for r in requests)
    body = next(r.body for r in requests if r.body["messages"][-1]["content"] == texts[0])
    assert body == {
        "model": "llama-guard-3",
        "messages": [{"role": "user", "content": texts[0]}],
        "temperature": 0,
        "max_tokens": 64,
        "logprobs": True,
        "top_logprobs": 5,
    }
    # A judged assistant turn without context: an empty user turn first, as the template needs.
    assert requests[-1].body["messages"] == [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "<<S12:0.8>>"},
    ]
    assert isinstance(safe, Scored) and isinstance(unsafe, Scored) and isinstance(conversation, Scored)
    assert set(safe.scores) == set(LLAMA_GUARD_HAZARDS.values()) and set(safe.scores.values()) == {0.0}
    assert unsafe.scores["violent_crimes"] == pytest.approx(0.93) and unsafe.scores["hate"] == pytest.approx(0.93)
    assert unsafe.scores["elections"] == 0.0
    assert conversation.scores["sexual_content"] == pytest.approx(0.8)
    assert unsafe.details is not None and unsafe.details.score_kind == "probability"


async def test_qwen3guard_without_server_logprobs_scores_are_labels(api_key: str, settings_for: SettingsFor) -> None:
    texts = ["<<violent:0.9>>", "<<politically_sensitive_topics:0.6>>", "fine"]
    with LlmServer(dialect="qwen3guard", api_key=api_key, logprobs=False) as srv:
        settings = llm_settings(settings_for, srv, dialect="qwen3guard")
        async with started(LlmBackend(settings)) as backend:
            unsafe, controversial, safe = await backend.score_texts(texts)
        assert srv.violations == []
    assert isinstance(unsafe, Scored) and isinstance(controversial, Scored) and isinstance(safe, Scored)
    assert unsafe.scores["violent"] == 1.0 and unsafe.details is not None and unsafe.details.score_kind == "label"
    assert controversial.scores["politically_sensitive_topics"] == 0.5
    assert set(safe.scores.values()) == {0.0}


async def test_qwen3guard_with_logprobs(api_key: str, settings_for: SettingsFor) -> None:
    with LlmServer(dialect="qwen3guard", api_key=api_key) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv, dialect="qwen3guard"))) as backend:
            (outcome,) = await backend.score_texts(["<<suicide_and_self_harm:0.9>>"])
    assert isinstance(outcome, Scored) and outcome.details is not None
    # P(Unsafe) 0.9, the rest split: P(Controversial) 0.05 counts half.
    assert outcome.scores["suicide_and_self_harm"] == pytest.approx(0.9 + 0.5 * 0.05)
    assert outcome.details.score_kind == "probability"


async def test_an_unparseable_answer_is_asked_again_and_its_tokens_counted(
    api_key: str, settings_for: SettingsFor
) -> None:
    def garbage_first(request: RecordedRequest, default: str) -> str:
        return "Sure! The scores are high." if request.index == 0 else default

    before = metrics.LLM_UNPARSEABLE.labels("json")._value.get()
    with LlmServer(api_key=api_key, answer=garbage_first) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["hello"])
        first_try, second_try = srv.requests
    assert first_try.raw_body == second_try.raw_body
    assert isinstance(outcome, Scored) and outcome.details is not None
    assert outcome.details.completion_tokens == len(tokenize("Sure! The scores are high.")) + len(
        tokenize(json.dumps({"scores": fake_scores("hello", FORUM_CATEGORIES)}))
    )
    assert outcome.details.prompt_tokens == 2 * count_prompt_tokens(first_try.body["messages"])
    assert metrics.LLM_UNPARSEABLE.labels("json")._value.get() == before + 1


@pytest.mark.parametrize("dialect", ["json", "llama-guard", "qwen3guard"])
async def test_unparseable_after_the_retries_is_rejected_as_llm_unparseable_and_the_rest_scored(
    api_key: str, settings_for: SettingsFor, dialect: str
) -> None:
    with LlmServer(api_key=api_key, dialect=dialect) as srv:  # type: ignore[arg-type]
        settings = llm_settings(settings_for, srv, dialect=dialect, parse_retries=2)
        async with started(LlmBackend(settings, policy=FORUM)) as backend:
            good, bad = await backend.score_texts(["fine", "a <<unparseable>> one"])
        bad_requests = [r for r in srv.requests if "unparseable" in json.dumps(r.body)]
    assert isinstance(good, Scored)
    assert isinstance(bad, Rejected) and bad.error_type == "llm_unparseable"
    assert "after 3 tries" in bad.reason and REFUSAL[:30] in bad.reason
    assert len(bad_requests) == 3


async def test_answers_with_a_score_out_of_range_are_unparseable(api_key: str, settings_for: SettingsFor) -> None:
    answers = iter(
        ['{"scores": {"spam": 7, "off_topic": 0, "hate_and_discrimination": 0}}', '{"scores": {"spam": "x"}}']
    )
    with LlmServer(api_key=api_key, answer=lambda request, default: next(answers)) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["x"])
        assert srv.request_count == 2
    assert isinstance(outcome, Rejected) and outcome.error_type == "llm_unparseable"
    assert "not a number" in outcome.reason and '{"scores": {"spam": "x"}}' in outcome.reason


def _with(default: str, **changes: float | None) -> str:
    """The server's answer with categories added (a value) or left out (None)."""
    scores = json.loads(default)["scores"]
    for name, value in changes.items():
        if value is None:
            scores.pop(name, None)
        else:
            scores[name] = value
    return json.dumps({"scores": scores})


async def test_a_chatty_judge_naming_extra_categories_is_scored_and_the_extras_counted(
    api_key: str, settings_for: SettingsFor
) -> None:
    before = metrics.LLM_UNKNOWN_CATEGORIES.labels("medical_advice")._value.get()
    with LlmServer(api_key=api_key, answer=lambda request, default: _with(default, medical_advice=0.7)) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["<<spam:0.9>> buy"])
        assert srv.request_count == 1, "an extra key is no reason to ask again"
    assert isinstance(outcome, Scored) and outcome.unscored == ()
    assert set(outcome.scores) == set(FORUM_CATEGORIES) and outcome.scores["spam"] == pytest.approx(0.9)
    assert metrics.LLM_UNKNOWN_CATEGORIES.labels("medical_advice")._value.get() == before + 1


async def test_an_answer_leaving_a_category_out_is_asked_again_within_the_parse_retries(
    api_key: str, settings_for: SettingsFor
) -> None:
    def off_topic_forgotten_once(request: RecordedRequest, default: str) -> str:
        return _with(default, off_topic=None) if request.index == 0 else default

    before = metrics.LLM_MISSING_CATEGORIES.labels("off_topic")._value.get()
    with LlmServer(api_key=api_key, answer=off_topic_forgotten_once) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv, parse_retries=1), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["hello"])
        assert srv.request_count == 2
    assert isinstance(outcome, Scored) and outcome.unscored == ()
    assert set(outcome.scores) == set(FORUM_CATEGORIES)
    assert outcome.details is not None and outcome.details.requests == 2
    assert metrics.LLM_MISSING_CATEGORIES.labels("off_topic")._value.get() == before + 1


async def test_a_category_left_out_of_every_try_is_unscored_not_zero_and_not_cached(
    api_key: str, settings_for: SettingsFor
) -> None:
    with LlmServer(api_key=api_key, answer=lambda request, default: _with(default, off_topic=None)) as srv:
        settings = llm_settings(settings_for, srv, parse_retries=2)
        async with started(create_backend(settings, FORUM)) as backend:
            assert isinstance(backend, CachingBackend)
            (outcome,) = await backend.score_texts(["hello <<spam:0.2>>"])
            (again,) = await backend.score_texts(["hello <<spam:0.2>>"])
        assert srv.request_count == 6, "three tries each time: a partial answer is not reused from the cache"
    for scored in (outcome, again):
        assert isinstance(scored, Scored)
        assert scored.unscored == ("off_topic",)
        assert "off_topic" not in scored.scores and scored.scores["spam"] == pytest.approx(0.2)


async def test_an_answer_cut_at_max_tokens_is_unparseable(api_key: str, settings_for: SettingsFor) -> None:
    with LlmServer(api_key=api_key) as srv:
        settings = llm_settings(settings_for, srv, max_answer_tokens=5, parse_retries=0)
        async with started(LlmBackend(settings, policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["x"])
        assert srv.requests[0].body["max_tokens"] == 5
    assert isinstance(outcome, Rejected) and "max_tokens" in outcome.reason


async def test_503_and_429_with_retry_after_are_retried(api_key: str, settings_for: SettingsFor) -> None:
    plan = [Fault(status=503), Fault(status=429, retry_after="1")]
    with LlmServer(api_key=api_key, fault_plan=plan) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["hello"])
        unavailable, limited, answered = srv.requests
    assert [unavailable.status, limited.status, answered.status] == [503, 429, 200]
    assert limited.retry_after == "1"
    assert limited.answered_at is not None and answered.received_at - limited.answered_at >= 1.0
    assert isinstance(outcome, Scored) and outcome.scores == fake_scores("hello", FORUM_CATEGORIES)


async def test_an_input_over_the_context_is_rejected_alone_with_the_servers_message(
    api_key: str, settings_for: SettingsFor
) -> None:
    long_text = "word " * 400
    with LlmServer(api_key=api_key, max_context_tokens=600) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            short, long = await backend.score_texts(["short", long_text])
    assert isinstance(short, Scored)
    assert isinstance(long, Rejected) and long.error_type == "backend_rejected"
    assert "maximum context length is 600 tokens" in long.reason


async def test_a_wrong_key_is_fatal_and_names_the_setting_without_the_key(settings_for: SettingsFor) -> None:
    with LlmServer(api_key="right-key") as srv:
        backend = LlmBackend(settings_for(srv, backend="llm", key="sk-wrong-0123456789"), policy=FORUM)
        async with started(backend):
            with pytest.raises(BackendAuthError) as raised:
                await backend.score_texts(["a", "b"])
    assert "MODWORKER_LLM__API_KEY" in str(raised.value)
    assert "sk-wrong" not in str(raised.value)


async def test_a_server_without_json_mode_needs_json_mode_off(api_key: str, settings_for: SettingsFor) -> None:
    with LlmServer(api_key=api_key, json_mode=False) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            (refused,) = await backend.score_texts(["x"])
        async with started(LlmBackend(llm_settings(settings_for, srv, json_mode=False), policy=FORUM)) as backend:
            (scored,) = await backend.score_texts(["x"])
        assert "response_format" not in srv.requests[-1].body
    assert isinstance(refused, Rejected) and "response_format" in refused.reason
    assert isinstance(scored, Scored)


async def test_requests_in_flight_stay_within_the_concurrency_limit(api_key: str, settings_for: SettingsFor) -> None:
    with LlmServer(api_key=api_key, latency_s=0.1) as srv:
        settings = settings_for(srv, backend="llm", scoring={"max_concurrency": 2})
        async with started(LlmBackend(settings, policy=FORUM)) as backend:
            outcomes = await backend.score_texts([f"text {i}" for i in range(6)])
        requests = srv.requests
    assert all(isinstance(o, Scored) for o in outcomes) and len(requests) == 6
    events = sorted([(r.received_at, 1) for r in requests] + [(r.answered_at or 0.0, -1) for r in requests])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert peak == 2


async def test_token_metrics_and_the_cache_marks_reused_answers(api_key: str, settings_for: SettingsFor) -> None:
    prompt = metrics.LLM_TOKENS.labels("json", "prompt")
    before = prompt._value.get()
    with LlmServer(api_key=api_key) as srv:
        backend = create_backend(settings_for(srv, backend="llm"), policy=FORUM)
        assert isinstance(backend, CachingBackend) and isinstance(backend.inner, LlmBackend)
        async with started(backend):
            (first_answer,) = await backend.score_texts(["same text"])
            (second_answer,) = await backend.score_texts(["same text"])
        assert srv.request_count == 1
    assert isinstance(first_answer, Scored) and isinstance(second_answer, Scored)
    assert first_answer.details is not None and second_answer.details is not None
    assert not first_answer.details.cached and second_answer.details.cached
    assert second_answer.scores == first_answer.scores
    assert prompt._value.get() == before + first_answer.details.prompt_tokens


def test_mistral_url_needs_a_key_and_falls_back_to_mistral_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MISTRAL_API_KEY", "MODWORKER_MISTRAL__API_KEY", "MODWORKER_LLM__API_KEY", "MODWORKER_LLM__BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="MISTRAL_API_KEY"):
        load_settings(require_kafka=False, backend="llm")
    settings = load_settings(require_kafka=False, backend="llm", mistral={"api_key": "mk-1"})
    key = llm_api_key(settings)
    assert key is not None and key.get_secret_value() == "mk-1"
    own = load_settings(require_kafka=False, backend="llm", llm={"base_url": "http://gpu-box:8000"})
    assert llm_api_key(own) is None  # a self-hosted server: no key needed, none sent
    with pytest.raises(ConfigError, match="MODWORKER_LLM__DIALECT"):
        load_settings(require_kafka=False, backend="llm", llm={"base_url": "http://x", "dialect": "shieldgemma"})


async def test_a_body_that_is_not_a_chat_completion_is_unavailable_and_names_the_setting(
    api_key: str, settings_for: SettingsFor
) -> None:
    with LlmServer(
        api_key=api_key, fault_plan=lambda request: Fault(status=200, body={"object": "list", "data": []})
    ) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            with pytest.raises(BackendUnavailable, match="MODWORKER_LLM__BASE_URL"):
                await backend.score_texts(["a", "b"])


async def test_a_null_content_without_model_or_usage_is_an_unparseable_answer(
    api_key: str, settings_for: SettingsFor
) -> None:
    refusal = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]}
    with LlmServer(api_key=api_key, fault_plan=lambda request: Fault(status=200, body=refusal)) as srv:
        async with started(LlmBackend(llm_settings(settings_for, srv), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["a"])
    assert isinstance(outcome, Rejected) and outcome.error_type == "llm_unparseable"


def test_the_llm_key_is_redacted_from_logs() -> None:
    from worker.cli import secrets_of

    settings = load_settings(require_kafka=False, backend="llm", llm={"base_url": "http://x", "api_key": "llm-secret"})
    assert "llm-secret" in secrets_of(settings)
