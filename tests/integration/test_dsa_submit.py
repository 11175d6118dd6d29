"""``modworker dsa submit`` on the test broker against the loopback DSA Transparency Database:
every statement on the topic ends stored exactly once (or dead-lettered with the API's
reason), through duplicates, refused fields, 429s, 5xx, lost answers and restarts, and the
offsets are committed only past what has an outcome. The token appears in no log line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import structlog

from schemas import DeadLetterHeaders
from tests.kafka_support import committed, create_topics, log_events, produce, read_all
from tests.pipeline.test_statements import valid_body
from worker.config import load_settings
from worker.ops.dsa_submit import DsaSubmitter
from worker.testing.dsa_server import DsaTransparencyServer, rate_limited
from worker.testing.faults import Fault, when_input_contains

pytestmark = [pytest.mark.slow]

TOKEN = "X|ybqkTestToken" + os.urandom(6).hex()
PARTITIONS = 4


def statement(i: int, **change: Any) -> dict[str, Any]:
    return valid_body(puid=f"verdict-{i:04d}", **change)


def record_of(body: dict[str, Any] | bytes, key: str) -> tuple[bytes, bytes]:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    return key.encode(), value


async def end_offsets(bootstrap: str, topic: str) -> dict:
    records = await read_all(bootstrap, topic, idle_s=1.0)
    ends: dict = {}
    for r in records:
        ends[(r.topic, r.partition)] = max(ends.get((r.topic, r.partition), 0), r.offset + 1)
    return ends


async def wait_committed(bootstrap: str, group: str, topic: str, ends: dict, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = {
            (tp.topic, tp.partition): o for tp, o in (await committed(bootstrap, group, [topic], PARTITIONS)).items()
        }
        if done == ends:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"group {group} committed {done}, the topic ends at {ends}")


def submit_env(broker, server: DsaTransparencyServer, topic: str, dead_letter: str, group: str, **extra: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODWORKER_", "MISTRAL_", "OPENAI_"))}
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "MODWORKER_KAFKA__ENABLE_IDEMPOTENCE": "false" if broker.embedded else "true",
            "MODWORKER_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "MODWORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "MODWORKER_DSA__TOPIC": topic,
            "MODWORKER_DSA__API_URL": server.base_url,
            "MODWORKER_DSA__API_TOKEN": TOKEN,
            "MODWORKER_DSA__GROUP_ID": group,
            "MODWORKER_DEAD_LETTER_TOPIC": dead_letter,
            "MODWORKER_HTTP__RETRY_BASE_WAIT_S": "0.05",
            "MODWORKER_HTTP__RETRY_MAX_WAIT_S": "0.2",
            "MODWORKER_LOG_FORMAT": "json",
            "MODWORKER_LOG_LEVEL": "debug",
        }
    )
    env.update(extra)
    return env


@pytest.fixture
async def sor_topics(broker, topics):
    """The statements topic (4 partitions) beside the test's fresh dead-letter topic."""
    topic = topics.verdict + ".sor"
    await create_topics(broker.bootstrap_servers, [topic], partitions=PARTITIONS)
    return topic, topics.dead_letter, topics.group_id + "-dsa"


