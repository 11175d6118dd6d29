"""The whole worker (a real process, a real broker) against a misbehaving loopback Mistral API.

- 1,000 messages through a server that fails its first requests (503) and rate-limits every
  third request (429 + Retry-After): every input verdicted with the server's scores, no
  retry earlier than the Retry-After it was given, and the key in no output.
- Fail policy ``wait`` while the API is down: nothing is published, consumption pauses with
  in-flight work bounded, and once the API is back every input gets a real verdict.
- Fail policy ``review``/``allow`` when the retry budget is spent: degraded verdicts.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from tests.conftest import SPEC, worker_env
from tests.kafka_support import event_record, produce, read_all, wait_for_count
from worker.testing import Fault, MistralServer, RecordedRequest, combine, every, fake_scores, first
from worker.testing.openapi import load_spec_validator

pytestmark = pytest.mark.slow

FAST_RETRIES = {
    "MODWORKER_HTTP__RETRY_BASE_WAIT_S": "0.05",
    "MODWORKER_HTTP__RETRY_MAX_WAIT_S": "0.5",
    "MODWORKER_HTTP__BREAKER_RESET_S": "1",
}


def contents(count: int, prefix: str = "c") -> list[dict]:
    marks = ["", " <<sexual:0.93>>", " <<pii:0.7>>", "", " <<selfharm:0.8>>"]
    return [{"id": f"{prefix}-{i}", "text": f"message {i} from {prefix}{marks[i % len(marks)]}"} for i in range(count)]


def turns(count: int) -> list[dict]:
    return [
        {
            "id": f"t-{i}",
            "conversation_id": f"conv-{i % 17}",
            "role": "assistant",
            "content": f"reply {i}" + (" <<violence_and_threats:0.9>>" if i % 9 == 0 else ""),
            "context": [{"role": "user", "content": f"question {i}"}],
        }
        for i in range(count)
    ]


def retry_of(requests: list[RecordedRequest], failed: RecordedRequest) -> RecordedRequest | None:
    return next((r for r in requests if r.index > failed.index and r.raw_body == failed.raw_body), None)


async def test_a_thousand_messages_through_503s_and_429s_all_verdicted_retry_after_honoured(
    broker, topics, api_key, spawn_worker
) -> None:
    plan = combine(first(4, Fault(status=503)), every(3, Fault(status=429, retry_after="1"), offset=4))
    events = contents(800) + turns(200)
    with MistralServer(api_key=api_key, validator=load_spec_validator(SPEC), fault_plan=plan) as server:
        await produce(broker.bootstrap_servers, topics.content, [event_record(e) for e in events[:800]])
        await produce(
            broker.bootstrap_servers, topics.conversation, [event_record(e, "conversation_id") for e in events[800:]]
        )
        worker = spawn_worker(
            worker_env(
                broker,
                topics,
                server,
                api_key,
                **FAST_RETRIES,
                MODWORKER_BATCH__MAX_SIZE="32",
                MODWORKER_LOG_LEVEL="debug",
            )
        )
        verdict_records = await wait_for_count(broker.bootstrap_servers, topics.verdict, len(events), timeout_s=180)
        assert worker.stop(signal.SIGTERM) == 0
        requests = server.requests
        assert server.violations == []

    verdicts = {}
    for record in verdict_records:
        verdict = json.loads(record.value)
        verdicts[verdict["event_id"]] = verdict
    assert set(verdicts) == {e["id"] for e in events}, "every input verdicted"
    judged = {e["id"]: e.get("text", e.get("content")) for e in events}
    for event_id, verdict in verdicts.items():
        assert not verdict["degraded"], event_id
        assert verdict["scores"] == fake_scores(judged[event_id]), event_id

    statuses = [r.status for r in requests]
    assert statuses[:4] == [503] * 4 and statuses.count(429) >= 5
    for failed in (r for r in requests if r.status == 429):
        retry = retry_of(requests, failed)
        assert retry is not None and failed.answered_at is not None
        assert retry.received_at - failed.answered_at >= 1.0, f"request #{retry.index} ignored Retry-After"

    outputs = [worker.log()]
    for topic in topics.outputs:
        outputs += [
            bytes(r.value or b"").decode(errors="replace")
            for r in await read_all(broker.bootstrap_servers, topic, idle_s=1.0)
        ]
    assert "backend.http.retry" in outputs[0], "the retries must show in the log"
    assert not any(api_key in output for output in outputs), "the API key leaked into an output"


async def test_wait_policy_pauses_with_bounded_in_flight_and_loses_nothing(
    broker, topics, api_key, spawn_worker
) -> None:
    events = contents(600, prefix="w")
    cap, poll = 100, 50
    with MistralServer(api_key=api_key, fault_plan=lambda request: Fault(status=503)) as server:
        await produce(broker.bootstrap_servers, topics.content, [event_record(e) for e in events])
        worker = spawn_worker(
            worker_env(
                broker,
                topics,
                server,
                api_key,
                **FAST_RETRIES,
                MODWORKER_SCORING__FAIL_POLICY="wait",
                MODWORKER_HTTP__RETRY_ATTEMPTS="2",
                MODWORKER_MAX_IN_FLIGHT=str(cap),
                MODWORKER_KAFKA__MAX_POLL_RECORDS=str(poll),
                MODWORKER_BATCH__MAX_SIZE="20",
            )
        )
        worker.wait_for_log("consumption.paused", timeout_s=60)
        worker.wait_for_log("backend.circuit.opened", timeout_s=60)
        await asyncio.sleep(3)  # down for a while: the worker must hold, not publish or buffer
        assert await read_all(broker.bootstrap_servers, topics.verdict, idle_s=1.0) == []

        server.fault_plan = None  # the API comes back
        verdict_records = await wait_for_count(broker.bootstrap_servers, topics.verdict, len(events), timeout_s=120)
        assert worker.stop(signal.SIGTERM) == 0

    verdicts = [json.loads(r.value) for r in verdict_records]
    assert {v["event_id"] for v in verdicts} == {e["id"] for e in events}
    assert not any(v["degraded"] for v in verdicts), "wait: nothing passes unmoderated"
    paused = [json.loads(line) for line in worker.log().splitlines() if '"consumption.paused"' in line]
    assert paused and all(line["in_flight"] <= cap + poll for line in paused), "in-flight work stays bounded"


@pytest.mark.parametrize("policy", ["review", "allow"])
async def test_spent_retry_budget_publishes_degraded_verdicts(
    broker, topics, api_key, spawn_worker, policy: str
) -> None:
    events = contents(30, prefix=policy)
    with MistralServer(api_key=api_key, fault_plan=lambda request: Fault(status=503)) as server:
        await produce(broker.bootstrap_servers, topics.content, [event_record(e) for e in events])
        worker = spawn_worker(
            worker_env(
                broker,
                topics,
                server,
                api_key,
                **FAST_RETRIES,
                MODWORKER_SCORING__FAIL_POLICY=policy,
                MODWORKER_HTTP__RETRY_ATTEMPTS="2",
            )
        )
        verdict_records = await wait_for_count(broker.bootstrap_servers, topics.verdict, len(events), timeout_s=90)
        assert worker.stop(signal.SIGTERM) == 0

    verdicts = [json.loads(r.value) for r in verdict_records]
    assert {v["event_id"] for v in verdicts} == {e["id"] for e in events}
    for verdict in verdicts:
        assert verdict["degraded"] is True and verdict["action"] == policy
        assert verdict["degraded_reason"] and "Mistral API" in verdict["degraded_reason"]
        assert verdict["scores"] == {} and verdict["model"] is None
    assert "backend.degraded_verdicts" in worker.log()
