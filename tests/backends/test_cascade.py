"""The cascade: band logic on a policy, and the composition over two real loopback APIs.

First stage: the loopback OpenAI server; second stage: the loopback Mistral server. Both
score every category below 0.1 unless the text carries a marker such as
``<<sexual:0.55>>``, so which inputs are uncertain is known from the text alone.
"""

from __future__ import annotations

import pytest

from schemas import Turn
from worker.backends import create_backend
from worker.backends.base import BackendUnavailable, Conversation, Scored, Unavailable
from worker.backends.cascade import CascadeBackend, UncertaintyBands
from worker.config import load_settings
from worker.pipeline.policy import Policy, PolicyError
from worker.testing import Fault, MistralServer
from worker.testing.openai_server import OpenAIServer

POLICY = {
    "categories": {
        "sexual": {"threshold": 0.5, "action": "block"},
        "pii": {"threshold": 0.3, "action": "flag"},
        "jailbreaking": {"threshold": 0.5, "action": "allow"},
    },
    "aliases": {"sexual/minors": "sexual"},
}


def bands(document: dict | None = None, default_band: float = 0.1) -> UncertaintyBands:
    return UncertaintyBands(Policy.from_mapping(document or POLICY), default_band=default_band)


# -- bands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "uncertain"),
    [(0.39, False), (0.4, True), (0.5, True), (0.599, True), (0.6, False), (0.05, False), (0.95, False)],
)
def test_a_score_is_uncertain_inside_the_band_around_its_threshold_only(score, uncertain):
    assert bands().uncertain({"sexual": score}) is uncertain


def test_an_input_is_uncertain_when_any_one_category_is():
    assert bands().uncertain({"sexual": 0.9, "pii": 0.35}) is True
    assert bands().uncertain({"sexual": 0.9, "pii": 0.05}) is False


def test_aliases_are_merged_before_the_band_applies_as_the_policy_does():
    # sexual/minors 0.45 and sexual 0.9: the policy sees 0.9, far above 0.5.
    assert bands().uncertain({"sexual": 0.9, "sexual/minors": 0.45}) is False
    assert bands().uncertain({"sexual/minors": 0.45}) is True


def test_a_category_that_can_never_be_a_violation_never_escalates():
    assert bands().uncertain({"jailbreaking": 0.5}) is False


def test_unknown_categories_use_the_default_rule_threshold():
    assert bands().uncertain({"brand_new": 0.55}) is True
    assert bands().uncertain({"brand_new": 0.2}) is False


def test_the_policy_cascade_section_gives_bands_per_category_and_a_default():
    document = {
        **POLICY,
        "cascade": {"default": {"below": 0.0, "above": 0.0}, "bands": {"sexual": {"below": 0.05, "above": 0.3}}},
    }
    b = bands(document, default_band=0.2)
    assert b.band("sexual") == (0.05, 0.3)
    assert b.band("pii") == (0.0, 0.0)
    assert b.uncertain({"sexual": 0.44}) is False
    assert b.uncertain({"sexual": 0.79}) is True
    assert b.uncertain({"pii": 0.3}) is False  # a zero band: the first stage decides everything


def test_without_a_cascade_section_the_configured_default_band_applies():
    assert bands(default_band=0.25).band("sexual") == (0.25, 0.25)


def test_thresholds_of_overrides_count_since_a_backend_cannot_see_the_tenant():
    document = {**POLICY, "overrides": [{"match": {"tenant": "kids"}, "categories": {"sexual": {"threshold": 0.2}}}]}
    assert Policy.from_mapping(document).thresholds("sexual") == (0.2, 0.5)
    assert bands(document).uncertain({"sexual": 0.25}) is True


def test_a_bad_cascade_section_is_refused_with_the_key_path():
    with pytest.raises(PolicyError, match=r"cascade\.bands\.sexual\.below"):
        Policy.from_mapping({**POLICY, "cascade": {"bands": {"sexual": {"below": 2, "above": 0.1}}}})
    with pytest.raises(PolicyError, match="alias"):
        Policy.from_mapping({**POLICY, "cascade": {"bands": {"sexual/minors": {"below": 0.1, "above": 0.1}}}})


def test_a_policy_without_a_cascade_section_keeps_its_version_and_bands_change_it():
    plain = Policy.from_mapping(POLICY)
    with_bands = plain.with_cascade_bands((0.1, 0.1), {"sexual": (0.05, 0.2)})
    assert Policy.from_mapping(plain.document()).version == plain.version
    assert with_bands.version != plain.version
    assert Policy.from_mapping(with_bands.document()).version == with_bands.version
    assert with_bands.cascade_band("sexual") == (0.05, 0.2)


# -- the composition over real loopback servers -----------------------------------------


def cascade_over(openai: OpenAIServer, mistral: MistralServer, **extra) -> CascadeBackend:
    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:9"},
        backend="cascade",
        cascade={"first": "openai", "then": "mistral"},
        openai={"api_key": "k", "base_url": openai.base_url},
        mistral={"api_key": "k", "base_url": mistral.base_url},
        http={"retry_base_wait_s": 0.01, "retry_max_wait_s": 0.02, "retry_budget_s": 5.0, **extra.pop("http", {})},
        **extra,
    )
    backend = create_backend(settings, Policy.from_mapping(POLICY))
    assert isinstance(backend, CascadeBackend)
    return backend


def sent_texts(server) -> list[str]:
    return [text for request in server.requests for text in request.body["input"]]


