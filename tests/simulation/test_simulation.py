"""The seeded simulation of the whole worker (``world``): many seeds, every invariant after
every step, then a fault-free drain that must bring every partition to its end.

``MODWORKER_SIM_SEEDS`` sets how many seeds run (default 2000). A failure names its seed,
is shrunk to the fewest script steps that still break the same invariant, and
``python -m tests.simulation --seed N --keep ...`` replays it exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Callable

import pytest
from aiokafka.structs import TopicPartition

from schemas import DeadLetterHeaders, Turn
from tests.simulation.world import (
    CONTENT,
    REVIEWS,
    STACKED_POLICY,
    Faults,
    InvariantBroken,
    MemoryBatch,
    Sent,
    World,
    WrittenReview,
    script,
    shrink,
    simulate,
)
from worker.backends.base import Conversation
from worker.pipeline.policy import Policy
from worker.pipeline.types import OutRecord, PartitionOffsets

SEEDS = int(os.environ.get("MODWORKER_SIM_SEEDS", "2000"))
STEPS = 200


async def test_no_invariant_breaks_under_random_faults_for_any_seed() -> None:
    failures = []
    for seed in range(SEEDS):
        try:
            await simulate(seed, steps=STEPS)
        except InvariantBroken as err:
            shrunk = await shrink(seed, steps=STEPS, max_runs=60)
            failures.append(str(shrunk[1] if shrunk is not None else err))
            if len(failures) >= 3:
                break
    assert not failures, "\n\n".join(failures)


async def test_the_same_seed_replays_the_same_run() -> None:
    first = await simulate(11, steps=STEPS)
    second = await simulate(11, steps=STEPS)
    assert first.trace == second.trace
    assert first.broker.commits == second.broker.commits
    assert first.dead_letters == second.dead_letters


async def test_the_simulation_exercises_what_it_claims() -> None:
    """Guard against a world that never reaches the interesting states."""
    worlds = [await simulate(seed, steps=STEPS) for seed in range(30)]
    actions = {action.split(":")[0].split("=")[0] for world in worlds for action in world.trace}
    expected = {"poll", "flush", "answer", "sink", "ack", "advance", "rebalance", "offset_reset", "outage"}
    assert expected | {"sigterm", "publish_failure", "restart"} <= actions
    assert any(w.cascade for w in worlds) and not all(w.cascade for w in worlds), "both backends"
    dead = [(position[0], error) for world in worlds for position, error in world.dead_letters]
    assert {("ugc.content", "backend_failed"), ("ugc.conversations", "backend_failed")} <= set(dead), (
        "no poison input of each kind was ever isolated"
    )
    assert {"not_json", "schema"} <= {error for _, error in dead}, "no malformed input was ever dead-lettered"
    second_stage = [
        position
        for world in worlds
        if world.cascade
        for position, error in world.dead_letters
        if error == "backend_failed"
        and b"POISON2" in (world.broker.logs[_tp(world, position)][position[2]].value or b"")
    ]
    assert second_stage, "no poison input of the cascade's second stage was ever isolated"
    outages = {e.name for w in worlds for e in w.endpoints.values() if e.outages}
    assert {"one/content", "one/conversation", "first/content", "then/conversation"} <= outages
    assert any(context for w in worlds for c in w.contexts.values() for context in c), "no turn had context"
    assert any(c.context for w in worlds for c in w.shadow_backend.judged), "the shadow judged no turn with context"
    assert any(w.broker.restored for w in worlds), "no conversation state was ever restored"
    assert any(w.cascade and w.policy.thresholds("sexual") == (0.1, 0.5) for w in worlds), "no stacked overrides"


async def test_the_simulation_exercises_the_reviews_path() -> None:
    """Guard against review seeds that never reach the interesting answers."""
    worlds = [await simulate(seed, steps=STEPS) for seed in range(30)]
    reviewing = [w for w in worlds if w.reviews]
    assert reviewing and len(reviewing) < len(worlds), "reviews in a share of the seeds, not in all"
    assert all(TopicPartition(REVIEWS, 0) not in w.tps for w in worlds if not w.reviews)
    answers = Counter((shape, answer) for w in reviewing for _, shape, answer in w.review_answers)
    seen = {answer for _, answer in answers}
    refusals = {"unknown_category", "invalid_review", "duplicate_review", "unknown_verdict"}
    assert {"applied"} | refusals <= seen, f"answers seen: {sorted(seen)}"
    assert {"not_json", "schema"} <= seen, "no malformed review decision was dead-lettered at decode"
    assert answers["valid", "applied"] > 0 and answers["unseen", "applied"] > 0, "no decision was applied"
    assert answers["duplicate", "applied"] > 0, "no repeated review_id was applied again (a restart, the bound)"
    assert answers["unknown_verdict", "applied"] > 0, "no decision on a verdict not remembered was applied"
    redelivered = [w for w in reviewing if max(Counter(p for p, _, _ in w.review_answers).values(), default=0) > 1]
    assert redelivered, "no review record was answered twice (after a revoke, an offset reset or a restart)"
    assert any(w.restarts for w in redelivered), "no review seed restarted its worker"
    assert any(w.superseding for w in reviewing), "no superseding verdict was published"


def _tp(world: World, position: tuple[str, int, int]) -> TopicPartition:
    return next(tp for tp in world.tps if (tp.topic, tp.partition) == position[:2])


async def test_a_step_replays_alone_the_same_way() -> None:
    """The script's steps do not depend on each other's choices: what shrinking needs."""
    steps = script(3, STEPS, Faults())
    assert [s.choice for s in steps] == [s.choice for s in script(3, STEPS, Faults())]
    kept = [0, 5, 9, 40]
    first = await simulate(3, steps=STEPS, keep=kept)
    second = await simulate(3, steps=STEPS, keep=kept)
    assert first.trace == second.trace
    assert len([a for a in first.trace if a not in ("drain", "restart")]) == len(kept)


async def test_shrinking_keeps_a_shorter_run_that_breaks_the_same_invariant() -> None:
    """With a defect put into the world on purpose (a dropped sink group stops counting one
    message in flight, whatever its size), a seed fails; shrinking finds far fewer steps
    that still fail the same way, and replaying those fails again."""
    faults = Faults(bug="dropped_group_counts_one")
    found = None
    for seed in range(40):
        found = await shrink(seed, steps=STEPS, faults=faults, max_runs=120)
        if found is not None:
            break
    assert found is not None, "the injected defect was never found"
    original, smallest = found
    assert smallest.invariant == original.invariant
    assert len(smallest.kept) < STEPS // 4, f"shrunk to {len(smallest.kept)} steps only"
    assert f"--keep {','.join(map(str, smallest.kept))} --bug dropped_group_counts_one" in str(smallest)
    with pytest.raises(InvariantBroken) as again:
        await simulate(smallest.seed, steps=STEPS, faults=faults, keep=smallest.kept)
    assert again.value.invariant == original.invariant


async def test_a_broken_invariant_names_the_seed_and_how_to_replay_it() -> None:
    world = World(5)
    world.trace = ["poll", "ack"]
    try:
        with pytest.raises(
            InvariantBroken, match=r"seed 5 .*an example\n.*poll ack\n.*python -m tests.simulation --seed 5"
        ):
            world.fail("example", "an example")
    finally:
        await world.worker.source._consumer.stop()
        await world.sink._producer.stop()


async def test_offset_resets_only_to_at_most_the_committed_offset_hold_too() -> None:
    for seed in range(50):
        await simulate(seed, steps=STEPS, faults=Faults(reset_above_committed=False))


def _verdict(topic: str, partition: int, offset: int, **fields: object) -> OutRecord:
    value = {"input": {"topic": topic, "partition": partition, "offset": offset}, **fields}
    return OutRecord("moderation.verdicts", b"k1", json.dumps(value).encode())


def _commit_past_an_unacknowledged_output(world: World) -> None:
    world._check_commit({TopicPartition(CONTENT, 0): 3})


def _two_outputs_in_one_ownership(world: World) -> None:
    slot = PartitionOffsets(TopicPartition(CONTENT, 0))
    world._check_publish([_verdict(CONTENT, 0, 2)], slot)
    world._check_publish([_verdict(CONTENT, 0, 2)], slot)


def _an_output_published_without_its_slot(world: World) -> None:
    world._check_publish([_verdict(CONTENT, 0, 2)], None)


def _a_key_out_of_order(world: World) -> None:
    slot = PartitionOffsets(TopicPartition(CONTENT, 0))
    world._check_publish([_verdict(CONTENT, 0, 3), _verdict(CONTENT, 0, 2)], slot)


def _sent_for_a_partition_not_owned(world: World) -> None:
    batch = MemoryBatch()
    record = _verdict(CONTENT, 0, 0)
    batch.append(key=record.key, value=record.value, timestamp=None, headers=None)
    world._check_send(Sent("moderation.verdicts", 0, batch, asyncio.get_running_loop().create_future()))


def _a_healthy_input_dead_lettered(world: World) -> None:
    healthy = next(
        (tp.topic, tp.partition, r.offset)
        for tp in world.tps
        for r in world.broker.logs[tp]
        if (tp.topic, tp.partition, r.offset) not in world.poison | world.malformed
    )
    world.dead_letters.append((healthy, "backend_failed"))


def _a_turn_judged_with_another_conversation(world: World) -> None:
    first, *others = world.conversation_of
    stranger = next(text for text in others if world.conversation_of[text] != world.conversation_of[first])
    world.contexts[first] = {(Turn(role="user", content=stranger),)}


def _the_shadow_without_the_live_context(world: World) -> None:
    text = next(iter(world.conversation_of))
    world.contexts[text] = {()}
    world.shadow_backend.judged.append(Conversation(Turn(role="user", content=text), (Turn(role="user", content="x"),)))


def _review(world: World, *, action: str = "block", categories: tuple[str, ...] = ("sexual",)) -> None:
    """Append a decision on a verdict this process never saw (applied as it stands)."""
    decision = {
        "review_id": "r1",
        "verdict_id": "v1",
        "event_id": "e1",
        "kind": "content",
        "reviewer_id": "reviewer-1",
        "action": action,
        "categories": list(categories),
        "decided_at": "2026-01-02T03:04:05Z",
    }
    world._append_review(b"k1", json.dumps(decision).encode(), WrittenReview("valid", decision))


def _superseding(verdict_id: str, action: str = "allow", categories: tuple[str, ...] = ()) -> OutRecord:
    violations = [{"category": name} for name in categories]
    return _verdict(
        REVIEWS, 0, 0, verdict_id=verdict_id, decided_by="human", supersedes="v1", action=action, violations=violations
    )


def _a_restricting_review_applied_without_its_violation(world: World) -> None:
    _review(world)
    world._check_publish([_superseding("h1", "block", ("sexual",))], PartitionOffsets(TopicPartition(REVIEWS, 0)))


def _a_review_refused_though_it_applies(world: World) -> None:
    _review(world)
    headers = [
        (DeadLetterHeaders.ORIGIN_TOPIC, REVIEWS.encode()),
        (DeadLetterHeaders.ORIGIN_PARTITION, b"0"),
        (DeadLetterHeaders.ORIGIN_OFFSET, b"0"),
        (DeadLetterHeaders.STAGE, b"review"),
        (DeadLetterHeaders.ERROR_TYPE, b"unknown_verdict"),
    ]
    dead = OutRecord("moderation.dead-letter", b"k1", b"{}", headers)
    world._check_publish([dead], PartitionOffsets(TopicPartition(REVIEWS, 0)))


def _a_redelivered_review_superseding_under_another_id(world: World) -> None:
    _review(world, action="allow", categories=())
    world._check_publish([_superseding("h1")], PartitionOffsets(TopicPartition(REVIEWS, 0)))
    world._check_publish([_superseding("h2")], PartitionOffsets(TopicPartition(REVIEWS, 0)))


def _a_commit_past_an_unanswered_review(world: World) -> None:
    _review(world)
    world._check_commit({TopicPartition(REVIEWS, 0): 1})


def _a_review_answer_sent_for_a_partition_not_owned(world: World) -> None:
    batch = MemoryBatch()
    record = _superseding("h1")
    batch.append(key=record.key, value=record.value, timestamp=None, headers=None)
    world._check_send(Sent("moderation.verdicts", 0, batch, asyncio.get_running_loop().create_future()))


def _a_review_at_the_backend(world: World) -> None:
    _review(world)
    world.called.append((world.broker.logs[TopicPartition(REVIEWS, 0)][0].value or b"").decode())


def _the_first_stage_deciding_near_a_stacked_threshold(world: World) -> None:
    world.policy = Policy.from_mapping(STACKED_POLICY)
    slot = PartitionOffsets(TopicPartition(CONTENT, 0))
    near = _verdict(CONTENT, 0, 1, decided_by="first", scores={"sexual": 0.11}, tenant="kids", source="chat")
    world._check_publish([near], slot)


@pytest.mark.parametrize(
    ("breach", "invariant"),
    [
        (_commit_past_an_unacknowledged_output, "commit-acked"),
        (_two_outputs_in_one_ownership, "one-output"),
        (_a_key_out_of_order, "key-order"),
        (_an_output_published_without_its_slot, "output-slot"),
        (_sent_for_a_partition_not_owned, "revoked-silent"),
        (_a_healthy_input_dead_lettered, "outage-dead-letters"),
        (_a_turn_judged_with_another_conversation, "context"),
        (_the_shadow_without_the_live_context, "shadow-context"),
        (_the_first_stage_deciding_near_a_stacked_threshold, "cascade-band"),
        (_a_restricting_review_applied_without_its_violation, "review-answer"),
        (_a_review_refused_though_it_applies, "review-answer"),
        (_a_redelivered_review_superseding_under_another_id, "review-redelivery"),
        (_a_commit_past_an_unanswered_review, "commit-acked"),
        (_a_review_answer_sent_for_a_partition_not_owned, "revoked-silent"),
        (_a_review_at_the_backend, "backend-inputs"),
    ],
)
async def test_each_invariant_fails_on_its_breach(breach: Callable[[World], None], invariant: str) -> None:
    world = World(5, faults=Faults(reviews=1.0))
    try:
        breach(world)
        with pytest.raises(InvariantBroken) as broken:
            world.check()
        assert broken.value.invariant == invariant
    finally:
        await world.worker.source._consumer.stop()
        await world.sink._producer.stop()
