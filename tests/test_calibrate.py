"""Cascade calibration: the offline replay and the band search, on synthetic scores whose
right answer is known, and the calibrated policy file."""

from __future__ import annotations

import numpy as np
import pytest

from worker.offline.calibrate import (
    Replay,
    band_options,
    choose_bands,
    choose_bands_macro,
    quality,
    search_band,
    write_policy,
)
from worker.pipeline.policy import Policy


def replay(categories: dict[str, tuple[float, float]], size: int = 200) -> Replay:
    """Per category: first-stage scores evenly spread over [0, 1), threshold 0.5, and the
    first stage wrong exactly on the scores inside ``(low, high)``; the second stage right."""
    scores = (np.arange(size) + 0.5) / size
    labels, first, then, first_scores = {}, {}, {}, {}
    for name, (low, high) in categories.items():
        truth = scores >= 0.5
        wrong = (scores > low) & (scores < high)
        labels[name] = truth
        first[name] = np.where(wrong, ~truth, truth)
        then[name] = truth.copy()
        first_scores[name] = scores
    return Replay(
        labels=labels,
        first=first,
        then=then,
        first_scores=first_scores,
        thresholds=dict.fromkeys(categories, (0.5,)),
        kinds=["content"] * size,
        tokens=np.full(size, 10),
    )


def test_the_band_covers_exactly_the_first_stage_s_mistakes_when_no_loss_is_allowed():
    r = replay({"x": (0.42, 0.55)})
    below, above = search_band(r, "x", max_loss=0.0)
    assert (below, above) == pytest.approx((0.08, 0.05))
    escalated = r.escalated({"x": (below, above)}, (0.0, 0.0))
    assert escalated.sum() == 26  # the 26 inputs between 0.42 and 0.55
    assert quality(r, escalated, batch_size=10)["categories"]["x"]["f1_loss"] == 0.0


def test_allowing_loss_narrows_the_band_and_escalates_less():
    r = replay({"x": (0.3, 0.7)})
    strict = r.escalated({"x": search_band(r, "x", 0.0)}, (0.0, 0.0)).sum()
    loose_band = search_band(r, "x", 0.1)
    loose = r.escalated({"x": loose_band}, (0.0, 0.0))
    assert loose.sum() < strict
    assert quality(r, loose, batch_size=10)["categories"]["x"]["f1_loss"] <= 0.1


def test_a_first_stage_that_is_never_wrong_escalates_nothing():
    r = replay({"x": (0.9, 0.9)})
    assert search_band(r, "x", 0.0) == (0.0, 0.0)


def test_quality_counts_calls_tokens_and_both_stages_alone():
    r = replay({"x": (0.42, 0.55)}, size=100)
    escalated = np.zeros(100, dtype=bool)
    escalated[[0, 1, 55]] = True  # batches of 10: two batches call the second stage
    q = quality(r, escalated, batch_size=10)
    assert (q["calls_alone"], q["calls_cascade"], q["calls_saved_fraction"]) == (10, 2, 0.8)
    assert (q["calls_cascade_pooled"], q["calls_saved_fraction_pooled"]) == (1, 0.9)  # ceil(3 / 10)
    assert (q["tokens_alone"], q["tokens_cascade"]) == (1000, 30)
    assert q["second_stage_inputs"] == 3 and q["escalated_fraction"] == 0.03
    assert q["categories"]["x"]["then"]["f1"] == 1.0
    assert q["categories"]["x"]["first"]["f1"] < 1.0


def test_pooled_calls_fill_full_second_stage_calls_per_kind():
    """30% escalated, spread so that every batch of 10 has some: one call per batch alone,
    but pooled, ceil(escalated / batch size) per kind (texts and conversations pool apart)."""
    from dataclasses import replace

    r = replace(replay({"x": (0.42, 0.55)}, size=100), kinds=["content"] * 60 + ["conversation"] * 40)
    escalated = np.zeros(100, dtype=bool)
    escalated[::10] = escalated[1::10] = escalated[2::10] = True  # 18 content, 12 conversation inputs
    q = quality(r, escalated, batch_size=10)
    assert (q["calls_alone"], q["calls_cascade"], q["calls_saved_fraction"]) == (10, 10, 0.0)
    assert q["calls_cascade_pooled"] == 2 + 2  # ceil(18 / 10) + ceil(12 / 10)
    assert q["calls_saved_fraction_pooled"] == 0.6


