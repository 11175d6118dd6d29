"""The ``local`` backend: a HuggingFace-format model run beside the worker (GPU or CPU).

``MODWORKER_BACKEND=local``; settings under ``MODWORKER_LOCAL__*`` (see
``worker.config.LocalSettings``); needs ``pip install 'moderation-worker[local]'``.

Contract, beyond ``worker.backends.base.Backend``:

- ``start()`` loads the model and runs one warm-up batch, both in the backend's executor;
  ``ready()`` is False until that is done. Loading errors raise ``LocalModelError`` from
  ``start()`` (a configuration problem: the worker should stop with the message).
- All tokenising and inference run in a single-thread executor owned by the backend,
  never on the event loop; calls from several coroutines are queued there one at a time
  (one model, one stream of forward passes). Each call's inputs are split into forward
  passes of at most ``max_tokens_per_batch`` padded tokens (unset: 1024 on CPU, 16384
  on CUDA; see ``default_token_budget``).
- Scores: one entry per model label, renamed through ``MODWORKER_LOCAL__LABELS``
  (model label -> category; an empty category drops the label; unmapped labels keep the
  model's name). When two labels map to one category the higher score is kept.
- Conversations: the judged turn (the last one) is what is scored, as a text. With
  ``context_turns = N > 0`` the N turns before it are joined (``role: content`` per line,
  oldest first) and given as the first segment of a sentence pair, the judged turn as
  the second; when the budget of ``max_length`` tokens is short, context is cut first
  and the judged turn is never displaced by it. Unset, N is what the model was trained
  with (``head.json``'s ``context_turns``: 1 for the starter, which was fine-tuned on
  replies with their user turn), else 0: the turn alone.
- ``Scored.model`` is the model id: the model's short name and a digest of its files.
- A failure while scoring (e.g. CUDA out of memory) raises ``BackendUnavailable``: it is
  not the input's fault, so nothing is dead-lettered for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar

from worker.backends.base import (
    Backend,
    BackendUnavailable,
    Conversation,
    Outcome,
    Scored,
)
from worker.config import Settings

if TYPE_CHECKING:
    import numpy as np

    from worker.backends.local_model import LocalModel

WARM_UP_TEXTS = ("warm-up", "a slightly longer warm-up text, so that the first real batch is not the slow one")


class LocalBackend(Backend):
    """Scores with a local model; see the module docstring for the contract."""

    name: ClassVar[str] = "local"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings.local
        self._model: LocalModel | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._columns: list[tuple[str, list[int]]] = []
        self._budget = settings.local.max_tokens_per_batch or 0

    @property
    def model_id(self) -> str:
        """The id recorded on verdicts. Only valid after ``start()``."""
        return self._loaded().model_id

    @property
    def model(self) -> LocalModel:
        """The loaded model (for tools such as ``modworker eval``). Only valid after ``start()``."""
        return self._loaded()

    async def start(self) -> None:
        if self._model is not None:
            return
        from worker.backends.local_model import LocalModelError, load_local_model

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-model")
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self._executor, load_local_model, self._settings)
        except LocalModelError:
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt file, an unforeseen format: still one line
            raise LocalModelError(
                f"MODWORKER_LOCAL__MODEL={self._settings.model}: cannot load the model "
                f"({type(err).__name__}: {err}); check the model files or choose another model"
            ) from None
        self._columns = category_columns(model.labels, self._settings.labels)
        self._budget = self._settings.max_tokens_per_batch or default_token_budget(model.device.type)
        self._model = model
        await self._infer(list(WARM_UP_TEXTS), None)

    async def close(self) -> None:
        self._model = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)

    async def ready(self) -> bool:
        return self._model is not None

    async def score_texts(self, texts: Sequence[str]) -> list[Outcome]:
        return self._outcomes(await self._infer(list(texts), None))

    async def score_conversations(self, conversations: Sequence[Conversation]) -> list[Outcome]:
        texts = [c.turn.content for c in conversations]
        turns = self._settings.context_turns
        if turns is None:
            turns = self._loaded().context_turns
        contexts = [conversation_context(c, turns) for c in conversations]
        return self._outcomes(await self._infer(texts, contexts if any(contexts) else None))

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One embedding per text (the encoder's pooled output), in order; off the event loop."""
        model = self._loaded()
        budget = self._budget

        def run() -> np.ndarray:
            return model.embed(model.tokenize(list(texts)), budget)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def _infer(self, texts: list[str], contexts: list[str | None] | None) -> np.ndarray:
        model = self._loaded()
        budget = self._budget

        def run() -> np.ndarray:
            return model.score(model.tokenize(texts, contexts), budget)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except (RuntimeError, MemoryError) as err:
            # torch reports CUDA OOM and device faults as RuntimeError subclasses.
            raise BackendUnavailable(
                f"local model {model.model_id} failed on a batch of {len(texts)} ({type(err).__name__}: {err}); "
                "lower MODWORKER_LOCAL__MAX_TOKENS_PER_BATCH if it ran out of memory"
            ) from err

    def _outcomes(self, probabilities: np.ndarray) -> list[Outcome]:
        model_id = self._loaded().model_id
        outcomes: list[Outcome] = []
        for row in probabilities.tolist():
            scores = {category: max(row[i] for i in columns) for category, columns in self._columns}
            outcomes.append(Scored(scores=scores, model=model_id))
        return outcomes

    def _loaded(self) -> LocalModel:
        if self._model is None:
            raise RuntimeError("LocalBackend used before start() or after close()")
        return self._model


def default_token_budget(device_type: str) -> int:
    """Padded tokens per forward pass when unset: small on CPU, where compute grows with
    padded tokens and padding is pure waste (1024 ran the starter ~2x faster than 8192 on
    mixed-length batches of 32-128 in worker/offline/bench/local_model.py); large on CUDA, where wide
    passes are what keeps the GPU busy."""
    return 16_384 if device_type == "cuda" else 1_024


def category_columns(labels: Sequence[str], mapping: dict[str, str]) -> list[tuple[str, list[int]]]:
    """Which score columns make each category: ``[(category, [column, ...]), ...]``.

    ``mapping`` renames model labels (an empty name drops the label); labels it does not
    name keep their own name. Order follows the model's labels.
    """
    columns: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        category = mapping.get(label, label)
        if category:
            columns.setdefault(category, []).append(index)
    return list(columns.items())


def conversation_context(conversation: Conversation, turns: int) -> str | None:
    """The last ``turns`` context turns as ``role: content`` lines, oldest first; None for none."""
    if turns <= 0 or not conversation.context:
        return None
    return "\n".join(f"{t.role}: {t.content}" for t in conversation.context[-turns:])
