"""``modworker eval DATA.jsonl --backend NAME --report OUT.json``: measure a backend.

Runs any backend (``local``, ``mistral``, ``openai``, configured as for ``modworker
run``) over labelled JSONL (``worker.offline.labelled``: text records and conversation records),
applies the policy exactly as the worker does, and reports per category found in the
data's labels:

- ``support`` (positives), and ``precision``, ``recall``, ``f1`` of the policy's
  decision: the category is predicted for an input when it is among the violations
  ``Policy.decide`` returns for the input's scores (so the policy's threshold, aliases
  and actions all apply, with the overrides matching the record's ``source``; a category
  whose action is ``allow`` is never predicted);
- ``auprc`` (average precision) of the raw score, merged through the policy's aliases
  (highest raw score per canonical category, as the policy does);
- ``threshold_at_target_precision`` / ``recall_at_target_precision``: the lowest
  threshold reaching ``--target-precision`` and the recall it gives (None if unreachable);
- ``best_f1`` / ``best_f1_threshold`` on this data (optimistic: chosen on what it measures).

``OUT.json``: ``{"categories": {name: {"support", "precision", "recall", "f1", "auprc",
...}}, "data", "backend", "model", "policy_version", "examples", "skipped", "rejected",
"target_precision", "plots"}``. PNG plots go beside it (``--plots DIR`` to choose, see
``worker.offline.eval_plots``). ``--holdout HEAD_DIR`` keeps only the texts of that head's
validation split (``split.json``), i.e. data it was not trained on. ``--card HEAD_DIR``
writes the table and the command into that head's MODEL_CARD.md.

``--gate BASELINE.json`` makes the command a check: after writing the report it compares
each category's ``f1`` with the baseline's (any earlier report, or a file holding just
``{"categories": {name: {"f1": ...}}}``) and exits 1, naming each category, when one moved
by more than ``--tolerance`` (absolute F1, default ``GATE_TOLERANCE``), or is in one and
not the other. A golden set per policy plus its baseline gates policy and prompt changes.

Policy: ``--policy FILE``, else the one ``modworker run`` applies with the same settings
(``worker.backends.load_policy``: ``MODWORKER_POLICY_FILE``, else the starter model's own
for the bundled local model, else the built-in default).
Needs the ``local`` extra (numpy, scikit-learn, matplotlib; torch for local models and
for the embeddings plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.offline.labelled import Example, LabelledData, LabelledDataError, read_labelled

if TYPE_CHECKING:
    import numpy as np

    from worker.backends.base import Backend, Scored
    from worker.config import Settings
    from worker.pipeline.policy import Policy

SCORE_CHUNK = 64
"""Inputs per backend call (one progress-bar step)."""
MACRO_CATEGORIES = ("sexual", "hate_and_discrimination", "violence_and_threats", "selfharm")
"""The harm categories every source of the shared data annotates somewhere: the summary's macro-F1."""
GATE_TOLERANCE = 0.05
"""``--gate``: the largest change of a category's F1 (absolute) that still passes."""
UNSAFE_ACTIONS = frozenset({"review", "block"})
"""A decision with one of these actions stops the content: what ``unsafe`` means in the report."""