async def test_every_statement_is_stored_once_through_duplicates_bad_fields_429s_5xx_and_a_lost_answer(
    broker, sor_topics, monkeypatch
):
    bootstrap = broker.bootstrap_servers
    topic, dead_letter, group = sor_topics
    valid = [statement(i) for i in range(230)]
    bad = {
        "verdict-9001": statement(9001, content_date="1990-05-01"),
        "verdict-9002": statement(9002, category="STATEMENT_CATEGORY_GARDENING"),
        "verdict-9003": statement(9003, incompatible_content_ground=None),
        "verdict-9004": statement(9004, decision_facts="facts TOO-LARGE"),  # 413 for any call with it
    }
    records = [record_of(s, s["puid"]) for s in valid[:7]]
    records += [record_of(valid[7], valid[7]["puid"])] * 2  # published twice in a row: one batch
    records += [record_of(s, s["puid"]) for s in valid[8:120]]
    records += [record_of(bad["verdict-9001"], "verdict-9001"), record_of(b"not json {", "broken")]
    records += [record_of(valid[3], valid[3]["puid"]), record_of(valid[50], valid[50]["puid"])]  # published twice
    records += [record_of(s, s["puid"]) for s in valid[120:]]
    records += [record_of(bad[puid], puid) for puid in ("verdict-9002", "verdict-9003", "verdict-9004")]
    await produce(bootstrap, topic, records)
    ends = await end_offsets(bootstrap, topic)

    faults = {0: rate_limited(1), 2: Fault(status=503), 3: Fault(status=500), 6: Fault(status=429, retry_after="1")}
    too_large = when_input_contains("TOO-LARGE", Fault(status=413))  # refused whole, naming nothing
    lost: list[int] = []

    def lose_the_first_answer(request) -> bool:  # stored, then the answer is lost (502)
        if lost:
            return False
        lost.append(request.index)
        return True

    with DsaTransparencyServer(
        api_key=TOKEN,
        fault_plan=lambda request: faults.get(request.index) or too_large(request),
        lose_answer=lose_the_first_answer,
    ) as server:
        server.preload(valid[200:210])  # submitted before: the API answers them as duplicates
        for name, value in submit_env(
            broker, server, topic, dead_letter, group, MODWORKER_DSA__BATCH_SIZE="50"
        ).items():
            monkeypatch.setenv(name, value)
        submitter = DsaSubmitter(load_settings(require_backend=False))
        with structlog.testing.capture_logs() as logs:
            running = asyncio.create_task(submitter.run())
            try:
                await wait_committed(bootstrap, group, topic, ends)
            finally:
                submitter.stop()
                await asyncio.wait_for(running, 30)

        accepted = Counter(server.accepted_puids)
        assert [puid for puid, n in accepted.items() if n > 1] == []  # nothing stored twice
        expected = {s["puid"] for s in valid} - {s["puid"] for s in valid[200:210]}
        assert set(accepted) == expected  # nothing skipped
        assert set(server.stored) == {s["puid"] for s in valid}
        for request in server.requests:
            puids = [s.get("puid") for s in request.body["statements"]]
            assert len(puids) <= 50 and len(set(puids)) == len(puids), "a call repeated a puid or passed the batch size"
        assert {r.retry_after for r in server.requests} >= {"1"}
        assert any(r.status == 502 for r in server.requests) and any(r.status in (500, 503) for r in server.requests)

    letters = await read_all(bootstrap, dead_letter, expected=5)
    by_key = {r.key.decode(): {k: v.decode() for k, v in r.headers} for r in letters}
    assert sorted(by_key) == ["broken", "verdict-9001", "verdict-9002", "verdict-9003", "verdict-9004"]
    assert all(
        h[DeadLetterHeaders.STAGE] == "submit" and h[DeadLetterHeaders.ORIGIN_TOPIC] == topic for h in by_key.values()
    )
    assert by_key["broken"][DeadLetterHeaders.ERROR_TYPE] == "not_json"
    refused = {k: h[DeadLetterHeaders.MESSAGE] for k, h in by_key.items() if k != "broken"}
    assert refused == {
        "verdict-9001": "content_date: The content date field must be a date after or equal to 2000-01-01.",
        "verdict-9002": "category: The selected category is invalid.",
        "verdict-9003": "incompatible_content_ground: The incompatible content ground field is required when "
        "decision ground is incompatible content.",
        "verdict-9004": "HTTP 413: Request Entity Too Large",
    }
    assert all(by_key[k][DeadLetterHeaders.ERROR_TYPE] == "submission_refused" for k in refused)
    assert json.loads(next(r.value for r in letters if r.key == b"verdict-9002")) == bad["verdict-9002"]
    totals = submitter.totals  # the lost answer's statements came back as duplicates
    assert totals["dead_lettered"] == 5 and totals["accepted"] + totals["duplicate"] == len(valid) + 3
    assert totals["duplicate"] >= 13 + 1
    events = {entry["event"] for entry in logs}
    assert {"dsa.submit.started", "dsa.submit.batch", "dsa.submit.refused", "dsa.submit.stopped"} <= events
    assert TOKEN not in repr(logs)


