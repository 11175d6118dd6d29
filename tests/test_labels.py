"""Closing the loop offline: the join of review decisions with machine verdicts, the
exported file as training data, and thresholds proposed from the reviewers' labels."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import InputPosition, ReviewDecision, Verdict
from worker.offline.labelled import NO_TEXT, read_labelled
from worker.offline.labels import LabelledReview, join, read_reviews
from worker.pipeline.policy import Policy

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def verdict(n: int, *, text: str | None = None, scores: dict[str, float] | None = None, **extra) -> Verdict:
    scores = scores if scores is not None else {"sexual": 0.2}
    return Verdict(
        verdict_id=f"v-{n}",
        event_id=f"c-{n}",
        kind="content",
        tenant="acme",
        action="allow",
        flagged=False,
        scores=scores,
        model="mistral-moderation-2411",
        backend="mistral",
        policy_version="0123456789ab",
        input=InputPosition(topic="ugc.content", partition=0, offset=n),
        decided_at=T0,
        text=text,
        **extra,
    )


def decision(n: int, review: str, *, action: str = "block", categories=("sexual",), minutes: int = 0) -> ReviewDecision:
    return ReviewDecision(
        review_id=review,
        verdict_id=f"v-{n}",
        event_id=f"c-{n}",
        reviewer_id="r-1",
        action=action,
        categories=list(categories),
        decided_at=T0 + timedelta(minutes=minutes),
    )


def test_of_several_decisions_on_one_verdict_the_newest_wins_whatever_the_read_order():
    newer_first = [decision(1, "a", action="block", minutes=5), decision(1, "b", action="allow", categories=())]
    records, counts = join(newer_first, [verdict(1, text="hello")])
    assert [(r.review_id, r.human_action, r.labels) for r in records] == [("a", "block", {"review": ["sexual"]})]
    assert counts.superseded == 1 and counts.joined == 1


def test_a_decision_naming_no_verdict_on_the_topic_is_counted_not_exported():
    records, counts = join([decision(1, "a"), decision(2, "b")], [verdict(1, text="x")])
    assert [r.verdict_id for r in records] == ["v-1"]
    assert counts.without_verdict == 1


def test_a_repeated_review_id_is_a_duplicate_and_human_verdicts_are_never_the_machine_side():
    human = verdict(3, text="x", decided_by="human", supersedes="v-0", reviewer_id="r-1")
    records, counts = join([decision(3, "a"), decision(3, "a", minutes=9)], [human])
    assert records == []
    assert (counts.duplicates, counts.human_verdicts, counts.without_verdict) == (1, 1, 1)


def test_the_exported_line_carries_both_sides_and_the_event_id_instead_of_a_missing_text(tmp_path: Path):
    records, counts = join(
        [decision(1, "a"), decision(2, "b", action="allow", categories=())],
        [verdict(1, scores={"sexual": 0.7}), verdict(2, text="nice weather")],
    )
    assert counts.without_text == 1
    out = tmp_path / "labels.jsonl"
    out.write_text("".join(r.line() + "\n" for r in records), encoding="utf-8")
    first = out.read_text(encoding="utf-8").splitlines()[0]
    assert '"text"' not in first and '"event_id":"c-1"' in first
    back = read_reviews(out)
    assert (back[0].scores, back[0].machine_action, back[0].human_action) == ({"sexual": 0.7}, "allow", "block")
    assert back[0].policy_version == "0123456789ab"
    data = read_labelled([out])  # what train and eval read
    assert [(e.text, e.labels) for e in data.examples] == [("nice weather", frozenset())]
    assert data.skipped == {NO_TEXT: 1}


def test_train_skips_the_lines_without_text_with_a_count(tmp_path: Path, monkeypatch, capsys):
    pytest.importorskip("numpy")
    from worker.backends import local_model
    from worker.cli import CommandError
    from worker.offline.train import cmd_train

    records, _ = join(
        [decision(i, f"r{i}", categories=("sexual",) if i % 2 else ()) for i in range(24)],
        [verdict(i, text=None if i < 4 else f"text {i}") for i in range(24)],
    )
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(r.line() + "\n" for r in records), encoding="utf-8")

    def no_encoder(*_args, **_kwargs):
        raise local_model.LocalModelError("stop here: the data was read")

    monkeypatch.setattr(local_model, "load_encoder", no_encoder)
    args = argparse.Namespace(data=[data], config=None, validation=0.3, limit=None, min_support=5, encoder="x")
    with pytest.raises(CommandError, match="the data was read"):
        cmd_train(args)
    err = capsys.readouterr().err
    assert f"skipped 4 records: 4 {NO_TEXT}" in err
    assert "train: 20 records, categories sexual" in err


def reviewed(scores: list[float], *, truth_from: float, category: str = "selfharm") -> list[LabelledReview]:
    """Reviewed inputs whose reviewer found ``category`` exactly when its score >= ``truth_from``."""
    return [
        LabelledReview(
            text=f"t{i}",
            labels={"review": [category] if s >= truth_from else []},
            event_id=f"c-{i}",
            verdict_id=f"v-{i}",
            review_id=f"r-{i}",
            reviewer_id="r-1",
            scores={category: s},
            machine_action="allow",
            human_action="review" if s >= truth_from else "allow",
            policy_version="x",
            backend="mistral",
            decided_at=T0,
        )
        for i, s in enumerate(scores)
    ]


def test_the_proposed_threshold_is_where_the_reviewers_draw_the_line_and_the_workload_change_is_reported(
    tmp_path: Path,
):
    pytest.importorskip("sklearn")
    from worker.offline.calibrate import propose_thresholds, write_candidate

    policy = Policy.load(None)  # selfharm: review at 0.5
    scores = [i / 40 for i in range(40)]  # 0.0 .. 0.975
    report = propose_thresholds(policy, reviewed(scores, truth_from=0.3), min_support=10)
    assert report["proposed"] == {"selfharm": 0.3}
    entry = report["categories"]["selfharm"]
    assert entry["current"]["recall"] == pytest.approx(20 / 28, abs=1e-4)
    assert entry["candidate"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert entry["change"]["recall"] > 0
    assert report["workload"] == {"current": 0.5, "candidate": 0.7, "change": 0.2}
    assert report["action_agreement"]["candidate"] == 1.0
    from worker.offline.calibrate import candidate_policy

    candidate = candidate_policy(policy, report["proposed"])
    path = tmp_path / "candidate.yaml"
    write_candidate(path, candidate, report)
    loaded = Policy.load(path)
    assert loaded.version == candidate.version == report["candidate_policy_version"] != policy.version
    assert loaded.decide({"selfharm": 0.3}).action == "review"
    assert policy.decide({"selfharm": 0.3}).action == "allow"
    assert loaded.thresholds("sexual") == policy.thresholds("sexual")  # the rest is kept


def test_a_category_with_too_few_reviewed_positives_keeps_its_threshold():
    pytest.importorskip("sklearn")
    from worker.offline.calibrate import propose_thresholds

    report = propose_thresholds(Policy.load(None), reviewed([0.1, 0.2, 0.35, 0.9], truth_from=0.3), min_support=10)
    assert report["proposed"] == {}
    assert report["candidate_policy_version"] == report["current_policy_version"]
    assert "fewer than --min-support 10" in report["categories"]["selfharm"]["note"]
