"""``modworker calibrate``: measure a cascade on labelled data and choose its uncertainty bands.

    modworker calibrate DATA.jsonl --first local --then mistral --report OUT.json \\
        [--max-f1-loss 0.01] [--write-policy POLICY.yaml] [--holdout HEAD_DIR] [--then-oracle]

Both stages score every input once (the second stage's answers are what "the second stage
alone" would have decided); the cascade is then replayed offline for any bands, exactly as
``worker.backends.cascade`` routes: an input escalates when some category's first-stage
score (merged through the policy's aliases) lies in ``[t - below, t + above)`` around one
of its thresholds ``t``, and then takes the second stage's decision.

Calibration: the data is split by a hash of each text (``--calibration-fraction``, default
half) into a calibration part, on which the bands are chosen, and a test part, on which
they are reported (so the reported loss is not measured on the data that chose it). For
each labelled category, among bands on a 0.01 grid, the one escalating the fewest inputs
whose cascade F1 is at most ``--max-f1-loss`` below the second stage's alone; the chosen
bands are then checked together and any category over its loss is searched again with a
stricter limit. ``--write-policy`` writes the policy with these bands in its ``cascade``
section (``MODWORKER_POLICY_FILE``); categories without labels get ``--default-band``.

The report (``OUT.json``): escalated fraction, second-stage inputs, calls (batches of
``--batch-size`` in data order: a cascade batch calls the second stage when any of its
inputs escalates, ``calls_cascade``; and pooled, ``calls_cascade_pooled``: the escalated
inputs of each kind in full calls of ``--batch-size``, ``ceil(escalated / batch size)``,
the bound the worker's escalation pool reaches when concurrent batches fill it) and tokens (UTF-8 bytes / 4 of the judged text and its context) against
the second stage alone, per-category precision/recall/F1 of the first stage alone, the
second alone and the cascade, macro-F1 (categories with positives), and a curve of
escalation against macro-F1 for uniform bands, plotted beside the report.

Thresholds from human review (``--labels``):

    modworker calibrate --labels LABELS.jsonl --write-policy CANDIDATE.yaml [--report OUT.json] \\
        [--policy POLICY.yaml] [--min-support 10]

No backend runs: ``LABELS.jsonl`` (``modworker labels export``) holds the machine's scores
and the reviewers' categories. Per category, the F1-max threshold against the reviewers
(``propose_thresholds``), the change in precision, recall and F1, in human workload (share
of inputs whose action is ``review``) and in agreement with the reviewers' actions, against
the current policy; ``CANDIDATE.yaml`` is that policy with the moved thresholds (a new
version), for ``MODWORKER_SHADOW__POLICY_FILE``. Cascade bands are not chosen from reviews
(they need a second stage's scores): the exported lines that carry text are labelled data
for the band search above.

``--then-oracle`` (second stage ``mistral`` only): the second stage is a loopback Mistral
server (``worker.testing.mistral_server``) that answers with the data's own labels, i.e. a
second stage that is right by construction: the loss then is exactly what the first
stage's confident decisions cost. ``modworker eval --backend cascade`` reports the same
numbers for the bands in force (the policy's, else ``MODWORKER_CASCADE__DEFAULT_BAND``),
with the stages of ``MODWORKER_CASCADE__FIRST`` / ``__THEN`` and no search.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from worker.config import Settings
    from worker.offline.labelled import Example, LabelledData
    from worker.pipeline.policy import Policy

STAGES = ["local", "mistral", "openai"]
GRID_STEP = 0.01
MAX_BAND = 0.5
CURVE_WIDTHS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
FRONTIER_LOSSES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
"""Macro-F1 budgets for which bands are chosen on the calibration part and measured on the test part."""


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``modworker calibrate``."""
    parser = subparsers.add_parser(
        "calibrate", help="choose cascade bands from labelled JSONL, or thresholds from review labels (--labels)"
    )
    parser.add_argument("data", type=Path, nargs="*", help="labelled JSONL file(s) (cascade bands)")
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="thresholds instead: from a 'modworker labels export' file of human review decisions",
    )
    parser.add_argument(
        "--min-support", type=int, default=10, help="--labels: reviewed positives a category needs to be moved"
    )
    parser.add_argument("--first", choices=STAGES, default="local", help="first stage (default local)")
    parser.add_argument("--then", choices=STAGES, default="mistral", help="second stage (default mistral)")
    parser.add_argument("--report", type=Path, help="where to write the JSON report (required without --labels)")
    parser.add_argument("--policy", type=Path, help="policy YAML (else MODWORKER_POLICY_FILE, else built-in)")
    parser.add_argument("--model", help="local backend: model to load (else MODWORKER_LOCAL__MODEL)")
    parser.add_argument("--max-f1-loss", type=float, default=0.01, help="F1 lost against the second stage alone")
    parser.add_argument(
        "--objective",
        choices=["per-category", "macro"],
        default="per-category",
        help="per-category: no category loses more than --max-f1-loss; macro: macro-F1 loses at most that",
    )
    parser.add_argument("--scores", type=Path, help="JSON cache of both stages' scores: read if there, else written")
    parser.add_argument("--calibration-fraction", type=float, default=0.5, help="share of the data choosing bands")
    parser.add_argument("--default-band", type=float, help="band of unlabelled categories (else the setting)")
    parser.add_argument("--write-policy", type=Path, help="write the policy with the chosen bands here")
    parser.add_argument("--then-oracle", action="store_true", help="second stage: loopback Mistral answering labels")
    parser.add_argument("--batch-size", type=int, help="inputs per call when counting calls (else the setting)")
    parser.add_argument("--holdout", type=Path, help="head directory: only its validation split")
    parser.add_argument("--limit", type=int, help="first N records of each file only")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--config", type=Path, help="settings YAML, as for 'modworker run'")
    parser.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from worker.cli import CommandError

    if args.labels is not None:
        if args.data:
            raise CommandError("calibrate: give labelled DATA (cascade bands) or --labels FILE (thresholds), not both")
        return calibrate_from_reviews(args)
    if not args.data or args.report is None:
        raise CommandError("calibrate: needs labelled DATA and --report OUT.json (or --labels FILE)")
    return _run(args, search=True)


