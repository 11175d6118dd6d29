"""The seeded simulation of the whole worker (``world``): many seeds, every invariant after
every step, then a fault-free drain that must bring every partition to its end.

``MODWORKER_SIM_SEEDS`` sets how many seeds run (default 300). A failure names its seed;
``python -m tests.simulation --seed N`` replays it exactly.
"""

from __future__ import annotations

import os

import pytest

from tests.simulation.world import Faults, InvariantBroken, World, simulate

SEEDS = int(os.environ.get("MODWORKER_SIM_SEEDS", "300"))
STEPS = 200


async def test_no_invariant_breaks_under_random_faults_for_any_seed() -> None:
    failures = []
    for seed in range(SEEDS):
        try:
            await simulate(seed, steps=STEPS)
        except InvariantBroken as err:
            failures.append(str(err))
            if len(failures) >= 3:
                break
    assert not failures, "\n\n".join(failures)


async def test_the_same_seed_replays_the_same_run() -> None:
    first = await simulate(11, steps=STEPS)
    second = await simulate(11, steps=STEPS)
    assert first.trace == second.trace
    assert first.consumer.commits == second.consumer.commits
    assert first.dead_letters == second.dead_letters


async def test_the_simulation_exercises_what_it_claims() -> None:
    """Guard against a world that never reaches the interesting states."""
    worlds = [await simulate(seed, steps=STEPS) for seed in range(20)]
    actions = {action.split("=")[0] for world in worlds for action in world.trace}
    assert {"poll", "flush", "answer", "sink", "ack", "advance", "rebalance", "offset_reset", "outage"} <= actions
    dead = [error for world in worlds for _, _, error in world.dead_letters]
    assert "backend_failed" in dead, "no poison input was ever isolated"
    assert {"not_json", "schema"} <= set(dead), "no malformed input was ever dead-lettered"


async def test_a_broken_invariant_names_the_seed_and_how_to_replay_it() -> None:
    world = World(5)
    world.trace = ["poll", "ack"]
    try:
        with pytest.raises(InvariantBroken, match=r"seed 5: .*\n.*poll ack\n.*python -m tests.simulation --seed 5"):
            world.fail("an example")
    finally:
        await world.worker.source._consumer.stop()
        await world.sink._producer.stop()


async def test_offset_resets_only_to_at_most_the_committed_offset_hold_too() -> None:
    for seed in range(50):
        await simulate(seed, steps=STEPS, faults=Faults(reset_above_committed=False))
