"""The loopback Mistral server in a child process of its own.

The bench's own event loop stamps arrival times for the latency figures; a server
thread in the same process would take the GIL for every batch it scores and delay those
stamps. In a child process it only competes for CPU, as a remote API's client-side
costs would not at all. The parent sets the per-call latency and reads the counts of
requests and inputs through shared memory.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from typing import Any, Self


class ApiServerError(RuntimeError):
    """The server process did not come up; the message says why."""


class ApiServerProcess:
    """``with ApiServerProcess(api_key) as api: api.base_url; api.latency_s = 0.05; api.snapshot()``."""

    def __init__(self, api_key: str) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of the bench's threads and event loop
        self._latency = context.Value("d", 0.0)
        self._requests = context.Value("q", 0)
        self._inputs = context.Value("q", 0)
        self._stop = context.Event()
        self._ports: Any = context.Queue()
        self._process = context.Process(
            target=_serve,
            args=(api_key, self._latency, self._requests, self._inputs, self._stop, self._ports),
            name="bench-mistral-server",
            daemon=True,
        )
        self.port = 0

    def __enter__(self) -> Self:
        self._process.start()
        deadline = time.monotonic() + 60
        while not self.port:
            try:
                self.port = self._ports.get(timeout=0.2)
            except queue.Empty:
                if not self._process.is_alive() or time.monotonic() > deadline:
                    self.__exit__()
                    raise ApiServerError(
                        f"the loopback Mistral server process did not start (exit code {self._process.exitcode}); "
                        "a script that runs the bench needs an `if __name__ == '__main__':` guard (spawn start method)"
                    ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def latency_s(self) -> float:
        return self._latency.value

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self._latency.value = value

    def snapshot(self) -> tuple[int, int]:
        """Requests answered so far and the inputs they carried."""
        return self._requests.value, self._inputs.value


def _serve(api_key: str, latency: Any, requests: Any, inputs: Any, stop: Any, ports: Any) -> None:
    from worker.testing.mistral_server import MistralServer

    def count(path: str, body: Any) -> list[str]:
        batch = body.get("input") if isinstance(body, dict) else None
        with requests.get_lock():
            requests.value += 1
        with inputs.get_lock():
            inputs.value += len(batch) if isinstance(batch, list) else 1
        return []  # no schema check here: the integration tests validate bodies

    with MistralServer(api_key=api_key, validator=count) as server:
        ports.put(server.port)
        while not stop.wait(0.05):
            server.latency_s = latency.value
            server.clear()  # the request log is not needed and would grow without bound
