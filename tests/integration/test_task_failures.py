"""A batch task that raises (a bug) is noticed: logged, counted, and the worker fails
rather than running on with the batch's offsets stranded uncommitted."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tests.conftest import worker_env
from tests.kafka_support import committed, produce
from worker.app import ModerationWorker, WorkerFatal
from worker.backends.base import Backend, Conversation, Outcome, Scored
from worker.config import load_settings
from worker.ops import metrics
from worker.pipeline.policy import Policy


class BuggyBackend(Backend):
    """Answers an object that is no outcome for the input ``BUG``: a backend bug."""

    name = "buggy"

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        return [None if text == "BUG" else Scored({"sexual": 0.01}, "m") for text in texts]  # type: ignore[misc]

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        raise AssertionError("not used")


async def test_a_batch_task_that_raises_fails_the_worker_logged_counted_and_uncommitted(
    broker, topics, mistral, api_key, monkeypatch
) -> None:
    await produce(
        broker.bootstrap_servers,
        topics.content,
        [(b"same-key", b'{"id": "bug", "text": "BUG"}')],
    )
    for key, value in worker_env(broker, topics, mistral, api_key).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    worker = ModerationWorker(settings, backend=BuggyBackend(), policy=Policy.load(None))
    failures_before = metrics.TASK_FAILURES._value.get()

    with pytest.raises(WorkerFatal, match="AttributeError"):
        await asyncio.wait_for(worker.run(), 60)  # a guard against a hang, not a timing assertion

    assert metrics.TASK_FAILURES._value.get() - failures_before == 1
    offsets = await committed(broker.bootstrap_servers, topics.group_id, [topics.content])
    assert all(offset == 0 for tp, offset in offsets.items() if tp.topic == topics.content), offsets