def add_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``modworker eval``."""
    parser = subparsers.add_parser("eval", help="measure a backend and the policy on labelled JSONL")
    parser.add_argument("data", type=Path, nargs="+", help="labelled JSONL file(s): text and conversation records")
    parser.add_argument("--backend", required=True, choices=["local", "mistral", "openai", "llm", "cascade"])
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument(
        "--model",
        help="local backend: model to load (else MODWORKER_LOCAL__MODEL); llm: model name (else MODWORKER_LLM__MODEL)",
    )
    parser.add_argument("--policy", type=Path, help="policy YAML (else the one 'modworker run' would apply)")
    parser.add_argument("--target-precision", type=float, default=0.9)
    parser.add_argument("--holdout", type=Path, help="head directory: evaluate only its validation split")
    parser.add_argument("--plots", type=Path, help="directory for PNG plots (default: beside the report)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--projection", choices=["pca", "tsne"], default="pca")
    parser.add_argument("--projection-sample", type=int, default=2_000, help="inputs shown in the embeddings plot")
    parser.add_argument("--limit", type=int, help="first N records of each file only")
    parser.add_argument("--card", type=Path, help="head directory whose MODEL_CARD.md gets these results")
    parser.add_argument("--config", type=Path, help="settings YAML, as for 'modworker run'")
    parser.add_argument(
        "--macro",
        nargs="+",
        default=list(MACRO_CATEGORIES),
        help="categories whose mean F1 the summary reports (default: %(default)s)",
    )
    parser.add_argument(
        "--gate",
        type=Path,
        metavar="BASELINE.json",
        help="exit 1 when a category's F1 moved from this baseline report by more than --tolerance",
    )
    parser.add_argument(
        "--tolerance", type=float, default=GATE_TOLERANCE, help="--gate: largest F1 change that passes (absolute)"
    )
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.backend == "cascade":  # both stages, offline replay of the routing: worker.offline.calibrate
        from worker.cli import CommandError
        from worker.offline.calibrate import eval_cascade

        if args.gate:
            raise CommandError("--gate measures one backend; run it with --backend local or the cascade's API backend")

        return eval_cascade(args)
    from worker.config import check_backend_credentials
    from worker.offline.train import tool_settings

    # No dedup cache: eval measures the backend itself, and the local backend's embeddings
    # (for the projection plot) are only reachable on the bare backend.
    overrides: dict[str, Any] = {"backend": args.backend, "cache": {"enabled": False}}
    if args.model:
        overrides["llm" if args.backend == "llm" else "local"] = {"model": args.model}
    settings = tool_settings(args.config, **overrides)
    check_backend_credentials(settings)
    policy, data = load_policy_and_data(args, settings)
    report = asyncio.run(evaluate(settings, policy, data, args))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(report))  # the results: stdout; progress and notes: stderr
    print(format_summary(report))
    print(f"eval: report {args.report}", file=sys.stderr)
    if args.card:
        update_model_card(args.card / "MODEL_CARD.md", eval_command(args), report)
        print(f"eval: results written into {args.card / 'MODEL_CARD.md'}", file=sys.stderr)
    if args.gate:
        return gate(report, args.gate, args.tolerance)
    return 0


def gate(report: dict[str, Any], baseline_file: Path, tolerance: float) -> int:
    """``--gate``: 0 when every category's F1 is within ``tolerance`` of the baseline's, else 1
    (each drift printed to stderr); ``CommandError`` when the baseline cannot be read."""
    from worker.cli import CommandError

    try:
        baseline = json.loads(baseline_file.read_text(encoding="utf-8"))
        expected = {name: float(entry["f1"]) for name, entry in baseline["categories"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CommandError(
            f"--gate: cannot read per-category F1 from {baseline_file} ({err!r}); give an earlier eval report "
            'or {"categories": {name: {"f1": number}}}'
        ) from None
    drifts = f1_drift({name: entry["f1"] for name, entry in report["categories"].items()}, expected, tolerance)
    for line in drifts:
        print(f"eval: gate: {line}", file=sys.stderr)
    if drifts:
        print(f"eval: gate FAILED against {baseline_file} (tolerance {tolerance})", file=sys.stderr)
        return 1
    print(f"eval: gate passed against {baseline_file} (tolerance {tolerance})", file=sys.stderr)
    return 0


def f1_drift(measured: dict[str, float], baseline: dict[str, float], tolerance: float) -> list[str]:
    """One line per category whose F1 moved by more than ``tolerance``, or that only one side has."""
    lines = []
    for name in sorted(baseline.keys() | measured.keys()):
        if name not in measured:
            lines.append(f"{name}: in the baseline (F1 {baseline[name]:.4f}) but has no positives in the data")
        elif name not in baseline:
            lines.append(f"{name}: F1 {measured[name]:.4f}, not in the baseline")
        elif abs(measured[name] - baseline[name]) > tolerance:
            lines.append(f"{name}: F1 {measured[name]:.4f}, baseline {baseline[name]:.4f}")
    return lines


def load_policy_and_data(args: argparse.Namespace, settings: Settings) -> tuple[Policy, LabelledData]:
    """The policy (``--policy`` or the settings') and the labelled data (``--limit``,
    ``--holdout``) an offline command measures; ``CommandError`` naming what is wrong."""
    from worker.backends import load_policy
    from worker.cli import CommandError
    from worker.pipeline.policy import Policy, PolicyError

    try:
        policy = Policy.load(args.policy) if args.policy else load_policy(settings)
    except PolicyError as err:
        raise CommandError(str(err)) from None
    try:
        data = read_labelled(args.data, limit=args.limit)
    except LabelledDataError as err:
        raise CommandError(str(err)) from None
    if args.holdout:
        data = holdout_only(data, args.holdout)
    if not data.examples:
        raise CommandError("no usable labelled records in the data; see worker/offline/labelled.py for the formats")
    return policy, data


def holdout_only(data: LabelledData, head_dir: Path) -> LabelledData:
    """Keep the examples whose text was in the head's validation split (``split.json``)."""
    from worker.cli import CommandError

    split_file = head_dir / "split.json"
    try:
        keys = set(json.loads(split_file.read_text(encoding="utf-8"))["validation_keys"])
    except (OSError, ValueError, KeyError) as err:
        raise CommandError(
            f"--holdout: cannot read {split_file} ({err}); give a directory written by 'modworker train'"
        ) from None
    kept = [e for e in data.examples if e.key in keys]
    skipped = Counter(data.skipped)
    skipped["used in training (--holdout)"] += len(data.examples) - len(kept)
    return LabelledData(kept, skipped)


