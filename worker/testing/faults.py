"""Scripted faults for the loopback API servers.

A ``FaultPlan`` decides, per request, whether the server misbehaves:

- a sequence: the n-th request (0-based, counting every request the server receives)
  gets ``plan[n]``; ``None`` entries and requests past the end are answered normally;
- a callable ``plan(request) -> Fault | None`` given the ``RecordedRequest`` (its index,
  path, headers and parsed body);
- ``None``: no faults.

The small constructors below (``first``, ``every``, ``when_input_contains``,
``combine``) cover the usual scripts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.testing.loopback import RecordedRequest


@dataclass(frozen=True)
class Fault:
    """How to misbehave on one request.

    ``delay_s`` is slept first (a slow server; past the client's read timeout it is a
    timeout). Then ``reset`` drops the TCP connection with a RST and answers nothing;
    otherwise, when ``status`` is set, the server answers it with ``body`` (a JSON-able
    value, raw ``bytes``, or ``None`` for the API's usual error body for that status),
    ``retry_after`` as the ``Retry-After`` header and any extra ``headers``. A fault with
    only ``delay_s`` delays a normal answer.
    """

    status: int | None = None
    body: Any = None
    retry_after: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    reset: bool = False


FaultFunction = Callable[["RecordedRequest"], Fault | None]
FaultPlan = Sequence[Fault | None] | FaultFunction | None


def first(n: int, fault: Fault) -> FaultFunction:
    """The first ``n`` requests get ``fault``."""
    return lambda request: fault if request.index < n else None


def every(n: int, fault: Fault, *, offset: int = 0) -> FaultFunction:
    """Every ``n``-th request gets ``fault`` (requests ``offset``, ``offset + n``, ...)."""
    return lambda request: fault if request.index >= offset and (request.index - offset) % n == 0 else None


def when_input_contains(marker: str, fault: Fault) -> FaultFunction:
    """Requests whose body mentions ``marker`` anywhere (e.g. one bad input in a batch)."""
    return lambda request: fault if marker in json.dumps(request.body, ensure_ascii=False) else None


def combine(*plans: FaultPlan) -> FaultFunction:
    """The first plan that has a fault for the request wins."""

    def decide(request: RecordedRequest) -> Fault | None:
        for plan in plans:
            fault = fault_for(plan, request)
            if fault is not None:
                return fault
        return None

    return decide


def fault_for(plan: FaultPlan, request: RecordedRequest) -> Fault | None:
    """Apply ``plan`` to one request."""
    if plan is None:
        return None
    if callable(plan):
        return plan(request)
    return plan[request.index] if request.index < len(plan) else None
