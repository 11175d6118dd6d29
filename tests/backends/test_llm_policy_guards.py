"""The policy-as-prompt guard dialects (shieldstral, granite-guardian, gpt-oss-safeguard) against the loopback server.

The server plays each model as vLLM serves it, scoring the texts' markers; what is checked
here is the wire (one request per category where the model takes one, the fields each
model needs), the scores (P(yes) from logprobs, labels without), the cost counted per
input, and the failures (retries of flaky answers, dead letters of unparseable ones).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.backends.conftest import started
from worker.backends.base import Rejected, Scored
from worker.backends.llm import LlmBackend
from worker.config import Settings
from worker.ops import metrics
from worker.pipeline.policy import Policy
from worker.testing import Fault, LlmServer, RecordedRequest, fake_scores

SettingsFor = Callable[..., Settings]
DEPLOY = Path(__file__).parents[2] / "deploy"
DIALECTS = ("shieldstral", "granite-guardian", "gpt-oss-safeguard")

FORUM = Policy.from_mapping(
    {
        "categories": {
            "spam": {"threshold": 0.7, "action": "block", "description": "Unsolicited advertising or bulk links."},
            "off_topic": {"threshold": 0.8, "action": "flag", "description": "Unrelated to cooking."},
            "violence": {"threshold": 0.5, "action": "block"},
        }
    }
)
CATEGORIES = tuple(FORUM.category_descriptions())


def server(dialect: str, api_key: str, **options: object) -> LlmServer:
    return LlmServer(api_key=api_key, dialect=dialect, categories=FORUM.category_descriptions(), **options)  # type: ignore[arg-type]


def settings(settings_for: SettingsFor, srv: LlmServer, dialect: str, **llm: object) -> Settings:
    return settings_for(srv, backend="llm", llm={"model": "guard", "dialect": dialect, **llm})


def counter(metric, *labels: str) -> float:  # type: ignore[no-untyped-def]
    return float(metric.labels(*labels)._value.get())


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_scores_are_p_yes_from_logprobs_and_the_cost_is_counted_per_input(
    api_key: str, settings_for: SettingsFor, dialect: str
) -> None:
    texts = ["how long do I rest a brisket?", "CHEAP WATCHES <<spam:0.93>> <<violence:0.2>>"]
    requests_before = counter(metrics.LLM_REQUESTS, dialect)
    tokens_before = counter(metrics.LLM_TOKENS, dialect, "prompt")
    with server(dialect, api_key) as srv:
        async with started(LlmBackend(settings(settings_for, srv, dialect), policy=FORUM)) as backend:
            outcomes = await backend.score_texts(texts)
        requests = srv.requests
        assert srv.violations == []
        served_prompt, served_completion = srv.prompt_tokens, srv.completion_tokens
    per_input = 1 if dialect == "gpt-oss-safeguard" else len(CATEGORIES)
    assert len(requests) == per_input * len(texts)
    for text, outcome in zip(texts, outcomes, strict=True):
        assert isinstance(outcome, Scored), outcome
        assert outcome.details is not None
        assert outcome.details.score_kind == "probability"
        assert outcome.details.requests == per_input
        expected = fake_scores(text, CATEGORIES)
        # P(yes) is the marked score when the model says yes, 1 - P(no) otherwise: the same number.
        assert outcome.scores == pytest.approx(expected)
        assert all(0.0 <= score <= 1.0 for score in outcome.scores.values())
    details = [o.details for o in outcomes if isinstance(o, Scored) and o.details]
    assert sum(d.prompt_tokens or 0 for d in details) == served_prompt
    assert sum(d.completion_tokens or 0 for d in details) == served_completion
    assert counter(metrics.LLM_REQUESTS, dialect) == requests_before + len(requests)
    assert counter(metrics.LLM_TOKENS, dialect, "prompt") == tokens_before + served_prompt


async def test_shieldstral_and_granite_fan_out_within_the_bound(api_key: str, settings_for: SettingsFor) -> None:
    with server("shieldstral", api_key, latency_s=0.05) as srv:
        config = settings(settings_for, srv, "shieldstral", max_questions_in_flight=2)
        async with started(LlmBackend(config, policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["one input, three questions"])
        requests = srv.requests
    assert isinstance(outcome, Scored)
    assert sorted(r.body["messages"][1]["content"].split("</Query>")[0] for r in requests) == sorted(
        [
            "<Query>Is this content spam, that is: Unsolicited advertising or bulk links?",
            "<Query>Is this content off topic, that is: Unrelated to cooking?",
            "<Query>Is this content violence?",
        ]
    )
    assert all(r.body["max_tokens"] == 1 and r.body["top_logprobs"] == 5 for r in requests)
    in_flight = max(
        sum(1 for other in requests if other.received_at <= r.received_at < (other.answered_at or 0.0))
        for r in requests
    )
    assert in_flight == 2, "at most max_questions_in_flight requests at once, and the bound used"


async def test_granite_guardian_think_mode_and_labels_without_logprobs(api_key: str, settings_for: SettingsFor) -> None:
    with server("granite-guardian", api_key, logprobs=False) as srv:
        config = settings(settings_for, srv, "granite-guardian", think=True)
        async with started(LlmBackend(config, policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["kill the lights <<violence:0.7>>"])
        requests = srv.requests
        assert srv.violations == []
    kwargs = {json.dumps(r.body["chat_template_kwargs"], sort_keys=True) for r in requests}
    assert kwargs == {
        json.dumps({"guardian_config": config, "think": True}, sort_keys=True)
        for config in (
            {"custom_criteria": "Unsolicited advertising or bulk links."},
            {"custom_criteria": "Unrelated to cooking."},
            {"criteria_id": "violence"},
        )
    }
    assert isinstance(outcome, Scored) and outcome.details is not None
    assert outcome.details.score_kind == "label"
    assert outcome.scores == {"spam": 0.0, "off_topic": 0.0, "violence": 1.0}


async def test_gpt_oss_safeguard_sends_the_reasoning_effort_and_reads_only_the_final_answer(
    api_key: str, settings_for: SettingsFor
) -> None:
    with server("gpt-oss-safeguard", api_key) as srv:
        config = settings(settings_for, srv, "gpt-oss-safeguard", reasoning_effort="high")
        async with started(LlmBackend(config, policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["<<off_topic:0.9>> who won the match?"])
        (request,) = srv.requests
    assert request.body["reasoning_effort"] == "high"
    assert isinstance(outcome, Scored) and outcome.scores["off_topic"] == pytest.approx(0.9)


async def test_gpt_oss_safeguard_reasoning_that_fills_max_tokens_is_unparseable(
    api_key: str, settings_for: SettingsFor
) -> None:
    with server("gpt-oss-safeguard", api_key) as srv:
        config = settings(settings_for, srv, "gpt-oss-safeguard", max_answer_tokens=5, parse_retries=0)
        async with started(LlmBackend(config, policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["hello"])
        (request,) = srv.requests
    assert request.status == 200
    assert isinstance(outcome, Rejected) and outcome.error_type == "llm_unparseable"
    assert "only reasoning" in outcome.reason and "MAX_ANSWER_TOKENS" in outcome.reason


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_flaky_answer_is_asked_again_and_counted(api_key: str, settings_for: SettingsFor, dialect: str) -> None:
    seen: set[str] = set()

    def first_try_garbled(request: RecordedRequest, default: str) -> str:
        key = json.dumps(request.body, sort_keys=True)
        if key in seen:
            return default
        seen.add(key)
        return "Let me think about this"

    with server(dialect, api_key, answer=first_try_garbled) as srv:
        async with started(LlmBackend(settings(settings_for, srv, dialect), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["buy <<spam:0.8>>"])
        requests = srv.requests
    questions = 1 if dialect == "gpt-oss-safeguard" else len(CATEGORIES)
    assert len(requests) == 2 * questions, "each question once garbled, once answered"
    assert isinstance(outcome, Scored) and outcome.details is not None
    assert outcome.details.requests == 2 * questions
    assert outcome.scores["spam"] == pytest.approx(0.8)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_always_unparseable_answers_reject_the_input_as_llm_unparseable(
    api_key: str, settings_for: SettingsFor, dialect: str
) -> None:
    with server(dialect, api_key) as srv:
        async with started(LlmBackend(settings(settings_for, srv, dialect), policy=FORUM)) as backend:
            good, bad = await backend.score_texts(["a fine stew", "ignore the rules <<unparseable>>"])
    assert isinstance(good, Scored)
    assert isinstance(bad, Rejected) and bad.error_type == "llm_unparseable"
    assert f"the {dialect} answer" in bad.reason and "after 2 tries" in bad.reason


async def test_server_errors_on_one_question_are_retried_and_a_refusal_rejects_the_input(
    api_key: str, settings_for: SettingsFor
) -> None:
    plan = [Fault(status=503)]
    with server("shieldstral", api_key, fault_plan=plan) as srv:
        async with started(LlmBackend(settings(settings_for, srv, "shieldstral"), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["hello"])
        statuses = sorted(r.status or 0 for r in srv.requests)
    assert statuses == [200, 200, 200, 503]
    assert isinstance(outcome, Scored) and outcome.details is not None and outcome.details.requests == 3

    def refuse_violence(request: RecordedRequest) -> Fault | None:
        return Fault(status=400) if "violence" in json.dumps(request.body) else None

    with server("granite-guardian", api_key, fault_plan=refuse_violence) as srv:
        async with started(LlmBackend(settings(settings_for, srv, "granite-guardian"), policy=FORUM)) as backend:
            (outcome,) = await backend.score_texts(["hello"])
    assert isinstance(outcome, Rejected) and "HTTP 400" in outcome.reason and outcome.error_type != "llm_unparseable"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_each_dialects_forum_policy_example_loads_and_is_its_prompt(dialect: str) -> None:
    from worker.backends.llm import make_dialect
    from worker.config import load_settings

    policy = Policy.load(DEPLOY / f"policy.forum-{dialect}.example.yaml")
    described = policy.category_descriptions()
    assert {"spam", "self_promotion", "off_topic"} <= set(described)
    assert all(described.values()), "every category is described: the description is what the model reads"
    assert policy.decide({"self_promotion": 0.95}, source="marketplace").violations == []
    config = load_settings(
        require_kafka=False, backend="llm", llm={"dialect": dialect, "base_url": "http://127.0.0.1:9"}
    )
    chosen = make_dialect(config, policy)
    assert chosen.name == dialect
    for name, description in described.items():
        assert description is not None and " ".join(description.split()) in " ".join(chosen.system_prompt.split()), name
    if dialect == "shieldstral":
        assert all(description.endswith("?") for description in described.values() if description)
