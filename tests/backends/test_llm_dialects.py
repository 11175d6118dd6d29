"""The llm backend's dialects: prompts built from the policy, answers parsed or refused (pure logic)."""

from __future__ import annotations

import json
import math

import pytest

from schemas import Turn
from worker.backends.llm_dialects import (
    LLAMA_GUARD_HAZARDS,
    SHIELDSTRAL_SYSTEM_PROMPT,
    GptOssSafeguardDialect,
    GraniteGuardianDialect,
    JsonDialect,
    LlamaGuardDialect,
    Qwen3GuardDialect,
    Reply,
    ShieldstralDialect,
    TokenLogprob,
    Unparseable,
    guard_messages,
    label_probabilities,
    snake_case,
)

CATEGORIES = {"spam": "Unsolicited advertising.", "off_topic": None, "sexual": "Sexually explicit material."}


def tokens(*pieces: tuple[str, float, dict[str, float]]) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(token=t, logprob=lp, top=tuple(top.items())) for t, lp, top in pieces)


# -- json -------------------------------------------------------------------------------


def test_json_prompt_lists_every_category_with_its_description_and_the_answer_contract() -> None:
    dialect = JsonDialect(CATEGORIES)
    system = dialect.system_prompt
    assert "- spam: Unsolicited advertising." in system
    assert "- off_topic\n" in system  # no description: the name alone
    assert (
        '{"scores": {"spam": <number in [0, 1]>, "off_topic": <number in [0, 1]>, "sexual": <number in [0, 1]>}}'
        in system
    )
    assert dialect.request_fields() == {"response_format": {"type": "json_object"}}
    assert JsonDialect(CATEGORIES, json_mode=False).request_fields() == {}


def test_json_messages_carry_the_content_as_data_and_name_the_judged_turn() -> None:
    dialect = JsonDialect(CATEGORIES)
    (system, user) = dialect.messages([Turn(role="user", content='buy now "cheap"')])
    assert system["role"] == "system" and user["role"] == "user"
    task, payload = user["content"].split("\n", 1)
    assert json.loads(payload) == {"text": 'buy now "cheap"'}
    conversation = [Turn(role="user", content="hi"), Turn(role="assistant", content="visit my shop")]
    (_, user) = dialect.messages(conversation)
    task, payload = user["content"].split("\n", 1)
    assert "LAST message" in task and "assistant" in task
    assert json.loads(payload)["conversation"][-1] == {"role": "assistant", "content": "visit my shop"}


def test_json_answer_parsed_including_a_fenced_one() -> None:
    dialect = JsonDialect(CATEGORIES)
    answer = {"scores": {"spam": 0.9, "off_topic": 0, "sexual": 0.01}}
    judged = dialect.parse(Reply(json.dumps(answer)))
    assert judged.scores == {"spam": 0.9, "off_topic": 0.0, "sexual": 0.01}
    assert judged.score_kind == "probability"
    assert dialect.parse(Reply(f"```json\n{json.dumps(answer)}\n```")).scores == judged.scores


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("I can't help with that.", "not JSON"),
        ('{"spam": 0.9}', 'no "scores"'),
        ('{"scores": {"spam": 1.5, "off_topic": 0.1, "sexual": 0}}', "outside [0, 1]"),
        ('{"scores": {"spam": -0.1, "off_topic": 0.1, "sexual": 0}}', "outside [0, 1]"),
        ('{"scores": {"spam": "high", "off_topic": 0.1, "sexual": 0}}', "not a number"),
        ('{"scores": {"spam": true, "off_topic": 0.1, "sexual": 0}}', "not a number"),
        ('{"scores": {"spam": NaN, "off_topic": 0.1, "sexual": 0}}', "not a number"),
    ],
)
def test_json_answers_that_break_the_contract_are_unparseable(content: str, problem: str) -> None:
    with pytest.raises(Unparseable) as raised:
        JsonDialect(CATEGORIES).parse(Reply(content))
    assert problem in raised.value.problem


