"""On a CUDA machine: the local backend's texts/s against the same model's raw forward passes.

Not a test; needs a CUDA build of torch and the ``local`` extra. For each model
(``starter``: the bundled MiniLM head; ``bert-base-random``: a BERT-base-sized classifier
with random weights, see ``local_model.py`` beside this file) it measures, in one run:

- **raw**: the model's forward passes alone, under ``torch.inference_mode``, on the same
  texts already tokenised, sorted by length, cut into passes of the backend's token budget,
  padded and copied to the GPU before the clock starts; one synchronise at the end. This
  is the ceiling: no tokenising, no planning, no host-device copies, no Python per call.
- **backend**: ``LocalBackend.score_texts`` on calls of ``--batch`` texts, as the worker
  makes them (tokenising, planning, padding, copies, scores back to Python), one call
  after another.

and prints ``backend / raw`` (issue 14's target: at least 0.80). ``--json OUT`` writes it.

    python worker/offline/bench/gpu_local.py                        # both models, fp16
    python worker/offline/bench/gpu_local.py --model starter --batch 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# Run as a script, this folder would come first on sys.path and its profile.py would shadow
# the standard library's (torch imports cProfile, which imports profile).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from worker.offline.bench.local_model import load_texts, machine, save_bert_base_random


def raw_forward(model, texts: list[str], budget: int, seconds: float) -> float:
    """Texts/s of the bare forward passes (see the module docstring)."""
    import torch

    from worker.backends.token_batches import plan_token_batches

    features = model.tokenize(texts)
    plan = plan_token_batches([len(f.input_ids) for f in features], budget, model.pass_overhead)
    passes = [model._pad([features[i] for i in batch]) for batch in plan]
    forward = model._score_batch
    with torch.inference_mode():
        for inputs in passes:  # warm-up: every shape once (cuBLAS/cuDNN plans)
            forward(inputs)
        torch.cuda.synchronize()
        done, rounds, begin = 0, 0, time.perf_counter()
        while rounds < 2 or time.perf_counter() - begin < seconds:
            for inputs in passes:
                forward(inputs)
            torch.cuda.synchronize()
            done += len(texts)
            rounds += 1
        return done / (time.perf_counter() - begin)


async def backend_throughput(backend, texts: list[str], batch: int, seconds: float) -> float:
    calls = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)] or [texts]
    for call in calls:  # warm-up at these shapes
        await backend.score_texts(call)
    done, i, begin = 0, 0, time.perf_counter()
    while i < 2 * len(calls) or time.perf_counter() - begin < seconds:
        call = calls[i % len(calls)]
        await backend.score_texts(call)
        done += len(call)
        i += 1
    return done / (time.perf_counter() - begin)


async def measure(model_dir: str, name: str, dtype: str, texts: list[str], batch: int, seconds: float) -> dict:
    from worker.backends.local import LocalBackend
    from worker.config import load_settings

    settings = load_settings(
        None,
        require_backend=False,
        backend="local",
        kafka={"bootstrap_servers": "unused.invalid:9092"},
        local={"model": model_dir, "device": "cuda", "dtype": dtype},
    )
    backend = LocalBackend(settings)
    await backend.start()
    try:
        model = backend.model
        budget = backend._budget
        raw = raw_forward(model, texts, budget, seconds)
        served = await backend_throughput(backend, texts, batch, seconds)
    finally:
        await backend.close()
    row = {
        "model": name,
        "model_id": model.model_id,
        "dtype": str(model.dtype).removeprefix("torch."),
        "token_budget": budget,
        "call_batch": batch,
        "raw_texts_per_s": round(raw, 1),
        "backend_texts_per_s": round(served, 1),
        "backend_over_raw": round(served / raw, 3),
    }
    print(
        f"{name:>17} {row['dtype']}: raw {raw:10.1f} texts/s   backend {served:10.1f} texts/s   "
        f"ratio {row['backend_over_raw']:.3f} (target >= 0.80)",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["starter", "bert-base-random", "both"], default="both")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=512, help="texts per backend call (the worker's batch size)")
    parser.add_argument("--texts", type=int, default=4_096, help="distinct texts drawn from the data")
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum measuring time per figure")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (see worker/offline/bench/gpu.sh)", file=sys.stderr)
        return 2
    texts = load_texts(max(args.texts, args.batch))
    names = ["starter", "bert-base-random"] if args.model == "both" else [args.model]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model_dir = str(save_bert_base_random(Path(tmp))) if name == "bert-base-random" else "starter"
            rows.append(asyncio.run(measure(model_dir, name, args.dtype, texts, args.batch, args.seconds)))
    result = {"machine": machine(), "texts": len(texts), "rows": rows}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
