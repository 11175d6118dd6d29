// Example consumer of moderation verdicts for a Node service: the newest verdict per event,
// replays dropped. The same rules as examples/verdict_consumer.py (docs/contract.md):
//
//   npm ci && node verdict-consumer.mjs --bootstrap-server localhost:9092 --from-beginning
//
// - a record whose `modworker-contract` header names a major version this consumer does
//   not know is skipped and counted;
// - unknown fields are ignored: read the fields you need, never reject the others;
// - a verdict id seen before is a replay and is dropped;
// - a new verdict id for an event already judged supersedes the kept one when decided
//   later (policy, model or context change); an older one arriving late is stale.
//
// Prints one JSON object on exit (--max-messages, --idle-timeout-s or SIGINT).
import { Kafka, logLevel } from "kafkajs";

const KNOWN_MAJOR_VERSIONS = new Set(["2"]);
const CONTRACT_HEADER = "modworker-contract";

function parseArgs(argv) {
  const args = { topic: "moderation.verdicts", group: "verdict-consumer-example-node", fromBeginning: false,
                 maxMessages: 0, idleTimeoutS: 0, bootstrapServer: null };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => argv[++i];
    if (flag === "-b" || flag === "--bootstrap-server") args.bootstrapServer = value();
    else if (flag === "--topic") args.topic = value();
    else if (flag === "--group") args.group = value();
    else if (flag === "--from-beginning") args.fromBeginning = true;
    else if (flag === "--max-messages") args.maxMessages = Number(value());
    else if (flag === "--idle-timeout-s") args.idleTimeoutS = Number(value());
    else throw new Error(`unknown argument ${flag}`);
  }
  if (!args.bootstrapServer) throw new Error("--bootstrap-server is required");
  return args;
}

export class VerdictStore {
  // Keep seen ids as long as a replay can reach back: the topic's retention if you may
  // re-read it from the beginning, else a day covers redeliveries after crashes.
  constructor({ seenTtlMs = 7 * 24 * 3600 * 1000, maxSeen = 1_000_000 } = {}) {
    this.seenTtlMs = seenTtlMs;
    this.maxSeen = maxSeen;
    this.seen = new Map(); // verdict id -> first seen (ms); insertion order = age
    this.newest = new Map(); // "kind:event_id" -> verdict
    this.counts = { new: 0, supersedes: 0, duplicate: 0, stale: 0, unknown_version: 0 };
  }

  offer(verdict, now = Date.now()) {
    for (const [id, at] of this.seen) {
      if (this.seen.size <= this.maxSeen && at >= now - this.seenTtlMs) break;
      this.seen.delete(id);
    }
    let outcome;
    if (this.seen.has(verdict.verdict_id)) {
      outcome = "duplicate";
    } else {
      this.seen.set(verdict.verdict_id, now);
      const event = `${verdict.kind}:${verdict.event_id}`;
      const kept = this.newest.get(event);
      if (kept === undefined) outcome = "new";
      else if (verdict.supersedes === kept.verdict_id) outcome = "supersedes"; // a reviewer's: whatever the times
      else if (kept.supersedes === verdict.verdict_id) outcome = "stale"; // what the reviewer replaced, late
      else if (later(verdict, kept)) outcome = "supersedes";
      else outcome = "stale";
      if (outcome !== "stale") this.newest.set(event, verdict);
    }
    this.counts[outcome] += 1;
    return outcome;
  }
}

function later(a, b) {
  const [ta, tb] = [Date.parse(a.decided_at), Date.parse(b.decided_at)];
  return ta !== tb ? ta > tb : a.verdict_id > b.verdict_id;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const kafka = new Kafka({ clientId: "verdict-consumer-example", brokers: args.bootstrapServer.split(","),
                            logLevel: logLevel.ERROR });
  // readUncommitted false (the default): only committed records, as exactly-once outputs need.
  const consumer = kafka.consumer({ groupId: args.group });
  const store = new VerdictStore();
  let read = 0;
  let last = Date.now();
  await consumer.connect();
  await consumer.subscribe({ topic: args.topic, fromBeginning: args.fromBeginning });
  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  await consumer.run({
    eachMessage: async ({ message }) => {
      last = Date.now();
      read += 1;
      const version = message.headers?.[CONTRACT_HEADER]?.toString();
      if (!KNOWN_MAJOR_VERSIONS.has(version)) store.counts.unknown_version += 1;
      else store.offer(JSON.parse(message.value.toString("utf8")));
      if (args.maxMessages && read >= args.maxMessages) finish();
    },
  });
  const idle = setInterval(() => {
    if (args.idleTimeoutS && Date.now() - last > args.idleTimeoutS * 1000) finish();
  }, 200);
  process.on("SIGINT", finish);
  await finished;
  clearInterval(idle);
  await consumer.disconnect();
  const newest = Object.fromEntries(
    [...store.newest.entries()].sort().map(([event, v]) => [event, [v.verdict_id, v.action]]));
  console.log(JSON.stringify({ counts: store.counts, newest }));
}

main().catch((err) => {
  console.error(`verdict-consumer: ${err.message}`);
  process.exit(1);
});
