"""Replay simulation seeds: ``python -m tests.simulation --seed 7`` (or ``--seeds 0:1000``).

Prints each failing seed with its invariant and trace, shrunk to the fewest script steps
that still break the same invariant, and the command that replays the shrunk run
(``--seed N --keep 3,17,45``: only those steps of the seed's script). Exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import replace

import structlog

from tests.simulation.world import Faults, InvariantBroken, shrink, simulate


async def _run(seeds: range, steps: int, faults: Faults, keep: list[int] | None, shrinking: bool) -> int:
    failed = 0
    started = time.perf_counter()
    for seed in seeds:
        try:
            await simulate(seed, steps=steps, faults=faults, keep=keep)
        except InvariantBroken as err:
            failed += 1
            print(err, file=sys.stderr)
            if shrinking and keep is None:
                shrunk = await shrink(seed, steps=steps, faults=faults)
                if shrunk is not None:
                    print(f"shrunk to {len(shrunk[1].kept)} of {steps} steps:\n{shrunk[1]}\n", file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(f"{len(seeds)} seeds x {steps} steps: {failed} failed, {elapsed:.1f} s")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation", description=__doc__)
    parser.add_argument("--seed", type=int, help="one seed")
    parser.add_argument("--seeds", default="0:200", help="a range START:STOP (default 0:200)")
    parser.add_argument("--steps", type=int, default=200, help="script steps per seed before the drain")
    parser.add_argument("--keep", help="replay only these steps of the script: indices, comma-separated")
    parser.add_argument("--no-shrink", action="store_true", help="report failures without shrinking them")
    parser.add_argument("--bug", help="a defect put into the world on purpose (see Faults.bug)")
    parser.add_argument("--verbose", action="store_true", help="the worker's log lines too")
    parser.add_argument(
        "--resets-to-committed-only", action="store_true", help="offset resets land at most at the committed offset"
    )
    parser.add_argument("--no-reviews", action="store_true", help="no seed has a reviews partition")
    args = parser.parse_args()
    if not args.verbose:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if args.seed is not None:
        seeds = range(args.seed, args.seed + 1)
    else:
        start, stop = (int(part) for part in args.seeds.split(":"))
        seeds = range(start, stop)
    keep = [int(i) for i in args.keep.split(",") if i] if args.keep is not None else None
    faults = Faults(reset_above_committed=not args.resets_to_committed_only, bug=args.bug)
    if args.no_reviews:
        faults = replace(faults, reviews=0.0)
    sys.exit(asyncio.run(_run(seeds, args.steps, faults, keep, shrinking=not args.no_shrink)))


if __name__ == "__main__":
    main()
