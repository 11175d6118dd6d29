"""Turn the chaos suite's measurements into docs/reliability.md's table.

``python -m tests.chaos.report`` prints the table from ``build/chaos/results.json``;
``--write docs/reliability.md`` replaces the table between the file's markers. What each
scenario injects and promises is written here once; what was measured comes only from the
results file (a scenario that did not run shows as "not run").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.chaos.harness import RESULTS_FILE

START, END = "<!-- chaos-table:start -->", "<!-- chaos-table:end -->"
T = "tests/chaos/test_chaos.py::"
S = "tests/chaos/test_security_chaos.py::"
M = "tests/chaos/test_static_membership_chaos.py::"
E = "tests/chaos/test_exactly_once_chaos.py::"

SCENARIOS: list[tuple[str, str, str, str]] = [
    # (scenario name as recorded, injected, promised, test)
    ("malformed 10%", "10% of inputs not UTF-8, not JSON or off-schema", "each dead-lettered with its reason; lost 0, no duplicates", "test_malformed_inputs_at_ten_percent"),
    ("worker SIGKILL mid-stream", "the only worker SIGKILLed, a new one started", "lost 0; duplicates ≤ the killed worker's in-flight window (200)", "test_worker_sigkill_mid_stream"),
    ("rebalance storm", "3 workers; every 4 s one SIGKILLed and one added (4 times)", "lost 0; duplicates ≤ 200 per kill", "test_rebalance_storm"),
    ("broker SIGKILL, down 5 s", "broker SIGKILLed, restarted on the same port and storage after 5 s", "lost 0; worker rides it out and stops cleanly; tens of log lines besides the per-message ones, all JSON", "test_broker_sigkill_and_restart[5]"),
    ("broker SIGKILL, down 30 s", "as above, 30 s", "as above", "test_broker_sigkill_and_restart[30]"),
    ("backend 503 burst", "every API request answers 503 for 3 s", "lost 0, no duplicates (policy `wait`)", "test_backend_503_burst"),
    ("backend 6x503 then healthy", "6 requests answer 503, then healthy", "moderation resumes within ~2 s of the API recovering, end to end (checked: ≤ 4 s)", "test_backend_503_burst_recovers_within_seconds"),
    ("backend flapping 20 s / 20 s", "API down (503) 20 s, up 20 s, twice", "lost 0, no duplicates", "test_backend_flapping"),
    ("backend outage 60 s (wait)", "every request 503 for 60 s", "lost 0; RSS flat (growth over the last 40 s < 15 MB)", "test_backend_outage_60s_under_wait_keeps_memory_flat"),
    ("backend 429 storm", "every other request 429 with Retry-After: 1, for 15 s", "lost 0, no duplicates", "test_backend_429_storm"),
    ("one poison input", "one input the API answers 500 every time; the stream goes on", "dead-lettered `backend_failed`, the rest judged; lost 0", "test_one_poison_input[stream-goes-on]"),
    ("one poison input, then the stream stops", "as above, the stream stopped 0.5 s after it (no other traffic during the search)", "as above", "test_one_poison_input[stream-stops]"),
    ("oversized input (900 KB)", "one 900 KB input (over MODWORKER_MAX_TEXT_CHARS)", "dead-lettered `too_long`; lost 0", "test_oversized_input"),
    ("oversized outputs (broker limit 64 KB)", "output topics with max.message.bytes=65536 on the broker; a verdict and a dead letter larger than that", "the worker reads the topics' limit; outputs made to fit, never fatal; lost 0", "test_oversized_output"),
    ("conversation-state changelog compacted by the broker, then restored", "changelog compacted by the broker as it runs (segment.ms 1 s, min.cleanable.dirty.ratio 0.01); the worker SIGKILLed once most writes were cleaned away, a successor started", "the successor restores every live conversation from the compacted log; lost 0", "tests/chaos/test_compaction_chaos.py::test_restore_from_a_really_compacted_changelog"),
    ("end to end over TLS", "worker and harness on the broker's TLS listener (Kafka's own SSL listener)", "lost 0, no duplicates", "test_end_to_end_over_tls"),
    ("TLS port, wrong CA client", "worker trusting another CA", "start-up stops with one line, exit 1", "test_a_bad_tls_client_stops_start_up_with_one_line[wrong CA]"),
    ("TLS port, plaintext client", "worker speaking plaintext to the TLS port", "start-up stops with one line, exit 1", "test_a_bad_tls_client_stops_start_up_with_one_line[plaintext]"),
    ("exactly-once: worker SIGKILL mid-transaction", "MODWORKER_DELIVERY=exactly_once; the worker SIGKILLed 3 times mid-stream, a new one started each time; outputs read with read_committed", "lost 0, **duplicates 0**", f"{E}test_exactly_once_worker_sigkill_mid_transaction"),
    ("exactly-once: rebalance storm", "exactly-once; 3 workers, every 4 s one SIGKILLed and one added (4 times)", "lost 0, **duplicates 0**", f"{E}test_exactly_once_rebalance_storm"),
    ("exactly-once: broker SIGKILL, down 5 s", "exactly-once; the broker SIGKILLed, restarted on its log dir after 5 s", "lost 0, **duplicates 0**; the worker rides it out and stops cleanly", f"{E}test_exactly_once_broker_sigkill_and_restart"),
    ("exactly-once: zombie (SIGSTOP past the session timeout, SIGCONT)", "exactly-once; a worker SIGSTOPped past the session timeout, the group moves its partitions to another, then SIGCONT", "lost 0, **duplicates 0**; the zombie's late writes fenced and counted", f"{E}test_exactly_once_zombie_is_fenced"),
    ("rolling restart of 3 workers, static membership", "3 workers, each in turn SIGTERMed and replaced under the same MODWORKER_KAFKA__GROUP_INSTANCE_ID", "no rebalance: the other members keep their partitions and restore nothing; lost 0", f"{M}test_rolling_restart[static]"),
    ("rolling restart of 3 workers, dynamic membership", "as above, no instance id (the control)", "lost 0 (every restart rebalances the group)", f"{M}test_rolling_restart[dynamic]"),
    ("SCRAM-SHA-512 over SASL_PLAINTEXT, with ACLs", "worker authenticating with SCRAM, exactly its ACLs", "lost 0, no duplicates; the password in no log line or metric", f"{S}test_scram_end_to_end[SASL_PLAINTEXT]"),
    ("SCRAM-SHA-512 over SASL_SSL, with ACLs", "as above, over TLS", "as above", f"{S}test_scram_end_to_end[SASL_SSL]"),
    ("SASL, wrong password", "worker with a wrong SASL password", "start-up stops with one line naming the setting, exit non-zero", f"{S}test_a_wrong_password_stops_start_up_with_one_line"),
    ("ACL: no WRITE on the verdict topic, then granted", "no WRITE ACL on the verdict topic; granted, a worker restarted", "one line, exit 1, nothing committed past an input without its output; then lost 0", f"{S}test_no_write_acl_on_the_verdict_topic_then_granted"),
    ("ACL: no READ on an input topic", "no READ ACL on the content topic", "start-up stops with one line naming topic and ACL, exit 1", f"{S}test_a_missing_read_acl_stops_start_up_with_one_line[no-read-on-an-input-topic]"),
    ("ACL: no ACL for the group", "no READ ACL on the consumer group", "start-up stops with one line naming group and ACL, exit 1", f"{S}test_a_missing_read_acl_stops_start_up_with_one_line[no-acl-for-the-group]"),
]  # fmt: skip


_ONLY_WHEN_ANY = frozenset({"fenced_producers", "fenced_late_outputs_dropped"})
"""Notes shown only where they are not 0 (the zombie's row, not every exactly-once row)."""


def measured(result: dict | None) -> str:
    if result is None:
        return "not run"
    notes = result.get("notes", {})
    if "line" in notes:
        tls = notes["line"].partition("; TLS: ")[2].partition(")")[0]
        cause = f"…TLS: {tls}…" if tls else notes["line"]
        return f"exit {notes['exit_code']}, one line naming the cause: “{cause}”"
    parts = [
        f"inputs {result['inputs']}",
        f"verdicts {result['verdicts']}",
        f"dead letters {result['dead_letters']}",
        f"**lost {result['lost']}**",
        f"duplicates {result['duplicates']}",
        f"peak RSS {result['peak_rss_mb']} MB",
    ]
    if result.get("recovery_s") is not None:
        parts.append(f"recovery {result['recovery_s']} s")
    if result.get("latency_p50_s") is not None:
        parts.append(f"latency after the fault p50 {result['latency_p50_s']} s")
    if "denied_line" in notes:
        parts.insert(
            0,
            f"first worker: exit {notes['exit_code']}, “{notes['denied_line']}”, "
            f"{notes['committed_while_denied']} offsets committed (past dead-lettered inputs only); then granted",
        )
    for key, label in (
        ("rss_growth_mb", "RSS growth {} MB"),
        ("fenced_producers", "**{} producers fenced**"),
        ("fenced_late_outputs_dropped", "{} late outputs of the zombie dropped"),
        ("verdict_records_aborted_in_log", "{} verdict records aborted in the log (invisible to read_committed)"),
        ("changelog_written", "changelog records written {}"),
        ("changelog_after_compaction", "left by compaction {}"),
        ("restored_records", "successor read {} records"),
        ("restored_conversations", "restored {} conversations"),
        ("log_lines_during_outage", "{} log lines"),
        ("largest_output_bytes", "largest output {} B"),
        ("rebalances", "**{} rebalances**"),
        ("restored_by_others", "conversations restored by the other members {}"),
        ("restored_by_restarted", "by the restarted ones {}"),
    ):
        if key in notes and (notes[key] or key not in _ONLY_WHEN_ANY):
            parts.append(label.format(notes[key]))
    if not notes.get("settled", True):
        parts.append("**did not settle**")
    return ", ".join(parts)


def table(results: dict[str, dict]) -> str:
    lines = ["| scenario | injected | promised | measured | command |", "|---|---|---|---|---|"]
    for name, injected, promised, test in SCENARIOS:
        command = f"`.venv/bin/python -m pytest '{test if '::' in test else T + test}'`"
        lines.append(f"| {name} | {injected} | {promised} | {measured(results.get(name))} | {command} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_FILE)
    parser.add_argument("--write", type=Path, help="Markdown file whose table (between the markers) to replace")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    rendered = table(results)
    if args.write is None:
        print(rendered)
        return 0
    text = args.write.read_text()
    if START not in text or END not in text:
        print(f"{args.write}: no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.write.write_text(f"{head}{START}\n{rendered}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
