"""``modworker train --fine-tune``: train the encoder end to end with a multi-label head.

The frozen-embedding head (``modworker train`` without ``--fine-tune``) reads a fixed
sentence embedding; here the encoder's weights move too, so it can learn intent ("kill a
process" against "kill you") rather than topic. What it does, in order:

1. Reads labelled JSONL (texts and conversations, ``worker.offline.labelled``).
2. Holds out a split it never fits or tunes on: the texts exactly as the frozen head's
   ``modworker train`` splits them (``stratified_split`` on source and label set, same
   seed, copies of a text on one side), and each conversation on the side its user turn
   is on when that prompt is one of the texts, else by a hash of the prompt, so that the
   replies to one prompt are all on one side and never beside their own prompt.
3. Splits a tuning part (``--tune-fraction`` of the training part, stratified the same
   way) off the rest: the epoch kept, the calibration and the thresholds are chosen on it.
4. Adds the template examples of ``worker.offline.hard_examples`` (safe look-alikes and
   short threats) to the fitting part only (``--no-hard-examples`` leaves them out).
5. Tokenises once (cached in memory for every epoch; ``--embedding-cache DIR`` keeps the
   ids on disk), with conversations as the pair (context, reply) exactly as the local
   backend builds them with ``MODWORKER_LOCAL__CONTEXT_TURNS`` (``--context-turns``).
6. Fine-tunes: mean-pooled encoder output, dropout, one linear layer, binary
   cross-entropy per category with positive weights ``min(sqrt(neg/pos), --pos-weight-cap)``
   (the rare categories count more), AdamW with linear warm-up and decay, batches of
   similar length (dynamic padding; batch order shuffled every epoch), the word embeddings
   frozen (a third of the weights, and the slowest part of the update on CPU). A
   progress bar shows the ETA.
7. After each epoch, scores the tuning part and keeps the epoch with the best mean AUPRC.
8. Calibrates per category on the tuning part (Platt scaling: a logistic regression on
   the logit) and folds it into the linear layer, so the stored head is plain
   ``sigmoid(w . pooled + b)``; picks each threshold as the F1-max on the calibrated
   tuning scores.
9. Writes an embedding-head directory (``worker.backends.embedding_head``) whose encoder
   is the fine-tuned one in ``encoder/`` (safetensors in float16: about half the size;
   the local backend loads it as float32 on CPU), plus ``thresholds.json``,
   ``policy.yaml``, ``split.json``, ``training.json`` (what was fitted, on what, how long
   each epoch took, the tuning part's scores per epoch) and ``MODEL_CARD.md``.

Fits 2 CPU cores: about 12k texts, 3 epochs, at most 128 tokens each, in well under an
hour (``training.json`` records the time); on a GPU the same command runs with
``MODWORKER_LOCAL__DEVICE=cuda``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.offline.labelled import Example, text_key

if TYPE_CHECKING:
    import numpy as np
    import torch

    from worker.backends.local_model import Features, LocalModel

ENCODER_DIR = "encoder"
TRAINING_RECORD = "training.json"


@dataclass(frozen=True)
class FineTuneSettings:
    """How ``modworker train --fine-tune`` trains (its command-line options)."""

    epochs: int = 3
    learning_rate: float = 5e-5
    head_learning_rate: float = 2e-3
    batch_size: int = 32
    max_length: int = 128
    """Tokens per training input (the served model reads up to ``serve_max_length``)."""
    serve_max_length: int = 256
    warmup: float = 0.06
    weight_decay: float = 0.01
    dropout: float = 0.1
    pos_weight_cap: float = 10.0
    tune_fraction: float = 0.15
    context_turns: int = 1
    hard_examples: bool = True
    freeze_word_embeddings: bool = True
    seed: int = 0
    """Training randomness (head initialisation, dropout, batch order); ``--seed`` sets the split."""


MIN_LABELLED_TUNING = 10
"""Tuning positives below which a category's threshold is chosen without its labels (see ``pick_thresholds``)."""