def create_backend(settings: Settings, policy: Policy | None = None) -> Backend:
    """The backend the settings choose, built by the worker's own factory; ``policy`` is the
    one being evaluated (the llm backend's json dialect and the cascade read it)."""
    from worker.backends import create_backend as factory

    return factory(settings, policy)


async def score_examples(backend: Backend, examples: Sequence[Example]) -> list[Scored | None]:
    """The backend's outcome per example (None where it rejected it), with a progress bar."""
    from tqdm import tqdm

    from schemas import Turn
    from worker.backends.base import Conversation, Scored

    results: list[Scored | None] = [None] * len(examples)
    texts = [i for i, e in enumerate(examples) if e.kind == "content"]
    conversations = [i for i, e in enumerate(examples) if e.kind != "content"]
    with tqdm(total=len(examples), desc="scoring", unit="input", disable=None, file=sys.stderr) as bar:
        for group, is_text in ((texts, True), (conversations, False)):
            for start in range(0, len(group), SCORE_CHUNK):
                chunk = group[start : start + SCORE_CHUNK]
                if is_text:
                    outcomes = await backend.score_texts([examples[i].text for i in chunk])
                else:
                    outcomes = await backend.score_conversations(
                        [
                            Conversation(
                                turn=Turn(role=_judged_role(examples[i]), content=examples[i].text),
                                context=examples[i].context,
                            )
                            for i in chunk
                        ]
                    )
                for i, outcome in zip(chunk, outcomes, strict=True):
                    results[i] = outcome if isinstance(outcome, Scored) else None
                bar.update(len(chunk))
    return results


def _judged_role(example: Example) -> str:
    # The judged turn answers the last context turn: the other role, or user when alone.
    if example.context:
        return "assistant" if example.context[-1].role == "user" else "user"
    return "user"


