"""A circuit breaker for one remote API: stop calling a backend that keeps failing.

States:

- **closed**: calls go through. Each failed try (connection error, timeout, 5xx) adds one
  to a count of consecutive failures; any answer from the API (success, 400, 401 ...)
  resets it. 429 is neutral: the API is pacing us, not failing. At
  ``failure_threshold`` consecutive failures the circuit opens.
- **open**: every call fails at once with ``CircuitOpenError`` (a ``BackendUnavailable``
  whose ``retry_in_s`` says when a probe will be let through), so a dead backend costs no
  connections or timeouts and the pipeline's fail policy applies without delay.
- **half-open**: once the open time is over one call, the probe, goes through; others
  still fail fast. The probe's success closes the circuit, its failure opens it again for
  twice as long as last time.

Open time: ``first_open_s`` when the circuit opens from closed, doubled by each failed
probe, never more than ``reset_timeout_s``. A blip (a few 5xx, the API healthy again a
moment later) then costs about ``first_open_s``, not ``reset_timeout_s``, while a long
outage is still probed only every ``reset_timeout_s``.

*Suspect inputs.* A try that fails says "the API is failing" only if other requests would
fail too. When the caller already knows better, because the API answered other requests
since this input last failed (the pipeline's poison search), it makes its calls inside
``suspect_input()``: their failures then count like a 429, not at all, so one bad input
retried six times a call cannot open the circuit and stall everyone else. Their successes
still count, and an open circuit still refuses them. An outage fails every call, including
those made outside ``suspect_input()``, so it still opens the circuit.

A small class rather than a library: the asyncio breakers on PyPI count exceptions around a
whole call, while this one must count single tries inside the retry loop and treat 429 as
neutral. Single-threaded (asyncio) by contract: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import structlog

from worker.backends.base import BackendUnavailable
from worker.ops.logs import BreakerEvent

log = structlog.get_logger(__name__)

State = Literal["closed", "open", "half_open"]

_suspect_input: ContextVar[bool] = ContextVar("suspect_input", default=False)


@contextmanager
def suspect_input() -> Iterator[None]:
    """Calls made inside blame their input, not the API: their failed tries do not count.

    For a caller that has seen the API answer other requests since this input last failed.
    A context variable rather than a parameter: it crosses the ``Backend`` protocol (and
    any tasks a backend starts for one call) without every backend passing it on.
    """
    token = _suspect_input.set(True)
    try:
        yield
    finally:
        _suspect_input.reset(token)


def input_suspected() -> bool:
    """True inside ``suspect_input()``: a failed try here says nothing about the API's health."""
    return _suspect_input.get()


class CircuitOpenError(BackendUnavailable):
    """The circuit is open: the call was not attempted. Try again after ``retry_in_s``."""

    retry_in_s: float

    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"{name} API circuit open after repeated failures; next probe in {retry_in_s:.1f}s")
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    """See the module docstring. ``clock`` is injectable for tests (default ``time.monotonic``)."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_timeout_s: float,
        first_open_s: float | None = None,
        name: str = "backend",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.first_open_s = min(reset_timeout_s, first_open_s if first_open_s is not None else reset_timeout_s)
        self.name = name
        self._clock = clock
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._open_for = self.first_open_s
        self._probe_in_flight = False
        self.times_opened = 0

    @property
    def state(self) -> State:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def open_for_s(self) -> float:
        """How long the circuit stays open this time (or would, if it opened now)."""
        return self._open_for

    def before_call(self) -> None:
        """Let a try through, or raise ``CircuitOpenError``."""
        if self._state == "closed":
            return
        now = self._clock()
        if self._state == "open":
            wait = self._opened_at + self._open_for - now
            if wait > 0:
                raise CircuitOpenError(self.name, wait)
            self._state = "half_open"
            self._probe_in_flight = False
            log.info(BreakerEvent.HALF_OPEN, api=self.name)
        if self._probe_in_flight:
            raise CircuitOpenError(self.name, min(self._open_for, 1.0))
        self._probe_in_flight = True

    def record_success(self) -> None:
        """The API answered (any status that is not a failure)."""
        if self._state != "closed":
            log.info(BreakerEvent.CLOSED, api=self.name)
        self._state = "closed"
        self._failures = 0
        self._open_for = self.first_open_s
        self._probe_in_flight = False

    def record_failure(self) -> None:
        """A try failed (connection error, timeout, 5xx)."""
        self._failures += 1
        if self._state == "half_open" or (self._state == "closed" and self._failures >= self.failure_threshold):
            self._open()

    def record_neutral(self) -> None:
        """A try ended saying nothing about health (429, cancelled): free the probe slot."""
        self._probe_in_flight = False

    def _open(self) -> None:
        if self._state == "half_open":  # the probe failed: stay away longer this time
            self._open_for = min(self.reset_timeout_s, self._open_for * 2)
        else:
            self._open_for = self.first_open_s
        self._state = "open"
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self.times_opened += 1
        log.warning(BreakerEvent.OPENED, api=self.name, consecutive_failures=self._failures, reset_in_s=self._open_for)