def test_json_answer_keys_naming_no_asked_category_are_ignored_and_reported() -> None:
    content = '{"scores": {"spam": 0.9, "off_topic": 0.1, "sexual": 0, "hate": 0.2, "weird": "not a number"}}'
    judged = JsonDialect(CATEGORIES).parse(Reply(content))
    assert judged.scores == {"spam": 0.9, "off_topic": 0.1, "sexual": 0.0}
    assert judged.unknown == ("hate", "weird")
    assert judged.missing == ()


def test_json_answer_leaving_categories_out_reports_them_missing_never_as_zero() -> None:
    judged = JsonDialect(CATEGORIES).parse(Reply('{"scores": {"spam": 0.9, "extra": 1}}'))
    assert judged.scores == {"spam": 0.9}
    assert "off_topic" not in judged.scores and "sexual" not in judged.scores
    assert judged.missing == ("off_topic", "sexual")
    assert judged.unknown == ("extra",)
    empty = JsonDialect(CATEGORIES).parse(Reply('{"scores": {}}'))
    assert empty.scores == {} and empty.missing == ("spam", "off_topic", "sexual")


def test_an_answer_cut_off_at_max_tokens_is_unparseable_even_if_it_happens_to_parse() -> None:
    with pytest.raises(Unparseable, match="max_tokens"):
        LlamaGuardDialect().parse(Reply("unsafe", finish_reason="length"))


# -- llama guard ------------------------------------------------------------------------


def test_llama_guard_labels_without_logprobs_are_labels() -> None:
    judged = LlamaGuardDialect().parse(Reply("\n\nunsafe\nS1,S10"))
    assert judged.score_kind == "label"
    assert judged.scores["violent_crimes"] == 1.0 and judged.scores["hate"] == 1.0
    assert set(judged.scores) == set(LLAMA_GUARD_HAZARDS.values())
    assert sum(judged.scores.values()) == 2.0
    safe = LlamaGuardDialect().parse(Reply("safe"))
    assert safe.score_kind == "label" and set(safe.scores.values()) == {0.0}


def test_llama_guard_probability_of_unsafe_from_the_label_tokens_logprobs() -> None:
    reply = Reply(
        "unsafe\nS12",
        logprobs=tokens(
            ("unsafe", math.log(0.8), {"unsafe": math.log(0.8), "safe": math.log(0.15), "Sorry": math.log(0.05)}),
            ("\n", 0.0, {}),
            ("S", 0.0, {}),
            ("12", 0.0, {}),
        ),
    )
    judged = LlamaGuardDialect().parse(reply)
    assert judged.score_kind == "probability"
    assert judged.scores["sexual_content"] == pytest.approx(0.8 / 0.95)
    assert judged.scores["violent_crimes"] == 0.0


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("I'm sorry, I cannot do that.", "first line"),
        ("unsafe", "without a line of hazard codes"),
        ("unsafe\nS15", "unknown hazard code 'S15'"),
        ("unsafe\nviolence", "unknown hazard code"),
        ("", "first line"),
    ],
)
def test_llama_guard_malformed_answers(content: str, problem: str) -> None:
    with pytest.raises(Unparseable) as raised:
        LlamaGuardDialect().parse(Reply(content))
    assert problem in raised.value.problem


def test_guard_messages_alternate_and_start_with_the_user() -> None:
    turns = [
        Turn(role="assistant", content="welcome"),
        Turn(role="user", content="a"),
        Turn(role="user", content="b"),
        Turn(role="assistant", content="judged"),
    ]
    assert guard_messages(turns) == [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "welcome"},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "judged"},
    ]
    assert LlamaGuardDialect().request_fields() == {"logprobs": True, "top_logprobs": 5}
    assert LlamaGuardDialect(logprobs=False).request_fields() == {}


# -- qwen3guard -------------------------------------------------------------------------


