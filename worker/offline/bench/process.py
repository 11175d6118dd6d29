"""A measured child process: the worker or the limit loop, with its CPU time and memory sampled.

``MeasuredProcess`` starts a command with its output in a log file and samples the
process every ``interval_s`` with psutil: wall time (epoch seconds, comparable with Kafka
record timestamps), CPU seconds (user + system) and RSS. ``cpu_between(t0, t1)``
interpolates the CPU time spent between two wall times, so start-up (imports, group join)
and shutdown are left out of per-message figures. ``peak_rss_mb()`` is the kernel's
high-water mark (``VmHWM`` in ``/proc/PID/status``) where there is one, else the largest
sample. Only this process is measured, never its parent or the broker.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.time()
    cpu_s: float
    rss_mb: float


class ProcessFailed(RuntimeError):
    """The child exited before it was asked to; the message carries the end of its log."""


class MeasuredProcess:
    """``async with MeasuredProcess(cmd, env=..., log_path=...) as proc:`` starts, samples, stops."""

    def __init__(self, command: list[str], *, env: dict[str, str], log_path: Path, interval_s: float = 0.1) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.returncode: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._handle: psutil.Process | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._hwm_mb: float | None = None

    async def __aenter__(self) -> Self:
        log = self.log_path.open("wb")
        try:
            self._process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self._handle = psutil.Process(self._process.pid)
        self._sampler = asyncio.create_task(self._sample_forever())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def check_alive(self) -> None:
        """Raise ``ProcessFailed`` if the child has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise ProcessFailed(
                f"{' '.join(self.command[-2:])} exited with {self._process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout_s``); returns the exit code."""
        if self._process is None:
            return self.returncode or 0
        if self._process.poll() is None:
            self._take_sample()
            self._hwm_mb = _high_water_mb(self._process.pid)
            self._process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self._process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        self.returncode = self._process.returncode
        self._process = None
        return self.returncode

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds spent between two ``time.time()`` instants (linear between samples)."""
        return max(0.0, self._cpu_at(end) - self._cpu_at(start))

    def peak_rss_mb(self) -> float:
        """The process's peak resident set size; read before it exits (``stop`` does)."""
        sampled = max((s.rss_mb for s in self.samples), default=0.0)
        return max(self._hwm_mb or 0.0, sampled)

    def rss_between(self, start: float, end: float) -> float:
        """The largest sampled RSS between two instants."""
        return max((s.rss_mb for s in self.samples if start <= s.at <= end), default=0.0)

    def rss_timeline(self, start: float, end: float, points: int = 120) -> list[tuple[float, float]]:
        """(seconds after ``start``, RSS MB) samples between two instants, thinned to ``points``."""
        window = [s for s in self.samples if start <= s.at <= end]
        step = max(1, len(window) // points)
        return [(round(s.at - start, 2), round(s.rss_mb, 1)) for s in window[::step]]

    def _cpu_at(self, at: float) -> float:
        samples = self.samples
        if not samples:
            return 0.0
        times = [s.at for s in samples]
        i = bisect.bisect_left(times, at)
        if i == 0:
            return samples[0].cpu_s
        if i >= len(samples):
            return samples[-1].cpu_s
        before, after = samples[i - 1], samples[i]
        span = after.at - before.at
        share = (at - before.at) / span if span > 0 else 1.0
        return before.cpu_s + share * (after.cpu_s - before.cpu_s)

    async def _sample_forever(self) -> None:
        while True:
            self._take_sample()
            await asyncio.sleep(self.interval_s)

    def _take_sample(self) -> None:
        if self._handle is None:
            return
        try:
            with self._handle.oneshot():
                cpu = self._handle.cpu_times()
                rss = self._handle.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return
        self.samples.append(Sample(time.time(), cpu.user + cpu.system, rss / MB))


def _high_water_mb(pid: int) -> float | None:
    """``VmHWM`` (peak RSS) from /proc, Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
