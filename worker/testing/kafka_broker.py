"""Apache Kafka itself (KRaft, one node) for tests, the chaos suite and benchmarks.

The jars come from Maven Central through the pinned ``worker/testing/kafka/pom.xml``:
``fetch_jars`` copies them into ``build/kafka/lib`` (git-ignored) and does nothing while
the pom is unchanged. ``KafkaBroker`` formats a fresh log dir, starts ``kafka.Kafka`` with
``java -cp`` on free loopback ports, waits until it serves metadata, and can be SIGKILLed
and started again on the same log dir and ports (topics, offsets and groups survive).

Listeners: ``PLAINTEXT`` always, for the tests' own clients; with ``sasl_users`` also
``SASL_PLAINTEXT`` (SCRAM-SHA-512), and with a ``tls`` certificate ``SASL_SSL`` and ``SSL``
served by Kafka itself. With ``acls=True`` the ``StandardAuthorizer`` enforces ACLs on
every listener; the plain listener's anonymous principal and ``admin`` are super users,
so tests create topics and read results on it while workers authenticate on SASL.

Command line: ``python -m worker.testing.kafka_broker fetch`` (what ``make test`` runs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.testing.broker import BrokerUnavailable, free_port

POM = Path(__file__).parent / "kafka" / "pom.xml"
DEFAULT_JARS = Path(os.environ.get("MODWORKER_KAFKA_JARS", Path.cwd() / "build" / "kafka" / "lib"))
"""Where the jars go: ``MODWORKER_KAFKA_JARS``, else ``build/kafka/lib`` under the working directory."""

_STAMP = ".pom-sha256"
_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
SCRAM_MECHANISM = "SCRAM-SHA-512"
ADMIN_USER = "admin"


def missing_tools() -> str | None:
    """One line naming what is missing to run Apache Kafka here, or None."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if not missing:
        return None
    return f"Apache Kafka test broker unavailable: {' and '.join(missing)} not on PATH (needs Java 17+ and Maven)"


def fetch_jars(dest: Path = DEFAULT_JARS, *, quiet: bool = True) -> Path:
    """Copy the pom's jars into ``dest`` unless a previous copy of the same pom is there."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    stamp = dest / _STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return dest
    problem = missing_tools()
    if problem:
        raise BrokerUnavailable(problem)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "mvn",
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(POM),
        f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={dest}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise BrokerUnavailable(f"fetching the Kafka jars with Maven failed ({done.returncode}): {tail[0]}")
    stamp.write_text(digest + "\n")
    return dest


def kafka_version(jars: Path = DEFAULT_JARS) -> str:
    """The Kafka version of the fetched jars, read from the kafka-clients jar's name."""
    for jar in jars.glob("kafka-clients-*.jar"):
        return jar.stem.removeprefix("kafka-clients-")
    return "unknown"


def _cluster_id() -> str:
    """22 characters of URL-safe base64; never starting with "-", which StorageTool's
    argument parser would take for an option (1 start in 64 failed that way)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class Tls:
    """A PEM certificate and its unencrypted PKCS#8 key, for Kafka's own TLS listeners."""

    cert: Path
    key: Path


