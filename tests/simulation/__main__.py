"""Replay simulation seeds: ``python -m tests.simulation --seed 7`` (or ``--seeds 0:1000``).

Prints each failing seed with its invariant and trace; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import structlog

from tests.simulation.world import Faults, InvariantBroken, simulate


async def _run(seeds: range, steps: int, faults: Faults) -> int:
    failed = 0
    started = time.perf_counter()
    for seed in seeds:
        try:
            await simulate(seed, steps=steps, faults=faults)
        except InvariantBroken as err:
            failed += 1
            print(err, file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(f"{len(seeds)} seeds x {steps} steps: {failed} failed, {elapsed:.1f} s")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation", description=__doc__)
    parser.add_argument("--seed", type=int, help="one seed")
    parser.add_argument("--seeds", default="0:200", help="a range START:STOP (default 0:200)")
    parser.add_argument("--steps", type=int, default=200, help="random steps per seed before the drain")
    parser.add_argument("--verbose", action="store_true", help="the worker's log lines too")
    parser.add_argument(
        "--resets-to-committed-only", action="store_true", help="offset resets land at most at the committed offset"
    )
    args = parser.parse_args()
    if not args.verbose:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if args.seed is not None:
        seeds = range(args.seed, args.seed + 1)
    else:
        start, stop = (int(part) for part in args.seeds.split(":"))
        seeds = range(start, stop)
    faults = Faults(reset_above_committed=not args.resets_to_committed_only)
    sys.exit(asyncio.run(_run(seeds, args.steps, faults)))


if __name__ == "__main__":
    main()
