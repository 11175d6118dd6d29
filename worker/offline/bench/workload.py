"""The benchmark's input: a reproducible mix of content and conversation events.

Texts come from the labelled data set (``texts.jsonl``: the ``text`` field;
``conversations.jsonl``: a user prompt and a model's reply). A content event judges one
text; a conversation event judges the reply, with the prompt as context, as a chat
platform would publish an assistant turn. Events cycle through the data in a seeded
shuffle, so N larger than the data repeats texts (the bench turns the dedup cache off by
default so repeats still reach the backend).

Flag rate: a text whose label is one of the 2411 harm categories gets a
``<<category:0.9>>`` marker, so the loopback server scores it as its label says and the
default policy flags it (~8% of texts.jsonl). Flagged verdicts cost a violation event and
an info log line each, as in production, so the bench does not measure only the cheap
path.

Data location: ``--data-dir``, else ``../shared/data`` next to the repository, else the
small attributed sample committed in ``worker/offline/bench/data`` (see its README).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DATA_CANDIDATES = (REPO.parent / "shared" / "data", Path(__file__).resolve().parent / "data")
TEXTS_FILE = "texts.jsonl"
CONVERSATIONS_FILE = "conversations.jsonl"

HARM_CATEGORIES = frozenset(
    {"sexual", "hate_and_discrimination", "violence_and_threats", "dangerous_and_criminal_content", "selfharm", "pii"}
)
"""Labels that become a score marker (``pii`` is advisory: the default policy flags it)."""

CONVERSATION_KEYS = 1_000
"""Conversation events share this many conversation ids (keys), so per-key order is exercised."""


class WorkloadError(Exception):
    """The benchmark data cannot be found or read; the message says which option fixes it."""


@dataclass(frozen=True, slots=True)
class BenchEvent:
    """One input record: which topic lane, its Kafka key and value, and its event id."""

    kind: str  # "content" or "conversation"
    key: bytes
    value: bytes
    event_id: str


def find_data_dir(explicit: Path | None = None) -> Path:
    """``explicit`` if given, else the first candidate holding both data files."""
    candidates = (explicit,) if explicit is not None else DATA_CANDIDATES
    for directory in candidates:
        if (directory / TEXTS_FILE).is_file() and (directory / CONVERSATIONS_FILE).is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise WorkloadError(f"no benchmark data ({TEXTS_FILE} and {CONVERSATIONS_FILE}) in {looked}: pass --data-dir DIR")


class Workload:
    """Builds ``BenchEvent`` streams from the data files. Deterministic for a given seed."""

    def __init__(self, data_dir: Path, *, conversation_share: float = 0.2, seed: int = 7) -> None:
        if not 0 <= conversation_share <= 1:
            raise WorkloadError(f"--conversation-share must be between 0 and 1, got {conversation_share}")
        self.data_dir = data_dir
        self.conversation_share = conversation_share
        rng = random.Random(seed)
        self._texts = _load_texts(data_dir / TEXTS_FILE)
        self._conversations = _load_conversations(data_dir / CONVERSATIONS_FILE)
        rng.shuffle(self._texts)
        rng.shuffle(self._conversations)
        self._seed = seed

    @property
    def flagged_share(self) -> float:
        """Share of content texts carrying a score marker."""
        return sum(1 for t in self._texts if "<<" in t) / len(self._texts)

    def events(self, count: int, *, prefix: str = "b") -> list[BenchEvent]:
        """``count`` events; ids are ``{prefix}-{i}`` so two streams never share an id."""
        return list(self.iter_events(count, prefix=prefix))

    def iter_events(self, count: int, *, prefix: str = "b") -> Iterator[BenchEvent]:
        rng = random.Random(self._seed)
        texts, conversations = self._texts, self._conversations
        share = self.conversation_share
        t = c = 0
        for i in range(count):
            event_id = f"{prefix}-{i}"
            if conversations and rng.random() < share:
                prompt, reply = conversations[c % len(conversations)]
                c += 1
                conversation_id = f"{prefix}-conv-{c % CONVERSATION_KEYS}"
                event = {
                    "id": event_id,
                    "conversation_id": conversation_id,
                    "role": "assistant",
                    "content": reply,
                    "context": [{"role": "user", "content": prompt}],
                    "tenant": "bench",
                }
                yield BenchEvent("conversation", conversation_id.encode(), _dumps(event), event_id)
            else:
                text = texts[t % len(texts)]
                t += 1
                event = {"id": event_id, "text": text, "tenant": "bench", "author_id": f"u-{i % 997}"}
                yield BenchEvent("content", event_id.encode(), _dumps(event), event_id)


def _dumps(event: dict) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def _load_texts(path: Path) -> list[str]:
    texts = []
    for line in _lines(path):
        text = str(line.get("text") or "").strip()
        if not text:
            continue
        labels = (line.get("labels") or {}).get("moderation") or []
        markers = "".join(f" <<{label}:0.9>>" for label in labels if label in HARM_CATEGORIES)
        texts.append(text + markers)
    if not texts:
        raise WorkloadError(f"{path} holds no texts")
    return texts


def _load_conversations(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in _lines(path):
        messages = line.get("messages") or []
        if len(messages) < 2:
            continue
        prompt, reply = str(messages[-2].get("content") or ""), str(messages[-1].get("content") or "")
        if prompt.strip() and reply.strip():
            pairs.append((prompt, reply))
    return pairs


def _lines(path: Path) -> Iterator[dict]:
    try:
        with path.open(encoding="utf-8") as stream:
            for number, raw in enumerate(stream, 1):
                if raw.strip():
                    try:
                        yield json.loads(raw)
                    except ValueError as err:
                        raise WorkloadError(f"{path}:{number} is not JSON ({err})") from None
    except OSError as err:
        raise WorkloadError(f"cannot read {path}: {err}") from None