@dataclass
class KafkaBroker:
    """One Apache Kafka node on loopback. Use as a context manager, or ``start``/``close``.

    ``properties`` override or extend the broker's ``server.properties`` (e.g.
    ``log.cleaner.backoff.ms``). ``sasl_users`` maps SCRAM user names to passwords; they
    are written at format time (KIP-900), ``admin`` among them when ACLs are on.
    """

    workdir: Path
    jars: Path = DEFAULT_JARS
    sasl_users: Mapping[str, str] = field(default_factory=dict)
    tls: Tls | None = None
    acls: bool = False
    properties: Mapping[str, str] = field(default_factory=dict)
    heap: str = "768m"
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name, password in self.sasl_users.items():
            # StorageTool's --add-scram parses `[name=...,password=...]`: these would break it.
            if set(name + password) & set(",[]=\"' \t\n") or not name or not password:
                raise ValueError(f'SCRAM user {name!r}: name and password must be non-empty, without ,[]=" or spaces')
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.workdir / "data"
        self.log_file = self.workdir / "server.log"
        self.port = free_port()
        self.controller_port = free_port()
        self.sasl_port = free_port() if self.sasl_users else None
        self.sasl_ssl_port = free_port() if self.sasl_users and self.tls else None
        self.ssl_port = free_port() if self.tls else None
        self._process: subprocess.Popen[bytes] | None = None
        self._formatted = False

    # -- addresses ------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """The plain listener (no authentication; a super user when ACLs are on)."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        if self.sasl_port is None:
            raise ValueError("this broker has no SASL listener (no sasl_users)")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        if self.sasl_ssl_port is None:
            raise ValueError("this broker has no SASL_SSL listener (needs sasl_users and tls)")
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def ssl_bootstrap_servers(self) -> str:
        if self.ssl_port is None:
            raise ValueError("this broker has no SSL listener (no tls)")
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    # -- configuration --------------------------------------------------------------

    def _server_properties(self) -> dict[str, str]:
        listeners = {"PLAINTEXT": self.port, "CONTROLLER": self.controller_port}
        protocols = {"PLAINTEXT": "PLAINTEXT", "CONTROLLER": "PLAINTEXT"}
        if self.sasl_port is not None:
            listeners["SASL"] = self.sasl_port
            protocols["SASL"] = "SASL_PLAINTEXT"
        if self.sasl_ssl_port is not None:
            listeners["SASLTLS"] = self.sasl_ssl_port
            protocols["SASLTLS"] = "SASL_SSL"
        if self.ssl_port is not None:
            listeners["TLS"] = self.ssl_port
            protocols["TLS"] = "SSL"
        addresses = ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items())
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": addresses,
            "advertised.listeners": addresses,
            "listener.security.protocol.map": ",".join(f"{n}:{p}" for n, p in protocols.items()),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": "4",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A test's compacted topic is cleaned within seconds, not the default 15 s backoff.
            "log.cleaner.backoff.ms": "500",
            "auto.create.topics.enable": "true",
            # After a SIGKILL the restarted node may register only once its old session has
            # expired: 2 s here, not the default 9 s, so a chaos restart takes ~3 s.
            "broker.session.timeout.ms": "2000",
            "broker.heartbeat.interval.ms": "500",
        }
        if self.sasl_users:
            props["sasl.enabled.mechanisms"] = SCRAM_MECHANISM
            for name in ("SASL", "SASLTLS"):
                props[f"listener.name.{name.lower()}.scram-sha-512.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
        if self.tls is not None:
            keystore = self.workdir / "broker-keystore.pem"
            keystore.write_text(self.tls.key.read_text() + self.tls.cert.read_text())
            props["ssl.keystore.type"] = "PEM"
            props["ssl.keystore.location"] = str(keystore)
        if self.acls:
            props["authorizer.class.name"] = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
            props["super.users"] = f"User:{ADMIN_USER};User:ANONYMOUS"
            props["allow.everyone.if.no.acl.found"] = "false"
        props.update(self.properties)
        return props

    def _write_config(self) -> Path:
        config = self.workdir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self._server_properties().items()))
        (self.workdir / "log4j2.properties").write_text(
            "status = error\n"
            "appender.file.type = File\n"
            "appender.file.name = FILE\n"
            f"appender.file.fileName = {self.log_file}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
            "logger.kafka.name = kafka\n"
            "logger.kafka.level = INFO\n"
            "logger.cleaner.name = kafka.log.LogCleaner\n"
            "logger.cleaner.level = INFO\n"
        )
        return config

    def _java(self, *args: str) -> list[str]:
        return ["java", "-cp", f"{self.jars}/*", *args]

    def _format(self, config: Path) -> None:
        command = self._java(
            "kafka.tools.StorageTool", "format", "--standalone", "-t", _cluster_id(), "-c", str(config)
        )
        users = dict(self.sasl_users)
        for name, password in users.items():
            command += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BrokerUnavailable(f"kafka-storage format failed: {(done.stdout + done.stderr).strip()[-300:]}")
        self._formatted = True

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> KafkaBroker:
        """Start (formatting the log dir the first time) and wait until it serves metadata."""
        problem = missing_tools()
        if problem:
            raise BrokerUnavailable(problem)
        fetch_jars(self.jars)
        config = self._write_config()
        if not self._formatted:
            self._format(config)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        stdout = (self.workdir / "stdout.log").open("ab")
        self._process = subprocess.Popen(
            [
                "java",
                "-Xms128m",
                f"-Xmx{self.heap}",
                "-XX:+UseG1GC",
                "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp",
                f"{self.jars}/*",
                "kafka.Kafka",
                str(config),
            ],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stdout.close()
        self._wait_started(offset)
        return self

    def _wait_started(self, offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise BrokerUnavailable(
                    f"Apache Kafka exited at start with code {self._process.returncode}; see {self.log_file}"
                )
            if self.log_file.exists():
                with self.log_file.open("rb") as log:
                    log.seek(offset)
                    if b"Kafka Server started" in log.read():
                        break
            time.sleep(0.1)
        else:
            raise BrokerUnavailable(f"Apache Kafka did not start within {self.start_timeout_s}s; see {self.log_file}")
        _run_async(self._describe_cluster(), timeout_s=max(5.0, deadline - time.monotonic()))

    async def _describe_cluster(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        await admin.start()
        try:
            await admin.describe_cluster()
        finally:
            await admin.close()

    def kill(self) -> None:
        """SIGKILL the broker; its log dir stays for ``start`` to reopen."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL if it lingers."""
        if not self.running or self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal(self, sig: int) -> None:
        if self.running and self._process is not None:
            self._process.send_signal(sig)
            if sig == signal.SIGKILL:
                self._process.wait()

    def close(self) -> None:
        self.stop(timeout_s=10.0)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- administration ---------------------------------------------------------------

    def add_acls(self, *bindings: AclSpec) -> None:
        """Create ALLOW bindings with Kafka's own ``AclCommand``, on the plain listener
        (one JVM per principal, resource type, operation and pattern: about 1 s each)."""
        for group in _grouped(bindings):
            self._acl_command(["--add"], group)

    def remove_acls(self, *bindings: AclSpec) -> None:
        for group in _grouped(bindings):
            self._acl_command(["--remove", "--force"], group)

    def _acl_command(self, flags: list[str], specs: list[AclSpec]) -> None:
        first = specs[0]
        resource = {"topic": "--topic", "group": "--group", "transactional_id": "--transactional-id"}
        if first.resource_type == "cluster":
            target = ["--cluster"]
        else:
            target = [arg for spec in specs for arg in (resource[spec.resource_type], spec.name)]
        command = self._java(
            "org.apache.kafka.tools.AclCommand",
            "--bootstrap-server",
            self.bootstrap_servers,
            *flags,
            "--allow-principal",
            first.principal,
            "--operation",
            first.operation,
            "--resource-pattern-type",
            first.pattern,
            *target,
        )
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"AclCommand {flags} {specs} failed: {(done.stdout + done.stderr).strip()[-400:]}")


def _grouped(bindings: tuple[AclSpec, ...]) -> list[list[AclSpec]]:
    """Bindings that one ``AclCommand`` run can create: same principal, operation, pattern
    and resource type (it applies each operation to each resource named)."""
    groups: dict[tuple[str, str, str, str], list[AclSpec]] = {}
    for b in bindings:
        groups.setdefault((b.principal, b.operation, b.pattern, b.resource_type), []).append(b)
    return list(groups.values())


@dataclass(frozen=True)
class AclSpec:
    """An ALLOW binding: ``principal`` (e.g. ``User:worker``) may ``operation`` (``Read``,
    ``Write``, ``Describe``, ``All`` ...) the ``resource_type`` (``topic``, ``group``,
    ``transactional_id`` or ``cluster``) named ``name``, matched ``literal`` or ``prefixed``."""

    principal: str
    resource_type: str
    name: str
    operation: str
    pattern: str = "literal"


def _run_async(coro: object, *, timeout_s: float) -> None:
    """Run a coroutine to completion on a private loop in a thread (callers may be inside one)."""
    from aiokafka.errors import KafkaError

    errors: list[Exception] = []

    def target() -> None:
        try:
            asyncio.run(asyncio.wait_for(coro, timeout_s))  # type: ignore[arg-type]
        except (KafkaError, OSError, TimeoutError) as err:
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s + 5)
    if errors:
        raise BrokerUnavailable(f"Apache Kafka did not answer: {errors[0]!r}") from errors[0]


@contextlib.contextmanager
def kafka_broker(workdir: Path, **options: object) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(workdir, **options)  # type: ignore[arg-type]
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["fetch"]:
        print("usage: python -m worker.testing.kafka_broker fetch", file=sys.stderr)
        return 2
    problem = missing_tools()
    if problem:
        print(problem + "; the tests fall back to the embedded Tansu broker", file=sys.stderr)
        return 0
    started = time.monotonic()
    try:
        dest = fetch_jars(DEFAULT_JARS, quiet=True)
    except BrokerUnavailable as err:
        print(f"{err}; the tests fall back to the embedded Tansu broker", file=sys.stderr)
        return 0
    print(f"Kafka {kafka_version(dest)} jars in {dest} ({time.monotonic() - started:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