def eval_cascade(args: argparse.Namespace) -> int:
    """``modworker eval --backend cascade``: the report at the bands in force, no search."""
    args.first = args.then = None
    args.max_f1_loss, args.calibration_fraction, args.default_band = None, 0.0, None
    args.write_policy, args.then_oracle, args.batch_size = None, False, None
    return _run(args, search=False)


def save_scores(path: Path, examples: Sequence[Example], first: Sequence[Any], then: Sequence[Any]) -> None:
    """Both stages' outcomes per example (None: rejected), keyed by text, to replay without scoring."""

    def dump(outcome: Any) -> Any:
        return None if outcome is None else {"model": outcome.model, "scores": outcome.scores}

    rows = [{"key": e.key, "first": dump(f), "then": dump(t)} for e, f, t in zip(examples, first, then, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows) + "\n", encoding="utf-8")


def load_scores(path: Path, examples: Sequence[Example]) -> tuple[list[Any], list[Any]]:
    from worker.backends.base import Scored
    from worker.cli import CommandError

    rows = json.loads(path.read_text(encoding="utf-8"))
    if [r["key"] for r in rows] != [e.key for e in examples]:
        raise CommandError(f"--scores {path}: written for other data; delete it to score again")

    def load(value: Any) -> Any:
        return None if value is None else Scored(value["scores"], value["model"])

    return [load(r["first"]) for r in rows], [load(r["then"]) for r in rows]


