"""``modworker run`` with ``MODWORKER_BACKEND=llm`` on the embedded broker and a loopback chat-completions server.

The server answers each dialect's format with the scores the texts' markers set, so the
expected violations are written out here from the policy, independently of the worker's
code: custom categories of the forum policy in the json dialect, the built-in policy's
aliases of the guard models' labels in the guard dialects. Texts marked
``<<unparseable>>`` get a refusal every time: they must end as dead letters with
``error_type`` ``llm_unparseable`` and the refusal's first words in the reason.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jsonschema
import pytest

from schemas import DeadLetterHeaders
from tests.conftest import worker_env
from tests.kafka_support import event_record, produce, read_all, wait_for_count
from worker.testing import LlmServer
from worker.testing.llm_server import REFUSAL

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
FORUM_POLICY = REPO / "deploy" / "policy.forum-llm.example.yaml"
VERDICT_SCHEMA = json.loads((REPO / "schemas" / "json" / "verdict.schema.json").read_text())


def content(i: int, text: str, **extra: str) -> dict:
    return {"id": f"c-{i}", "text": f"post {i}: {text}", **extra}


def conversation_turn(i: int, text: str) -> dict:
    return {
        "id": f"t-{i}",
        "conversation_id": f"conv-{i % 3}",
        "role": "assistant",
        "content": f"reply {i}: {text}",
        "context": [{"role": "user", "content": f"question {i}"}, {"role": "user", "content": "anyone?"}],
    }


async def run(broker, topics, spawn_worker, server: LlmServer, api_key: str, events, turns, dead: int, **env: str):
    bootstrap = broker.bootstrap_servers
    await produce(bootstrap, topics.content, [event_record(e) for e in events])
    await produce(bootstrap, topics.conversation, [event_record(t, "conversation_id") for t in turns])
    worker = spawn_worker(
        worker_env(
            broker,
            topics,
            server,  # type: ignore[arg-type]  # only its base_url is read
            api_key,
            MODWORKER_BACKEND="llm",
            MODWORKER_LLM__BASE_URL=server.base_url,
            MODWORKER_LLM__API_KEY=api_key,
            MODWORKER_LLM__MODEL="judge",
            MODWORKER_BATCH__MAX_SIZE="8",
            **env,
        )
    )
    valid = len(events) + len(turns) - dead
    await wait_for_count(bootstrap, topics.verdict, valid, timeout_s=120)
    await wait_for_count(bootstrap, topics.dead_letter, dead, timeout_s=60)
    assert worker.stop(signal.SIGTERM) == 0
    verdicts = {
        json.loads(r.value)["event_id"]: json.loads(r.value)
        for r in await read_all(bootstrap, topics.verdict, expected=valid, idle_s=1)
    }
    dead_letters = await read_all(bootstrap, topics.dead_letter, expected=dead, idle_s=1)
    outputs = [worker.log()] + [
        bytes(r.value or b"").decode(errors="replace")
        for topic in topics.outputs
        for r in await read_all(bootstrap, topic, idle_s=0.5)
    ]
    assert not any(api_key in output for output in outputs), "the API key leaked into an output"
    return verdicts, dead_letters


def violations_of(verdict: dict) -> dict[str, str]:
    return {hit["category"]: hit["action"] for hit in verdict["violations"]}


def assert_unparseable(dead_letters, ids: set[str]) -> None:
    assert {json.loads(r.value)["id"] for r in dead_letters} == ids
    for record in dead_letters:
        headers = {k: v.decode() for k, v in record.headers}
        assert headers[DeadLetterHeaders.STAGE] == "backend"
        assert headers[DeadLetterHeaders.ERROR_TYPE] == "llm_unparseable"
        assert REFUSAL[:30] in headers[DeadLetterHeaders.MESSAGE]


async def test_json_dialect_custom_categories_follow_the_answers_and_the_forum_policy(
    broker, topics, api_key, spawn_worker
) -> None:
    expected = {
        "c-0": {},
        "c-1": {"spam": "block"},
        "c-2": {"self_promotion": "flag"},
        "c-3": {"off_topic": "flag"},
        "c-4": {},  # off_topic 0.8 is under its 0.85 threshold
        "c-5": {"sexual": "block", "self_promotion": "flag"},
        "c-6": {},  # self-promotion on the marketplace board is allowed
        "c-7": {"spam": "block"},  # spam is not, even there
        "t-0": {"spam": "block"},
        "t-1": {},
        "t-2": {"pii": "flag"},
    }
    events = [
        content(0, "how long do I rest a brisket?"),
        content(1, "CHEAP ROLEX at example.com <<spam:0.95>>"),
        content(2, "my channel has this recipe, subscribe! <<self_promotion:0.8>>"),
        content(3, "who won the match yesterday? <<off_topic:0.9>>"),
        content(4, "my dog ate the dough <<off_topic:0.8>>"),
        content(5, "<<sexual:0.93>> <<self_promotion:0.71>>"),
        content(6, "selling my cast iron pans <<self_promotion:0.95>>", source="marketplace"),
        content(7, "buy followers <<spam:0.9>>", source="marketplace"),
        content(8, "ignore all that <<unparseable>>"),
    ]
    turns = [
        conversation_turn(0, "DM me for crypto tips <<spam:0.99>>"),
        conversation_turn(1, "use a thermometer"),
        conversation_turn(2, "call her at 555-0100 <<pii:0.7>>"),
        conversation_turn(3, "<<unparseable>>"),
    ]
    with LlmServer(api_key=api_key) as server:
        verdicts, dead = await run(
            broker,
            topics,
            spawn_worker,
            server,
            api_key,
            events,
            turns,
            dead=2,
            MODWORKER_POLICY_FILE=str(FORUM_POLICY),
        )
        requests = server.requests
        assert server.violations == []
    system = requests[0].body["messages"][0]["content"]
    assert "- self_promotion: The author promoting their own shop" in system
    assert set(verdicts) == set(expected)
    for event_id, verdict in verdicts.items():
        jsonschema.validate(verdict, VERDICT_SCHEMA)
        assert violations_of(verdict) == expected[event_id], event_id
        assert verdict["backend"] == "llm" and verdict["model"] == "judge"
        details = verdict["backend_details"]
        assert (
            details["score_kind"] == "probability" and details["prompt_tokens"] > 0 and details["completion_tokens"] > 0
        )
    assert_unparseable(dead, {"c-8", "t-3"})
    # The default one retry: two requests for each unparseable input.
    assert sum("unparseable" in json.dumps(r.body) for r in requests) == 4


@pytest.mark.parametrize("dialect", ["llama-guard", "qwen3guard"])
async def test_guard_dialects_map_onto_the_builtin_policy(broker, topics, api_key, spawn_worker, dialect) -> None:
    marks = {
        "llama-guard": ["<<S1:0.9>>", "<<S12:0.8>>", "<<S5:0.9>>", "<<S7:0.6>>"],
        "qwen3guard": [
            "<<violent:0.9>>",
            "<<sexual_content_or_sexual_acts:0.85>>",
            "<<unethical_acts:0.9>>",
            "<<pii:0.6>>",
        ],
    }[dialect]
    expected = {
        "c-0": {},
        "c-1": {"violence_and_threats": "block"},
        "c-2": {"sexual": "block"},
        # Defamation (Llama Guard S5) and unethical acts (Qwen3Guard) have no counterpart: default rule.
        "c-3": {"defamation" if dialect == "llama-guard" else "unethical_acts": "flag"},
        "t-0": {"pii": "flag"},
    }
    events = [content(0, "a nice stew")] + [content(i + 1, mark) for i, mark in enumerate(marks[:3])]
    events.append(content(9, "<<unparseable>>"))
    turns = [conversation_turn(0, marks[3])]
    # Qwen3Guard on a server without logprobs: labels; Llama Guard with them: probabilities.
    server = LlmServer(api_key=api_key, dialect=dialect, logprobs=dialect == "llama-guard")  # type: ignore[arg-type]
    with server:
        verdicts, dead = await run(
            broker, topics, spawn_worker, server, api_key, events, turns, dead=1, MODWORKER_LLM__DIALECT=dialect
        )
        assert server.violations == []
    assert set(verdicts) == set(expected)
    kind = "probability" if dialect == "llama-guard" else "label"
    for event_id, verdict in verdicts.items():
        jsonschema.validate(verdict, VERDICT_SCHEMA)
        assert violations_of(verdict) == expected[event_id], event_id
        assert verdict["backend_details"]["score_kind"] == kind
    if dialect == "qwen3guard":
        # pii 0.6 is Controversial: a label of 0.5, at the threshold.
        assert verdicts["t-0"]["scores"]["pii"] == 0.5
    assert_unparseable(dead, {"c-9"})


@pytest.mark.parametrize("dialect", ["shieldstral", "gpt-oss-safeguard", "granite-guardian"])
async def test_policy_as_prompt_guards_judge_the_forum_policy_of_their_own_example(
    broker, topics, api_key, spawn_worker, dialect
) -> None:
    """Each guard reads its own example policy; the verdicts follow the answers and the
    policy (custom categories, the marketplace override), scores are P(yes) from logprobs,
    the cost per input is on the verdict, and a flaky answer is asked again."""
    from worker.pipeline.policy import Policy

    policy_file = REPO / "deploy" / f"policy.forum-{dialect}.example.yaml"
    categories = Policy.load(policy_file).category_descriptions()
    flaky: set[str] = set()

    def garble_the_first_try_of_c2(request, default: str) -> str:  # type: ignore[no-untyped-def]
        key = json.dumps(request.body, sort_keys=True)
        if "post 2:" in key and key not in flaky:
            flaky.add(key)
            return "Let me think about it."
        return default

    expected = {
        "c-0": {},
        "c-1": {"spam": "block"},
        "c-2": {"self_promotion": "flag"},
        "c-3": {"off_topic": "flag"},
        "c-4": {},  # off_topic 0.8 is under its 0.85 threshold
        "c-5": {},  # self-promotion on the marketplace board is allowed
        "c-6": {"spam": "block"},  # spam is not, even there
        "t-0": {"pii": "flag"},
    }
    events = [
        content(0, "how long do I rest a brisket?"),
        content(1, "CHEAP ROLEX at example.com <<spam:0.95>>"),
        content(2, "my channel has this recipe, subscribe! <<self_promotion:0.8>>"),
        content(3, "who won the match yesterday? <<off_topic:0.9>>"),
        content(4, "my dog ate the dough <<off_topic:0.8>>"),
        content(5, "selling my cast iron pans <<self_promotion:0.95>>", source="marketplace"),
        content(6, "buy followers <<spam:0.9>>", source="marketplace"),
        content(7, "ignore all that <<unparseable>>"),
    ]
    turns = [conversation_turn(0, "call her at 555-0100 <<pii:0.7>>")]
    server = LlmServer(
        api_key=api_key,
        dialect=dialect,  # type: ignore[arg-type]
        categories=categories,
        answer=garble_the_first_try_of_c2,
    )
    with server:
        verdicts, dead = await run(
            broker,
            topics,
            spawn_worker,
            server,
            api_key,
            events,
            turns,
            dead=1,
            MODWORKER_POLICY_FILE=str(policy_file),
            MODWORKER_LLM__DIALECT=dialect,
        )
        assert server.violations == []
    assert set(verdicts) == set(expected)
    per_input = 1 if dialect == "gpt-oss-safeguard" else len(categories)
    for event_id, verdict in verdicts.items():
        jsonschema.validate(verdict, VERDICT_SCHEMA)
        assert violations_of(verdict) == expected[event_id], event_id
        details = verdict["backend_details"]
        assert details["score_kind"] == "probability"
        assert all(0.0 <= score <= 1.0 for score in verdict["scores"].values())
        # c-2's first answer to each of its questions is garbled: each question asked twice.
        assert details["requests"] == (2 * per_input if event_id == "c-2" else per_input), event_id
        assert details["prompt_tokens"] > 0 and details["completion_tokens"] > 0
    assert verdicts["c-1"]["scores"]["spam"] == pytest.approx(0.95)
    ((record),) = dead
    headers = {k: v.decode() for k, v in record.headers}
    assert json.loads(record.value)["id"] == "c-7"
    assert headers[DeadLetterHeaders.ERROR_TYPE] == "llm_unparseable"
    assert f"the {dialect} answer" in headers[DeadLetterHeaders.MESSAGE]


async def test_a_chatty_judge_is_judged_and_a_category_it_leaves_out_gives_a_degraded_review(
    broker, topics, api_key, spawn_worker
) -> None:
    """Every answer names a category the prompt did not ask about (ignored); for texts marked
    ``<<forget>>`` the judge leaves ``off_topic`` out of every try: a degraded review naming it,
    never a dead letter and never an allow."""

    def chatty(request, default: str) -> str:
        scores = json.loads(default)["scores"]
        scores["medical_advice"] = 0.4
        if "<<forget>>" in request.body["messages"][-1]["content"]:
            scores.pop("off_topic")
        return json.dumps({"scores": scores})

    events = [
        content(0, "how long do I rest a brisket?"),
        content(1, "CHEAP ROLEX at example.com <<spam:0.95>>"),
        content(2, "nice weather <<forget>>"),
        content(3, "CHEAP ROLEX <<spam:0.95>> <<forget>>"),
    ]
    with LlmServer(api_key=api_key, answer=chatty) as server:
        verdicts, _ = await run(
            broker, topics, spawn_worker, server, api_key, events, [], dead=0, MODWORKER_POLICY_FILE=str(FORUM_POLICY)
        )
        forgetful = [r for r in server.requests if "<<forget>>" in json.dumps(r.body)]
    assert len(forgetful) == 4, "the default one retry: two tries for each input that left a category out"
    for verdict in verdicts.values():
        jsonschema.validate(verdict, VERDICT_SCHEMA)
        assert "medical_advice" not in verdict["scores"]
    assert verdicts["c-0"]["action"] == "allow" and not verdicts["c-0"]["degraded"]
    assert violations_of(verdicts["c-1"]) == {"spam": "block"} and not verdicts["c-1"]["degraded"]
    assert verdicts["c-2"]["action"] == "review" and verdicts["c-2"]["degraded"]
    assert "off_topic" in verdicts["c-2"]["degraded_reason"] and "off_topic" not in verdicts["c-2"]["scores"]
    assert verdicts["c-3"]["action"] == "block" and verdicts["c-3"]["degraded"], "the stricter decision stands"
