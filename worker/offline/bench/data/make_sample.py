"""Rebuild the bench's fallback sample from the full labelled data.

    python worker/offline/bench/data/make_sample.py ../shared/data

Writes ``texts.jsonl`` (400 lines) and ``conversations.jsonl`` (60 lines) beside this
script: seeded random draws, lines copied unchanged (same format, same attribution).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {"texts.jsonl": 400, "conversations.jsonl": 60}


def main(source: Path) -> None:
    for name, size in SIZES.items():
        lines = [line for line in (source / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        picked = sorted(random.Random(2024).sample(range(len(lines)), size))
        (HERE / name).write_text("".join(lines[i] + "\n" for i in picked), encoding="utf-8")
        print(f"{name}: {size} of {len(lines)} lines")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data"))
