"""The forward-pass planner's effect on the starter's CPU cost: greedy vs least-cost, interleaved.

Not a test. One process, one thread, the same tokenised calls of ``--batch`` texts from
the shared data; the greedy planner (passes filled to the token budget, as before issue
14) and ``plan_token_batches`` (least padding + pass cost) alternate ``--rounds`` times, so
a shared machine's load hits both alike. Prints texts per CPU-second and per wall second
for each round, and padded tokens per real token.

    PYTHONPATH=$PWD python worker/offline/bench/local_plan.py --batch 32
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# Run as a script, this folder would shadow the standard library's profile module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from worker.backends import local_model
from worker.backends.token_batches import plan_token_batches
from worker.config import LocalSettings
from worker.offline.bench.local_model import load_texts

Planner = Callable[[Sequence[int], int, int], list[list[int]]]


def greedy_plan(lengths: Sequence[int], max_tokens: int, pass_overhead: int = 0) -> list[list[int]]:
    """The planner before issue 14: longest first, each pass filled until the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        if current and (len(current) + 1) * width > max_tokens:
            batches.append(current)
            current = []
        if not current:
            width = max(lengths[index], 1)
        current.append(index)
    if current:
        batches.append(current)
    return batches


def padding(planner: Planner, calls: list[list[int]], budget: int, overhead: int) -> float:
    real = padded = 0
    for lengths in calls:
        for batch in planner(lengths, budget, overhead):
            real += sum(lengths[i] for i in batch)
            padded += len(batch) * max(lengths[i] for i in batch)
    return padded / real


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="texts per call")
    parser.add_argument("--texts", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--budget", type=int, default=1_024, help="padded tokens per pass")
    args = parser.parse_args()

    model = local_model.load_local_model(LocalSettings(threads=1))
    texts = load_texts(args.texts)
    calls = [model.tokenize(texts[i : i + args.batch]) for i in range(0, len(texts), args.batch)]
    lengths = [[len(f.input_ids) for f in call] for call in calls]
    planners: dict[str, Planner] = {"greedy": greedy_plan, "least-cost": plan_token_batches}

    def run(planner: Planner) -> tuple[float, float]:
        setattr(local_model, "plan_token_batches", planner)  # noqa: B010 - the name LocalModel._run calls
        cpu, wall = time.process_time(), time.perf_counter()
        for call in calls:
            model.score(call, args.budget)
        return len(texts) / (time.process_time() - cpu), len(texts) / (time.perf_counter() - wall)

    for planner in planners.values():
        run(planner)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in planners}
    for _ in range(args.rounds):
        for name, planner in planners.items():
            results[name].append(run(planner))
    setattr(local_model, "plan_token_batches", plan_token_batches)  # noqa: B010
    for name, planner in planners.items():
        pad = padding(planner, lengths, args.budget, model.pass_overhead)
        print(
            f"batch {args.batch} {name:>10}: padded/real {pad:.2f}  texts/CPU-s {[round(c) for c, _ in results[name]]}"
            f"  texts/s {[round(w) for _, w in results[name]]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