def test_the_summary_gives_the_pooled_calls_saved_beside_the_per_batch_ones():
    from worker.offline.calibrate import format_summary

    r = replay({"x": (0.42, 0.55)}, size=100)
    escalated = np.zeros(100, dtype=bool)
    escalated[[0, 1, 55]] = True
    report = {
        "first": "local",
        "then": "mistral",
        "bands": {},
        "default_band": 0.1,
        "test": quality(r, escalated, batch_size=10),
    }
    assert "calls saved 80.0% (90.0% pooled)" in format_summary(report)


def test_per_category_bands_keep_every_category_within_the_loss():
    r = replay({"x": (0.42, 0.55), "y": (0.2, 0.8)})
    bands = choose_bands(r, max_f1_loss=0.01, default=(0.0, 0.0), batch_size=10)
    result = quality(r, r.escalated(bands, (0.0, 0.0)), batch_size=10)
    assert all(e["f1_loss"] <= 0.01 for e in result["categories"].values())


def test_the_macro_objective_spends_its_budget_where_it_saves_most():
    r = replay({"x": (0.42, 0.55), "y": (0.2, 0.8)})
    per_category = r.escalated(choose_bands(r, max_f1_loss=0.05, default=(0.0, 0.0), batch_size=10), (0.0, 0.0))
    macro_bands = choose_bands_macro(r, max_f1_loss=0.05, default=(0.0, 0.0), batch_size=10)
    macro = quality(r, r.escalated(macro_bands, (0.0, 0.0)), batch_size=10)
    assert macro["macro_f1_loss"] <= 0.05
    assert macro["second_stage_inputs"] <= per_category.sum()


def test_band_options_form_a_front_of_fewer_escalations_for_more_loss():
    front = band_options(replay({"x": (0.3, 0.7)}), "x")
    counts = [o[0] for o in front]
    losses = [o[1] for o in front]
    assert counts == sorted(counts) and losses == sorted(losses, reverse=True)
    assert losses[-1] == 0.0


def test_the_written_policy_loads_with_the_chosen_bands(tmp_path):
    base = Policy.from_mapping({"categories": {"x": {"threshold": 0.5, "action": "block"}}})
    calibrated = base.with_cascade_bands((0.1, 0.1), {"x": (0.08, 0.05)})
    report = {
        "first": "local",
        "then": "mistral",
        "max_f1_loss": 0.01,
        "objective": "macro",
        "test": {"escalated_fraction": 0.2, "macro_f1": {"cascade": 0.99, "then": 1.0}},
    }
    path = tmp_path / "policy.yaml"
    write_policy(path, calibrated, report)
    loaded = Policy.load(path)
    assert loaded.version == calibrated.version
    assert loaded.cascade_band("x") == (0.08, 0.05)
    assert loaded.cascade_band("other") == (0.1, 0.1)


def test_calibrate_chooses_on_one_part_reports_on_the_other_and_traces_the_frontier():
    from worker.backends.base import Scored
    from worker.config import load_settings
    from worker.offline.calibrate import calibrate
    from worker.offline.labelled import Example

    policy = Policy.from_mapping({"categories": {"x": {"threshold": 0.5, "action": "block"}}})
    examples, first, then = [], [], []
    for i in range(400):
        score = (i + 0.5) / 400
        truth = score >= 0.5 if not 0.4 < score < 0.6 else i % 2 == 0  # the first stage is unsure there
        examples.append(Example(text=f"text {i}", labels=frozenset({"x"}) if truth else frozenset()))
        first.append(Scored({"x": score}, "small"))
        then.append(Scored({"x": 0.95 if truth else 0.01}, "big"))
    settings = load_settings(require_backend=False, require_kafka=False, backend="cascade")
    report = calibrate(
        settings,
        policy,
        examples,
        first,
        then,
        search=True,
        max_f1_loss=0.0,
        objective="macro",
        calibration_fraction=0.5,
        default_band=0.1,
        batch_size=16,
    )
    assert report["calibration_examples"] + report["test_examples"] == 400
    assert 0 < report["calibration_examples"] < 400
    below, above = report["bands"]["x"]
    # Covers the calibration half's mistakes, all inside the unsure region (0.4, 0.6).
    assert 0.05 <= below <= 0.11 and 0.05 <= above <= 0.11
    assert report["calibration"]["macro_f1_loss"] == 0.0
    assert report["test"]["macro_f1_loss"] <= 0.05  # measured on texts that did not choose the band
    assert 0.15 < report["test"]["escalated_fraction"] < 0.3
    losses = [p["max_macro_f1_loss"] for p in report["frontier"]]
    escalated = [p["escalated_fraction"] for p in report["frontier"]]
    assert losses == sorted(losses) and escalated == sorted(escalated, reverse=True)
