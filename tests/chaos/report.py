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

SCENARIOS: list[tuple[str, str, str, str]] = [
    # (scenario name as recorded, injected, promised, test)
    ("malformed 10%", "10% of inputs not UTF-8, not JSON or off-schema", "each dead-lettered with its reason; lost 0, no duplicates", "test_malformed_inputs_at_ten_percent"),
    ("worker SIGKILL mid-stream", "the only worker SIGKILLed, a new one started", "lost 0; duplicates ≤ the killed worker's in-flight window (200)", "test_worker_sigkill_mid_stream"),
    ("rebalance storm", "3 workers; every 4 s one SIGKILLed and one added (4 times)", "lost 0; duplicates ≤ 200 per kill", "test_rebalance_storm"),
    ("broker SIGKILL, down 5 s", "broker SIGKILLed, restarted on the same port and storage after 5 s", "lost 0; worker rides it out and stops cleanly; tens of log lines besides the per-message ones, all JSON", "test_broker_sigkill_and_restart[5]"),
    ("broker SIGKILL, down 30 s", "as above, 30 s", "as above", "test_broker_sigkill_and_restart[30]"),
    ("backend 503 burst", "every API request answers 503 for 3 s", "lost 0, no duplicates (policy `wait`)", "test_backend_503_burst"),
    ("backend 6x503 then healthy", "6 requests answer 503, then healthy", "moderation resumes within seconds (asked: ~2 s; checked: ≤ 20 s end to end, the broker's own latency included)", "test_backend_503_burst_recovers_within_seconds"),
    ("backend flapping 20 s / 20 s", "API down (503) 20 s, up 20 s, twice", "lost 0, no duplicates", "test_backend_flapping"),
    ("backend outage 60 s (wait)", "every request 503 for 60 s", "lost 0; RSS flat (growth over the last 40 s < 15 MB)", "test_backend_outage_60s_under_wait_keeps_memory_flat"),
    ("backend 429 storm", "every other request 429 with Retry-After: 1, for 15 s", "lost 0, no duplicates", "test_backend_429_storm"),
    ("one poison input", "one input the API answers 500 every time; the stream goes on", "dead-lettered `backend_failed`, the rest judged; lost 0", "test_one_poison_input[stream-goes-on]"),
    ("one poison input, then the stream stops", "as above, the stream stopped 0.5 s after it (no other traffic during the search)", "as above", "test_one_poison_input[stream-stops]"),
    ("oversized input (900 KB)", "one 900 KB input (over MODWORKER_MAX_TEXT_CHARS)", "dead-lettered `too_long`; lost 0", "test_oversized_input"),
    ("oversized outputs (limit 64 KB)", "a verdict and a dead letter larger than the output limit", "outputs made to fit, never fatal; lost 0", "test_oversized_output"),
    ("end to end over TLS", "broker reachable only through TLS (stunnel)", "lost 0, no duplicates", "test_end_to_end_over_tls"),
    ("TLS port, wrong CA client", "worker trusting another CA", "start-up stops with one line, exit 1", "test_a_bad_tls_client_stops_start_up_with_one_line[wrong CA]"),
    ("TLS port, plaintext client", "worker speaking plaintext to the TLS port", "start-up stops with one line, exit 1", "test_a_bad_tls_client_stops_start_up_with_one_line[plaintext]"),
]  # fmt: skip


def measured(result: dict | None) -> str:
    if result is None:
        return "not run"
    notes = result.get("notes", {})
    if "line" in notes:
        cause = notes["line"].partition("; TLS: ")[2].partition(")")[0] or notes["line"][:90]
        return f"exit {notes['exit_code']}, one line naming the cause: “…TLS: {cause}…”"
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
    for key, label in (
        ("rss_growth_mb", "RSS growth {} MB"),
        ("log_lines_during_outage", "{} log lines"),
        ("largest_output_bytes", "largest output {} B"),
    ):
        if key in notes:
            parts.append(label.format(notes[key]))
    if not notes.get("settled", True):
        parts.append("**did not settle**")
    return ", ".join(parts)


def table(results: dict[str, dict]) -> str:
    lines = ["| scenario | injected | promised | measured | command |", "|---|---|---|---|---|"]
    for name, injected, promised, test in SCENARIOS:
        command = f"`.venv/bin/python -m pytest '{T}{test}'`"
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
