"""MODWORKER_EVENT_LOOP: which loop the worker runs on."""

from __future__ import annotations

import sys

import pytest

from worker.config import ConfigError
from worker.ops.event_loop import loop_factory


def test_auto_takes_uvloop_when_installed_and_asyncio_keeps_the_default():
    uvloop = pytest.importorskip("uvloop")
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="MODWORKER_EVENT_LOOP=uvloop"):
        loop_factory("uvloop")