def test_qwen3guard_labels_categories_and_controversial_as_half() -> None:
    judged = Qwen3GuardDialect().parse(Reply("Safety: Unsafe\nCategories: Violent, Suicide & Self-Harm"))
    assert judged.score_kind == "label"
    assert judged.scores["violent"] == 1.0 and judged.scores["suicide_and_self_harm"] == 1.0
    assert judged.scores["pii"] == 0.0
    controversial = Qwen3GuardDialect().parse(Reply("Safety: Controversial\nCategories: Politically Sensitive Topics"))
    assert controversial.scores["politically_sensitive_topics"] == 0.5
    safe = Qwen3GuardDialect().parse(Reply("Safety: Safe\nCategories: None\nRefusal: No"))
    assert set(safe.scores.values()) == {0.0}


def test_qwen3guard_score_from_logprobs_counts_controversial_half() -> None:
    reply = Reply(
        "Safety: Unsafe\nCategories: PII",
        logprobs=tokens(
            ("Safety", 0.0, {}),
            (":", 0.0, {}),
            (
                " Unsafe",
                math.log(0.6),
                {" Unsafe": math.log(0.6), " Controversial": math.log(0.3), " Safe": math.log(0.1)},
            ),
            ("\nCategories", 0.0, {}),
            (":", 0.0, {}),
            (" PII", 0.0, {}),
        ),
    )
    judged = Qwen3GuardDialect().parse(reply)
    assert judged.score_kind == "probability"
    assert judged.scores["pii"] == pytest.approx(0.6 + 0.5 * 0.3)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("The text is fine.", "no 'Safety:' line"),
        ("Safety: Dangerous\nCategories: Violent", "unknown safety label 'Dangerous'"),
        ("Safety: Unsafe\nCategories: Spam", "unknown category 'Spam'"),
        ("Safety: Unsafe\nCategories: None", "without a category"),
    ],
)
def test_qwen3guard_malformed_answers(content: str, problem: str) -> None:
    with pytest.raises(Unparseable) as raised:
        Qwen3GuardDialect().parse(Reply(content))
    assert problem in raised.value.problem


def test_snake_case_names() -> None:
    assert snake_case("Suicide & Self-Harm") == "suicide_and_self_harm"
    assert snake_case("Non-violent Illegal Acts") == "non_violent_illegal_acts"
    assert snake_case("PII") == "pii"


def test_label_probabilities_need_logprobs_that_mention_a_label() -> None:
    assert label_probabilities(Reply("safe"), r"(safe|unsafe)", ("safe", "unsafe")) is None
    unrelated = Reply("safe", logprobs=tokens(("safe", 0.0, {"Hello": -0.1})))
    # The chosen token itself always counts: "safe" with probability 1.
    assert label_probabilities(unrelated, r"(safe|unsafe)", ("safe", "unsafe")) == {"safe": 1.0, "unsafe": 0.0}
    split = Reply(
        "unsafe",
        logprobs=tokens(("un", math.log(0.7), {"un": math.log(0.7), "safe": math.log(0.3)}), ("safe", 0.0, {})),
    )
    assert label_probabilities(split, r"(safe|unsafe)", ("safe", "unsafe")) == pytest.approx(
        {"unsafe": 0.7, "safe": 0.3}
    )


def test_a_json_answer_nested_too_deeply_is_unparseable_not_a_recursion_error() -> None:
    with pytest.raises(Unparseable, match="not JSON"):
        JsonDialect(CATEGORIES).parse(Reply('{"scores": ' + "[" * 100_000 + "]" * 100_000 + "}"))


# -- shieldstral ------------------------------------------------------------------------

QUESTIONS = {"spam": "Is this content spam?", "off_topic": "Unrelated to cooking.", "violence": None}


def test_shieldstral_asks_one_yes_no_question_per_category_from_its_description() -> None:
    dialect = ShieldstralDialect(QUESTIONS)
    questions = dialect.questions([Turn(role="user", content="buy now")])
    assert [q.category for q in questions] == ["spam", "off_topic", "violence"]
    queries = [q.messages[1]["content"].split("</Query>")[0].removeprefix("<Query>") for q in questions]
    assert queries == [
        "Is this content spam?",  # a question is asked as written
        "Is this content off topic, that is: Unrelated to cooking?",
        "Is this content violence?",
    ]
    for question in questions:
        assert question.messages[0] == {"role": "system", "content": SHIELDSTRAL_SYSTEM_PROMPT}
        assert question.messages[1]["content"].endswith("<Content>buy now</Content>")
        assert question.fields == {"logprobs": True, "top_logprobs": 5}
    assert dialect.max_answer_tokens == 1
    conversation = [Turn(role="user", content="hi"), Turn(role="assistant", content="visit my shop")]
    (first, *_) = dialect.questions(conversation)
    assert "user: hi\nassistant: visit my shop" in first.messages[1]["content"]
    assert "last message, written by the assistant" in first.messages[1]["content"]


def test_shieldstral_p_yes_is_the_softmax_over_the_yes_no_tokens() -> None:
    dialect = ShieldstralDialect(QUESTIONS)
    (question, *_) = dialect.questions([Turn(role="user", content="x")])
    # A one-token answer stops at max_tokens 1: finish_reason length is the normal case.
    reply = Reply(
        "Yes",
        finish_reason="length",
        logprobs=tokens(("Yes", math.log(0.6), {"Yes": math.log(0.6), "No": math.log(0.3), "I": math.log(0.1)})),
    )
    judged = dialect.parse_question(question, reply)
    assert judged.score_kind == "probability"
    assert judged.scores == {"spam": pytest.approx(0.6 / 0.9)}
    label = dialect.parse_question(question, Reply("no"))
    assert label.score_kind == "label" and label.scores == {"spam": 0.0}
    assert dialect.parse_question(question, Reply(" yes")).scores == {"spam": 1.0}


@pytest.mark.parametrize("content", ["I", "maybe", "", "yes and no"])
def test_shieldstral_answers_other_than_yes_or_no_are_unparseable(content: str) -> None:
    dialect = ShieldstralDialect(QUESTIONS)
    (question, *_) = dialect.questions([Turn(role="user", content="x")])
    with pytest.raises(Unparseable, match="not 'yes' or 'no'"):
        dialect.parse_question(question, Reply(content, finish_reason="length"))


# -- granite guardian -------------------------------------------------------------------


def test_granite_guardian_sends_each_category_as_its_criterion_in_the_chat_template_kwargs() -> None:
    dialect = GraniteGuardianDialect(QUESTIONS, think=True)
    questions = dialect.questions([Turn(role="assistant", content="welcome"), Turn(role="user", content="hi")])
    configs = [q.fields["chat_template_kwargs"] for q in questions]
    assert configs == [
        {"guardian_config": {"custom_criteria": "Is this content spam?"}, "think": True},
        {"guardian_config": {"custom_criteria": "Unrelated to cooking."}, "think": True},
        # no description, named like a pre-baked criterion: the model's own definition
        {"guardian_config": {"criteria_id": "violence"}, "think": True},
    ]
    assert questions[0].messages == guard_messages(
        [Turn(role="assistant", content="welcome"), Turn(role="user", content="hi")]
    )
    assert questions[0].fields["logprobs"] is True
    assert dialect.max_answer_tokens > GraniteGuardianDialect(QUESTIONS).max_answer_tokens
    assert GraniteGuardianDialect({"rude": None}).guardian_config("rude") == {"custom_criteria": "rude"}


def test_granite_guardian_score_after_thinking_with_p_yes_from_the_score_token() -> None:
    dialect = GraniteGuardianDialect(QUESTIONS, think=True)
    (question, *_) = dialect.questions([Turn(role="user", content="x")])
    content = "<think>The message says <score> no </score> is wrong.</think>\n<score> yes </score>"
    judged = dialect.parse_question(question, Reply(content))
    assert judged.scores == {"spam": 1.0} and judged.score_kind == "label"
    reply = Reply(
        "<score> no </score>",
        logprobs=tokens(
            ("<", 0.0, {}),
            ("score", 0.0, {}),
            (">", 0.0, {}),
            (" no", math.log(0.7), {" no": math.log(0.7), " yes": math.log(0.3)}),
            (" <", 0.0, {}),
        ),
    )
    judged = dialect.parse_question(question, reply)
    assert judged.score_kind == "probability" and judged.scores == {"spam": pytest.approx(0.3)}


