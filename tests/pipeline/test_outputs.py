"""Outputs stage: what each outcome is published as, in key order, finished on ack."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiokafka.structs import TopicPartition

from schemas import DeadLetterHeaders
from tests.pipeline.conftest import make_job, make_record
from worker.backends.base import Rejected, Scored
from worker.config import Settings
from worker.ops import metrics
from worker.pipeline.conversation_stage import StateRecord
from worker.pipeline.conversation_state import Change, StoredTurn
from worker.pipeline.outputs import Outputs
from worker.pipeline.policy import Policy
from worker.pipeline.scoring import Degraded
from worker.pipeline.sink import dead_letter_record, record_size
from worker.pipeline.types import OutRecord, PartitionOffsets
from worker.pipeline.verdicts import VerdictBuilder

SETTINGS = Settings(verdict_topic="v", violation_topic="x", dead_letter_topic="d")


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[tuple[list[OutRecord], Callable[[], None]]] = []
        self.origins: list[PartitionOffsets | None] = []

    def publish(
        self,
        records: list[OutRecord],
        on_acked: Callable[[], None],
        origin: PartitionOffsets | None = None,
        messages: int = 1,
    ) -> None:
        self.published.append((records, on_acked))
        self.origins.append(origin)

    def ack_all(self) -> None:
        for _, on_acked in self.published:
            on_acked()

    @property
    def topics(self) -> list[list[str]]:
        return [[r.topic for r in records] for records, _ in self.published]


class Harness:
    def __init__(self) -> None:
        self.publisher = RecordingPublisher()
        self.finished: list[int] = []
        self.abandoned = 0
        self.slot = PartitionOffsets(TopicPartition("in.c", 0))

        def abandon() -> None:
            self.abandoned += 1

        self.outputs = Outputs(
            SETTINGS,
            sink=self.publisher,
            verdicts=VerdictBuilder(policy=Policy.load(None), backend_name="test", include_text=False),
            on_finished=lambda slot, offset: self.finished.append(offset),
            on_abandoned=abandon,
        )

    def job(self, offset: int, key: bytes = b"k"):
        job = make_job(slot=self.slot, offset=offset, key=key)
        self.outputs.expect(job)
        return job


def test_a_clean_verdict_goes_to_the_verdict_topic_and_finishes_on_ack():
    h = Harness()
    h.outputs.conclude(h.job(0), Scored({"sexual": 0.01}, "m"))
    assert h.publisher.topics == [["v"]]
    assert h.finished == []
    h.publisher.ack_all()
    assert h.finished == [0]


def test_a_flagged_verdict_also_publishes_a_violation_with_the_same_key():
    h = Harness()
    h.outputs.conclude(h.job(0, key=b"user-7"), Scored({"sexual": 0.99}, "m"))
    [(records, _)] = h.publisher.published
    assert [r.topic for r in records] == ["v", "x"]
    assert {r.key for r in records} == {b"user-7"}
    assert json.loads(records[0].value)["action"] == "block"


def test_results_of_one_key_are_published_in_input_order_whatever_order_they_come_in():
    h = Harness()
    first, second, other = h.job(0), h.job(1), h.job(2, key=b"other")
    h.outputs.conclude(second, Scored({"sexual": 0.0}, "m"))
    h.outputs.conclude(other, Scored({"sexual": 0.0}, "m"))
    assert [json.loads(r[0][0].value)["input"]["offset"] for r in h.publisher.published] == [2]
    h.outputs.conclude(first, Rejected("refused"))
    published = [records[0] for records, _ in h.publisher.published]
    assert [r.topic for r in published] == ["v", "d", "v"]
    assert [r.key for r in published] == [b"other", b"k", b"k"]


def test_a_rejected_input_is_dead_lettered_with_its_error_type():
    h = Harness()
    h.outputs.conclude(h.job(0), Rejected("API said 400", error_type="backend_rejected"))
    [([record], _)] = h.publisher.published
    headers = dict(record.headers or [])
    assert record.topic == "d"
    assert headers[DeadLetterHeaders.ERROR_TYPE] == b"backend_rejected"
    assert headers[DeadLetterHeaders.STAGE] == b"backend"


def test_unusable_scores_become_a_dead_letter_not_a_stuck_offset():
    h = Harness()
    h.outputs.conclude(h.job(0), Scored({"sexual": float("nan")}, "m"))
    [([record], _)] = h.publisher.published
    assert dict(record.headers or [])[DeadLetterHeaders.ERROR_TYPE] == b"invalid_scores"
    h.publisher.ack_all()
    assert h.finished == [0]


def test_a_degraded_outcome_becomes_a_degraded_verdict_with_the_fail_policys_action():
    h = Harness()
    h.outputs.conclude(h.job(0), Degraded("review", "API down"))
    [([verdict, _violation], _)] = h.publisher.published
    body = json.loads(verdict.value)
    assert body["degraded"] is True and body["action"] == "review" and body["degraded_reason"] == "API down"


def test_a_result_for_a_revoked_partition_is_never_published():
    h = Harness()
    job = h.job(0)
    h.slot.owned = False
    h.outputs.conclude(job, Scored({"sexual": 0.0}, "m"))
    assert h.publisher.published == [] and h.abandoned == 1


def test_forget_drops_held_results_of_revoked_partitions():
    h = Harness()
    first, second = h.job(0), h.job(1)
    h.outputs.conclude(second, Scored({"sexual": 0.0}, "m"))  # held behind the first
    assert h.outputs.forget([h.slot.tp]) == 1
    h.outputs.conclude(first, Scored({"sexual": 0.0}, "m"))
    assert len(h.publisher.published) == 1, "a dropped line must not release what it held"


def test_a_record_that_did_not_decode_is_dead_lettered_at_once_with_its_bytes():
    h = Harness()
    h.slot.track(5)
    h.outputs.dead_letter(h.slot, make_record(b"\xff", offset=5), stage="decode", error_type="not_utf8", message="x")
    [([record], on_acked)] = h.publisher.published
    assert record.value == b"\xff"
    on_acked()
    assert h.finished == [5]


# -- output size limit -------------------------------------------------------------------

SMALL = Settings(verdict_topic="v", violation_topic="x", dead_letter_topic="d", max_output_bytes=4_096)


def small_harness() -> Harness:
    h = Harness()
    h.outputs = Outputs(
        SMALL,
        sink=h.publisher,
        verdicts=VerdictBuilder(policy=Policy.load(None), backend_name="test", include_text=True),
        on_finished=lambda slot, offset: h.finished.append(offset),
        on_abandoned=lambda: None,
    )
    return h


def test_a_dead_letter_over_the_limit_is_truncated_with_headers_saying_so_and_the_original_size():
    h = small_harness()
    value = b"x" * 10_000
    h.outputs.dead_letter(h.slot, make_record(value, offset=3), stage="decode", error_type="not_json", message="bad")
    [([record], on_acked)] = h.publisher.published
    assert record_size(record) <= 4_096
    headers = dict(record.headers or [])
    assert headers[DeadLetterHeaders.TRUNCATED] == b"value"
    assert headers[DeadLetterHeaders.ORIGINAL_SIZE] == b"10000"
    assert headers[DeadLetterHeaders.ERROR_TYPE] == b"not_json"
    assert value.startswith(record.value) and len(record.value) > 3_000, "as much of the value as fits"
    on_acked()
    assert h.finished == [3]


def test_a_dead_letter_under_the_limit_is_unchanged():
    h = small_harness()
    h.outputs.dead_letter(h.slot, make_record(b"y" * 1_000), stage="decode", error_type="not_json", message="bad")
    [([record], _)] = h.publisher.published
    assert record.value == b"y" * 1_000
    assert DeadLetterHeaders.TRUNCATED not in dict(record.headers or [])


def test_original_headers_too_big_to_keep_are_dropped_and_the_record_still_fits():
    record = make_record(b"z" * 100)
    record.headers = [("trace", b"t" * 8_000)]
    out = dead_letter_record(record, topic="d", stage="decode", error_type="schema", message="m", max_bytes=4_096)
    headers = dict(out.headers or [])
    assert record_size(out) <= 4_096
    assert "trace" not in headers and headers[DeadLetterHeaders.TRUNCATED] == b"value,headers"


def test_a_verdict_over_the_limit_loses_metadata_and_text_and_says_so():
    h = small_harness()
    job = make_job("big " * 200, slot=h.slot, offset=0, metadata={"blob": "m" * 5_000})
    h.outputs.expect(job)
    h.outputs.conclude(job, Scored({"sexual": 0.99}, "m"))
    [(records, on_acked)] = h.publisher.published
    assert [r.topic for r in records] == ["v", "x"], "still a verdict (and its violation), never a fatal error"
    assert all(record_size(r) <= 4_096 for r in records)
    verdict = json.loads(records[0].value)
    assert verdict["trimmed"] is True and verdict["metadata"] is None and verdict["text"] is None
    assert verdict["action"] == "block"
    on_acked()
    assert h.finished == [0]


def test_a_verdict_under_the_limit_keeps_its_pass_through_fields():
    h = small_harness()
    job = make_job("small", slot=h.slot, offset=0, metadata={"a": 1})
    h.outputs.expect(job)
    h.outputs.conclude(job, Scored({"sexual": 0.01}, "m"))
    verdict = json.loads(h.publisher.published[0][0][0].value)
    assert verdict["trimmed"] is False and verdict["metadata"] == {"a": 1} and verdict["text"] == "small"


def test_a_verdict_that_cannot_fit_at_all_is_dead_lettered_not_fatal():
    h = small_harness()
    job = make_job("t", slot=h.slot, offset=0, key=b"k" * 5_000)
    h.outputs.expect(job)
    h.outputs.conclude(job, Scored({"sexual": 0.01}, "m"))
    [([record], _)] = h.publisher.published
    headers = dict(record.headers or [])
    assert record.topic == "d" and headers[DeadLetterHeaders.ERROR_TYPE] == b"output_too_large"


def test_a_turns_state_change_is_published_with_its_verdict_or_dead_letter():
    h = Harness()
    change = StateRecord("state", Change(3, "conv", (StoredTurn("t0", "user", "hi"),), 5.0))
    judged, refused = h.job(0), h.job(1, key=b"other")
    judged.changelog = refused.changelog = change
    h.outputs.conclude(judged, Scored({"sexual": 0.99}, "m"))
    h.outputs.conclude(refused, Rejected("API said 400"))
    assert h.publisher.topics == [["v", "x", "state"], ["d", "state"]]
    written = [records[-1] for records, _ in h.publisher.published]
    assert {(r.key, r.partition, r.value) for r in written} == {(b"conv", 3, change.record().value)}
    assert h.finished == [], "nothing finishes before its group, state change included, is acknowledged"
    h.publisher.ack_all()
    assert h.finished == [0, 1]


def _count(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


def test_one_calls_results_are_published_as_one_group_with_one_ack():
    h = Harness()
    jobs = [h.job(0, key=b"a"), h.job(1, key=b"b"), h.job(2, key=b"a")]
    blocked = _count(metrics.VERDICTS, "content", "block", "false")
    allowed = _count(metrics.VERDICTS, "content", "allow", "false")
    sexual = _count(metrics.VIOLATIONS, "sexual")
    h.outputs.conclude_all(jobs, [Scored({"sexual": 0.99}, "m"), Scored({"sexual": 0.0}, "m"), Scored({}, "m")])
    [(records, on_acked)] = h.publisher.published
    assert [(r.topic, r.key) for r in records] == [("v", b"a"), ("x", b"a"), ("v", b"b"), ("v", b"a")]
    assert [json.loads(r.value)["input"]["offset"] for r in records if r.topic == "v"] == [0, 1, 2]
    assert h.finished == []
    on_acked()
    assert h.finished == [0, 1, 2]
    assert _count(metrics.VERDICTS, "content", "block", "false") == blocked + 1
    assert _count(metrics.VERDICTS, "content", "allow", "false") == allowed + 2
    assert _count(metrics.VIOLATIONS, "sexual") == sexual + 1


def test_a_group_carries_earlier_results_of_its_keys_released_by_it_in_key_order():
    h = Harness()
    first, second, third = h.job(0), h.job(1), h.job(2)
    h.outputs.conclude_all([second], [Scored({}, "m")])  # waits for the first: nothing published
    assert h.publisher.published == []
    h.outputs.conclude_all([third, first], [Scored({}, "m"), Scored({}, "m")])
    [(records, on_acked)] = h.publisher.published
    assert [json.loads(r.value)["input"]["offset"] for r in records] == [0, 1, 2]
    on_acked()
    assert sorted(h.finished) == [0, 1, 2]


def test_a_dead_letter_in_a_call_is_published_alone_and_the_verdicts_still_group():
    h = Harness()
    jobs = [h.job(0, key=b"a"), h.job(1, key=b"b")]
    h.outputs.conclude_all(jobs, [Rejected("refused"), Scored({}, "m")])
    assert h.publisher.topics == [["d"], ["v"]]
    h.publisher.ack_all()
    assert sorted(h.finished) == [0, 1]


def test_the_shared_output_headers_are_counted_as_any_headers_would_be():
    from schemas import OUTPUT_HEADERS
    from worker.pipeline.types import OutRecord

    shared = OutRecord("v", b"key", b"x" * 100, OUTPUT_HEADERS)
    copied = OutRecord("v", b"key", b"x" * 100, [*OUTPUT_HEADERS])  # the same headers, not the shared list
    assert record_size(shared) == record_size(copied) > record_size(OutRecord("v", b"key", b"x" * 100))