@dataclass
class Split:
    """Indices into the examples: fitted on, tuned on (epoch, calibration, thresholds), held out."""

    fit: list[int]
    tune: list[int]
    held_out: list[int]
    held_out_keys: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``--fine-tune`` adds to ``modworker train``."""
    group = parser.add_argument_group("fine-tuning (--fine-tune)")
    defaults = FineTuneSettings()
    group.add_argument(
        "--fine-tune", action="store_true", help="train the encoder end to end (default: a head on frozen embeddings)"
    )
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="encoder learning rate")
    group.add_argument("--head-learning-rate", type=float, default=defaults.head_learning_rate)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per training input")
    group.add_argument("--pos-weight-cap", type=float, default=defaults.pos_weight_cap)
    group.add_argument("--tune-fraction", type=float, default=defaults.tune_fraction)
    group.add_argument(
        "--context-turns", type=int, default=defaults.context_turns, help="turns of context given with a reply"
    )
    group.add_argument("--no-hard-examples", action="store_true", help="leave out the template examples")
    group.add_argument(
        "--init-seed", type=int, default=defaults.seed, help="training randomness (the split follows --seed)"
    )


def settings_from(args: argparse.Namespace) -> FineTuneSettings:
    from worker.cli import CommandError

    settings = FineTuneSettings(
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        head_learning_rate=args.head_learning_rate,
        batch_size=args.batch_size,
        max_length=args.max_length,
        pos_weight_cap=args.pos_weight_cap,
        tune_fraction=args.tune_fraction,
        context_turns=args.context_turns,
        hard_examples=not args.no_hard_examples,
        seed=args.init_seed,
    )
    for name, value, ok in (
        ("--epochs", settings.epochs, settings.epochs >= 1),
        ("--batch-size", settings.batch_size, settings.batch_size >= 1),
        ("--max-length", settings.max_length, 8 <= settings.max_length <= 512),
        ("--tune-fraction", settings.tune_fraction, 0 < settings.tune_fraction < 1),
        ("--context-turns", settings.context_turns, settings.context_turns >= 0),
        ("--learning-rate", settings.learning_rate, settings.learning_rate > 0),
    ):
        if not ok:
            raise CommandError(f"{name} {value} is out of range")
    return settings


# -- the split -----------------------------------------------------------------------------


def prompt_of(example: Example) -> str | None:
    """The user turn a conversation's reply answers (the last user turn of its context)."""
    users = [t.content for t in example.context if t.role == "user"]
    return users[-1] if users else None


def group_of(example: Example) -> str:
    """What must stay on one side of a split: a text with the replies to it as a prompt."""
    prompt = prompt_of(example)
    return text_key(prompt) if prompt is not None else example.key


def split_examples(examples: Sequence[Example], validation: float, tune_fraction: float, seed: int) -> Split:
    """Held-out, tuning and fitting indices (see the module docstring, steps 2 and 3)."""
    from worker.offline.train import stratified_split

    texts = [i for i, e in enumerate(examples) if e.kind != "conversation"]
    conversations = [i for i, e in enumerate(examples) if e.kind == "conversation"]
    text_train_local, text_held_local = stratified_split([examples[i] for i in texts], validation, seed)
    text_train = [texts[i] for i in text_train_local]
    text_held = [texts[i] for i in text_held_local]
    held_keys = {examples[i].key for i in text_held}
    known = {examples[i].key for i in texts}
    conv_train: list[int] = []
    conv_held: list[int] = []
    for i in conversations:
        prompt = prompt_of(examples[i]) or examples[i].text
        key = text_key(prompt)
        if key in known:
            held = key in held_keys
        else:
            held = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < validation
        (conv_held if held else conv_train).append(i)
    train = text_train + conv_train
    grouped = [examples[i] for i in train]
    # The tuning part is grouped by prompt too: a prompt's text and its replies go together.
    _, tune_local = stratified_split(grouped, tune_fraction, seed + 1)
    tune_groups = {group_of(grouped[i]) for i in tune_local}
    fit: list[int] = []
    tune: list[int] = []
    for i in train:
        (tune if group_of(examples[i]) in tune_groups else fit).append(i)
    held_out = text_held + conv_held
    return Split(fit, tune, held_out, sorted({examples[i].key for i in held_out}))


# -- features ------------------------------------------------------------------------------


