"""Kafka's own security on Apache Kafka: SCRAM-SHA-512 over SASL_PLAINTEXT and SASL_SSL,
and ACLs enforced by KRaft's ``StandardAuthorizer``.

Each scenario gets its own broker (``KafkaBroker(sasl_users=..., tls=..., acls=True)``):
the worker authenticates as ``worker`` on a SASL listener with exactly the ACLs it needs
(or one of them missing); the harness's producer and reader use the plain listener, a
super user. Promises: the stream is judged end to end over both SASL listeners (lost 0);
a wrong password, a missing WRITE ACL on the verdict topic, a missing READ ACL on an input
topic and a missing ACL for the group each stop the worker with one line naming the fix,
exit 1; with the WRITE ACL missing nothing is committed, and once it is granted a
restarted worker judges everything (lost 0). The password appears in no log line, error
or metric.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import DeadLetterHeaders
from tests.chaos.conftest import ChaosRun
from tests.chaos.harness import create_topics, self_signed_certificate
from tests.kafka_support import TopicSet, committed, read_all
from worker.testing.broker import free_port
from worker.testing.kafka_broker import AclSpec, KafkaBroker, Tls, missing_tools
from worker.testing.mistral_server import MistralServer

IN_FLIGHT = 200
WORKER = "worker"


class SecureRun(ChaosRun):
    """A ``ChaosRun`` whose workers authenticate as ``worker`` on a SASL listener."""

    broker: KafkaBroker

    def __init__(self, *args: Any, password: str, ca: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.password = password
        self.ca = ca

    def secure_env(self, protocol: str = "SASL_PLAINTEXT", **extra: str) -> dict[str, str]:
        listener = (
            self.broker.sasl_ssl_bootstrap_servers if protocol == "SASL_SSL" else self.broker.sasl_bootstrap_servers
        )
        settings = {
            "KAFKA_BOOTSTRAP_SERVERS": listener,
            "MODWORKER_KAFKA__SECURITY_PROTOCOL": protocol,
            "MODWORKER_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "MODWORKER_KAFKA__SASL_USERNAME": WORKER,
            "MODWORKER_KAFKA__SASL_PASSWORD": self.password,
            "MODWORKER_MAX_IN_FLIGHT": str(IN_FLIGHT),
        }
        if protocol == "SASL_SSL":
            settings["MODWORKER_KAFKA__SSL_CAFILE"] = str(self.ca)
        return {**settings, **extra}

    def spawn_secure(self, protocol: str = "SASL_PLAINTEXT", **extra: str):
        return self.spawn(**self.secure_env(protocol, **extra))

    def worker_acls(self) -> dict[str, AclSpec]:
        """What the worker needs, by name: read the inputs and the state, write the outputs."""
        t, user = self.topics, f"User:{WORKER}"
        acls = {f"read {name}": AclSpec(user, "topic", name, "Read") for name in t.inputs}
        acls["read group"] = AclSpec(user, "group", t.group_id, "Read")
        acls |= {f"write {name}": AclSpec(user, "topic", name, "Write") for name in t.outputs}
        acls["read state"] = AclSpec(user, "topic", t.conversation_state, "Read")
        acls["write state"] = AclSpec(user, "topic", t.conversation_state, "Write")
        return acls

    def grant(self, *, without: tuple[str, ...] = ()) -> None:
        self.broker.add_acls(*(spec for name, spec in self.worker_acls().items() if name not in without))

    def assert_no_password(self, *texts: str) -> None:
        for text in (*(w.log() for w in self.workers), *texts):
            assert self.password not in text, "the SASL password appeared in a worker's output"


@pytest.fixture
def secure(mistral: MistralServer, api_key: str, tmp_path: Path) -> Iterator[SecureRun]:
    """Apache Kafka with SCRAM users ``admin`` and ``worker``, TLS and ACLs, fresh topics
    (the changelog created compacted up front), and a ``SecureRun`` on it."""
    problem = missing_tools()
    if problem:
        pytest.skip(f"{problem}: Kafka's security needs Apache Kafka")
    cert, key = self_signed_certificate(tmp_path)
    password = "pw-" + secrets.token_urlsafe(16)
    users = {"admin": "admin-" + secrets.token_urlsafe(12), WORKER: password}
    broker = KafkaBroker(tmp_path / "kafka", sasl_users=users, tls=Tls(cert, key), acls=True).start()
    run = None
    try:
        topics = TopicSet.unique()
        asyncio.run(create_topics(broker.bootstrap_servers, topics.inputs + topics.outputs, partitions=4))
        asyncio.run(_create_changelog(broker.bootstrap_servers, topics))
        run = SecureRun(broker, topics, mistral, api_key, tmp_path, password=password, ca=cert)
        yield run
    finally:
        if run is not None:
            run.close()
        broker.close()


async def _create_changelog(bootstrap: str, topics: TopicSet) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from worker.pipeline.state_changelog import CHANGELOG_CONFIGS

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.conversation_state, 4, 1, topic_configs=CHANGELOG_CONFIGS)])
    finally:
        await admin.close()


def _no_loss(outcome) -> None:
    assert outcome.notes["settled"], f"not every input got an output: {outcome}"
    assert outcome.lost == 0, outcome
    assert outcome.dead_letters >= 1, "the malformed tenth must be dead-lettered"


def _exit_line(run: SecureRun, worker, what: str, timeout_s: float = 120) -> tuple[int, str]:
    """Wait for the worker to stop at start-up; its exit code and its last line's error."""
    try:
        code = worker.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: the worker did not stop:\n{worker.log()[-3000:]}")
    log = worker.log()
    assert "Traceback" not in log and run.api_key not in log, log[-3000:]
    last = json.loads(log.strip().splitlines()[-1])
    assert last["event"] == "worker.exit", last
    return code, last["error"]


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_scram_end_to_end(secure: SecureRun, protocol: str):
    """The worker authenticates with SCRAM-SHA-512 and works under exactly its ACLs."""
    secure.grant()
    port = free_port()
    worker = secure.spawn_secure(protocol, MODWORKER_HTTP_PORT=str(port))
    secure.stream()
    assert secure.traffic is not None and secure.traffic.wait_for_outputs(50, 90), worker.log()[-3000:]
    time.sleep(6)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    outcome = secure.finish(f"SCRAM-SHA-512 over {protocol}, with ACLs", fault_end=None)
    _no_loss(outcome)
    assert outcome.duplicates == 0
    assert outcome.notes["sigterm_exit_codes"] == [0]
    secure.assert_no_password(metrics)