def _run(args: argparse.Namespace, *, search: bool) -> int:
    from worker.cli import CommandError
    from worker.config import ConfigError, check_backend_credentials
    from worker.offline.evaluate import load_policy_and_data
    from worker.offline.train import tool_settings

    overrides: dict[str, Any] = {"backend": "cascade", "cache": {"enabled": False}}
    if args.first is not None:
        overrides["cascade"] = {"first": args.first, "then": args.then}
    if args.model:
        overrides["local"] = {"model": args.model}
    try:
        settings = tool_settings(args.config, **overrides)
    except ConfigError as err:
        raise CommandError(str(err)) from None
    policy, data = load_policy_and_data(args, settings)
    cache = getattr(args, "scores", None)
    if cache is not None and cache.is_file():
        first, then = load_scores(cache, data.examples)
    else:
        with _oracle(settings, data, enabled=args.then_oracle) as settings:
            check_backend_credentials(settings)
            first, then = asyncio.run(_score_both(settings, data.examples))
        if cache is not None:
            save_scores(cache, data.examples, first, then)
    report = calibrate(
        settings,
        policy,
        data.examples,
        first,
        then,
        search=search,
        max_f1_loss=args.max_f1_loss if args.max_f1_loss is not None else 0.01,
        objective=getattr(args, "objective", "per-category"),
        calibration_fraction=args.calibration_fraction,
        default_band=args.default_band if args.default_band is not None else settings.cascade.default_band,
        batch_size=args.batch_size or settings.batch.max_size,
    )
    report["data"] = [str(p) for p in args.data]
    report["holdout"] = str(args.holdout) if args.holdout else None
    report["then_oracle"] = bool(args.then_oracle)
    if search and args.write_policy:
        bands = {c: tuple(b) for c, b in report["bands"].items()}
        calibrated = policy.with_cascade_bands((report["default_band"],) * 2, bands)
        write_policy(args.write_policy, calibrated, report)
        report["written_policy"] = {"path": str(args.write_policy), "version": calibrated.version}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        report["plots"] = [str(plot_curve(args.report.with_name(f"{args.report.stem}_escalation.png"), report))]
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_summary(report))  # the results: stdout; progress and notes: stderr
    print(f"calibrate: report {args.report}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _oracle(settings: Settings, data: LabelledData, *, enabled: bool) -> Iterator[Settings]:
    """Settings whose ``mistral`` points at a loopback server answering the data's labels."""
    if not enabled:
        yield settings
        return
    from worker.cli import CommandError
    from worker.testing.mistral_server import CATEGORIES_2411, MistralServer, scores_from_labels

    if settings.cascade.then != "mistral":
        raise CommandError("--then-oracle needs --then mistral")
    labels: dict[str, set[str]] = {}
    for example in data.examples:
        labels.setdefault(example.text, set()).update(example.labels)
    extra = [c for c in data.categories() if c not in CATEGORIES_2411]
    with MistralServer(
        api_key="oracle", categories=(*CATEGORIES_2411, *extra), scorer=scores_from_labels(labels)
    ) as server:
        yield settings.model_copy(
            update={
                "mistral": settings.mistral.model_copy(
                    update={"base_url": server.base_url, "api_key": _secret("oracle"), "model": "oracle-labels"}
                )
            }
        )


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


async def _score_both(settings: Settings, examples: Sequence[Example]) -> tuple[list[Any], list[Any]]:
    from worker.backends import create_named
    from worker.offline.evaluate import _start, score_examples

    results = []
    for name in (settings.cascade.first, settings.cascade.then):
        backend = create_named(settings, name)
        try:
            await _start(backend)
            print(f"calibrate: scoring {len(examples)} inputs with {name}", file=sys.stderr)
            results.append(await score_examples(backend, examples))
        finally:
            await backend.close()
    return results[0], results[1]


# -- the offline cascade ----------------------------------------------------------------


@dataclass
class Replay:
    """Everything needed to replay the cascade for any bands, over one set of inputs."""

    labels: dict[str, np.ndarray]
    """Labelled category -> bool per input."""
    first: dict[str, np.ndarray]
    then: dict[str, np.ndarray]
    """Labelled category -> whether that stage's scores made it a violation (policy applied)."""
    first_scores: dict[str, np.ndarray]
    """Canonical category the first stage scored -> its merged score per input (0 when absent)."""
    thresholds: dict[str, tuple[float, ...]]
    kinds: list[str]
    tokens: np.ndarray

    @property
    def size(self) -> int:
        return len(self.kinds)

    def subset(self, keep: np.ndarray) -> Replay:
        return Replay(
            {c: v[keep] for c, v in self.labels.items()},
            {c: v[keep] for c, v in self.first.items()},
            {c: v[keep] for c, v in self.then.items()},
            {c: v[keep] for c, v in self.first_scores.items()},
            self.thresholds,
            [k for k, kept in zip(self.kinds, keep, strict=True) if kept],
            self.tokens[keep],
        )

    def escalated(self, bands: Mapping[str, tuple[float, float]], default: tuple[float, float]) -> np.ndarray:
        """Which inputs the cascade sends to the second stage under ``bands``."""
        import numpy as np

        mask = np.zeros(self.size, dtype=bool)
        for category, scores in self.first_scores.items():
            below, above = bands.get(category, default)
            if below <= 0 and above <= 0:
                continue
            for t in self.thresholds.get(category, ()):
                mask |= (scores >= t - below) & (scores < t + above)
        return mask


def build_replay(policy: Policy, examples: Sequence[Example], first: Sequence[Any], then: Sequence[Any]) -> Replay:
    """The replay over the examples both stages scored (rejections are left out)."""
    import numpy as np

    from worker.offline.evaluate import canonical_score

    kept = [i for i in range(len(examples)) if first[i] is not None and then[i] is not None]
    categories = sorted({label for i in kept for label in examples[i].labels})
    first_decisions = [policy.decide(first[i].scores) for i in kept]
    then_decisions = [policy.decide(then[i].scores) for i in kept]

    def hits(decisions: list[Any], category: str) -> np.ndarray:
        return np.array([any(v.category == category for v in d.violations) for d in decisions], dtype=bool)

    scored = sorted({policy.canonical(name) for i in kept for name in first[i].scores})
    return Replay(
        labels={c: np.array([c in examples[i].labels for i in kept], dtype=bool) for c in categories},
        first={c: hits(first_decisions, c) for c in categories},
        then={c: hits(then_decisions, c) for c in categories},
        first_scores={
            c: np.array([canonical_score(policy, first[i].scores, c) for i in kept], dtype=np.float64) for c in scored
        },
        thresholds={c: policy.thresholds(c) for c in scored},
        kinds=[examples[i].kind for i in kept],
        tokens=np.array([_tokens(examples[i]) for i in kept], dtype=np.int64),
    )


def _tokens(example: Example) -> int:
    return sum(
        math.ceil(len(text.encode("utf-8")) / 4) for text in [t.content for t in example.context] + [example.text]
    )


def prf(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    tp = int((truth & predicted).sum())
    fp = int((~truth & predicted).sum())
    fn = int((truth & ~predicted).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def quality(replay: Replay, escalated: np.ndarray, *, batch_size: int) -> dict[str, Any]:
    """The cascade with ``escalated`` against each stage alone: quality, inputs, calls, tokens."""
    import numpy as np

    categories: dict[str, Any] = {}
    for c, truth in replay.labels.items():
        cascade = np.where(escalated, replay.then[c], replay.first[c])
        entry: dict[str, Any] = {
            "support": int(truth.sum()),
            "first": prf(truth, replay.first[c]),
            "then": prf(truth, replay.then[c]),
            "cascade": prf(truth, cascade),
        }
        entry["f1_loss"] = round(entry["then"]["f1"] - entry["cascade"]["f1"], 4)
        categories[c] = entry
    counted = [e for e in categories.values() if e["support"] > 0]
    macro = {
        stage: round(sum(e[stage]["f1"] for e in counted) / len(counted), 4) if counted else 0.0
        for stage in ("first", "then", "cascade")
    }
    calls_alone = calls_cascade = calls_pooled = 0
    for kind in sorted(set(replay.kinds)):
        rows = np.array([k == kind for k in replay.kinds])
        esc = escalated[rows]
        for start in range(0, len(esc), batch_size):
            calls_alone += 1
            calls_cascade += int(esc[start : start + batch_size].any())
        calls_pooled += math.ceil(int(esc.sum()) / batch_size)  # each kind has its own pool
    tokens_alone = int(replay.tokens.sum())
    tokens_cascade = int(replay.tokens[escalated].sum())
    size = replay.size
    return {
        "inputs": size,
        "second_stage_inputs": int(escalated.sum()),
        "escalated_fraction": round(float(escalated.mean()) if size else 0.0, 4),
        "calls_alone": calls_alone,
        "calls_cascade": calls_cascade,
        "calls_saved_fraction": round(1 - calls_cascade / calls_alone, 4) if calls_alone else 0.0,
        "calls_cascade_pooled": calls_pooled,
        "calls_saved_fraction_pooled": round(1 - calls_pooled / calls_alone, 4) if calls_alone else 0.0,
        "tokens_alone": tokens_alone,
        "tokens_cascade": tokens_cascade,
        "tokens_saved_fraction": round(1 - tokens_cascade / tokens_alone, 4) if tokens_alone else 0.0,
        "macro_f1": macro,
        "macro_f1_loss": round(macro["then"] - macro["cascade"], 4),
        "categories": categories,
    }


def _grid(limit: float) -> list[float]:
    return [round(i * GRID_STEP, 4) for i in range(int(min(limit, MAX_BAND) / GRID_STEP + 1e-9) + 1)]


def search_band(replay: Replay, category: str, max_loss: float) -> tuple[float, float]:
    """The band of ``category`` escalating the fewest inputs with F1 at most ``max_loss`` below
    the second stage's (escalation by this category alone); ties: the narrower band."""
    import numpy as np

    truth = replay.labels[category]
    scores = replay.first_scores.get(category)
    thresholds = replay.thresholds.get(category, ())
    if scores is None or not thresholds:
        return (0.0, 0.0)
    target = prf(truth, replay.then[category])["f1"] - max_loss
    best: tuple[int, float, tuple[float, float]] | None = None
    for below in _grid(min(thresholds)):
        for above in _grid(1 - max(thresholds)):
            mask = np.zeros(replay.size, dtype=bool)
            for t in thresholds:
                mask |= (scores >= t - below) & (scores < t + above)
            f1 = prf(truth, np.where(mask, replay.then[category], replay.first[category]))["f1"]
            if f1 + 1e-9 < target:
                continue
            key = (int(mask.sum()), below + above, (below, above))
            if best is None or key[:2] < best[:2]:
                best = key
    return best[2] if best is not None else (MAX_BAND, MAX_BAND)


def choose_bands(
    replay: Replay, *, max_f1_loss: float, default: tuple[float, float], batch_size: int
) -> dict[str, tuple[float, float]]:
    """Bands per labelled category meeting ``max_f1_loss`` together (see the module docstring)."""
    limits = dict.fromkeys(replay.labels, max_f1_loss)
    bands: dict[str, tuple[float, float]] = {}
    for _ in range(6):
        bands = {c: search_band(replay, c, limits[c]) for c in replay.labels}
        result = quality(replay, replay.escalated(bands, default), batch_size=batch_size)
        over = [c for c, e in result["categories"].items() if e["f1_loss"] > max_f1_loss + 1e-9]
        if not over:
            break
        for c in over:
            limits[c] /= 2
    return bands


def band_options(replay: Replay, category: str) -> list[tuple[int, float, tuple[float, float]]]:
    """The Pareto front of ``category``'s bands: ``(inputs escalated by it alone, F1 loss
    against the second stage, band)``, fewest escalations first, each option losing less
    than every one before it."""
    import numpy as np

    truth = replay.labels[category]
    scores = replay.first_scores.get(category)
    thresholds = replay.thresholds.get(category, ())
    if scores is None or not thresholds:
        return [(0, 0.0, (0.0, 0.0))]
    best_f1 = prf(truth, replay.then[category])["f1"]
    options = []
    for below in _grid(min(thresholds)):
        for above in _grid(1 - max(thresholds)):
            mask = np.zeros(replay.size, dtype=bool)
            for t in thresholds:
                mask |= (scores >= t - below) & (scores < t + above)
            f1 = prf(truth, np.where(mask, replay.then[category], replay.first[category]))["f1"]
            options.append((int(mask.sum()), round(best_f1 - f1, 6), (below, above)))
    options.sort(key=lambda o: (o[0], o[1], sum(o[2])))
    front: list[tuple[int, float, tuple[float, float]]] = []
    for option in options:
        if not front or option[1] < front[-1][1] - 1e-12:
            front.append(option)
    return front


def choose_bands_macro(
    replay: Replay, *, max_f1_loss: float, default: tuple[float, float], batch_size: int
) -> dict[str, tuple[float, float]]:
    """Bands whose macro-F1 loss is at most ``max_f1_loss``, escalating few inputs: greedily,
    from each category's least-loss band, take the step to a narrower band that saves the
    most escalations per point of macro-F1 lost, while the budget allows (escalations are
    counted per category, so an input two categories escalate counts twice: a bound)."""
    counted = [c for c, truth in replay.labels.items() if truth.any()]
    fronts = {c: band_options(replay, c) for c in replay.labels}
    at = {c: len(front) - 1 for c, front in fronts.items()}  # the least-loss option of each
    budget = max_f1_loss * max(len(counted), 1)

    def spent() -> float:
        return sum(fronts[c][at[c]][1] for c in counted)

    while True:
        best: tuple[float, str, int] | None = None
        for c, front in fronts.items():
            here = front[at[c]]
            for j in range(at[c]):
                saved = here[0] - front[j][0]
                cost = (front[j][1] - here[1]) if c in counted else 0.0
                if saved <= 0 or spent() + cost > budget + 1e-9:
                    continue
                ratio = saved / max(cost, 1e-9)
                if best is None or ratio > best[0]:
                    best = (ratio, c, j)
        if best is None:
            break
        at[best[1]] = best[2]
    bands = {c: fronts[c][at[c]][2] for c in fronts}
    # The union escalates at least what each category asked for: check, and widen back if not.
    result = quality(replay, replay.escalated(bands, default), batch_size=batch_size)
    if result["macro_f1_loss"] > max_f1_loss + 1e-9:
        return choose_bands(replay, max_f1_loss=max_f1_loss, default=default, batch_size=batch_size)
    return bands


def calibrate(
    settings: Settings,
    policy: Policy,
    examples: Sequence[Example],
    first: Sequence[Any],
    then: Sequence[Any],
    *,
    search: bool,
    max_f1_loss: float,
    objective: str = "per-category",
    calibration_fraction: float,
    default_band: float,
    batch_size: int,
) -> dict[str, Any]:
    """The report (see the module docstring); bands searched on the calibration part when ``search``."""
    import numpy as np

    replay = build_replay(policy, examples, first, then)
    kept = [e for i, e in enumerate(examples) if first[i] is not None and then[i] is not None]
    in_calibration = np.array([int(e.key[:8], 16) % 1000 < calibration_fraction * 1000 for e in kept], dtype=bool)
    default = (default_band, default_band)
    if search:
        calibration = replay.subset(in_calibration)
        choose = choose_bands_macro if objective == "macro" else choose_bands
        bands = choose(calibration, max_f1_loss=max_f1_loss, default=default, batch_size=batch_size)
        test = replay.subset(~in_calibration)
    else:
        calibration = None
        bands = {c: policy.cascade_band(c) or default for c in replay.first_scores}
        test = replay
    report: dict[str, Any] = {
        "first": settings.cascade.first,
        "then": settings.cascade.then,
        "models": {
            "first": sorted({o.model for o in first if o is not None}),
            "then": sorted({o.model for o in then if o is not None}),
        },
        "policy_version": policy.version,
        "examples": len(examples),
        "rejected": len(examples) - len(kept),
        "batch_size": batch_size,
        "searched": search,
        "max_f1_loss": max_f1_loss if search else None,
        "objective": objective if search else None,
        "default_band": default_band,
        "bands": {c: list(b) for c, b in sorted(bands.items())},
        "calibration_examples": int(in_calibration.sum()) if search else 0,
        "test_examples": test.size,
        "test": quality(test, test.escalated(bands, default), batch_size=batch_size),
    }
    if calibration is not None:
        report["calibration"] = quality(calibration, calibration.escalated(bands, default), batch_size=batch_size)
        report["frontier"] = []
        for budget in FRONTIER_LOSSES:
            chosen = choose_bands_macro(calibration, max_f1_loss=budget, default=default, batch_size=batch_size)
            measured = quality(test, test.escalated(chosen, default), batch_size=batch_size)
            report["frontier"].append(
                {
                    "max_macro_f1_loss": budget,
                    "escalated_fraction": measured["escalated_fraction"],
                    "macro_f1": measured["macro_f1"]["cascade"],
                    "macro_f1_loss": measured["macro_f1_loss"],
                    "tokens_saved_fraction": measured["tokens_saved_fraction"],
                }
            )
    report["curve"] = [
        {
            "band": w,
            "escalated_fraction": (q := quality(test, test.escalated({}, (w, w)), batch_size=batch_size))[
                "escalated_fraction"
            ],
            "macro_f1": q["macro_f1"]["cascade"],
        }
        for w in CURVE_WIDTHS
    ]
    return report


# -- thresholds from human review decisions ----------------------------------------------


def calibrate_from_reviews(args: argparse.Namespace) -> int:
    """``modworker calibrate --labels FILE --write-policy OUT.yaml``: see ``propose_thresholds``."""
    from worker.backends import load_policy
    from worker.cli import CommandError
    from worker.config import ConfigError
    from worker.offline.labels import LabelsFileError, read_reviews
    from worker.offline.train import tool_settings
    from worker.pipeline.policy import Policy, PolicyError

    if args.write_policy is None:
        raise CommandError("calibrate --labels: give --write-policy CANDIDATE.yaml (where the candidate policy goes)")
    try:
        settings = tool_settings(args.config)
        policy = Policy.load(args.policy) if args.policy else load_policy(settings)
        reviewed = read_reviews(args.labels)
    except ConfigError as err:
        raise CommandError(str(err)) from None
    except (PolicyError, LabelsFileError) as err:
        raise CommandError(str(err)) from None
    if not reviewed:
        raise CommandError(f"{args.labels}: no reviewed inputs; export some with 'modworker labels export'")
    report = propose_thresholds(policy, reviewed, min_support=args.min_support)
    candidate = candidate_policy(policy, report["proposed"])
    report["candidate_policy"] = {"path": str(args.write_policy), "version": candidate.version}
    report["labels"] = str(args.labels)
    write_candidate(args.write_policy, candidate, report)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"calibrate: report {args.report}", file=sys.stderr)
    print(format_review_summary(report))
    print(
        f"calibrate: candidate policy {args.write_policy} (version {candidate.version}); "
        "try it with MODWORKER_SHADOW__POLICY_FILE and MODWORKER_SHADOW__SAMPLE",
        file=sys.stderr,
    )
    return 0


def propose_thresholds(policy: Policy, reviewed: Sequence[Any], *, min_support: int) -> dict[str, Any]:
    """Per category, the threshold on the machine's scores that maximises F1 against the
    reviewers' categories (``eval_metrics.f1_max_threshold``, as ``modworker train`` picks
    its thresholds, rounded down to 4 decimals), and what it would change.

    ``reviewed``: ``LabelledReview`` records. A category is moved only when it has at least
    ``min_support`` reviewed positives and its base action is not ``allow`` (an allow rule
    never decides). Measured per category, under the current policy and under the
    candidate (``Policy.decide`` with each input's tenant and source, so overrides apply):
    precision, recall and F1 of "the category is a violation", and over all inputs the
    human workload (share whose action is ``review``) and the agreement of the policy's
    action with the reviewer's. The numbers are on the reviewed inputs only: inputs that
    were sent to review, which is no random sample unless the platform reviews one.
    """
    import numpy as np

    from worker.offline.eval_metrics import f1_max_threshold
    from worker.offline.evaluate import canonical_score

    document = policy.document()
    rules, default = document.get("categories", {}), document.get("default", {"threshold": 0.5, "action": "flag"})
    truth_sets = [frozenset(policy.canonical(c) for c in r.categories) for r in reviewed]
    current = [policy.decide(r.scores, tenant=r.tenant, source=r.source) for r in reviewed]
    named = sorted({c for t in truth_sets for c in t} | {v.category for d in current for v in d.violations})
    proposed: dict[str, float] = {}
    notes: dict[str, str] = {}
    for category in named:
        truth = np.array([category in t for t in truth_sets], dtype=bool)
        rule = rules.get(category, default)
        if int(truth.sum()) < min_support:
            notes[category] = f"kept: {int(truth.sum())} reviewed positives, fewer than --min-support {min_support}"
            continue
        if rule["action"] == "allow":
            notes[category] = "kept: its action is allow (monitored only)"
            continue
        scores = np.array([canonical_score(policy, r.scores, category) for r in reviewed], dtype=np.float64)
        threshold, _ = f1_max_threshold(truth, scores)
        threshold = float(int(threshold * 10_000) / 10_000)  # still admits the score it was chosen at
        if threshold != rule["threshold"]:
            proposed[category] = threshold
    candidate = candidate_policy(policy, proposed)
    after = [candidate.decide(r.scores, tenant=r.tenant, source=r.source) for r in reviewed]

    def hits(decisions: Sequence[Any], category: str) -> np.ndarray:
        return np.array([any(v.category == category for v in d.violations) for d in decisions], dtype=bool)

    categories: dict[str, Any] = {}
    for category in named:
        truth = np.array([category in t for t in truth_sets], dtype=bool)
        now, then = prf(truth, hits(current, category)), prf(truth, hits(after, category))
        categories[category] = {
            "support": int(truth.sum()),
            "threshold": {
                "current": rules.get(category, default)["threshold"],
                "candidate": proposed.get(category, rules.get(category, default)["threshold"]),
            },
            "current": now,
            "candidate": then,
            "change": {k: round(then[k] - now[k], 4) for k in now},
            "note": notes.get(category, "moved" if category in proposed else "kept: already F1-max"),
        }

    def share(values: Sequence[bool]) -> float:
        return round(sum(values) / len(values), 4) if values else 0.0

    workload = {
        "current": share([d.action == "review" for d in current]),
        "candidate": share([d.action == "review" for d in after]),
    }
    agreement = {
        "current": share([d.action == r.human_action for d, r in zip(current, reviewed, strict=True)]),
        "candidate": share([d.action == r.human_action for d, r in zip(after, reviewed, strict=True)]),
    }
    return {
        "reviewed": len(reviewed),
        "with_text": sum(r.text is not None for r in reviewed),
        "machine_policy_versions": dict(sorted(Counter(r.policy_version for r in reviewed).items())),
        "current_policy_version": policy.version,
        "candidate_policy_version": candidate.version,
        "min_support": min_support,
        "proposed": proposed,
        "categories": categories,
        "workload": {**workload, "change": round(workload["candidate"] - workload["current"], 4)},
        "action_agreement": {**agreement, "change": round(agreement["candidate"] - agreement["current"], 4)},
    }


def candidate_policy(policy: Policy, thresholds: Mapping[str, float]) -> Policy:
    """``policy`` with these base thresholds (a category it does not name gets a rule with
    the default action); overrides, aliases, cascade bands and the dsa section are kept.
    Its version is the new content's hash, so it differs whenever a threshold moved."""
    from worker.pipeline.policy import Policy

    document = policy.document()
    rules = document.setdefault("categories", {})
    default_action = document.get("default", {}).get("action", "flag")
    for category, threshold in thresholds.items():
        rules[category] = {**rules.get(category, {"action": default_action}), "threshold": threshold}
    return Policy.from_mapping(document)


def write_candidate(path: Path, candidate: Policy, report: dict[str, Any]) -> None:
    """The candidate as a policy file ``Policy.load`` (and so the shadow) reads."""
    import yaml

    moved = ", ".join(
        f"{c} {report['categories'][c]['threshold']['current']:g} -> {t:g}" for c, t in report["proposed"].items()
    )
    header = (
        f"# Candidate policy written by 'modworker calibrate --labels' from {report['reviewed']} reviewed inputs:\n"
        f"# version {candidate.version}, from {report['current_policy_version']}; thresholds moved: {moved or 'none'}.\n"
        f"# Human workload (sent to review) {report['workload']['current']:.1%} -> "
        f"{report['workload']['candidate']:.1%} on the reviewed inputs.\n"
        "# Shadow it first: MODWORKER_SHADOW__POLICY_FILE=<this file> MODWORKER_SHADOW__SAMPLE=0.1\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(candidate.document(), sort_keys=False), encoding="utf-8")


def format_review_summary(report: dict[str, Any]) -> str:
    workload, agreement = report["workload"], report["action_agreement"]
    lines = [
        f"{report['reviewed']} reviewed inputs; policy {report['current_policy_version']} -> candidate "
        f"{report['candidate_policy_version']}: human workload (sent to review) {workload['current']:.1%} -> "
        f"{workload['candidate']:.1%}, action agrees with the reviewer {agreement['current']:.1%} -> "
        f"{agreement['candidate']:.1%}",
        "| category | support | threshold | precision | recall | F1 | note |",
        "|---|---:|---|---|---|---|---|",
    ]
    for c, e in report["categories"].items():
        now, then = e["current"], e["candidate"]
        lines.append(
            f"| {c} | {e['support']} | {e['threshold']['current']:g} -> {e['threshold']['candidate']:g} | "
            f"{now['precision']:.3f} -> {then['precision']:.3f} | {now['recall']:.3f} -> {then['recall']:.3f} | "
            f"{now['f1']:.3f} -> {then['f1']:.3f} | {e['note']} |"
        )
    return "\n".join(lines)


# -- outputs ----------------------------------------------------------------------------


def write_policy(path: Path, policy: Policy, report: dict[str, Any]) -> None:
    import yaml

    test = report["test"]
    header = (
        f"# Policy with cascade bands chosen by 'modworker calibrate' (first {report['first']}, then "
        f"{report['then']}),\n# at most {report['max_f1_loss']} F1 lost ({report['objective']}) against the second "
        f"stage alone. On the test part:\n# {test['escalated_fraction']:.1%} escalated, macro-F1 "
        f"{test['macro_f1']['cascade']:.4f} vs {test['macro_f1']['then']:.4f}. Use it with MODWORKER_POLICY_FILE.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(policy.document(), sort_keys=False), encoding="utf-8")


def plot_curve(path: Path, report: dict[str, Any]) -> Path:
    """Escalated fraction against macro-F1 for uniform bands, with the calibrated point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    test = report["test"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(
        [p["escalated_fraction"] for p in curve], [p["macro_f1"] for p in curve], "o-", label="uniform band (width)"
    )
    for p in curve:
        ax.annotate(
            f"{p['band']:g}",
            (p["escalated_fraction"], p["macro_f1"]),
            fontsize=7,
            xytext=(3, -9),
            textcoords="offset points",
        )
    ax.axhline(test["macro_f1"]["then"], color="grey", ls="--", label=f"{report['then']} alone")
    ax.axhline(test["macro_f1"]["first"], color="grey", ls=":", label=f"{report['first']} alone")
    frontier = report.get("frontier") or []
    if frontier:
        ax.plot(
            [p["escalated_fraction"] for p in frontier],
            [p["macro_f1"] for p in frontier],
            "s-",
            color="tab:green",
            label="bands calibrated for a macro-F1 budget",
        )
        for p in frontier:
            ax.annotate(
                f"{p['max_macro_f1_loss']:g}",
                (p["escalated_fraction"], p["macro_f1"]),
                fontsize=7,
                xytext=(-12, 4),
                textcoords="offset points",
                color="tab:green",
            )
    ax.plot([test["escalated_fraction"]], [test["macro_f1"]["cascade"]], "r*", ms=12, label="calibrated bands")
    ax.set_xlabel("fraction of inputs escalated to the second stage")
    ax.set_ylabel("macro-F1 (test part)")
    ax.set_title(f"Cascade {report['first']} -> {report['then']}: escalation against quality", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_summary(report: dict[str, Any]) -> str:
    test = report["test"]
    lines = [
        f"cascade {report['first']} -> {report['then']} on {test['inputs']} test inputs: "
        f"{test['escalated_fraction']:.1%} escalated, calls saved {test['calls_saved_fraction']:.1%} "
        f"({test['calls_saved_fraction_pooled']:.1%} pooled), "
        f"tokens saved {test['tokens_saved_fraction']:.1%}; macro-F1 cascade {test['macro_f1']['cascade']:.4f}, "
        f"{report['then']} alone {test['macro_f1']['then']:.4f}, {report['first']} alone {test['macro_f1']['first']:.4f}",
        "| category | support | band (below, above) | F1 first | F1 then | F1 cascade | loss |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for c, e in test["categories"].items():
        band = report["bands"].get(c, [report["default_band"]] * 2)
        lines.append(
            f"| {c} | {e['support']} | {band[0]:.2f}, {band[1]:.2f} | {e['first']['f1']:.4f} | {e['then']['f1']:.4f} "
            f"| {e['cascade']['f1']:.4f} | {e['f1_loss']:+.4f} |"
        )
    return "\n".join(lines)
