"""Split one backend call into forward passes sized by padded tokens, not by count.

A transformer's cost (time and memory) for one forward pass grows with
``rows x longest row``: every row is padded to the longest. A fixed count per pass either
wastes the accelerator on short texts or runs out of memory on long ones. Sorting by
length and cutting the sorted inputs into passes keeps every pass within a budget.

Where to cut matters as much as the budget: the first (longest) row of a pass fixes the
width of every other row, so filling a pass greedily up to the budget pads short rows to a
long one's width (on the shared data's length mix, calls of 32 texts padded 1.68 tokens for
every real one under a 1024-token budget). Each pass also has a fixed cost (kernel
launches, Python, small-matrix inefficiency), which punishes cutting too often. The plan
here is the least ``padded tokens + pass_overhead x passes`` over the cuts of the sorted
inputs that respect the budget (dynamic programming over the sorted order).

Pure Python, no torch: the plan is a list of index lists into the caller's inputs.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence


def plan_token_batches(lengths: Sequence[int], max_tokens: int, pass_overhead: int = 0) -> list[list[int]]:
    """Group input indices into batches whose padded size stays within ``max_tokens``.

    ``lengths[i]`` is the token count of input ``i`` (special tokens included). Returns
    batches of indices; every index appears exactly once. Within a batch, indices run
    from the longest input to the shortest; batches run from the longest to the
    shortest. A batch's padded size is ``len(batch) * max(lengths of batch)``, and it is
    at most ``max_tokens`` except for a single input longer than the budget on its own,
    which forms a batch of one (the caller truncates inputs to the model's limit, so that
    is bounded too).

    Among all such plans that cut the length-sorted order into consecutive runs, the one
    returned has the least ``sum of padded sizes + pass_overhead * number of batches``
    (ties: fewer, wider batches first). ``pass_overhead`` is what one more forward pass
    costs, in padded tokens: 0 minimises padding alone (one pass per distinct length when
    the budget allows), a large value packs passes full as long as the padding it costs is
    smaller.

    Raises ``ValueError`` for a budget below 1, a negative length or a negative overhead.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if pass_overhead < 0:
        raise ValueError(f"pass_overhead cannot be negative, got {pass_overhead}")
    if any(length < 0 for length in lengths):
        raise ValueError("token lengths cannot be negative")
    # Longest first: the first row of a batch fixes its padded width.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    widths = [max(lengths[i], 1) for i in order]
    n = len(order)
    # A batch [i, j) of the sorted order has width widths[i] and j - i rows. Only two kinds
    # of end are worth trying: where the length changes (ending inside a run of equal
    # lengths instead pads the same rows at a wider width) and where the budget is full.
    # That keeps the search to (distinct lengths x reachable starts), at most a few
    # thousand steps, instead of every (start, end) pair.
    run_ends = [j for j in range(1, n + 1) if j == n or widths[j] != widths[j - 1]]
    best: dict[int, float] = {0: 0.0}
    start: dict[int, int] = {}
    pending = [0]
    while pending:
        i = heapq.heappop(pending)
        if i == n:
            continue
        width = widths[i]
        limit = min(n, i + max(1, max_tokens // width))
        ends = run_ends[bisect.bisect_right(run_ends, i) : bisect.bisect_right(run_ends, limit)]
        if not ends or ends[-1] != limit:
            ends.append(limit)
        for j in ends:
            cost = best[i] + pass_overhead + (j - i) * width
            # Strictly better only: starts are taken in order, so a tie keeps the plan whose
            # last batch starts earliest (fewer, wider batches).
            if j not in best:
                heapq.heappush(pending, j)
                best[j], start[j] = cost, i
            elif cost < best[j]:
                best[j], start[j] = cost, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        i = start[j]
        batches.append(order[i:j])
        j = i
    batches.reverse()
    return batches
