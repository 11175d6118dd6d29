"""Routing on a real broker: the cascade, the fallback backend and the shadow, end to end.

The worker runs in-process against the embedded broker and two loopback APIs: OpenAI's
(the cheap first stage, fallback or shadow candidate) and Mistral's (the expensive one).
Both score every category below 0.1 unless the text carries a marker such as
``<<sexual:0.55>>``, so which inputs are uncertain (within 0.1 of the built-in policy's 0.5
thresholds) is known from the text, independently of the worker's code.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from tests.conftest import worker_env
from tests.kafka_support import create_topics, produce, read_all, wait_for_count
from worker.app import ModerationWorker
from worker.backends import create_backend, create_fallback
from worker.config import load_settings
from worker.ops import metrics
from worker.pipeline.policy import Policy
from worker.pipeline.shadow import create_shadow
from worker.testing import Fault, MistralServer, OpenAIServer

pytestmark = pytest.mark.slow

FAST = {
    "MODWORKER_HTTP__RETRY_ATTEMPTS": "2",
    "MODWORKER_HTTP__RETRY_BASE_WAIT_S": "0.02",
    "MODWORKER_HTTP__RETRY_MAX_WAIT_S": "0.05",
    "MODWORKER_HTTP__BREAKER_RESET_S": "0.3",
}


def contents(count: int, prefix: str = "c") -> list[dict]:
    # Every 5th uncertain (0.55 / 0.45: within the band), every 7th confidently harmful.
    events = []
    for i in range(count):
        mark = " <<sexual:0.55>>" if i % 10 == 0 else " <<sexual:0.45>>" if i % 5 == 0 else ""
        mark = mark or (" <<sexual:0.97>>" if i % 7 == 0 else "")
        events.append({"id": f"{prefix}-{i}", "text": f"post {i} of {prefix}{mark}"})
    return events


def uncertain(event: dict) -> bool:
    text = event.get("text") or event["content"]
    return any(mark in text for mark in ("0.55", "0.45", "0.52"))


def turns(count: int) -> list[dict]:
    return [
        {
            "id": f"t-{i}",
            "conversation_id": f"conv-{i % 5}",
            "role": "assistant",
            "content": f"reply {i}" + (" <<sexual:0.52>>" if i % 4 == 0 else ""),
            "context": [{"role": "user", "content": f"question {i}"}],
        }
        for i in range(count)
    ]


async def publish(bootstrap: str, topics, events: list[dict], conversations: list[dict] = ()) -> None:  # type: ignore[assignment]
    await produce(bootstrap, topics.content, [(e["id"].encode(), json.dumps(e).encode()) for e in events])
    if conversations:
        await produce(
            bootstrap,
            topics.conversation,
            [(t["conversation_id"].encode(), json.dumps(t).encode()) for t in conversations],
        )


CASCADE = {"MODWORKER_BACKEND": "cascade", "MODWORKER_CASCADE__FIRST": "openai", "MODWORKER_CASCADE__THEN": "mistral"}
"""The cascade these tests run: the OpenAI loopback server first, the Mistral one second."""


def routing_env(broker, topics, mistral: MistralServer, openai: OpenAIServer, api_key: str, **extra: str):
    return worker_env(
        broker,
        topics,
        mistral,
        api_key,
        OPENAI_API_KEY=api_key,
        MODWORKER_OPENAI__BASE_URL=openai.base_url,
        MODWORKER_BATCH__MAX_SIZE="8",
        **FAST,
        **extra,
    )


class Running:
    """The worker as ``modworker run`` wires it (backend, fallback, shadow), in-process."""

    def __init__(self, monkeypatch, env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        self.settings = load_settings()
        policy = Policy.load(None)
        self.worker = ModerationWorker(
            self.settings,
            backend=create_backend(self.settings, policy),
            policy=policy,
            fallback=create_fallback(self.settings),
            shadow=create_shadow(self.settings, policy),
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ModerationWorker:
        self.task = asyncio.create_task(self.worker.run())
        return self.worker

    async def __aexit__(self, *exc: object) -> None:
        self.worker.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)


async def verdicts_of(bootstrap: str, topic: str, count: int) -> dict[str, dict]:
    records = await read_all(bootstrap, topic, expected=count, idle_s=1)
    values = [json.loads(r.value) for r in records]
    per_event = Counter(v["event_id"] for v in values)
    assert [e for e, n in per_event.items() if n != 1] == [], "every input gets exactly one verdict"
    return {v["event_id"]: v for v in values}


def mistral_inputs(server: MistralServer) -> list[str]:
    texts = []
    for request in server.requests:
        for item in request.body["input"]:
            texts.append(item if isinstance(item, str) else item[-1]["content"])
    return texts


async def test_a_cascade_sends_only_the_uncertain_inputs_to_the_second_stage(
    broker, topics, api_key, monkeypatch
) -> None:
    bootstrap = broker.bootstrap_servers
    events, conversations = contents(60), turns(12)
    with MistralServer(api_key=api_key) as mistral, OpenAIServer(api_key=api_key) as openai:
        env = routing_env(
            broker,
            topics,
            mistral,
            openai,
            api_key,
            **CASCADE,
        )
        await publish(bootstrap, topics, events, conversations)
        async with Running(monkeypatch, env):
            await wait_for_count(bootstrap, topics.verdict, len(events) + len(conversations))
        sent_to_mistral = mistral_inputs(mistral)
    expected_escalated = [e["text"] for e in events if uncertain(e)] + [
        t["content"] for t in conversations if uncertain(t)
    ]
    assert sorted(sent_to_mistral) == sorted(expected_escalated)
    verdicts = await verdicts_of(bootstrap, topics.verdict, len(events) + len(conversations))
    for event in events + conversations:
        verdict = verdicts[event["id"]]
        assert verdict["backend"] == "cascade"
        if uncertain(event):
            assert verdict["decided_by"] == "mistral"
            assert [s["stage"] for s in verdict["stages"]] == ["first", "then"]
            assert verdict["model"] == "mistral-moderation-2411"
        else:
            assert verdict["decided_by"] == "openai"
            assert [s["stage"] for s in verdict["stages"]] == ["first"]
        text = event.get("text") or event["content"]
        expected = "block" if ("0.97" in text or "0.55" in text or "0.52" in text) else "allow"
        assert verdict["action"] == expected, event


async def test_when_the_second_stage_is_down_the_fail_policy_takes_only_the_escalated_inputs(
    broker, topics, api_key, monkeypatch
) -> None:
    bootstrap = broker.bootstrap_servers
    events = contents(30)
    down = Fault(status=503)
    with MistralServer(api_key=api_key, fault_plan=lambda r: down) as mistral, OpenAIServer(api_key=api_key) as openai:
        env = routing_env(
            broker,
            topics,
            mistral,
            openai,
            api_key,
            **CASCADE,
            MODWORKER_SCORING__FAIL_POLICY="review",
        )
        await publish(bootstrap, topics, events)
        async with Running(monkeypatch, env):
            await wait_for_count(bootstrap, topics.verdict, len(events))
    verdicts = await verdicts_of(bootstrap, topics.verdict, len(events))
    for event in events:
        verdict = verdicts[event["id"]]
        if uncertain(event):
            assert verdict["degraded"] and verdict["action"] == "review"
            assert "cascade second stage mistral" in verdict["degraded_reason"]
        else:
            assert not verdict["degraded"] and verdict["decided_by"] == "openai"


async def test_the_fallback_scores_during_an_outage_and_the_primary_takes_over_again(
    broker, topics, api_key, monkeypatch
) -> None:
    bootstrap = broker.bootstrap_servers
    outage = {"on": True}
    plan = lambda request: Fault(status=503) if outage["on"] else None  # noqa: E731
    with MistralServer(api_key=api_key, fault_plan=plan) as mistral, OpenAIServer(api_key=api_key) as openai:
        env = routing_env(
            broker,
            topics,
            mistral,
            openai,
            api_key,
            MODWORKER_SCORING__FAIL_POLICY="fallback",
            MODWORKER_FALLBACK__BACKEND="openai",
        )
        during = contents(20, prefix="during")
        async with Running(monkeypatch, env):
            await publish(bootstrap, topics, during)
            await wait_for_count(bootstrap, topics.verdict, len(during))
            outage["on"] = False
            # The breaker lets a probe through once its reset passed; keep sending single
            # inputs until one is answered by the primary (bounded), then a batch.
            probes = 0
            for probes in range(1, 40):
                await publish(bootstrap, topics, [{"id": f"probe-{probes}", "text": f"probe {probes}"}])
                records = await wait_for_count(bootstrap, topics.verdict, len(during) + probes)
                if any(
                    json.loads(r.value)["event_id"] == f"probe-{probes}" and not json.loads(r.value)["degraded"]
                    for r in records
                ):
                    break
                await asyncio.sleep(0.1)
            after = contents(20, prefix="after")
            await publish(bootstrap, topics, after)
            await wait_for_count(bootstrap, topics.verdict, len(during) + probes + len(after))
    verdicts = await verdicts_of(bootstrap, topics.verdict, len(during) + probes + len(after))
    for event in during:
        verdict = verdicts[event["id"]]
        assert verdict["degraded"] and verdict["decided_by"] == "openai" and verdict["backend"] == "mistral"
        assert verdict["degraded_reason"].startswith("scored by fallback backend openai")
        assert verdict["model"] == openai.model
        expected = "block" if "0.97" in event["text"] or "0.55" in event["text"] else "allow"
        assert verdict["action"] == expected  # the fallback's scores, under the policy
    assert not verdicts[f"probe-{probes}"]["degraded"]
    for event in after:
        verdict = verdicts[event["id"]]
        assert (
            not verdict["degraded"] and verdict["decided_by"] is None and verdict["model"] == "mistral-moderation-2411"
        )


async def test_a_shadow_policy_and_backend_judge_a_sample_beside_the_live_path(
    broker, topics, api_key, monkeypatch, tmp_path
) -> None:
    bootstrap = broker.bootstrap_servers
    shadow_topic = f"{topics.verdict}.shadow"
    await create_topics(bootstrap, [shadow_topic])
    strict = tmp_path / "strict.yaml"
    strict.write_text("categories:\n  sexual: {threshold: 0.4, action: block}\n", encoding="utf-8")
    events = contents(40)
    with MistralServer(api_key=api_key) as mistral, OpenAIServer(api_key=api_key) as openai:
        env = routing_env(
            broker,
            topics,
            mistral,
            openai,
            api_key,
            MODWORKER_SHADOW__BACKEND="openai",
            MODWORKER_SHADOW__POLICY_FILE=str(strict),
            MODWORKER_SHADOW__SAMPLE="0.5",
            MODWORKER_SHADOW__TOPIC=shadow_topic,
        )
        await publish(bootstrap, topics, events)
        async with Running(monkeypatch, env) as worker:
            await wait_for_count(bootstrap, topics.verdict, len(events))
            assert worker.shadow is not None
            sample = [e for e in events if worker.shadow is not None and _sampled(e["id"], 0.5)]
            await wait_for_count(bootstrap, shadow_topic, len(sample))
    shadows = {
        json.loads(r.value)["event_id"]: json.loads(r.value)
        for r in await read_all(bootstrap, shadow_topic, expected=len(sample), idle_s=1)
    }
    assert set(shadows) == {e["id"] for e in sample}
    verdicts = await verdicts_of(bootstrap, topics.verdict, len(events))
    for event in sample:
        shadow, live = shadows[event["id"]], verdicts[event["id"]]
        assert shadow["live_action"] == live["action"] and shadow["live_verdict_id"] == live["verdict_id"]
        assert shadow["backend"] == "openai"
        assert live["backend"] == "mistral" and live["decided_by"] is None  # the live path is untouched
        expected = "block" if any(m in event["text"] for m in ("0.97", "0.55", "0.45")) else "allow"
        assert shadow["action"] == expected  # 0.45 blocks under the stricter candidate policy
        assert shadow["agree"] == (shadow["action"] == live["action"])


async def test_a_shadow_backend_outage_never_touches_the_live_verdicts(broker, topics, api_key, monkeypatch) -> None:
    bootstrap = broker.bootstrap_servers
    shadow_topic = f"{topics.verdict}.shadow"
    await create_topics(bootstrap, [shadow_topic])
    events = contents(40)
    failures_before = metrics.SHADOW_FAILURES.labels("score")._value.get()
    down = Fault(status=503)
    with MistralServer(api_key=api_key) as mistral, OpenAIServer(api_key=api_key, fault_plan=lambda r: down) as openai:
        env = routing_env(
            broker,
            topics,
            mistral,
            openai,
            api_key,
            MODWORKER_SHADOW__BACKEND="openai",
            MODWORKER_SHADOW__SAMPLE="1.0",
            MODWORKER_SHADOW__TOPIC=shadow_topic,
        )
        await publish(bootstrap, topics, events)
        async with Running(monkeypatch, env):
            await wait_for_count(bootstrap, topics.verdict, len(events))
        assert openai.requests, "the shadow did try its backend"
    verdicts = await verdicts_of(bootstrap, topics.verdict, len(events))
    assert all(not v["degraded"] and v["backend"] == "mistral" for v in verdicts.values())
    assert metrics.SHADOW_FAILURES.labels("score")._value.get() > failures_before
    assert await read_all(bootstrap, shadow_topic, expected=0, idle_s=0.5) == []


def _sampled(event_id: str, fraction: float) -> bool:
    from worker.pipeline.shadow import sampled

    return sampled(event_id, fraction)
