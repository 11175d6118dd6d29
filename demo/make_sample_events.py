"""Rebuild demo/sample_events/ from the shared labelled data (deterministic).

    python demo/make_sample_events.py ../shared/data

Picks a small mix of short texts per source and label, and a few XSTest conversations
(the assistant reply is the judged turn, the user prompt its context), and writes them as
ContentEvent / ConversationEvent JSONL. One deliberately blank content event shows
dead-lettering. Every event names its origin data set and licence in ``metadata``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

LICENCES = {"openai-moderation": "MIT", "davidson-tweets": "MIT", "xstest": "CC-BY-4.0"}
# (source, label, how many): short texts of each kind, so the terminal stays readable.
CONTENT_PICKS = [
    ("davidson-tweets", "safe", 3),
    ("davidson-tweets", "offensive", 3),
    ("davidson-tweets", "hate_and_discrimination", 2),
    ("openai-moderation", "safe", 2),
    ("openai-moderation", "sexual", 2),
    ("openai-moderation", "violence_and_threats", 2),
    ("openai-moderation", "selfharm", 2),
    ("openai-moderation", "hate_and_discrimination", 1),
    ("xstest", "safe", 3),
    ("xstest", "violence_and_threats", 1),
    ("xstest", "dangerous_and_criminal_content", 1),
    ("xstest", "pii", 1),
]
# (prompt is unsafe, final_label, how many)
CONVERSATION_PICKS = [(False, "1_full_compliance", 2), (True, "2_full_refusal", 2), (True, "1_full_compliance", 2)]


def main(data_dir: Path, out: Path) -> None:
    rng = random.Random(2411)
    texts = [json.loads(line) for line in (data_dir / "texts.jsonl").open(encoding="utf-8")]
    events = []
    for source, label, n in CONTENT_PICKS:
        pool = [
            r
            for r in texts
            if r["source"] == source and r["labels"]["moderation"] == [label] and 20 <= len(r["text"]) <= 140
        ]
        for record in rng.sample(pool, n):
            events.append((record, label))
    rng.shuffle(events)
    content = []
    for i, (record, label) in enumerate(events, start=1):
        content.append(
            {
                "id": f"demo-c-{i:03d}",
                "text": record["text"],
                "tenant": "demo",
                "source": record["source"],
                "metadata": {"dataset": record["source"], "licence": LICENCES[record["source"]], "label": label},
            }
        )
    content.insert(
        len(content) // 2,
        {
            "id": "demo-c-blank",
            "text": "   ",
            "tenant": "demo",
            "source": "demo",
            "metadata": {"note": "blank on purpose: goes to the dead-letter topic"},
        },
    )

    conversations = [json.loads(line) for line in (data_dir / "conversations.jsonl").open(encoding="utf-8")]
    turns = []
    for unsafe, final, n in CONVERSATION_PICKS:
        pool = [
            r
            for r in conversations
            if r["source_labels"]["type"].startswith("contrast_") == unsafe
            and r["source_labels"]["final_label"] == final
            and len(r["messages"][1]["content"]) <= 400
        ]
        turns.extend(rng.sample(pool, n))
    conversation_events = []
    for i, record in enumerate(turns, start=1):
        user, assistant = record["messages"]
        conversation_events.append(
            {
                "id": f"demo-conv-{i:02d}-t2",
                "conversation_id": f"demo-conv-{i:02d}",
                "role": "assistant",
                "content": assistant["content"],
                "context": [{"role": "user", "content": user["content"]}],
                "tenant": "demo",
                "source": record["source"],
                "metadata": {"dataset": record["source"], "licence": "CC-BY-4.0", **record["source_labels"]},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("content.jsonl", content), ("conversations.jsonl", conversation_events)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"), Path(__file__).parent / "sample_events")
