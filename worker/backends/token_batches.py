"""Split one backend call into forward passes sized by padded tokens, not by count.

A transformer's cost (time and memory) for one forward pass grows with
``rows x longest row``: every row is padded to the longest. A fixed count per pass either
wastes the accelerator on short texts or runs out of memory on long ones. Sorting by
length and cutting wherever the padded size would pass a budget keeps every pass near
the same cost whatever the mix of lengths.

Pure Python, no torch: the plan is a list of index lists into the caller's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group input indices into batches whose padded size stays within ``max_tokens``.

    ``lengths[i]`` is the token count of input ``i`` (special tokens included). Returns
    batches of indices; every index appears exactly once. Within a batch, indices run
    from the longest input to the shortest; batches run from the longest to the
    shortest. A batch's padded size is ``len(batch) * max(lengths of batch)``, and it is
    at most ``max_tokens`` except for a single input longer than the budget on its own,
    which forms a batch of one (the caller truncates inputs to the model's limit, so that
    is bounded too).

    Raises ``ValueError`` for a budget below 1 or a negative length.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if any(length < 0 for length in lengths):
        raise ValueError("token lengths cannot be negative")
    # Longest first: the first row of a batch fixes its padded width, so the batch is cut
    # as soon as one more row would pass the budget at that width.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        if not current:
            current, width = [index], max(lengths[index], 1)
            continue
        if (len(current) + 1) * width > max_tokens:
            batches.append(current)
            current, width = [index], max(lengths[index], 1)
        else:
            current.append(index)
    if current:
        batches.append(current)
    return batches
