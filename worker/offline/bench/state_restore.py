"""How long restoring the conversation state takes, and how much memory it holds.

``python -m worker.offline.bench.state_restore --conversations 20000`` writes that many
conversation windows (``--turns`` turns of ``--chars`` characters each) to a changelog
topic on the embedded broker (or ``--bootstrap-servers``), with ``--versions`` writes per
conversation (a changelog that compaction has not caught up with holds every version),
then restores all partitions as a newly assigned worker does (``StateChangelog.read`` +
``ConversationState.load``) and prints one JSON line: records, conversations, seconds,
state bytes and the process's RSS growth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.models import Role
from worker.config import KafkaSettings
from worker.pipeline.conversation_state import ConversationState
from worker.pipeline.state_changelog import StateChangelog
from worker.testing.broker import test_broker


async def _measure(bootstrap: str, args: argparse.Namespace) -> dict[str, float | int]:
    tag = uuid.uuid4().hex[:8]
    source, changelog_topic = f"bench.conversations.{tag}", f"bench.conversation-state.{tag}"
    kafka = KafkaSettings(bootstrap_servers=bootstrap, enable_idempotence=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(source, args.partitions, 1)])
    finally:
        await admin.close()
    changelog = StateChangelog(kafka, topic=changelog_topic, source_topic=source)
    await changelog.ensure()
    writer = ConversationState(max_turns=args.turns, max_context_chars=8_000, ttl_s=86_400, max_bytes=1 << 40)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20, acks="all")
    await producer.start()
    try:
        futures = []
        for turn in range(args.turns):
            role: Role = "user" if turn % 2 == 0 else "assistant"
            for n in range(args.conversations):
                partition, key = n % args.partitions, f"conv-{n}"
                change = writer.observe(partition, key, f"t{turn}", role, "x" * args.chars).change
                if change is not None and turn >= args.turns - args.versions:
                    futures.append(
                        await producer.send(changelog_topic, change.value, key=key.encode(), partition=partition)
                    )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    del writer

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    state = ConversationState(max_turns=args.turns, max_context_chars=8_000, ttl_s=86_400, max_bytes=1 << 40)
    latest, records = await changelog.read(list(range(args.partitions)))
    loaded = sum(state.load(partition, values)[0] for partition, values in latest.items())
    seconds = time.perf_counter() - started
    return {
        "records": records,
        "conversations": loaded,
        "turns_per_conversation": args.turns,
        "chars_per_turn": args.chars,
        "seconds": round(seconds, 3),
        "records_per_second": round(records / seconds),
        "state_bytes": state.bytes,
        "rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument("--versions", type=int, default=1, help="changelog writes per conversation")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bootstrap-servers", default=None)
    args = parser.parse_args()
    with test_broker(args.bootstrap_servers) as broker:
        print(json.dumps(asyncio.run(_measure(broker.bootstrap_servers, args))))


if __name__ == "__main__":
    main()
