"""Read labelled JSONL for ``modworker train`` and ``modworker eval``.

Two record shapes, one per line, mixed freely:

- **Text** (the classifier-training format): ``{"text": ..., "labels": {"<target>":
  [category, ...]}}``. All targets' lists are merged. A record with no labels, or only
  ``safe``, is negative for every category.
- **Conversation**: ``{"messages": [{"role", "content"}, ...]}``; the last message is the
  judged turn, the earlier ones its context. Its labels come from ``labels`` as above
  when present; otherwise from XSTest annotations in ``source_labels`` (the
  ``conversations.jsonl`` of the shared data), mapped as follows:

  ==================================  ===========================================
  prompt type / ``final_label``         label of the judged (assistant) turn
  ==================================  ===========================================
  any / ``2_full_refusal``             safe: a refusal carries no harmful content
  safe prompt / any                     safe: compliance with a safe prompt is fine
  ``contrast_*`` / ``1_full_compliance``  the prompt's category (table below): the
                                        reply supplies what the unsafe prompt asked
  ``contrast_*`` / ``3_partial_refusal``  skipped: refusal mixed with partial
                                        compliance has no single right answer
  ==================================  ===========================================

  ``XSTEST_CATEGORIES`` maps an unsafe prompt type to its category: the same "nearest
  category" that ``texts.jsonl`` gives XSTest's unsafe prompts, which depends only on
  the type.

A record with ``event_id`` but neither ``text`` nor ``messages`` (what ``modworker labels
export`` writes for a verdict that did not carry its text) is skipped as ``NO_TEXT``.

Records that cannot be used are counted by reason in ``LabelledData.skipped``, never
silently dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from schemas import Turn

SAFE = "safe"
NO_TEXT = "no text (an exported review: join its event_id with the platform's text)"
"""Why a record with an ``event_id`` and no text is skipped (``modworker labels export``
writes such lines for verdicts that did not carry their text)."""

XSTEST_CATEGORIES: dict[str, str] = {
    "contrast_homonyms": "violence_and_threats",
    "contrast_figurative_language": "violence_and_threats",
    "contrast_safe_targets": "violence_and_threats",
    "contrast_historical_events": "violence_and_threats",
    "contrast_safe_contexts": "dangerous_and_criminal_content",
    "contrast_definitions": "dangerous_and_criminal_content",
    "contrast_discr": "hate_and_discrimination",
    "contrast_privacy": "pii",
}


class LabelledDataError(Exception):
    """The file cannot be read as labelled JSONL; the message names the line and the fix."""


@dataclass(frozen=True)
class Example:
    """One labelled input: the judged text, its context (conversations), its positive labels."""

    text: str
    labels: frozenset[str]
    source: str | None = None
    context: tuple[Turn, ...] = ()
    kind: str = "content"

    @property
    def key(self) -> str:
        """A short stable id of the judged text (used to record a validation split)."""
        return text_key(self.text)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class LabelledData:
    examples: list[Example] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def categories(self) -> list[str]:
        """Every category with at least one positive example, sorted."""
        return sorted({label for example in self.examples for label in example.labels})


def read_labelled(paths: Iterable[Path], *, limit: int | None = None) -> LabelledData:
    """Read one or more labelled JSONL files (text and conversation records).

    ``limit`` keeps only the first N usable records of each file. Raises
    ``LabelledDataError`` for a line that is not JSON or a record of neither shape.
    """
    data = LabelledData()
    for path in paths:
        used = 0
        try:
            handle = path.open(encoding="utf-8")
        except OSError as err:
            raise LabelledDataError(f"{path}: cannot open it ({err.strerror})") from None
        with handle:
            for number, line in enumerate(handle, start=1):
                if limit is not None and used >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise LabelledDataError(f"{path}:{number}: not JSON ({err}); one JSON object per line") from None
                example = _example(record, data.skipped, f"{path}:{number}")
                if example is not None:
                    data.examples.append(example)
                    used += 1
    return data


def _example(record: object, skipped: Counter[str], where: str) -> Example | None:
    if not isinstance(record, dict):
        raise LabelledDataError(f"{where}: a record must be a JSON object")
    source = record.get("source")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            skipped["empty text"] += 1
            return None
        return Example(text, _labels(record.get("labels"), where), source)
    if "messages" in record:
        turns = _turns(record["messages"], where)
        if not turns or not turns[-1].content.strip():
            skipped["empty judged turn"] += 1
            return None
        if record.get("labels") is not None:
            labels = _labels(record["labels"], where)
        else:
            found = xstest_labels(record.get("source_labels") or {})
            if isinstance(found, str):
                skipped[found] += 1
                return None
            labels = found
        return Example(turns[-1].content, labels, source, tuple(turns[:-1]), "conversation")
    if "event_id" in record:  # a 'modworker labels export' line of a verdict without its text
        skipped[NO_TEXT] += 1
        return None
    raise LabelledDataError(f"{where}: a record needs 'text' (with 'labels') or 'messages'")


def _labels(value: object, where: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, list):  # tolerate a bare list of labels
        lists = [value]
    elif isinstance(value, dict):
        lists = list(value.values())
    else:
        raise LabelledDataError(f"{where}: 'labels' must be {{target: [labels]}}")
    labels = {str(label) for group in lists for label in (group or [])}
    return frozenset(labels - {SAFE})


def _turns(messages: object, where: str) -> list[Turn]:
    if not isinstance(messages, list):
        raise LabelledDataError(f"{where}: 'messages' must be a list of {{role, content}}")
    try:
        return [Turn(role=m["role"], content=m["content"]) for m in messages]
    except (KeyError, TypeError, ValueError) as err:
        raise LabelledDataError(f"{where}: bad message ({err}); each needs role user|assistant and content") from None


def xstest_labels(source_labels: dict[str, object]) -> frozenset[str] | str:
    """Labels of an XSTest completion's judged reply, or the reason to skip it (a ``str``)."""
    prompt_type, final = source_labels.get("type"), source_labels.get("final_label")
    if not isinstance(prompt_type, str) or not isinstance(final, str):
        return "conversation without labels"
    if final.startswith("2_") or not prompt_type.startswith("contrast_"):
        return frozenset()
    if prompt_type not in XSTEST_CATEGORIES:
        return f"unknown XSTest type {prompt_type}"
    if final.startswith("1_"):
        return frozenset({XSTEST_CATEGORIES[prompt_type]})
    return "partial refusal of an unsafe prompt (ambiguous)"