async def evaluate(settings: Settings, policy: Policy, data: LabelledData, args: argparse.Namespace) -> dict[str, Any]:
    """Score the data with the backend, apply the policy, compute the report (and plots)."""
    import numpy as np

    from worker.offline.eval_metrics import bootstrap_f1, category_metrics, reliability

    backend = create_backend(settings, policy)
    try:
        await _start(backend)
        raw = await score_examples(backend, data.examples)
        kept = [i for i, outcome in enumerate(raw) if outcome is not None]
        examples = [data.examples[i] for i in kept]
        scored = [dict(raw[i].scores) for i in kept]  # type: ignore[union-attr]
        models = sorted({raw[i].model for i in kept})  # type: ignore[union-attr]
        categories = data.categories()
        decisions = [policy.decide(scores, source=e.source) for scores, e in zip(scored, examples, strict=True)]
        positives = {c: np.array([c in e.labels for e in examples], dtype=bool) for c in categories}
        scores = {c: np.array([canonical_score(policy, s, c) for s in scored], dtype=np.float64) for c in categories}
        produced = {policy.canonical(name) for s in scored for name in s}
        report_categories: dict[str, dict[str, Any]] = {}
        thresholds: dict[str, float | None] = {}
        hits_of: dict[str, np.ndarray] = {}
        for c in categories:
            hits = np.array([any(v.category == c for v in d.violations) for d in decisions], dtype=bool)
            hits_of[c] = hits
            entry = category_metrics(positives[c], scores[c], hits, target_precision=args.target_precision)
            thresholds[c] = policy_threshold(policy, c)
            entry["policy_threshold"] = thresholds[c]
            entry["scored_by_backend"] = c in produced
            entry["f1_ci95"] = list(bootstrap_f1(positives[c], hits))
            entry["calibration"] = reliability(positives[c], scores[c])
            report_categories[c] = entry
        unsafe = unsafe_view(policy, examples, scored, decisions)
        sources = [e.source or "(no source)" for e in examples]
        report: dict[str, Any] = {
            "categories": report_categories,
            "data": [str(p) for p in args.data],
            "holdout": str(args.holdout) if args.holdout else None,
            "backend": settings.backend,
            "model": ", ".join(models) or None,
            "policy_version": policy.version,
            "examples": len(examples),
            "by_kind": dict(Counter(e.kind for e in examples)),
            "skipped": dict(data.skipped),
            "rejected": len(raw) - len(kept),
            "target_precision": args.target_precision,
            "unsafe": unsafe_entry(unsafe, args.target_precision),
            "summary": macro_summary(args.macro, categories, positives, hits_of, report_categories),
            "by_source": by_source(sources, categories, positives, scores, hits_of, unsafe, args.target_precision),
            "baseline": read_baseline(args.holdout) if args.holdout else None,
            "plots": [],
        }
        if not args.no_plots and categories:
            report["plots"] = await _plots(backend, settings, args, examples, categories, positives, scores, report)
        return report
    finally:
        await backend.close()


async def _start(backend: Backend) -> None:
    from worker.backends.local_model import LocalModelError
    from worker.cli import CommandError

    try:
        await backend.start()
    except LocalModelError as err:
        raise CommandError(str(err)) from None


def canonical_score(policy: Policy, scores: dict[str, float], category: str) -> float:
    """The score the policy sees for ``category``: the highest raw score aliased onto it, 0 if none."""
    return max((v for k, v in scores.items() if policy.canonical(k) == category), default=0.0)


def policy_threshold(policy: Policy, category: str) -> float | None:
    """The policy's threshold for ``category`` (no tenant/source), None when its action is ``allow``."""
    hits = policy.decide({category: 1.0}).violations
    return hits[0].threshold if hits else None


@dataclass(frozen=True)
class UnsafeView:
    """Binary unsafe-or-not, as the published guard-model numbers count it.

    An input is labelled unsafe when one of its labels is a category the policy stops
    (action review or block); it is predicted unsafe when the policy's decision stops it.
    ``scores``: the highest raw score over those categories.
    """

    categories: frozenset[str]
    positive: np.ndarray
    hits: np.ndarray
    scores: np.ndarray


def unsafe_view(
    policy: Policy, examples: Sequence[Example], scored: Sequence[dict[str, float]], decisions: Sequence[Any]
) -> UnsafeView:
    import numpy as np

    named = {policy.canonical(c) for s in scored for c in s} | {policy.canonical(c) for e in examples for c in e.labels}
    stopping = frozenset(c for c in named if policy.decide({c: 1.0}).action in UNSAFE_ACTIONS)
    positive = np.array([any(policy.canonical(c) in stopping for c in e.labels) for e in examples], dtype=bool)
    hits = np.array([d.action in UNSAFE_ACTIONS for d in decisions], dtype=bool)
    scores = np.array(
        [max((v for k, v in s.items() if policy.canonical(k) in stopping), default=0.0) for s in scored],
        dtype=np.float64,
    )
    return UnsafeView(stopping, positive, hits, scores)


def unsafe_entry(view: UnsafeView, target_precision: float, rows: np.ndarray | None = None) -> dict[str, Any]:
    """The ``unsafe`` row (over ``rows`` when given): category metrics, F1 interval, calibration, safe inputs stopped."""
    from worker.offline.eval_metrics import bootstrap_f1, category_metrics, reliability

    positive, hits, scores = view.positive, view.hits, view.scores
    if rows is not None:
        positive, hits, scores = positive[rows], hits[rows], scores[rows]
    entry = category_metrics(positive, scores, hits, target_precision=target_precision)
    entry["categories"] = sorted(view.categories)
    entry["f1_ci95"] = list(bootstrap_f1(positive, hits))
    entry["calibration"] = reliability(positive, scores)
    safe = ~positive
    entry["safe_inputs"] = int(safe.sum())
    entry["safe_stopped"] = int((hits & safe).sum())
    entry["safe_stopped_rate"] = round(float((hits & safe).sum() / safe.sum()), 4) if safe.any() else None
    return entry