def context_of(example: Example, turns: int) -> str | None:
    """The context string the local backend gives the model for this example (same format)."""
    from worker.backends.base import Conversation
    from worker.backends.local import conversation_context

    if example.kind != "conversation" or not example.context:
        return None
    from schemas import Turn

    return conversation_context(Conversation(Turn(role="assistant", content=example.text), example.context), turns)


def tokenize_all(
    tokenizer_model: LocalModel, examples: Sequence[Example], turns: int, cache: Path | None
) -> list[Features]:
    """Token ids of every example, as the local backend would build them; cached on disk if asked."""
    from worker.backends.local_model import Features

    contexts = [context_of(e, turns) for e in examples]
    path = None
    if cache is not None:
        digest = hashlib.sha256(f"{tokenizer_model.model_id}|{tokenizer_model.max_length}|{turns}".encode())
        for e, c in zip(examples, contexts, strict=True):
            digest.update(hashlib.sha256(f"{c or ''}\x00{e.text}".encode()).digest())
        path = cache / f"tokens-{digest.hexdigest()[:20]}.json"
        if path.is_file():
            print(f"train: token ids from {path}", file=sys.stderr)
            rows = json.loads(path.read_text(encoding="utf-8"))
            return [Features(ids, types) for ids, types in rows]
    features = tokenizer_model.tokenize([e.text for e in examples], contexts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([[f.input_ids, f.token_type_ids] for f in features]), encoding="utf-8")
    return features


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length (little padding), in a shuffled order.

    Inputs are sorted by length with a random tie-break, cut into batches of ``batch_size``,
    and the batches shuffled: every epoch sees different neighbours and a random order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


# -- the model -----------------------------------------------------------------------------


