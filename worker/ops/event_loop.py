"""Which event loop the worker runs on (``MODWORKER_EVENT_LOOP``).

``auto`` (the default) takes uvloop when it is installed (it is a dependency): its loop,
transports and callbacks cost less CPU than asyncio's own, which the worker spends on
every record read, request sent and record produced (docs/benchmarks.md measures it).
``asyncio`` keeps the standard loop; ``uvloop`` insists on uvloop and stops start-up with a
``ConfigError`` when it is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from worker.config import ConfigError

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: Literal["auto", "uvloop", "asyncio"]) -> LoopFactory | None:
    """The factory for ``asyncio.Runner(loop_factory=...)``; ``None``: asyncio's default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("MODWORKER_EVENT_LOOP=uvloop but uvloop is not installed: pip install uvloop") from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory
