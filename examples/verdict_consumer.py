"""Example consumer of moderation verdicts: the newest verdict per event, replays dropped.

    pip install ./contracts aiokafka          # the typed models (pydantic only) and a client
    python examples/verdict_consumer.py -b localhost:9092 --topic moderation.verdicts --from-beginning

What it shows (docs/contract.md explains the rules):

- records whose ``modworker-contract`` header names a major version this consumer does not
  know are skipped and counted, never half-read;
- fields the models do not know are ignored (``moderation_contracts`` models do that), so
  additive changes within a version need no release of this consumer;
- a verdict id seen before is a replay (at-least-once delivery, a reprocessed partition, a
  consumer restarted before its commit) and is dropped;
- a new verdict id for an event already judged supersedes the earlier verdict when it was
  decided later (a policy, model or context change, or a re-judgement): keep the newest.
  An older one arriving late is stale and dropped;
- a reviewer's verdict (``supersedes`` names a verdict id) replaces the verdict it names
  whatever the times (a reviewer's clock is not the worker's).

On exit (``--max-messages``, ``--idle-timeout-s`` or Ctrl-C) it prints one JSON object:
the newest verdict id and action per event and the counts. A real service would act in
``VerdictStore.offer``'s callers (enforce, notify) and keep its state in a database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from moderation_contracts import CONTRACT_VERSION, OutputHeaders, Verdict

KNOWN_MAJOR_VERSIONS = {CONTRACT_VERSION}


@dataclass
class VerdictStore:
    """The newest verdict per event, and the verdict ids seen in the last ``seen_ttl_s``.

    Keep seen ids at least as long as a replay can reach back: the verdict topic's
    retention if you may re-read it from the beginning, otherwise a day is ample for
    redeliveries after crashes and rebalances. ``max_seen`` bounds memory either way.
    """

    seen_ttl_s: float = 7 * 24 * 3600
    max_seen: int = 1_000_000
    newest: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    seen: OrderedDict[str, float] = field(default_factory=OrderedDict)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("new", "supersedes", "duplicate", "stale", "unknown_version"), 0)
    )

    def offer(self, verdict: Verdict, now: float | None = None) -> str:
        """What ``verdict`` is: ``new`` (first for its event), ``supersedes`` (a later
        decision for an event already judged; it replaces the one kept), ``duplicate``
        (this verdict id was seen before) or ``stale`` (decided before the one kept)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        if verdict.verdict_id in self.seen:
            outcome = "duplicate"
        else:
            self.seen[verdict.verdict_id] = now
            event = (verdict.kind, verdict.event_id)
            kept = self.newest.get(event)
            if kept is None:
                outcome = "new"
            elif verdict.supersedes == kept.verdict_id:  # a reviewer's verdict: whatever the times
                outcome = "supersedes"
            elif kept.supersedes == verdict.verdict_id:  # what the reviewer replaced, arriving late
                outcome = "stale"
            elif (verdict.decided_at, verdict.verdict_id) > (kept.decided_at, kept.verdict_id):
                outcome = "supersedes"
            else:
                outcome = "stale"
            if outcome != "stale":
                self.newest[event] = verdict
        self.counts[outcome] += 1
        return outcome

    def _expire(self, now: float) -> None:
        while self.seen and (len(self.seen) > self.max_seen or next(iter(self.seen.values())) < now - self.seen_ttl_s):
            self.seen.popitem(last=False)


def contract_version(headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]) -> str | None:
    for key, value in headers or ():
        if key == OutputHeaders.CONTRACT:
            return value.decode()
    return None


async def consume(args: argparse.Namespace) -> VerdictStore:
    store = VerdictStore()
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap_server,
        group_id=args.group,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
        enable_auto_commit=False,
        # Needed when the worker runs with MODWORKER_DELIVERY=exactly_once; harmless otherwise.
        isolation_level="read_committed",
    )
    await consumer.start()
    read, last = 0, time.monotonic()
    try:
        while not args.max_messages or read < args.max_messages:
            batches = await consumer.getmany(timeout_ms=200)
            if not batches:
                if args.idle_timeout_s and time.monotonic() - last > args.idle_timeout_s:
                    break
                continue
            last = time.monotonic()
            for records in batches.values():
                for record in records:
                    read += 1
                    if contract_version(record.headers) not in KNOWN_MAJOR_VERSIONS:
                        store.counts["unknown_version"] += 1
                        continue
                    store.offer(Verdict.model_validate_json(record.value))
            await consumer.commit()  # after acting on the batch: a crash replays, never skips
    finally:
        await consumer.stop()
    return store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--bootstrap-server", required=True)
    parser.add_argument("--topic", default="moderation.verdicts")
    parser.add_argument("--group", default="verdict-consumer-example")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--max-messages", type=int, default=0)
    parser.add_argument("--idle-timeout-s", type=float, default=0)
    args = parser.parse_args()
    try:
        store = asyncio.run(consume(args))
    except KeyboardInterrupt:
        return 130
    summary = {
        "newest": {f"{kind}:{event}": [v.verdict_id, v.action] for (kind, event), v in sorted(store.newest.items())},
        "counts": store.counts,
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