@pytest.mark.parametrize(
    ("content", "finish_reason", "problem"),
    [
        ("I'm sorry, I can't help.", "stop", "no <score>"),
        ("<score> maybe </score>", "stop", "not 'yes' or 'no'"),
        ("<think>still thinking", "length", "max_tokens"),
    ],
)
def test_granite_guardian_malformed_answers(content: str, finish_reason: str, problem: str) -> None:
    dialect = GraniteGuardianDialect(QUESTIONS)
    (question, *_) = dialect.questions([Turn(role="user", content="x")])
    with pytest.raises(Unparseable) as raised:
        dialect.parse_question(question, Reply(content, finish_reason=finish_reason))
    assert problem in raised.value.problem


# -- gpt-oss-safeguard ------------------------------------------------------------------


def test_gpt_oss_safeguard_policy_is_the_system_message_with_every_category_and_the_output_format() -> None:
    dialect = GptOssSafeguardDialect(QUESTIONS, reasoning_effort="medium")
    system, user = dialect.messages([Turn(role="user", content="buy now")])
    assert system["role"] == "system" and user == {"role": "user", "content": "buy now"}
    assert "### off_topic\nUnrelated to cooking." in system["content"]
    assert "### violence\nContent that is violence." in system["content"]
    assert system["content"].endswith('{"spam": <0 or 1>, "off_topic": <0 or 1>, "violence": <0 or 1>}')
    assert dialect.request_fields() == {"reasoning_effort": "medium", "logprobs": True, "top_logprobs": 5}
    assert len(dialect.questions([Turn(role="user", content="x")])) == 1, "one request for every category"
    with pytest.raises(ValueError, match="reasoning_effort"):
        GptOssSafeguardDialect(QUESTIONS, reasoning_effort="max")


def test_gpt_oss_safeguard_reads_the_final_answer_and_p1_after_the_reasoning_tokens() -> None:
    dialect = GptOssSafeguardDialect({"spam": None, "off_topic": None})
    answer = '{"spam": 1, "off_topic": 0}'
    labels = dialect.parse(Reply(answer, reasoning='I think "spam": 0 at first.'))
    assert labels.score_kind == "label" and labels.scores == {"spam": 1.0, "off_topic": 0.0}
    # The logprobs start with the reasoning; each category's value is its last occurrence.
    reply = Reply(
        answer,
        reasoning='"spam": 0',
        logprobs=tokens(
            ('"spam": ', 0.0, {}),
            ("0", math.log(0.5), {"0": math.log(0.5), "1": math.log(0.5)}),
            ('{"spam":', 0.0, {}),
            (" 1", math.log(0.8), {" 1": math.log(0.8), " 0": math.log(0.2)}),
            (', "off_topic":', 0.0, {}),
            (" 0", math.log(0.9), {" 0": math.log(0.9), " 1": math.log(0.1)}),
            ("}", 0.0, {}),
        ),
    )
    judged = dialect.parse(reply)
    assert judged.score_kind == "probability"
    assert judged.scores == {"spam": pytest.approx(0.8), "off_topic": pytest.approx(0.1)}


@pytest.mark.parametrize(
    ("content", "reasoning", "problem"),
    [
        ("", "The user posted", "only reasoning"),
        ("I can't help with that.", "", "not JSON"),
        ('{"spam": 1}', "", "no answer for 'off_topic'"),
        ('{"spam": 1, "off_topic": 0, "hate": 0}', "", "unknown category 'hate'"),
        ('{"spam": 0.7, "off_topic": 0}', "", "not 0 or 1"),
        ('{"spam": true, "off_topic": 0}', "", "not 0 or 1"),
        ("[1, 0]", "", "not a JSON object"),
    ],
)
def test_gpt_oss_safeguard_malformed_answers(content: str, reasoning: str, problem: str) -> None:
    with pytest.raises(Unparseable) as raised:
        GptOssSafeguardDialect({"spam": None, "off_topic": None}).parse(Reply(content, reasoning=reasoning))
    assert problem in raised.value.problem
