"""The policy stage: raw scores + a YAML document -> action and violations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas import ACTION_SEVERITY, CategoryHit
from worker.pipeline.policy import Decision, Policy, PolicyError
from worker.pipeline.verdict_data import to_contract

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "categories": {
        "sexual": {"threshold": 0.5, "action": "block"},
        "selfharm": {"threshold": 0.3, "action": "review"},
        "pii": {"threshold": 0.7, "action": "flag"},
        "jailbreaking": {"threshold": 0.5, "action": "allow"},
    },
    "aliases": {"sexual/minors": "sexual", "self-harm": "selfharm", "self-harm/intent": "selfharm"},
    "default": {"threshold": 0.6, "action": "flag"},
}


def policy(**changes: Any) -> Policy:
    return Policy.from_mapping({**BASE, **changes})


def categories(decision: Decision) -> list[str]:
    return [hit.category for hit in decision.violations]


# --- thresholds and actions --------------------------------------------------------------


def test_a_score_equal_to_the_threshold_hits_and_one_just_below_does_not():
    p = policy()
    at = p.decide({"pii": 0.7})
    below = p.decide({"pii": math.nextafter(0.7, 0)})
    assert (at.action, categories(at)) == ("flag", ["pii"])
    assert (below.action, below.violations) == ("allow", [])


def test_a_hit_records_canonical_name_score_threshold_and_action():
    [hit] = policy().decide({"selfharm": 0.42}).violations
    assert (hit.category, hit.score, hit.threshold, hit.action) == ("selfharm", 0.42, 0.3, "review")


def test_action_is_the_most_severe_hit_and_violations_are_ordered_by_severity_then_score():
    decision = policy().decide({"pii": 0.99, "sexual": 0.55, "selfharm": 0.9, "unknown_a": 0.7, "unknown_b": 0.8})
    assert decision.action == "block"
    assert categories(decision) == ["sexual", "selfharm", "pii", "unknown_b", "unknown_a"]
    severities = [ACTION_SEVERITY[hit.action] for hit in decision.violations]
    assert severities == sorted(severities, reverse=True)


def test_no_hit_means_allow_and_not_flagged():
    decision = policy().decide({"sexual": 0.1, "pii": 0.2, "whatever": 0.0})
    assert decision == Decision(action="allow", violations=[])
    assert not decision.flagged


@pytest.mark.parametrize("action", ["flag", "review", "block"])
def test_flagged_is_true_for_every_action_but_allow(action):
    p = Policy.from_mapping({"categories": {"c": {"threshold": 0.5, "action": action}}})
    decision = p.decide({"c": 0.5})
    assert decision.action == action
    assert decision.flagged


def test_an_allow_action_is_monitored_but_never_a_violation():
    p = policy()
    decision = p.decide({"jailbreaking": 1.0})
    assert (decision.action, decision.violations, decision.flagged) == ("allow", [], False)
    # ... even next to a real violation
    assert categories(p.decide({"jailbreaking": 1.0, "pii": 0.8})) == ["pii"]


def test_a_threshold_of_zero_hits_every_score_and_one_only_certainty():
    p = Policy.from_mapping(
        {"categories": {"always": {"threshold": 0, "action": "flag"}, "certain": {"threshold": 1, "action": "block"}}}
    )
    assert categories(p.decide({"always": 0.0, "certain": 0.999})) == ["always"]
    assert categories(p.decide({"always": 0.0, "certain": 1.0})) == ["certain", "always"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.9", None])
def test_a_score_that_is_not_a_finite_number_is_refused_loudly(bad):
    with pytest.raises(ValueError, match="'sexual'"):
        policy().decide({"sexual": bad})


# --- aliases ------------------------------------------------------------------------------


def test_an_alias_is_decided_under_its_canonical_name():
    p = policy()
    assert p.canonical("sexual/minors") == "sexual"
    assert p.canonical("sexual") == "sexual"
    assert p.canonical("never-heard-of-it") == "never-heard-of-it"
    [hit] = p.decide({"sexual/minors": 0.6}).violations
    assert (hit.category, hit.action, hit.score) == ("sexual", "block", 0.6)


@pytest.mark.parametrize(
    "scores",
    [
        {"self-harm": 0.2, "self-harm/intent": 0.35, "selfharm": 0.1},
        {"selfharm": 0.35, "self-harm": 0.2, "self-harm/intent": 0.0},
        {"self-harm/intent": 0.1, "self-harm": 0.35},
    ],
)
def test_several_raw_names_give_their_canonical_category_the_highest_score(scores):
    [hit] = policy().decide(scores).violations
    assert (hit.category, hit.score) == ("selfharm", 0.35)


def test_the_max_of_aliases_below_the_threshold_does_not_hit():
    assert policy().decide({"self-harm": 0.29, "self-harm/intent": 0.29, "selfharm": 0.2}).violations == []


# --- the default for unknown categories ----------------------------------------------------


def test_an_unknown_category_uses_the_default_rule():
    p = policy()
    [hit] = p.decide({"brand_new_category": 0.6}).violations
    assert (hit.category, hit.threshold, hit.action) == ("brand_new_category", 0.6, "flag")
    assert p.decide({"brand_new_category": 0.59}).violations == []


def test_without_a_default_unknown_categories_flag_at_one_half():
    p = Policy.from_mapping({"categories": {}})
    [hit] = p.decide({"x": 0.5}).violations
    assert (hit.threshold, hit.action) == (0.5, "flag")


def test_an_alias_to_a_category_the_policy_does_not_list_uses_the_default():
    p = Policy.from_mapping({"aliases": {"raw": "cooked"}, "default": {"threshold": 0.4, "action": "review"}})
    [hit] = p.decide({"raw": 0.4}).violations
    assert (hit.category, hit.action) == ("cooked", "review")


# --- overrides -----------------------------------------------------------------------------

OVERRIDES = [
    {"match": {"tenant": "kids"}, "categories": {"sexual": {"threshold": 0.1}}, "default": {"action": "review"}},
    {"match": {"source": "forum"}, "categories": {"pii": {"action": "allow"}}},
    {
        "match": {"tenant": "kids", "source": "chat"},
        "categories": {"sexual": {"threshold": 0.05}, "pii": {"action": "block"}},
    },
]


def test_a_tenant_override_applies_to_that_tenant_only():
    p = policy(overrides=OVERRIDES)
    assert categories(p.decide({"sexual": 0.2}, tenant="kids")) == ["sexual"]
    assert p.decide({"sexual": 0.2}, tenant="adults").violations == []
    assert p.decide({"sexual": 0.2}).violations == []


def test_a_partial_override_keeps_the_field_it_does_not_give():
    [hit] = policy(overrides=OVERRIDES).decide({"sexual": 0.2}, tenant="kids").violations
    assert (hit.threshold, hit.action) == (0.1, "block")


def test_an_override_of_the_default_changes_unknown_categories_only():
    p = policy(overrides=OVERRIDES)
    [unknown] = p.decide({"novel": 0.6}, tenant="kids").violations
    assert (unknown.action, unknown.threshold) == ("review", 0.6)
    [pii] = p.decide({"pii": 0.8}, tenant="kids").violations
    assert pii.action == "flag"


def test_a_source_override_applies_to_that_source_whatever_the_tenant():
    p = policy(overrides=OVERRIDES)
    for tenant in (None, "kids", "adults"):
        assert p.decide({"pii": 0.9}, tenant=tenant, source="forum").violations == []
    assert categories(p.decide({"pii": 0.9}, source="comments")) == ["pii"]


def test_a_match_on_tenant_and_source_needs_both():
    p = policy(overrides=OVERRIDES)
    both = p.decide({"pii": 0.8}, tenant="kids", source="chat")
    assert both.action == "block"
    assert p.decide({"pii": 0.8}, tenant="kids", source="comments").action == "flag"
    assert p.decide({"pii": 0.8}, tenant="adults", source="chat").action == "flag"


def test_later_overrides_win_over_earlier_ones():
    p = policy(overrides=OVERRIDES)
    [hit] = p.decide({"sexual": 0.07}, tenant="kids", source="chat").violations
    assert hit.threshold == 0.05
    swapped = policy(overrides=[OVERRIDES[2], OVERRIDES[0]])
    [hit] = swapped.decide({"sexual": 0.2}, tenant="kids", source="chat").violations
    assert hit.threshold == 0.1


def test_an_override_can_add_a_category_that_inherits_the_overridden_default():
    p = policy(
        overrides=[
            {"match": {"tenant": "t"}, "default": {"action": "block"}, "categories": {"spam": {"threshold": 0.2}}}
        ]
    )
    [hit] = p.decide({"spam": 0.3}, tenant="t").violations
    assert (hit.threshold, hit.action) == (0.2, "block")
    assert p.decide({"spam": 0.3}).violations == []


def test_overrides_do_not_leak_between_tenants_after_many_decisions():
    p = policy(overrides=OVERRIDES)
    for _ in range(3):
        assert p.decide({"sexual": 0.2}, tenant="kids").action == "block"
        assert p.decide({"sexual": 0.2}, tenant="other").action == "allow"
        assert p.decide({"sexual": 0.2}, tenant="kids", source="chat").action == "block"
        assert p.decide({"sexual": 0.2}).action == "allow"


# --- version -----------------------------------------------------------------------------


def test_version_is_twelve_hex_digits():
    version = policy().version
    assert len(version) == 12
    int(version, 16)


def test_version_is_the_same_however_the_document_is_ordered_or_laid_out(tmp_path):
    block_style = tmp_path / "block.yaml"
    block_style.write_text(yaml.safe_dump({**BASE, "overrides": OVERRIDES}, sort_keys=True, default_flow_style=False))
    reordered = {
        "overrides": [
            {k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v for k, v in reversed(o.items())}
            for o in OVERRIDES
        ],
        "default": dict(reversed(list(BASE["default"].items()))),
        "aliases": dict(reversed(list(BASE["aliases"].items()))),
        "categories": {
            k: {"action": v["action"], "threshold": v["threshold"]} for k, v in reversed(BASE["categories"].items())
        },
    }
    flow_style = tmp_path / "flow.yaml"
    flow_style.write_text(
        "# a comment\n" + yaml.safe_dump(reordered, sort_keys=False, default_flow_style=True, width=40)
    )
    versions = {
        Policy.from_mapping({**BASE, "overrides": OVERRIDES}).version,
        Policy.from_mapping(reordered).version,
        Policy.load(block_style).version,
        Policy.load(flow_style).version,
    }
    assert len(versions) == 1


def test_version_does_not_depend_on_how_a_number_is_written():
    as_ints = Policy.from_mapping({"categories": {"c": {"threshold": 1, "action": "block"}}})
    as_floats = Policy.from_mapping({"categories": {"c": {"threshold": 1.0, "action": "block"}}})
    assert as_ints.version == as_floats.version


def test_version_is_the_same_when_the_default_is_spelled_out():
    assert (
        Policy.from_mapping({}).version
        == Policy.from_mapping({"default": {"threshold": 0.5, "action": "flag"}}).version
    )


@pytest.mark.parametrize(
    "change",
    [
        {"default": {"threshold": 0.61, "action": "flag"}},
        {"categories": {**BASE["categories"], "pii": {"threshold": 0.7, "action": "review"}}},
        {"aliases": {**BASE["aliases"], "porn": "sexual"}},
        {"overrides": OVERRIDES},
        {"overrides": list(reversed(OVERRIDES))},
    ],
)
def test_version_changes_with_content(change):
    assert policy(**change).version != policy().version


def test_override_order_is_part_of_the_version():
    assert policy(overrides=OVERRIDES).version != policy(overrides=list(reversed(OVERRIDES))).version


# --- bad documents -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"categores": {}}, ["unknown key 'categores'", "categories, aliases, default, overrides"]),
        (
            {"categories": {"sexual": {"threshold": 0.5, "action": "block", "severity": 3}}},
            ["categories.sexual", "unknown key 'severity'", "threshold, action"],
        ),
        (
            {"categories": {"sexual": {"threshold": 1.5, "action": "block"}}},
            ["categories.sexual.threshold", "from 0 to 1", "1.5"],
        ),
        (
            {"categories": {"sexual": {"threshold": -0.1, "action": "block"}}},
            ["categories.sexual.threshold", "from 0 to 1"],
        ),
        (
            {"categories": {"sexual": {"threshold": "high", "action": "block"}}},
            ["categories.sexual.threshold", "from 0 to 1", "'high'"],
        ),
        (
            {"categories": {"sexual": {"threshold": True, "action": "block"}}},
            ["categories.sexual.threshold", "from 0 to 1"],
        ),
        (
            {"categories": {"sexual": {"threshold": 0.5, "action": "ban"}}},
            ["categories.sexual.action", "allow, flag, review, block", "'ban'"],
        ),
        ({"categories": {"sexual": {"threshold": 0.5}}}, ["categories.sexual.action", "required key missing"]),
        (
            {"categories": {"self-harm/intent": {"action": "review"}}},
            ["categories['self-harm/intent'].threshold", "required"],
        ),
        ({"default": {"threshold": 0.5, "action": "maybe"}}, ["default.action", "allow, flag, review, block"]),
        ({"default": "flag"}, ["default", "mapping"]),
        ({"overrides": {"match": {"tenant": "a"}}}, ["overrides", "must be a list"]),
        ({"overrides": [{"categories": {}}]}, ["overrides[0].match", "required key missing"]),
        ({"overrides": [{"match": {}}]}, ["overrides[0].match", "give tenant, source or both"]),
        ({"overrides": [{"match": {"user": "x"}}]}, ["overrides[0].match", "unknown key 'user'", "tenant, source"]),
        ({"overrides": [{"match": {"tenant": 42}}]}, ["overrides[0].match.tenant", "string", "quote"]),
        (
            {"overrides": [{"match": {"tenant": "a"}, "categories": {"pii": {}}}]},
            ["overrides[0].categories.pii", "give threshold, action or both"],
        ),
        (
            {"overrides": [{"match": {"source": "a"}}, {"match": {"tenant": "b"}, "default": {"threshold": 2}}]},
            ["overrides[1].default.threshold", "from 0 to 1"],
        ),
        ({"aliases": {"a": "b", "b": "c"}}, ["aliases.a", "itself an alias", "'c'"]),
        ({"aliases": {"x": 5}}, ["aliases.x", "string"]),
        (
            {
                "aliases": {"hate": "hate_and_discrimination"},
                "categories": {"hate": {"threshold": 0.5, "action": "block"}},
            },
            ["categories.hate", "alias of 'hate_and_discrimination'", "configure 'hate_and_discrimination' instead"],
        ),
        (
            {
                "aliases": {"hate": "h"},
                "overrides": [{"match": {"tenant": "t"}, "categories": {"hate": {"action": "flag"}}}],
            },
            ["overrides[0].categories.hate", "alias of 'h'"],
        ),
    ],
)
def test_a_bad_document_is_refused_with_the_key_path_and_the_fix(document, expected):
    with pytest.raises(PolicyError) as caught:
        Policy.from_mapping(document)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in message and "pydantic" not in message


def test_every_problem_of_a_document_is_reported_one_per_line():
    with pytest.raises(PolicyError) as caught:
        Policy.from_mapping(
            {"categories": {"a": {"threshold": 2, "action": "block"}, "b": {"threshold": 0.5, "action": "nope"}}}
        )
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert any("categories.a.threshold" in line for line in lines)
    assert any("categories.b.action" in line for line in lines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("categories:\n  pii: {threshold: 0.5, action: flag\n", ["not valid YAML", "line "]),
        (
            "categories:\n  pii: {threshold: 0.5, action: flag}\n  pii: {threshold: 0.9, action: flag}\n",
            ["duplicate key 'pii'", "line 3"],
        ),
        ("", ["empty"]),
        ("# only a comment\n", ["empty"]),
        ("- categories\n", ["top level must be a mapping", "list"]),
        ("categories:\n  pii: {threshold: 0.5, action: flag, extra: 1}\n", ["categories.pii", "unknown key 'extra'"]),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_problem(tmp_path, text, expected):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        Policy.load(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_a_missing_file_names_the_setting_that_points_at_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="MODWORKER_POLICY_FILE") as caught:
        Policy.load(missing)
    assert str(missing) in str(caught.value)


# --- the built-in default ------------------------------------------------------------------

MISTRAL_2411 = {
    "sexual": "block",
    "hate_and_discrimination": "block",
    "violence_and_threats": "block",
    "dangerous_and_criminal_content": "block",
    "selfharm": "review",
    "health": "flag",
    "financial": "flag",
    "law": "flag",
    "pii": "flag",
}

MISTRAL_2603_NEW = {
    "dangerous": "dangerous_and_criminal_content",
    "criminal": "dangerous_and_criminal_content",
    "jailbreaking": "jailbreaking",
}

OPENAI_OMNI = {
    "harassment": "hate_and_discrimination",
    "harassment/threatening": "violence_and_threats",
    "hate": "hate_and_discrimination",
    "hate/threatening": "violence_and_threats",
    "illicit": "dangerous_and_criminal_content",
    "illicit/violent": "dangerous_and_criminal_content",
    "self-harm": "selfharm",
    "self-harm/instructions": "selfharm",
    "self-harm/intent": "selfharm",
    "sexual": "sexual",
    "sexual/minors": "sexual",
    "violence": "violence_and_threats",
    "violence/graphic": "violence_and_threats",
}


@pytest.fixture(scope="module")
def builtin() -> Policy:
    return Policy.load(None)


@pytest.mark.parametrize(("category", "action"), MISTRAL_2411.items())
def test_builtin_decides_each_2411_category_at_one_half(builtin, category, action):
    quiet = dict.fromkeys(MISTRAL_2411, 0.01)
    assert builtin.decide({**quiet, category: 0.49}).action == "allow"
    decision = builtin.decide({**quiet, category: 0.5})
    assert decision.action == action
    assert [(h.category, h.threshold) for h in decision.violations] == [(category, 0.5)]


@pytest.mark.parametrize(("raw", "canonical"), MISTRAL_2603_NEW.items())
def test_builtin_maps_2603_names(builtin, raw, canonical):
    assert builtin.canonical(raw) == canonical
    [hit] = builtin.decide({raw: 0.8}).violations
    assert hit.category == canonical
    assert hit.action == ("flag" if raw == "jailbreaking" else "block")


def test_builtin_on_a_whole_2603_response(builtin):
    scores = {name: 0.0 for name in MISTRAL_2411 if name != "dangerous_and_criminal_content"}
    scores |= {"dangerous": 0.2, "criminal": 0.7, "jailbreaking": 0.6, "pii": 0.9}
    decision = builtin.decide(scores)
    assert decision.action == "block"
    assert [(h.category, h.score, h.action) for h in decision.violations] == [
        ("dangerous_and_criminal_content", 0.7, "block"),
        ("pii", 0.9, "flag"),
        ("jailbreaking", 0.6, "flag"),
    ]


@pytest.mark.parametrize(("raw", "canonical"), OPENAI_OMNI.items())
def test_builtin_maps_every_openai_omni_category_to_its_nearest_harm(builtin, raw, canonical):
    assert builtin.canonical(raw) == canonical
    [hit] = builtin.decide(dict.fromkeys(OPENAI_OMNI, 0.0) | {raw: 0.51}).violations
    assert (hit.category, hit.action) == (canonical, MISTRAL_2411[canonical])


def test_builtin_on_an_openai_response_takes_the_highest_alias(builtin):
    scores = dict.fromkeys(OPENAI_OMNI, 0.0) | {
        "self-harm": 0.3,
        "self-harm/intent": 0.65,
        "self-harm/instructions": 0.4,
    }
    [hit] = builtin.decide(scores).violations
    assert (hit.category, hit.score, hit.action) == ("selfharm", 0.65, "review")


def test_builtin_flags_unknown_categories_at_one_half(builtin):
    [hit] = builtin.decide({"sexual": 0.0, "new_harm_2027": 0.5}).violations
    assert (hit.category, hit.threshold, hit.action) == ("new_harm_2027", 0.5, "flag")
    assert builtin.decide({"new_harm_2027": 0.49}).action == "allow"


def test_builtin_is_the_packaged_yaml_file(builtin):
    document = yaml.safe_load((REPO / "worker" / "pipeline" / "default_policy.yaml").read_text())
    assert Policy.from_mapping(document).version == builtin.version


# --- the example policy shipped in deploy/ ---------------------------------------------------


def test_example_policy_loads_and_its_overrides_do_what_its_comments_say(builtin):
    example = Policy.load(REPO / "deploy" / "policy.example.yaml")
    plain = {"sexual": 0.3, "pii": 0.6, "health": 0.9}
    assert example.decide(plain).action == builtin.decide(plain).action == "flag"
    assert example.decide({"sexual": 0.3}, tenant="kids-app").action == "block"
    assert example.decide({"pii": 0.6}, tenant="kids-app").action == "review"
    assert example.decide({"pii": 0.35}, tenant="kids-app", source="chat").action == "block"
    assert example.decide({"health": 0.9}, source="health-forum").action == "allow"
    assert example.decide({"novel": 0.6}, tenant="kids-app").action == "review"


# --- category descriptions (what the llm backend's json dialect shows the model) -------------


def test_descriptions_are_optional_and_absent_ones_keep_the_version_of_before():
    import hashlib
    import json

    document = {"categories": {"spam": {"threshold": 0.7, "action": "review"}}}
    before = json.dumps(
        {
            "format": 1,
            "document": {
                "categories": {"spam": {"threshold": 0.7, "action": "review"}},
                "aliases": {},
                "default": {"threshold": 0.5, "action": "flag"},
                "overrides": [],
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert Policy.from_mapping(document).version == hashlib.sha256(before.encode()).hexdigest()[:12]
    described = {"categories": {"spam": {"threshold": 0.7, "action": "review", "description": "Ads."}}}
    assert Policy.from_mapping(described).version != Policy.from_mapping(document).version
    assert Policy.from_mapping(described).decide({"spam": 0.7}).action == "review"


def test_category_descriptions_name_every_category_base_first():
    policy = Policy.from_mapping(
        {
            "categories": {
                "spam": {"threshold": 0.7, "action": "review", "description": "Ads."},
                "sexual": {"threshold": 0.5, "action": "block"},
            },
            "overrides": [{"match": {"source": "kids"}, "categories": {"dating": {"action": "block"}}}],
        }
    )
    assert policy.category_descriptions() == {"spam": "Ads.", "sexual": None, "dating": None}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"categories": {"spam": {"threshold": 0.7, "action": "flag", "description": ""}}},
            "categories.spam.description",
        ),
        (
            {"overrides": [{"match": {"tenant": "a"}, "categories": {"spam": {"action": "flag", "description": "x"}}}]},
            "unknown key 'description'",
        ),
    ],
)
def test_bad_descriptions_are_refused(document, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_mapping(document)


def test_builtin_policy_describes_every_category_and_aliases_the_guard_models(builtin):
    from worker.backends.llm_dialects import LLAMA_GUARD_HAZARDS

    assert all(builtin.category_descriptions().values())
    assert builtin.canonical("violent_crimes") == "violence_and_threats"
    assert builtin.canonical("suicide_and_self_harm") == "selfharm"
    mapped = {builtin.canonical(name) for name in LLAMA_GUARD_HAZARDS.values()}
    assert {"violence_and_threats", "sexual", "selfharm", "pii", "hate_and_discrimination"} <= mapped


def test_forum_example_policy_custom_categories_and_its_marketplace_override():
    forum = Policy.load(REPO / "deploy" / "policy.forum-llm.example.yaml")
    assert {"spam", "self_promotion", "off_topic"} <= set(forum.category_descriptions())
    assert all(forum.category_descriptions().values())
    assert forum.decide({"self_promotion": 0.9}).action == "flag"
    assert forum.decide({"self_promotion": 0.9}, source="marketplace").action == "allow"
    assert forum.decide({"spam": 0.9}, source="marketplace").action == "block"


def test_rules_remembered_per_tenant_and_source_decide_as_fresh_ones(monkeypatch):
    import worker.pipeline.policy as policy_module

    monkeypatch.setattr(policy_module, "_CONTEXTS_REMEMBERED", 2)  # forgets often: both paths run
    p = policy(overrides=OVERRIDES)
    contexts = [("kids", None), ("adults", None), ("kids", "chat"), (None, "forum"), ("kids", None), ("t9", None)]
    for _ in range(3):
        for tenant, source in contexts:
            fresh = policy(overrides=OVERRIDES).decide(
                {"sexual": 0.2, "pii": 0.8, "novel": 0.6}, tenant=tenant, source=source
            )
            assert p.decide({"sexual": 0.2, "pii": 0.8, "novel": 0.6}, tenant=tenant, source=source) == fresh


def test_integer_scores_count_as_their_float_value():
    p = policy()
    assert p.decide({"sexual": 1, "pii": 0}) == p.decide({"sexual": 1.0, "pii": 0.0})


def test_a_policy_file_nested_too_deeply_is_a_policy_error_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("categories:\n  spam: " + "[" * 5_000 + "]" * 5_000 + "\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="nested too deeply"):
        Policy.load(path)


def test_a_hit_is_built_equal_to_a_validated_category_hit():
    decision = Policy.load(None).decide({"sexual": 0.97, "violence_and_threats": 0.01})
    [hit] = decision.violations
    validated = CategoryHit(category="sexual", score=0.97, threshold=hit.threshold, action=hit.action)
    assert to_contract(hit) == validated
    assert to_contract(hit).model_dump_json() == validated.model_dump_json()
    assert hit.__struct_fields__ == tuple(CategoryHit.model_fields)