async def test_only_uncertain_inputs_reach_the_second_stage_which_then_decides():
    texts = ["plain", "sure <<sexual:0.93>>", "unsure <<sexual:0.55>>", "unsure violence <<violence:0.52>>", "plain 2"]
    with OpenAIServer(api_key="k") as openai, MistralServer(api_key="k") as mistral:
        backend = cascade_over(openai, mistral)
        await backend.start()
        try:
            outcomes = await backend.score_texts(texts)
        finally:
            await backend.close()
    assert sent_texts(openai) == texts
    assert sent_texts(mistral) == [texts[2], texts[3]]
    assert [o.decided_by for o in outcomes] == ["openai", "openai", "mistral", "mistral", "openai"]  # type: ignore[union-attr]
    confident, escalated = outcomes[1], outcomes[2]
    assert isinstance(confident, Scored) and isinstance(escalated, Scored)
    assert [s.stage for s in confident.stages] == ["first"]
    assert confident.scores["sexual"] == 0.93
    assert [(s.stage, s.backend) for s in escalated.stages] == [("first", "openai"), ("then", "mistral")]
    assert escalated.model == "mistral-moderation-2411"
    assert escalated.scores == escalated.stages[1].scores
    assert escalated.stages[0].scores["sexual"] == 0.55
    assert (backend.decided_first, backend.escalated) == (3, 2)


async def test_a_batch_with_nothing_uncertain_makes_no_second_stage_call():
    with OpenAIServer(api_key="k") as openai, MistralServer(api_key="k") as mistral:
        backend = cascade_over(openai, mistral)
        await backend.start()
        try:
            outcomes = await backend.score_texts(["a", "b <<sexual:0.99>>"])
        finally:
            await backend.close()
    assert mistral.requests == []
    assert all(isinstance(o, Scored) and o.decided_by == "openai" for o in outcomes)


async def test_conversations_escalate_the_same_way():
    turn = Conversation(
        turn=Turn(role="assistant", content="hm <<sexual:0.5>>"), context=(Turn(role="user", content="q"),)
    )
    sure = Conversation(turn=Turn(role="user", content="hello"))
    with OpenAIServer(api_key="k") as openai, MistralServer(api_key="k") as mistral:
        backend = cascade_over(openai, mistral)
        await backend.start()
        try:
            outcomes = await backend.score_conversations([sure, turn])
        finally:
            await backend.close()
    assert [r.path for r in mistral.requests] == ["/v1/chat/moderations"]
    assert [o.decided_by for o in outcomes] == ["openai", "mistral"]  # type: ignore[union-attr]


async def test_a_second_stage_outage_leaves_only_the_escalated_inputs_unavailable():
    with (
        OpenAIServer(api_key="k") as openai,
        MistralServer(api_key="k", fault_plan=lambda r: Fault(status=503)) as mistral,
    ):
        backend = cascade_over(openai, mistral, http={"retry_attempts": 2})
        await backend.start()
        try:
            outcomes = await backend.score_texts(["a", "b <<sexual:0.45>>", "c <<sexual:0.8>>"])
        finally:
            await backend.close()
    assert isinstance(outcomes[0], Scored) and isinstance(outcomes[2], Scored)
    assert isinstance(outcomes[1], Unavailable)
    assert "cascade second stage mistral" in outcomes[1].reason


async def test_a_first_stage_outage_fails_the_whole_batch():
    with (
        OpenAIServer(api_key="k", fault_plan=lambda r: Fault(status=503)) as openai,
        MistralServer(api_key="k") as mistral,
    ):
        backend = cascade_over(openai, mistral, http={"retry_attempts": 1})
        await backend.start()
        try:
            with pytest.raises(BackendUnavailable):
                await backend.score_texts(["a"])
        finally:
            await backend.close()
    assert mistral.requests == []


def test_the_cascade_needs_the_policy_and_two_different_stages():
    settings = load_settings(kafka={"bootstrap_servers": "x:1"}, backend="cascade", require_backend=False)
    with pytest.raises(ValueError, match="needs the policy"):
        create_backend(settings)
    from worker.config import ConfigError

    with pytest.raises(ConfigError, match="MODWORKER_CASCADE__THEN must differ"):
        load_settings(
            kafka={"bootstrap_servers": "x:1"}, backend="cascade", cascade={"first": "local", "then": "local"}
        )


def test_a_threshold_that_exists_only_when_overrides_stack_is_a_band():
    """A tenant override makes the category block, a source override lowers its threshold:
    for that tenant from that source it blocks from 0.1. Near 0.1 is near a boundary."""
    document = {
        "categories": {"sexual": {"threshold": 0.5, "action": "allow"}},
        "overrides": [
            {"match": {"tenant": "kids"}, "categories": {"sexual": {"action": "block"}}},
            {"match": {"source": "chat"}, "categories": {"sexual": {"threshold": 0.1}}},
        ],
    }
    policy = Policy.from_mapping(document)
    assert policy.decide({"sexual": 0.11}, tenant="kids", source="chat").action == "block"
    assert policy.thresholds("sexual") == (0.1, 0.5)
    assert bands(document).uncertain({"sexual": 0.11}) is True


def test_a_default_override_stacked_under_a_category_override_is_a_band():
    """An override's default reaches a category the base does not name; a later one patches it."""
    document = {
        "default": {"threshold": 0.5, "action": "allow"},
        "overrides": [
            {"match": {"tenant": "kids"}, "default": {"action": "block", "threshold": 0.7}},
            {"match": {"source": "chat"}, "categories": {"hate": {"threshold": 0.2}}},
        ],
    }
    policy = Policy.from_mapping(document)
    assert policy.decide({"hate": 0.25}, tenant="kids", source="chat").action == "block"
    assert policy.decide({"hate": 0.75}, tenant="kids").action == "block"
    assert policy.thresholds("hate") == (0.2, 0.7)