def test_a_wrong_password_stops_start_up_with_one_line(secure: SecureRun):
    secure.grant()
    worker = secure.spawn_secure(MODWORKER_KAFKA__SASL_PASSWORD="not-" + secure.password)
    code, line = _exit_line(secure, worker, "wrong password")
    assert code != 0
    assert "MODWORKER_KAFKA__SASL_PASSWORD" in line and "rejected the SASL credentials" in line, line
    secure.assert_no_password(line)
    assert "not-" + secure.password not in worker.log(), "the wrong password appeared in the output"
    secure.note_start_up_failure("SASL, wrong password", {"exit_code": code, "line": line})


@pytest.mark.parametrize(
    ("missing", "named"),
    [("read content", "READ on it"), ("read group", "READ on the group")],
    ids=["no-read-on-an-input-topic", "no-acl-for-the-group"],
)
def test_a_missing_read_acl_stops_start_up_with_one_line(secure: SecureRun, missing: str, named: str):
    secure.grant(without=(f"read {secure.topics.content}" if missing == "read content" else missing,))
    worker = secure.spawn_secure()
    code, line = _exit_line(secure, worker, missing)
    assert code == 1, line
    what = secure.topics.content if missing == "read content" else secure.topics.group_id
    assert what in line and named in line and f"User:{WORKER}" in line, line
    secure.assert_no_password(line)
    name = "ACL: no READ on an input topic" if missing == "read content" else "ACL: no ACL for the group"
    secure.note_start_up_failure(name, {"exit_code": code, "line": line})


def test_no_write_acl_on_the_verdict_topic_then_granted(secure: SecureRun):
    """Without WRITE on the verdict topic: one line, exit 1, nothing committed past an input
    without its output (a malformed one, dead-lettered, may finish). Granted, a
    restarted worker judges every input (lost 0)."""
    t = secure.topics
    secure.grant(without=(f"write {t.verdict}",))
    traffic = secure.stream()
    deadline = time.monotonic() + 30
    while traffic.inputs() < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
    denied = secure.spawn_secure()
    code, line = _exit_line(secure, denied, "no WRITE on the verdict topic")
    assert code == 1, line
    assert t.verdict in line and "WRITE" in line and f"User:{WORKER}" in line, line
    offsets = asyncio.run(committed(secure.broker.bootstrap_servers, t.group_id, t.inputs))
    # Nothing is committed past an input without its output: only a prefix of malformed
    # inputs, each dead-lettered (WRITE on the dead-letter topic is granted), may be.
    letters = asyncio.run(read_all(secure.broker.bootstrap_servers, t.dead_letter, idle_s=1))
    lettered = {
        (
            h[DeadLetterHeaders.ORIGIN_TOPIC].decode(),
            int(h[DeadLetterHeaders.ORIGIN_PARTITION]),
            int(h[DeadLetterHeaders.ORIGIN_OFFSET]),
        )
        for h in (dict(r.headers) for r in letters)
    }
    for tp, offset in offsets.items():
        unjudged = [o for o in range(offset) if (tp.topic, tp.partition, o) not in lettered]
        assert not unjudged, f"offsets of {tp} committed without an output: {unjudged}"

    secure.broker.add_acls(secure.worker_acls()[f"write {t.verdict}"])
    secure.spawn_secure()
    assert traffic.wait_for_outputs(50, 90), secure.workers[-1].log()[-3000:]
    time.sleep(4)
    outcome = secure.finish(
        "ACL: no WRITE on the verdict topic, then granted",
        fault_end=None,
        exit_code=code,
        denied_line=line,
        committed_while_denied=sum(offsets.values()),
    )
    _no_loss(outcome)
    secure.assert_no_password(line)