class SubmitProcess:
    """``modworker dsa submit`` in a child process; its stderr (the log) goes to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "dsa", "submit"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._log.close()


@pytest.fixture
def spawn_submit(tmp_path):
    started: list[SubmitProcess] = []

    def spawn(env: dict[str, str]) -> SubmitProcess:
        process = SubmitProcess(env, tmp_path / f"submit-{len(started)}.log")
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


async def wait_for(condition, what: str, timeout_s: float = 60.0, process: SubmitProcess | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.process.poll() is not None:
            raise AssertionError(f"dsa submit exited ({process.process.returncode}) before {what}:\n{process.log()}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def stored_below_committed(bootstrap: str, group: str, topic: str, server: DsaTransparencyServer) -> None:
    """Nothing skipped: every record below the committed offsets is stored."""
    done = await committed(bootstrap, group, [topic], PARTITIONS)
    below = [
        json.loads(r.value)["puid"]
        for r in await read_all(bootstrap, topic, idle_s=1.0)
        if r.offset < done.get(_tp(r.topic, r.partition), 0)
    ]
    assert below, "nothing committed yet"
    assert set(below) <= set(server.stored)


def _tp(topic: str, partition: int):
    from aiokafka.structs import TopicPartition

    return TopicPartition(topic, partition)


async def test_a_restart_in_the_middle_stores_nothing_twice_and_skips_nothing(broker, sor_topics, spawn_submit):
    bootstrap = broker.bootstrap_servers
    topic, dead_letter, group = sor_topics
    valid = [statement(i) for i in range(240)]
    await produce(bootstrap, topic, [record_of(s, s["puid"]) for s in valid])
    ends = await end_offsets(bootstrap, topic)
    api_down = False
    with DsaTransparencyServer(
        api_key=TOKEN, latency_s=0.15, fault_plan=lambda request: Fault(status=503) if api_down else None
    ) as server:
        env = submit_env(broker, server, topic, dead_letter, group, MODWORKER_DSA__BATCH_SIZE="20")

        first = spawn_submit(env)  # a clean stop in the middle
        await wait_for(lambda: len(server.accepted) >= 40, "40 statements stored", process=first)
        assert first.stop(signal.SIGTERM) == 0, first.log()[-3000:]
        await stored_below_committed(bootstrap, group, topic, server)
        after_clean_stop = len(server.accepted)

        second = spawn_submit(env)  # a crash in the middle
        await wait_for(lambda: len(server.accepted) >= after_clean_stop + 60, "60 more stored", process=second)
        second.stop(signal.SIGKILL)
        assert server.duplicates_refused == []  # the clean stop committed everything it had sent
        await stored_below_committed(bootstrap, group, topic, server)

        third = spawn_submit(env)  # a crash while the API is down: the batch it holds was never stored
        await wait_for(lambda: len(server.accepted) >= after_clean_stop + 100, "40 more stored", process=third)
        api_down = True
        failed = sum(1 for r in server.requests if r.status == 503)
        await wait_for(lambda: sum(1 for r in server.requests if r.status == 503) > failed + 1, "503s", process=third)
        third.stop(signal.SIGKILL)
        api_down = False
        await stored_below_committed(bootstrap, group, topic, server)

        fourth = spawn_submit(env)
        await wait_committed(bootstrap, group, topic, ends)
        assert fourth.stop(signal.SIGTERM) == 0

        accepted = Counter(server.accepted_puids)
        assert [puid for puid, n in accepted.items() if n > 1] == []  # nothing stored twice
        assert set(accepted) == {s["puid"] for s in valid}  # nothing skipped
        # One batch is in flight at a time and committed before the next: only a batch in
        # flight at one of the two SIGKILLs can have been stored and then sent again.
        assert len(server.duplicates_refused) <= 2 * 20
        logs = [process.log() for process in (first, second, third, fourth)]
    assert log_events(logs[0], "dsa.submit.stopped") and log_events(logs[3], "dsa.submit.stopped")
    for text in logs:
        assert TOKEN not in text
        for line in text.splitlines():
            json.loads(line)  # JSON lines only


async def test_a_refused_token_stops_the_command_with_one_line_naming_the_setting(broker, sor_topics, spawn_submit):
    topic, dead_letter, group = sor_topics
    await produce(broker.bootstrap_servers, topic, [record_of(statement(1), "k")])
    with DsaTransparencyServer(api_key="the-real-token") as server:
        env = submit_env(broker, server, topic, dead_letter, group, MODWORKER_LOG_FORMAT="console")
        process = spawn_submit(env)
        assert process.process.wait(timeout=60) == 1
        text = process.log()
        assert server.accepted == []
    last = text.strip().splitlines()[-1]
    assert last.startswith("modworker: ") and "MODWORKER_DSA__API_TOKEN" in last
    assert TOKEN not in text
    assert await committed(broker.bootstrap_servers, group, [topic], PARTITIONS) == {}


async def test_sigterm_while_the_api_is_down_stops_within_the_drain_timeout_committing_nothing(
    broker, sor_topics, spawn_submit
):
    topic, dead_letter, group = sor_topics
    await produce(broker.bootstrap_servers, topic, [record_of(statement(i), f"k{i}") for i in range(5)])
    with DsaTransparencyServer(api_key=TOKEN, fault_plan=lambda request: Fault(status=503)) as server:
        env = submit_env(broker, server, topic, dead_letter, group, MODWORKER_DRAIN_TIMEOUT_S="1")
        process = spawn_submit(env)
        await wait_for(lambda: server.request_count >= 3, "the API tried", process=process)
        started = time.monotonic()
        assert process.stop(signal.SIGTERM) == 0, process.log()[-3000:]
        assert time.monotonic() - started < 15
        assert server.accepted == []
        log = process.log()
        assert log_events(log, "backend.http.retry") and log_events(log, "dsa.submit.drain_timeout")
    assert await committed(broker.bootstrap_servers, group, [topic], PARTITIONS) == {}
    assert TOKEN not in log


async def test_two_submitters_share_the_topic_through_a_rebalance_and_store_each_statement_once(
    broker, sor_topics, spawn_submit
):
    bootstrap = broker.bootstrap_servers
    topic, dead_letter, group = sor_topics
    valid = [statement(i) for i in range(400)]
    await produce(bootstrap, topic, [record_of(s, s["puid"]) for s in valid])
    ends = await end_offsets(bootstrap, topic)
    with DsaTransparencyServer(api_key=TOKEN, latency_s=0.3) as server:
        env = submit_env(broker, server, topic, dead_letter, group, MODWORKER_DSA__BATCH_SIZE="20")
        first = spawn_submit(env)
        await wait_for(lambda: len(server.accepted) >= 20, "20 statements stored", process=first)
        second = spawn_submit(env)  # joins: the group rebalances while the first has a batch in flight
        await wait_committed(bootstrap, group, topic, ends)
        assert first.stop(signal.SIGTERM) == 0 and second.stop(signal.SIGTERM) == 0
        accepted = Counter(server.accepted_puids)
        assert [puid for puid, n in accepted.items() if n > 1] == []
        assert set(accepted) == {s["puid"] for s in valid}
        assert len(server.duplicates_refused) <= 20 * PARTITIONS
    assert log_events(second.log(), "dsa.submit.batch")  # the second took a share