def build_classifier(encoder: Any, labels: int, dropout: float) -> Any:
    """The encoder, mean pooling, dropout and a linear layer: the module that is trained."""
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.dropout = torch.nn.Dropout(dropout)
            self.head = torch.nn.Linear(int(encoder.config.hidden_size), labels)

        def pooled(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            hidden = self.encoder(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.head(self.dropout(self.pooled(inputs)))

    return Classifier()


def positive_weights(targets: np.ndarray, cap: float) -> np.ndarray:
    """Per label ``min(sqrt(negatives / positives), cap)``, at least 1."""
    import numpy as np

    positives = targets.sum(axis=0).astype(np.float64)
    negatives = len(targets) - positives
    ratio = np.sqrt(negatives / np.maximum(positives, 1.0))
    return np.clip(ratio, 1.0, cap).astype(np.float32)


def logits_of(model: Any, padder: LocalModel, features: Sequence[Features]) -> np.ndarray:
    """The model's logits for ``features`` in order (eval mode, no gradients)."""
    import numpy as np
    import torch

    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i].input_ids))
    out = np.zeros((len(features), model.head.out_features), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            logits = model(padder._pad([features[i] for i in batch])).float().cpu().numpy()
            out[batch] = logits
    return out


def mean_auprc(targets: np.ndarray, logits: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    values = [
        float(average_precision_score(targets[:, j], logits[:, j]))
        for j in range(targets.shape[1])
        if 0 < targets[:, j].sum() < len(targets)
    ]
    return sum(values) / len(values) if values else 0.0


def platt(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per label ``(scale, shift)`` so that ``sigmoid(scale * logit + shift)`` is calibrated."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    scales = np.ones(targets.shape[1], dtype=np.float32)
    shifts = np.zeros(targets.shape[1], dtype=np.float32)
    for j in range(targets.shape[1]):
        y = targets[:, j]
        if 0 < y.sum() < len(y):
            fit = LogisticRegression(C=1e4, max_iter=1000).fit(logits[:, j : j + 1], y)
            scales[j] = float(fit.coef_[0, 0])
            shifts[j] = float(fit.intercept_[0])
    return scales, shifts


def train_classifier(
    model: Any,
    padder: LocalModel,
    features: Sequence[Features],
    targets: np.ndarray,
    fit_idx: Sequence[int],
    tune_idx: Sequence[int],
    settings: FineTuneSettings,
) -> tuple[Any, list[dict[str, Any]]]:
    """Fine-tune ``model`` on ``fit_idx``; returns the best epoch's model (by tuning AUPRC) and a log."""
    import numpy as np
    import torch
    from tqdm import tqdm

    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    if settings.freeze_word_embeddings:
        model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in head_ids:
            continue
        (no_decay if "bias" in name or "LayerNorm" in name or "norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "lr": settings.learning_rate, "weight_decay": settings.weight_decay},
            {"params": no_decay, "lr": settings.learning_rate, "weight_decay": 0.0},
            {"params": head_params, "lr": settings.head_learning_rate, "weight_decay": 0.0},
        ]
    )
    lengths = [len(features[i].input_ids) for i in fit_idx]
    steps_per_epoch = math.ceil(len(fit_idx) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(total * settings.warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.from_numpy(positive_weights(targets[list(fit_idx)], settings.pos_weight_cap))
    )
    y_all = torch.from_numpy(targets.astype(np.float32))
    best_state: dict[str, torch.Tensor] | None = None
    best_score = -1.0
    log: list[dict[str, Any]] = []
    tune_y = targets[list(tune_idx)]
    with tqdm(total=total, desc="fine-tuning", unit="batch", disable=None, file=sys.stderr) as bar:
        for epoch in range(1, settings.epochs + 1):
            model.train()
            started = time.monotonic()
            running = 0.0
            for step, batch_local in enumerate(length_batches(lengths, settings.batch_size, rng), start=1):
                batch = [fit_idx[i] for i in batch_local]
                logits = model(padder._pad([features[i] for i in batch]))
                loss = loss_fn(logits, y_all[batch])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                running += float(loss.detach())
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{running / step:.4f}")
            seconds = time.monotonic() - started
            tune_logits = logits_of(model, padder, [features[i] for i in tune_idx])
            score = mean_auprc(tune_y, tune_logits)
            log.append(
                {
                    "epoch": epoch,
                    "seconds": round(seconds, 1),
                    "train_loss": round(running / steps_per_epoch, 5),
                    "tune_mean_auprc": round(score, 4),
                }
            )
            print(f"train: epoch {epoch}: {seconds:.0f} s, tuning mean AUPRC {score:.4f}", file=sys.stderr)
            if score > best_score:
                best_score = score
                best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, log


def expected_f1_threshold(scores: np.ndarray) -> float:
    """The threshold that maximises F1 expected from calibrated ``scores`` alone (no labels).

    Sorted high to low, flagging the top ``k`` is expected to hit ``sum(top k scores)``
    positives of ``sum(all scores)``: expected F1 ``2 * hits / (k + total)``. The plug-in
    rule of Lipton et al. (2014), "Thresholding classifiers to maximize F1 score".
    """
    import numpy as np

    ordered = np.sort(scores)[::-1]
    if not ordered.size or ordered.sum() <= 0:
        return 1.0
    hits = np.cumsum(ordered)
    f1 = 2 * hits / (np.arange(1, ordered.size + 1) + ordered.sum())
    return float(ordered[int(np.argmax(f1))])


def pick_thresholds(
    y: np.ndarray, calibrated: np.ndarray, labels: Sequence[str]
) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, str]]:
    """(thresholds, tuning metrics at them, the rule each came from).

    Per category the F1-max threshold on the tuning part's labels, except where the tuning
    part holds fewer than ``MIN_LABELLED_TUNING`` positives: an F1-max over 3 positives is
    set by one or two texts, so there the threshold is the expected-F1 maximum of the
    calibrated scores of the whole tuning part (``expected_f1_threshold``).
    """
    from worker.offline.eval_metrics import category_metrics, reliability
    from worker.offline.train import choose_thresholds

    thresholds, metrics = choose_thresholds(y, calibrated, labels)
    rules = dict.fromkeys(labels, "F1-max on the tuning part")
    for j, label in enumerate(labels):
        support = int(y[:, j].sum())
        if support >= MIN_LABELLED_TUNING:
            continue
        thresholds[label] = float(int(expected_f1_threshold(calibrated[:, j]) * 10_000) / 10_000)
        hits = calibrated[:, j] >= thresholds[label]
        metrics[label] = category_metrics(y[:, j], calibrated[:, j], hits, target_precision=0.9)
        metrics[label]["calibration"] = reliability(y[:, j], calibrated[:, j])
        rules[label] = f"expected F1 of the calibrated scores ({support} tuning positives)"
    return thresholds, metrics, rules


# -- writing -------------------------------------------------------------------------------


def write_fine_tuned(
    out: Path,
    model: Any,
    tokenizer: Any,
    labels: Sequence[str],
    scales: np.ndarray,
    shifts: np.ndarray,
    *,
    model_id: str,
    serve_max_length: int,
    context_turns: int,
) -> int:
    """The head directory: ``encoder/`` (float16 safetensors), the calibrated head; returns bytes written."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from worker.backends.embedding_head import HEAD_WEIGHTS, HeadConfig

    encoder_dir = out / ENCODER_DIR
    encoder_dir.mkdir(parents=True, exist_ok=True)
    for stale in encoder_dir.glob("*"):
        stale.unlink()
    half = copy.deepcopy(model.encoder).half()
    half.save_pretrained(encoder_dir, safe_serialization=True)
    tokenizer.save_pretrained(encoder_dir)
    weight = model.head.weight.detach().float().numpy()
    bias = model.head.bias.detach().float().numpy()
    tensors = {
        "weight": torch.from_numpy((weight * scales[:, None]).astype(np.float32)).contiguous(),
        "bias": torch.from_numpy((bias * scales + shifts).astype(np.float32)).contiguous(),
    }
    save_file(tensors, str(out / HEAD_WEIGHTS))
    HeadConfig(
        model_id=model_id,
        encoder=ENCODER_DIR,
        labels=list(labels),
        pooling="mean",
        normalize=False,
        max_length=serve_max_length,
        context_turns=context_turns,
    ).write(out)
    return sum(p.stat().st_size for p in encoder_dir.iterdir()) + (out / HEAD_WEIGHTS).stat().st_size


# -- the command ---------------------------------------------------------------------------


def cmd_fine_tune(args: argparse.Namespace) -> int:
    """``modworker train --fine-tune``: see the module docstring."""
    import numpy as np
    import torch
    from transformers import AutoModel

    from worker.backends.local_model import LocalModel, LocalModelError, load_encoder
    from worker.cli import CommandError
    from worker.offline import hard_examples
    from worker.offline.labelled import LabelledDataError, read_labelled
    from worker.offline.train import label_matrix, policy_yaml, tool_settings

    started = time.monotonic()
    settings = settings_from(args)
    tools = tool_settings(args.config)
    if tools.local.threads:
        torch.set_num_threads(tools.local.threads)
    try:
        data = read_labelled(args.data, limit=args.limit)
    except LabelledDataError as err:
        raise CommandError(str(err)) from None
    examples = list(data.examples)
    split = split_examples(examples, args.validation, settings.tune_fraction, args.seed)
    generated: list[Example] = []
    dropped_copies = 0
    if settings.hard_examples:
        generated, dropped_copies = hard_examples.generate(
            args.seed, exclude=[e.text for e in examples] + [p for e in examples if (p := prompt_of(e))]
        )
    counts = Counter(label for i in split.fit + split.tune for label in examples[i].labels)
    labels = sorted(label for label, n in counts.items() if n >= args.min_support)
    if not labels:
        raise CommandError(f"no category has {args.min_support} positive records in the training part")
    all_examples = examples + generated
    fit_idx = split.fit + list(range(len(examples), len(all_examples)))
    print(
        f"train: fine-tuning on {len(split.fit)} records + {len(generated)} template examples, "
        f"tuning on {len(split.tune)}, {len(split.held_out)} held out; categories {', '.join(labels)}",
        file=sys.stderr,
    )
    try:
        encoder_model = load_encoder(args.encoder, tools.local)
    except LocalModelError as err:
        raise CommandError(str(err)) from None
    source_dir = encoder_model.encoder.source.location
    tokenizer = encoder_model.tokenizer
    padder = LocalModel(tokenizer, torch.device("cpu"), torch.float32, settings.max_length)
    padder.model_id = encoder_model.model_id
    features = tokenize_all(padder, all_examples, settings.context_turns, args.embedding_cache)
    targets = label_matrix(all_examples, labels)
    encoder = AutoModel.from_pretrained(source_dir, local_files_only=True, dtype=torch.float32)
    model = build_classifier(encoder, len(labels), settings.dropout)
    device = encoder_model.device
    if device.type != "cpu":
        model.to(device)
        padder.device = device
    fit_started = time.monotonic()
    model, epochs = train_classifier(model, padder, features, targets, fit_idx, split.tune, settings)
    fit_seconds = time.monotonic() - fit_started
    model.to("cpu")
    padder.device = torch.device("cpu")
    tune_logits = logits_of(model, padder, [features[i] for i in split.tune])
    tune_y = targets[split.tune]
    scales, shifts = platt(tune_logits, tune_y)
    calibrated = 1.0 / (1.0 + np.exp(-(tune_logits * scales + shifts)))
    thresholds, tuning_metrics, threshold_rules = pick_thresholds(tune_y, calibrated, labels)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_id = args.model_id or f"{out.resolve().name}-{Path(args.encoder).name}-fine-tuned"
    size = write_fine_tuned(
        out,
        model,
        tokenizer,
        labels,
        scales,
        shifts,
        model_id=model_id,
        serve_max_length=settings.serve_max_length,
        context_turns=settings.context_turns,
    )
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n", encoding="utf-8")
    (out / "policy.yaml").write_text(policy_yaml(thresholds, model_id), encoding="utf-8")
    (out / "split.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "validation_fraction": args.validation,
                "stratified_on": "source and label set; conversations on their prompt's side",
                "validation_keys": split.held_out_keys,
            }
        )
        + "\n",
        encoding="utf-8",
    )
    shares = Counter(e.source for e in generated)
    record = {
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "encoder": args.encoder,
        "data": [str(p) for p in args.data],
        "records": {"fit": len(split.fit), "tune": len(split.tune), "held_out": len(split.held_out)},
        "template_examples": {
            "total": len(generated),
            "by_group": dict(sorted(shares.items())),
            "dropped_as_copies_of_data": dropped_copies,
        },
        "labels": labels,
        "positives_in_training_part": {label: counts[label] for label in labels},
        "epochs": epochs,
        "fit_seconds": round(fit_seconds, 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "size_bytes": size,
        "thresholds": thresholds,
        "threshold_rules": threshold_rules,
        "calibration": {
            label: [round(float(a), 4), round(float(b), 4)] for label, a, b in zip(labels, scales, shifts, strict=True)
        },
        "tuning_part": {
            label: {k: tuning_metrics[label][k] for k in ("support", "precision", "recall", "f1", "auprc")}
            | {"ece": tuning_metrics[label]["calibration"]["ece"]}
            for label in labels
        },
        "skipped": dict(data.skipped),
    }
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not args.no_baseline:
        texts_only = [i for i, e in enumerate(examples) if e.kind != "conversation"]
        baseline = text_baseline([examples[i] for i in texts_only], labels, args.validation, settings.seed, model_id)
        (out / "baseline.json").write_text(json.dumps(baseline, indent=2) + "\n", encoding="utf-8")
    (out / "MODEL_CARD.md").write_text(model_card(record, model_id, args), encoding="utf-8")
    print(
        f"train: wrote {out} (model id {model_id}, {size / 1e6:.1f} MB) in {record['wall_seconds'] / 60:.1f} min "
        f"(fine-tuning {fit_seconds / 60:.1f} min)",
        file=sys.stderr,
    )
    for label in labels:
        m = record["tuning_part"][label]
        print(
            f"  {label:32s} support={m['support']:5d} P={m['precision']:.3f} R={m['recall']:.3f} F1={m['f1']:.3f} "
            f"AUPRC={m['auprc']:.3f} ECE={m['ece']:.3f} threshold={thresholds[label]:.3f}",
            file=sys.stderr,
        )
    return 0


def text_baseline(
    texts: Sequence[Example], labels: Sequence[str], validation: float, seed: int, model_id: str
) -> dict[str, Any]:
    """The word TF-IDF baseline on the texts alone, split as the frozen head's ``train`` splits them.

    Texts only, so that it stays the same baseline the frozen head was compared with.
    """
    from worker.offline.head_fit import grouped_folds
    from worker.offline.train import baseline_report, label_matrix, stratified_split, stratum

    train_idx, val_idx = stratified_split(texts, validation, seed)
    folds = grouped_folds([texts[i].key for i in train_idx], [stratum(texts[i]) for i in train_idx], 5, seed)
    thresholds = dict.fromkeys(labels, 0.5)
    return baseline_report(texts, label_matrix(texts, labels), labels, train_idx, val_idx, folds, thresholds, model_id)


def model_card(record: dict[str, Any], model_id: str, args: argparse.Namespace) -> str:
    """MODEL_CARD.md of a fine-tuned model: how it was made; ``modworker eval --card`` adds the results."""
    from worker.offline.train import CARD_EVAL_END, CARD_EVAL_START

    s = record["settings"]
    groups = ", ".join(
        f"{name.removeprefix('templates:')} {n}" for name, n in record["template_examples"]["by_group"].items()
    )
    epochs = "; ".join(
        f"epoch {e['epoch']}: {e['seconds']:.0f} s, loss {e['train_loss']:.4f}, tuning AUPRC {e['tune_mean_auprc']:.3f}"
        for e in record["epochs"]
    )
    rows = [
        f"| {label} | {m['support']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['auprc']:.3f} | "
        f"{m['ece']:.3f} | {record['thresholds'][label]:.3f} |"
        for label, m in record["tuning_part"].items()
    ]
    command = " ".join(["modworker", "train", "--fine-tune", *map(str, args.data), "--out", str(args.out)])
    return "\n".join(
        [
            f"# Model card: {model_id}",
            "",
            "A multi-label moderation classifier: the sentence encoder all-MiniLM-L6-v2 (6 layers, 384 wide, "
            "22.7M parameters), fine-tuned end to end with a linear head on its mean-pooled output. Scores are "
            "independent per category (sigmoid), calibrated per category on a tuning part of the training data "
            "(Platt scaling, folded into the head).",
            "",
            "Use it with the local backend: `MODWORKER_BACKEND=local MODWORKER_LOCAL__MODEL=<this directory>` and "
            "`MODWORKER_POLICY_FILE=<this directory>/policy.yaml`.",
            "",
            "## How it was trained",
            "",
            "```",
            command,
            "```",
            "",
            f"- Written {record['written'][:10]} by `modworker train --fine-tune`: {record['wall_seconds'] / 60:.1f} "
            f"minutes wall, of which fine-tuning {record['fit_seconds'] / 60:.1f} ({record['cpu_cores']} CPU cores, "
            f"{record['torch_threads']} torch threads, device {record['device']}).",
            f"- Records: {record['records']['fit']} fitted on, {record['records']['tune']} tuning (epoch, calibration, "
            f"thresholds), {record['records']['held_out']} held out (`split.json`, never fitted or tuned on).",
            f"- Template examples (training only, `worker.offline.hard_examples`): {record['template_examples']['total']}"
            f" ({groups}); {record['template_examples']['dropped_as_copies_of_data']} dropped as copies of data texts.",
            f"- {s['epochs']} epochs, batch {s['batch_size']}, at most {s['max_length']} tokens (served: "
            f"{s['serve_max_length']}), learning rate {s['learning_rate']} (head {s['head_learning_rate']}), "
            f"positive weights capped at {s['pos_weight_cap']}, word embeddings frozen, conversations with "
            f"{s['context_turns']} turn(s) of context. {epochs}.",
            f"- Size: {record['size_bytes'] / 1e6:.1f} MB (encoder in float16 safetensors).",
            "",
            "## Tuning part (thresholds chosen here, so F1 is optimistic)",
            "",
            "| category | support | precision | recall | F1 | AUPRC | ECE | threshold |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "## Evaluation with `modworker eval`",
            "",
            CARD_EVAL_START,
            "(not run yet: `modworker eval DATA --backend local --holdout <this directory> --card <this directory>`)",
            CARD_EVAL_END,
            "",
        ]
    )