def macro_summary(
    wanted: Sequence[str],
    categories: Sequence[str],
    positives: dict[str, np.ndarray],
    hits: dict[str, np.ndarray],
    entries: dict[str, dict[str, Any]],
    rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean F1 over the ``wanted`` categories present in the data, with a bootstrap interval."""
    from worker.offline.eval_metrics import bootstrap_macro_f1, f1_of

    present = [c for c in wanted if c in categories]
    if not present:
        return {"macro_f1_categories": [], "macro_f1": None, "macro_f1_ci95": None}

    def pick(a: np.ndarray) -> np.ndarray:
        return a if rows is None else a[rows]

    values = [f1_of(pick(positives[c]), pick(hits[c])) for c in present]
    interval = bootstrap_macro_f1([pick(positives[c]) for c in present], [pick(hits[c]) for c in present])
    return {
        "macro_f1_categories": present,
        "macro_f1": round(sum(values) / len(values), 4),
        "macro_f1_ci95": list(interval),
    }


def by_source(
    sources: Sequence[str],
    categories: Sequence[str],
    positives: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    hits: dict[str, np.ndarray],
    unsafe: UnsafeView,
    target_precision: float,
) -> dict[str, dict[str, Any]]:
    """Per data source: inputs, the categories it has positives for, its ``unsafe`` row and macro-F1."""
    import numpy as np

    from worker.offline.eval_metrics import bootstrap_f1, category_metrics

    out: dict[str, dict[str, Any]] = {}
    names = np.array(sources)
    for source in sorted(set(sources)):
        rows = names == source
        entry: dict[str, Any] = {"examples": int(rows.sum()), "categories": {}}
        for c in categories:
            if not positives[c][rows].any():
                continue
            m = category_metrics(positives[c][rows], scores[c][rows], hits[c][rows], target_precision=target_precision)
            m["f1_ci95"] = list(bootstrap_f1(positives[c][rows], hits[c][rows]))
            entry["categories"][c] = m
        entry["unsafe"] = unsafe_entry(unsafe, target_precision, rows)
        entry["summary"] = macro_summary(
            [c for c in MACRO_CATEGORIES if c in entry["categories"]], categories, positives, hits, {}, rows
        )
        out[source] = entry
    return out


def read_baseline(head_dir: Path) -> dict[str, Any] | None:
    """The baseline's numbers on the same held-out split (``baseline.json`` of the head), if any."""
    path = head_dir / "baseline.json"
    if not path.is_file():
        return None
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


async def _plots(
    backend: Backend,
    settings: Settings,
    args: argparse.Namespace,
    examples: Sequence[Example],
    categories: Sequence[str],
    positives: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    report: dict[str, Any],
) -> list[str]:
    from worker.offline import eval_plots

    directory = args.plots or args.report.parent / f"{args.report.stem}_plots"
    directory.mkdir(parents=True, exist_ok=True)
    points = {}
    for c in categories:
        m = report["categories"][c]
        points[c] = (m["recall"], m["precision"])
    paths = [
        eval_plots.plot_pr_curves(directory / "pr_curves.png", categories, positives, scores, points),
        eval_plots.plot_score_histograms(
            directory / "score_histograms.png",
            categories,
            positives,
            scores,
            {c: report["categories"][c]["policy_threshold"] for c in categories},
        ),
        eval_plots.plot_reliability(
            directory / "reliability.png",
            {c: report["categories"][c]["calibration"] for c in categories}
            | {"unsafe (any harm)": report["unsafe"]["calibration"]},
        ),
    ]
    sample = projection_sample(examples, args.projection_sample)
    embeddings, source = await sample_embeddings(backend, settings, [examples[i].text for i in sample])
    if embeddings is not None:
        names = [primary_label(examples[i], positives, sample_index=i) for i in sample]
        paths.append(
            eval_plots.plot_embeddings(
                directory / "embeddings_2d.png",
                embeddings,
                names,
                method=args.projection,
                title=f"{len(sample)} inputs, {source} embeddings, {args.projection.upper()} projection",
            )
        )
    return [str(p) for p in paths]


def projection_sample(examples: Sequence[Example], size: int) -> list[int]:
    """Indices for the embeddings plot: every labelled example first (rare labels must show), then safe ones."""
    rng = random.Random(0)
    harmful = [i for i, e in enumerate(examples) if e.labels]
    safe = [i for i, e in enumerate(examples) if not e.labels]
    rng.shuffle(harmful)
    rng.shuffle(safe)
    take_harmful = harmful[: max(size // 2, size - len(safe))]
    return sorted(take_harmful + safe[: size - len(take_harmful)])


def primary_label(example: Example, positives: dict[str, np.ndarray], *, sample_index: int) -> str:
    """The label that colours an example: its rarest positive label, ``safe`` when none."""
    if not example.labels:
        return "safe"
    return min(example.labels, key=lambda c: (int(positives[c].sum()) if c in positives else 0, c))


async def sample_embeddings(backend: Backend, settings: Settings, texts: list[str]) -> tuple[np.ndarray | None, str]:
    """Embeddings from the backend when it has them (local), else from the starter encoder."""
    embed = getattr(backend, "embed_texts", None)
    if embed is not None:
        return await embed(texts), getattr(backend, "model_id", "local")
    try:
        from worker.backends.local import default_token_budget
        from worker.backends.local_model import LocalModelError, load_encoder
        from worker.offline.train import DEFAULT_ENCODER, embed_with_progress
    except ImportError:
        return None, ""
    try:
        encoder = await asyncio.to_thread(load_encoder, DEFAULT_ENCODER, settings.local)
    except LocalModelError as err:
        print(f"eval: no embeddings plot ({err})", file=sys.stderr)
        return None, ""
    budget = settings.local.max_tokens_per_batch or default_token_budget(encoder.device.type)
    vectors = await asyncio.to_thread(embed_with_progress, encoder, texts, budget)
    return vectors, DEFAULT_ENCODER


def format_table(report: dict[str, Any]) -> str:
    """The per-category numbers (and the ``unsafe`` row) as a Markdown table."""
    target = report["target_precision"]
    lines = [
        f"| category | support | precision | recall | F1 (95% CI) | AUPRC | ECE | policy threshold "
        f"| threshold for P>={target} (recall) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = list(report["categories"].items())
    if report.get("unsafe"):
        rows.append(("**unsafe** (any harm)", report["unsafe"]))
    for name, m in rows:
        at_target = (
            f"{m['threshold_at_target_precision']:.3f} ({m['recall_at_target_precision']:.3f})"
            if m["threshold_at_target_precision"] is not None
            else "not reached"
        )
        threshold = m.get("policy_threshold", "policy")
        threshold = f"{threshold:.3f}" if isinstance(threshold, float) else (threshold or "allow")
        auprc = f"{m['auprc']:.3f}" if m["auprc"] is not None else "-"
        ece = f"{m['calibration']['ece']:.3f}" if m.get("calibration") else "-"
        lines.append(
            f"| {name} | {m['support']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f}{_ci(m)} | "
            f"{auprc} | {ece} | {threshold} | {at_target} |"
        )
    return "\n".join(lines)


def _ci(entry: dict[str, Any], key: str = "f1_ci95") -> str:
    interval = entry.get(key)
    return f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else ""


def format_summary(report: dict[str, Any]) -> str:
    """Macro-F1, the per-source breakdown and, on a held-out split, the baseline beside the model."""
    lines: list[str] = []
    summary = report.get("summary") or {}
    if summary.get("macro_f1") is not None:
        lines += [
            f"Macro-F1 over {', '.join(summary['macro_f1_categories'])}: **{summary['macro_f1']:.3f}**"
            f"{_ci(summary, 'macro_f1_ci95')} (95% bootstrap interval).",
            "",
        ]
    sources = report.get("by_source") or {}
    if sources:
        lines += [
            "| source | inputs | unsafe support | unsafe P | unsafe R | unsafe F1 (95% CI) | safe inputs stopped | "
            "per-category F1 (support) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for source, entry in sources.items():
            u = entry["unsafe"]
            stopped = (
                f"{u['safe_stopped']}/{u['safe_inputs']} ({u['safe_stopped_rate']:.1%})" if u["safe_inputs"] else "-"
            )
            per_category = ", ".join(f"{c} {m['f1']:.3f} ({m['support']})" for c, m in entry["categories"].items())
            lines.append(
                f"| {source} | {entry['examples']} | {u['support']} | {u['precision']:.3f} | {u['recall']:.3f} | "
                f"{u['f1']:.3f}{_ci(u)} | {stopped} | {per_category or '-'} |"
            )
        lines.append("")
    baseline = report.get("baseline")
    if baseline:
        lines += [
            f"Baseline on the same held-out split ({baseline['description']}):",
            "",
            "| category | support | baseline F1 (95% CI) | this model F1 (95% CI) |",
            "|---|---:|---:|---:|",
        ]
        for c, b in baseline["categories"].items():
            mine = report["categories"].get(c)
            ours = f"{mine['f1']:.3f}{_ci(mine)}" if mine else "-"
            lines.append(f"| {c} | {b['support']} | {b['f1']:.3f}{_ci(b)} | {ours} |")
        if baseline.get("macro_f1") is not None and summary.get("macro_f1") is not None:
            lines.append(
                f"| macro-F1 ({len(summary['macro_f1_categories'])} categories) | | "
                f"{baseline['macro_f1']:.3f}{_ci(baseline, 'macro_f1_ci95')} | "
                f"{summary['macro_f1']:.3f}{_ci(summary, 'macro_f1_ci95')} |"
            )
        for source, b in (baseline.get("by_source") or {}).items():
            mine = sources.get(source, {}).get("unsafe")
            if mine:
                lines.append(
                    f"| {source} unsafe | {b['support']} | {b['f1']:.3f}{_ci(b)} | {mine['f1']:.3f}{_ci(mine)} |"
                )
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def eval_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this evaluation (as recorded in a model card)."""
    words = ["modworker", "eval", *map(str, args.data), "--backend", args.backend, "--report", str(args.report)]
    for flag, value in (
        ("--model", args.model),
        ("--policy", args.policy),
        ("--holdout", args.holdout),
        ("--limit", args.limit),
        ("--card", args.card),
    ):
        if value is not None:
            words += [flag, str(value)]
    if args.target_precision != 0.9:
        words += ["--target-precision", str(args.target_precision)]
    return shlex.join(words)


def update_model_card(card: Path, command: str, report: dict[str, Any]) -> None:
    """Put this run's table under its own heading inside the card's eval block (replacing a previous run's)."""
    from worker.offline.train import CARD_EVAL_END, CARD_EVAL_START

    text = card.read_text(encoding="utf-8") if card.is_file() else f"{CARD_EVAL_START}\n{CARD_EVAL_END}\n"
    if CARD_EVAL_START not in text or CARD_EVAL_END not in text:
        text = text.rstrip("\n") + f"\n\n## Evaluation with `modworker eval`\n\n{CARD_EVAL_START}\n{CARD_EVAL_END}\n"
    head, rest = text.split(CARD_EVAL_START, 1)
    block, tail = rest.split(CARD_EVAL_END, 1)
    title = (
        "### "
        + ", ".join(Path(p).name for p in report["data"])
        + (" (held-out split only)" if report["holdout"] else "")
    )
    sections = [s for s in ("\n" + block).split("\n### ")[1:] if s.strip() and not s.startswith("(")]
    sections = ["### " + s.strip("\n") for s in sections if not ("### " + s).startswith(title + "\n")]
    kinds = ", ".join(f"{n} {k}" for k, n in report["by_kind"].items())
    skipped = "; ".join(f"{n} {why}" for why, n in report["skipped"].items()) or "none"
    sections.append(
        "\n".join(
            [
                title,
                "",
                "```",
                command,
                "```",
                "",
                (
                    f"{report['examples']} inputs ({kinds}); skipped: {skipped}. Model `{report['model']}`, "
                    f"policy version `{report['policy_version']}`."
                ),
                "",
                format_table(report),
                "",
                format_summary(report),
            ]
        )
    )
    card.write_text(
        head + CARD_EVAL_START + "\n" + "\n\n".join(sections) + "\n" + CARD_EVAL_END + tail, encoding="utf-8"
    )
