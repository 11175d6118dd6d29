"""Sampling profiles of the worker with py-spy, summarised to text the docs can quote.

``Profiler(pid, raw_path)`` attaches ``py-spy record --pid`` (raw "collapsed stack"
format, no line numbers) to a running process; it stops by itself when the process exits.
``summarise`` turns the raw file into the share of samples in which each function is on
the stack (inclusive) and at its top (self), idle samples excluded (py-spy's default), and
into the share of each pipeline stage (``STAGES``: a sample belongs to the first stage
whose pattern its stack matches, leaf first), the table docs/benchmarks.md quotes.
py-spy comes with the ``bench`` extra; attaching needs ptrace rights over the process
(the same user, and a ``kernel.yama.ptrace_scope`` that allows it, or root).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class ProfilerUnavailable(RuntimeError):
    """py-spy is not installed; the message says how to get it."""


STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("metrics (Prometheus)", ("prometheus_client",)),
    ("logging (structlog)", ("structlog/",)),
    ("JSON of the backend's answer", ("decode_json (", "MistralBackend._parse", "_numbers (")),
    ("backend HTTP call (client)", ("RemoteApi.", "AsyncClient.", "aiohttp/", "httpx/", "httpcore/", "engine.py")),
    ("decode", ("Decoder.decode",)),
    ("conversation state", ("ConversationStage.", "ConversationState.")),
    ("policy", ("Policy.decide",)),
    ("verdict JSON", ("pipeline/encode.py",)),
    ("verdict assembly and id", ("VerdictBuilder.",)),
    ("ordering (key sequencer)", ("KeySequencer.",)),
    ("acknowledgements", ("VerdictGroup.acked", "_acked_callback", "ModerationWorker._finish")),
    ("outputs (the rest)", ("Outputs.",)),
    ("sink and producer", ("Sink.", "aiokafka/producer/", "partitioner.py")),
    ("consumer (fetch, records)", ("aiokafka/consumer/", "Source.")),
    ("scoring (the rest)", ("Scorer.", "RemoteBackend.", "breaker.py")),
    ("batching", ("MicroBatcher.",)),
    ("accept (the rest)", ("ModerationWorker._accept",)),
    ("Kafka protocol and connections", ("aiokafka/",)),
)
"""Pipeline stages by the frames that are theirs (``func (path)`` substrings); a sample
matching none is the event loop's or start-up's."""


@dataclass(frozen=True)
class Summary:
    samples: int
    inclusive: list[tuple[str, float]]  # (function, share of samples)
    self_time: list[tuple[str, float]]
    stages: list[tuple[str, float]] = field(default_factory=list)  # (stage, share of samples)

    def text(self, top: int = 40) -> str:
        lines = [f"{self.samples} samples (idle excluded); share of samples per pipeline stage:"]
        lines += [f"{share:6.1%}  {name}" for name, share in self.stages]
        lines += ["", "share of samples with the function on the stack:"]
        lines += [f"{share:6.1%}  {name}" for name, share in self.inclusive[:top]]
        lines += ["", "share of samples with the function at the top of the stack (self):"]
        lines += [f"{share:6.1%}  {name}" for name, share in self.self_time[:top]]
        return "\n".join(lines) + "\n"


def py_spy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise ProfilerUnavailable(
            "--profile needs py-spy: pip install 'moderation-worker[bench]' (or pip install py-spy)"
        )
    return found


class Profiler:
    """``py-spy record`` attached to ``pid`` until it exits."""

    def __init__(self, pid: int, raw_path: Path, *, rate: int = 100) -> None:
        self.raw_path = raw_path
        self._log = raw_path.with_suffix(".py-spy.log").open("wb")
        self._process = subprocess.Popen(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--nolineno",
                "--rate",
                str(rate),
                "--output",
                str(raw_path),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout_s: float = 30.0) -> Summary | None:
        """Wait for py-spy to write its file (after the profiled process exited); summarise it."""
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.terminate()
            self._process.wait()
        finally:
            self._log.close()
        return summarise(self.raw_path) if self.raw_path.is_file() else None


def summarise(raw_path: Path) -> Summary:
    """Inclusive and self shares per function from a py-spy raw file (``a;b;c COUNT`` lines)."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        stages[stage_of(stack.split(";"))] += samples
        frames = [_short(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += samples
        self_time[frames[-1]] += samples
    if total == 0:
        return Summary(0, [], [])
    return Summary(
        total,
        [(name, n / total) for name, n in inclusive.most_common()],
        [(name, n / total) for name, n in self_time.most_common()],
        [(name, n / total) for name, n in stages.most_common()],
    )


def stage_of(frames: list[str]) -> str:
    """The pipeline stage of one sample's stack (root first): the first of ``STAGES`` whose
    pattern a frame matches, from the leaf up; else the event loop's."""
    for frame in reversed(frames):
        for name, patterns in STAGES:
            if any(pattern in frame for pattern in patterns):
                return name
    return "event loop, start-up and the rest"


def _short(frame: str) -> str:
    """``func (path/to/module.py)`` -> ``func (module.py)``: stable across machines."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    return f"{name} ({where.rsplit('/', 1)[-1]})" if where else name
