"""The forward-pass planner: every input once, within the budget, and the least padding + pass cost."""

from __future__ import annotations

import itertools
import random

import pytest

from worker.backends.token_batches import plan_token_batches


def padded(lengths: list[int], plan: list[list[int]]) -> int:
    return sum(len(batch) * max(max(lengths[i] for i in batch), 1) for batch in plan)


def cost(lengths: list[int], plan: list[list[int]], overhead: int) -> int:
    return padded(lengths, plan) + overhead * len(plan)


def brute_force_least_cost(lengths: list[int], budget: int, overhead: int) -> int:
    """Every way to cut the length-sorted order into consecutive batches within the budget."""
    widths = sorted((max(n, 1) for n in lengths), reverse=True)
    best = None
    for cuts in itertools.product([False, True], repeat=len(widths) - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(widths)]
        batches = [widths[a:b] for a, b in itertools.pairwise(bounds)]
        if any(len(b) * b[0] > budget and len(b) > 1 for b in batches):
            continue
        total = sum(len(b) * b[0] + overhead for b in batches)
        best = total if best is None else min(best, total)
    assert best is not None
    return best


@pytest.mark.parametrize("overhead", [0, 5, 48, 10_000])
@pytest.mark.parametrize("budget", [16, 40, 100, 1_000])
def test_every_input_once_within_the_budget_longest_first(budget: int, overhead: int) -> None:
    lengths = [3, 50, 7, 7, 12, 1, 30, 2, 9, 64, 5, 0]
    plan = plan_token_batches(lengths, budget, overhead)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        assert len(batch) * max(lengths[i] for i in batch) <= budget or len(batch) == 1
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    widths = [max(lengths[i] for i in batch) for batch in plan]
    assert widths == sorted(widths, reverse=True)


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_has_the_least_padding_plus_pass_cost(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(10, 80)]) for _ in range(rng.randint(1, 11))]
    budget = rng.choice([40, 100, 200, 10_000])
    overhead = rng.choice([0, 8, 48, 500])
    plan = plan_token_batches(lengths, budget, overhead)
    assert cost(lengths, plan, overhead) == brute_force_least_cost(lengths, budget, overhead)


def test_short_texts_are_not_padded_to_a_long_ones_width() -> None:
    # Greedy filling would put the 40-token text with the 4-token ones (21 x 40 = 840 tokens).
    lengths = [40] + [4] * 20
    plan = plan_token_batches(lengths, 1_024, pass_overhead=48)
    assert plan == [[0], list(range(1, 21))]
    assert padded(lengths, plan) == 120


def test_a_large_pass_overhead_packs_passes_full() -> None:
    lengths = [10, 9, 8, 7]
    assert plan_token_batches(lengths, 1_000, pass_overhead=1_000) == [[0, 1, 2, 3]]
    assert plan_token_batches(lengths, 1_000, pass_overhead=0) == [[0], [1], [2], [3]]


def test_an_input_longer_than_the_budget_runs_alone() -> None:
    assert plan_token_batches([500, 3, 3], 100, pass_overhead=48) == [[0], [1, 2]]


def test_no_inputs_no_passes() -> None:
    assert plan_token_batches([], 100, pass_overhead=48) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [(([1, 2], 0), "max_tokens"), (([1, -2], 10), "negative"), (([1, 2], 10, -1), "pass_overhead")],
)
def test_bad_arguments_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_token_batches(*args)
