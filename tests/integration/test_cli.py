"""The ``modworker`` command line as a user runs it: produce, tail, schemas, start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas import json_schemas
from tests import kafka_support
from tests.conftest import worker_env
from tests.kafka_support import read_all, wait_for_count


def modworker(*args: str, env: dict[str, str] | None = None, timeout: float = 60, stdin: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, timeout=timeout, input=stdin
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MODWORKER_", "MISTRAL_", "OPENAI_")) and k != "KAFKA_BOOTSTRAP_SERVERS"
    }
    env.update(extra)
    return env


def test_a_bad_setting_stops_start_up_with_one_line_naming_it():
    result = modworker(
        "run",
        env=clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", MISTRAL_API_KEY="k", MODWORKER_BATCH__MAX_SIZE="lots"),
    )
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "MODWORKER_BATCH__MAX_SIZE" in err


def test_a_missing_key_or_broker_names_the_setting_and_the_fix():
    missing_key = modworker("run", env=clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"))
    assert missing_key.returncode == 2 and "MISTRAL_API_KEY" in missing_key.stderr.decode()
    assert "export MISTRAL_API_KEY" in missing_key.stderr.decode()
    missing_broker = modworker("run", env=clean_env(MISTRAL_API_KEY="k"))
    assert missing_broker.returncode == 2 and "KAFKA_BOOTSTRAP_SERVERS" in missing_broker.stderr.decode()
    assert "Traceback" not in missing_key.stderr.decode() + missing_broker.stderr.decode()


def test_unreachable_kafka_is_one_line_not_a_traceback():
    secret = "sk-never-print-me-123"
    result = modworker(
        "run",
        env=clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", MISTRAL_API_KEY=secret, MODWORKER_HTTP_PORT="0"),
        timeout=120,
    )
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in out and "Traceback" not in out
    assert secret not in out


def test_schemas_export_writes_the_checked_in_files(tmp_path: Path):
    result = modworker("schemas", "export", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    written = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert written == json_schemas()
    assert set(written) == {
        "content_event.schema.json",
        "conversation_event.schema.json",
        "verdict.schema.json",
        "violation.schema.json",
        "shadow_verdict.schema.json",
        "statement_of_reasons.schema.json",
        "review_decision.schema.json",
    }


async def test_produce_run_tail_round_trip_with_the_key_in_no_output(
    broker, topics, mistral, api_key, spawn_worker, tmp_path: Path
):
    events = [
        {"id": f"p-{i}", "text": f"hello {i}" + (" <<hate_and_discrimination:0.9>>" if i == 2 else "")}
        for i in range(5)
    ]
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json at all\n")
    env = worker_env(broker, topics, mistral, api_key)
    produced = modworker("produce", str(source), "--topic", topics.content, "--allow-invalid", env=env)
    assert produced.returncode == 0, produced.stderr.decode()
    assert f"{source}:6: not_json: value is not JSON" in produced.stderr.decode()
    assert "published 6 records" in produced.stderr.decode() and "(1 invalid: line 6)" in produced.stderr.decode()
    records = await read_all(broker.bootstrap_servers, topics.content, expected=6, idle_s=0.5)
    assert sorted(r.key for r in records if r.key) == [f"p-{i}".encode() for i in range(5)]  # keyed by id

    worker = spawn_worker(env)
    await wait_for_count(broker.bootstrap_servers, topics.verdict, 5)
    await wait_for_count(broker.bootstrap_servers, topics.dead_letter, 1)
    assert worker.stop(signal.SIGTERM) == 0

    tailed = modworker(
        "tail", topics.verdict, "--from-beginning", "--max-messages", "5", "--timeout-ms", "20000", env=env
    )
    lines = tailed.stdout.decode().strip().splitlines()
    assert tailed.returncode == 0 and len(lines) == 5
    assert sum(line.startswith("block") for line in lines) == 1
    assert any("hate_and_discrimination=0.90" in line for line in lines)
    dead = modworker("tail", topics.dead_letter, "--from-beginning", "--max-messages", "1", env=env)
    assert "dead-letter not_json" in dead.stdout.decode()

    assert api_key not in worker.log() + produced.stderr.decode() + tailed.stdout.decode()
    verdicts = await read_all(broker.bootstrap_servers, topics.verdict, expected=5, idle_s=0.5)
    assert all(api_key.encode() not in r.value for r in verdicts)


def test_a_local_model_that_fails_to_load_stops_the_worker_with_one_line(tmp_path: Path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    starter = Path(__file__).parents[2] / "worker" / "models" / "starter"
    (broken / "head.json").write_text((starter / "head.json").read_text())
    (broken / "head.safetensors").write_bytes(b"not a safetensors file")
    for model in ("/nonexistent/model", str(broken)):
        result = modworker(
            "run",
            env=clean_env(
                KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
                MODWORKER_BACKEND="local",
                MODWORKER_LOCAL__MODEL=model,
                MODWORKER_HTTP_PORT="0",
                MODWORKER_LOG_FORMAT="console",
            ),
            timeout=300,
        )
        out = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 1, out
        assert "Traceback" not in out and "Unclosed" not in out, out
        last = out.strip().splitlines()[-1]
        assert "local" in last and model in last, last


# -- behaving like Kafka's own tools -----------------------------------------------------------


def test_version_is_the_installed_package_s():
    import importlib.metadata

    result = modworker("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"modworker {importlib.metadata.version('moderation-worker')}"


async def produce_with_headers(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=kafka_support.IDEMPOTENT)
    await producer.start()
    try:
        for key, value, headers in records:
            await (await producer.send(topic, value, key=key, headers=headers))
    finally:
        await producer.stop()


async def test_tail_prints_only_new_records_unless_asked_to_start_at_the_beginning(broker, topics):
    bootstrap = broker.bootstrap_servers
    await produce_with_headers(bootstrap, topics.verdict, [(b"old-1", b'{"old": 1}', [("h", b"v")])])
    # -b wins over the environment's unreachable address
    env = clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "tail",
            topics.verdict,
            "-b",
            bootstrap,
            "--json",
            "--max-messages",
            "2",
            "--timeout-ms",
            "30000",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        started = (await asyncio.to_thread(tail.stderr.readline)).decode()
        assert started.startswith(f"tail: reading {topics.verdict} (4 partitions) from the end"), started
        await produce_with_headers(
            bootstrap, topics.verdict, [(b"new-1", b'{"new": 1}', []), (b"new-2", b'{"new": 2}', [])]
        )
        out, err = await asyncio.to_thread(tail.communicate, timeout=60)
    finally:
        tail.kill()
    assert tail.returncode == 0, err.decode()
    assert sorted(out.decode().splitlines()) == ['{"new": 1}', '{"new": 2}']
    assert err.decode().strip() == "tail: 2 records"

    on_broker = {r.key: r for r in await read_all(bootstrap, topics.verdict, expected=3, idle_s=0.5)}
    began = time.monotonic()
    replay = modworker(
        "tail", topics.verdict, "--from-beginning", "--timeout-ms", "1500", "--json",
        *("--print-partition", "--print-offset", "--print-headers", "--print-key"),
        "--bootstrap-server", bootstrap, env=env,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr.decode()
    assert time.monotonic() - began < 30, "--timeout-ms must end an idle tail"
    expected = sorted(
        f"Partition:{r.partition}\tOffset:{r.offset}\t"
        + (",".join(f"{k}:{v.decode()}" for k, v in r.headers) or "NO_HEADERS")
        + f"\t{r.key.decode()}\t{r.value.decode()}"
        for r in on_broker.values()
    )
    assert sorted(replay.stdout.decode().splitlines()) == expected
    assert "Partition:" in expected[0] and "\th:v\told-1\t" in "".join(expected)


async def test_tail_from_an_offset_of_one_partition_and_its_refusals(broker, topics):
    """``-o N --partition P`` starts at offset N of P only, as Kafka's console consumer; the
    flags that do not fit are one line each and exit 2 before any connection."""
    bootstrap = broker.bootstrap_servers
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=kafka_support.IDEMPOTENT)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topics.verdict, b'{"n": %d}' % i, partition=2)
        await producer.send_and_wait(topics.verdict, b'{"other": 1}', partition=1)
    finally:
        await producer.stop()
    env = clean_env()
    result = modworker(
        "tail", topics.verdict, "-o", "3", "--partition", "2", "--json", "--print-offset",
        "--timeout-ms", "1500", "-b", bootstrap, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == ['Offset:3\t{"n": 3}', 'Offset:4\t{"n": 4}']
    assert f"tail: reading {topics.verdict} (partition 2) from offset 3" in result.stderr.decode()
    earliest = modworker(
        "tail", topics.verdict, "-o", "earliest", "--partition", "1", "--json", "--timeout-ms", "1500",
        "-b", bootstrap, env=env,
    )  # fmt: skip
    assert earliest.stdout.decode().splitlines() == ['{"other": 1}'], earliest.stderr.decode()

    for flags, needle in (
        (("-o", "3"), "needs --partition"),
        (("-o", "soon", "--partition", "1"), "earliest, latest or a non-negative offset"),
        (("-o", "earliest", "--from-beginning"), "not both"),
        (("--partition", "9"), "no partition 9"),
    ):
        refused = modworker("tail", topics.verdict, *flags, "-b", bootstrap, env=env)
        lines = refused.stderr.decode().strip().splitlines()
        assert refused.returncode != 0 and len(lines) == 1 and needle in lines[0], (flags, lines)


async def test_tail_of_a_missing_topic_is_one_line_and_never_creates_it(broker, topics):
    bootstrap = broker.bootstrap_servers
    mistyped = topics.verdict.replace("verdicts", "verdict")  # the broker auto-creates topics asked for
    result = modworker("tail", mistyped, "-b", bootstrap, "--timeout-ms", "1000", env=clean_env())
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"no such topic: {mistyped} (did you mean {topics.verdict}?)" in err
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert mistyped not in await admin.list_topics()
    finally:
        await admin.close()


async def test_produce_refuses_invalid_lines_naming_each_and_publishes_nothing(broker, topics, tmp_path: Path):
    bootstrap = broker.bootstrap_servers
    source = tmp_path / "events.jsonl"
    source.write_text(
        '{"id": "e-1", "text": "hello"}\n'
        "not json\n"
        '{"id": "e-3", "text": "hi"}\n'
        '{"id": "e-4"}\n'
        "\n"
        '{"id": "e-6", "text": "   "}\n'
    )
    env = clean_env(**topics.env())
    refused = modworker("produce", str(source), "--topic", topics.content, "-b", bootstrap, env=env)
    err = refused.stderr.decode()
    assert refused.returncode == 1, err
    assert err.splitlines()[:3] == [
        f"{source}:2: not_json: value is not JSON: Expecting value: line 1 column 1 (char 0)",
        f"{source}:4: schema: schema violation: text: Field required",
        f"{source}:6: empty_text: text is empty or whitespace only",
    ]
    assert f"{source}: 3 of 5 lines invalid (lines 2, 4, 6); nothing published" in err.splitlines()[3]
    assert len(err.strip().splitlines()) == 4 and "Traceback" not in err
    assert await read_all(bootstrap, topics.content, idle_s=1.0, timeout_s=10) == []

    allowed = modworker("produce", str(source), "--topic", topics.content, "-b", bootstrap, "--allow-invalid", env=env)
    assert allowed.returncode == 0, allowed.stderr.decode()
    assert f"published 5 records to {topics.content} (3 invalid: lines 2, 4, 6)" in allowed.stderr.decode()
    assert len(await read_all(bootstrap, topics.content, expected=5, idle_s=0.5)) == 5


async def test_produce_checks_review_decisions_against_their_contract_and_keys_them_as_their_verdict(
    broker, topics, tmp_path: Path
):
    bootstrap = broker.bootstrap_servers
    reviews = topics.content + ".reviews"
    await kafka_support.create_topics(bootstrap, [reviews], partitions=1)
    decided = '"reviewer_id": "r-1", "decided_at": "2026-12-01T10:00:00Z"'
    source = tmp_path / "reviews.jsonl"
    source.write_text(
        f'{{"review_id": "rv-1", "verdict_id": "v-1", "event_id": "post-1", "action": "allow", {decided}}}\n'
        f'{{"review_id": "rv-2", "verdict_id": "v-2", "event_id": "turn-7", "kind": "conversation", '
        f'"conversation_id": "conv-3", "action": "block", "categories": ["hate"], {decided}}}\n'
        f'{{"review_id": "rv-3", "event_id": "post-2", "action": "allow", {decided}}}\n'
    )
    env = clean_env(**topics.env(), MODWORKER_REVIEWS__TOPIC=reviews)
    refused = modworker("produce", str(source), "--topic", reviews, "-b", bootstrap, env=env)
    err = refused.stderr.decode()
    assert refused.returncode == 1, err
    assert err.splitlines()[0] == f"{source}:3: schema: schema violation: verdict_id: Field required"

    allowed = modworker("produce", str(source), "--topic", reviews, "-b", bootstrap, "--allow-invalid", env=env)
    assert allowed.returncode == 0, allowed.stderr.decode()
    records = await read_all(bootstrap, reviews, expected=3, idle_s=0.5)
    assert [r.key for r in records] == [b"post-1", b"conv-3", b"post-2"]  # the machine verdict's key


def test_a_malformed_config_file_or_a_misspelled_setting_is_one_line(tmp_path: Path):
    env = clean_env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", MISTRAL_API_KEY="k")
    malformed = tmp_path / "settings.yaml"
    malformed.write_text("kafka:\n  bootstrap_servers: [a:1\nbatch: {}\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("batch: {max_sise: 64}\n")
    cases = [
        (("run", "--config", str(malformed)), env, f"--config {malformed}: not valid YAML: "),
        (("tail", "t", "--config", str(unknown)), env, "unknown setting batch.max_sise at line 1, column 9 "
         "(did you mean batch.max_size?)"),
    ]  # fmt: skip
    for args, case_env, expected in cases:
        result = modworker(*args, env=case_env)
        err = result.stderr.decode()
        assert result.returncode == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert expected in err, err


def test_an_unknown_variable_is_one_warning_at_start_up_and_the_worker_still_starts():
    # A rollback runs an older image with a newer ConfigMap: unknown names must not stop it.
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",  # start-up goes on until it tries Kafka
        MISTRAL_API_KEY="sk-unknown-variable-test",
        MODWORKER_HTTP_PORT="0",
        MODWORKER_LOG_FORMAT="json",
        MODWORKER_BATCH__MAXSIZE="64",
    )
    result = modworker("run", env=env)
    err = result.stderr.decode()
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    warnings = [e for e in events if e.get("event") == "config.unknown_setting"]
    assert [w["level"] for w in warnings] == ["warning"], err
    assert warnings[0]["message"].startswith(
        "MODWORKER_BATCH__MAXSIZE is not a setting and is ignored (did you mean MODWORKER_BATCH__MAX_SIZE?)"
    )
    assert any(e.get("event") == "worker.starting" for e in events), err
    assert result.returncode == 1 and "cannot reach Kafka at 127.0.0.1:1" in err

    produced = modworker("produce", "-", "--topic", "t", stdin=b"not json\n", env=env)
    lines = produced.stderr.decode().splitlines()
    assert lines[0].startswith("modworker: warning: MODWORKER_BATCH__MAXSIZE is not a setting and is ignored")
    assert sum("MODWORKER_BATCH__MAXSIZE" in line for line in lines) == 1


def test_eval_and_calibrate_print_their_tables_to_stdout_and_notes_to_stderr(tmp_path: Path):
    from worker.testing.mistral_server import MistralServer
    from worker.testing.openai_server import OpenAIServer

    data = tmp_path / "labelled.jsonl"
    records = [{"text": f"threat {i} <<violence_and_threats:0.9>>", "labels": {"moderation": ["violence_and_threats"]}}
               for i in range(10)] + [{"text": f"calm {i}", "labels": {"moderation": ["safe"]}} for i in range(10)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with MistralServer(api_key="k") as mistral_api, OpenAIServer(api_key="k") as openai_api:
        env = clean_env(MISTRAL_API_KEY="k", MODWORKER_MISTRAL__BASE_URL=mistral_api.base_url)
        env.update(OPENAI_API_KEY="k", MODWORKER_OPENAI__BASE_URL=openai_api.base_url)
        report = str(tmp_path / "eval.json")
        evaluated = modworker("eval", str(data), "--backend", "mistral", "--report", report, "--no-plots", env=env)
        calibrated = modworker(
            "calibrate", str(data), "--first", "openai", "--then", "mistral", "--then-oracle",
            "--report", str(tmp_path / "calibrate.json"), "--no-plots", env=env,
        )  # fmt: skip
    for result, table_head, note in (
        (evaluated, "| category | support | precision |", "eval: report"),
        (calibrated, "| category | support | band (below, above) |", "calibrate: report"),
    ):
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 0, err
        assert table_head in out and "| violence_and_threats |" in out
        assert "| category |" not in err and note in err and note not in out
