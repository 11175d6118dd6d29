"""The golden set of each example forum policy, gated on its checked-in per-category F1.

``deploy/golden/<policy>.jsonl`` holds hand-written forum posts labelled with the policy's
categories; ``loopback_scores`` on each post is what the loopback server's stand-in model
answers for it (the test appends them to the text as the server's markers; a real model
never sees them). ``modworker eval --backend llm --gate <policy>.baseline.json`` must pass
for each policy with its dialect. The stand-in knows the checked-in policy's questions
(shieldstral, granite-guardian): a reworded one is a question it does not recognise and
answers "no", so a changed threshold, action, override or question moves the F1 here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("numpy", reason="eval needs the 'local' extra")

from worker.cli import main
from worker.offline.evaluate import GATE_TOLERANCE
from worker.pipeline.policy import Policy
from worker.testing import LlmServer

DEPLOY = Path(__file__).parents[2] / "deploy"
GOLDEN = DEPLOY / "golden"
DIALECT_OF = {
    "forum-llm": "json",
    "forum-shieldstral": "shieldstral",
    "forum-gpt-oss-safeguard": "gpt-oss-safeguard",
    "forum-granite-guardian": "granite-guardian",
}


def marked_copy(name: str, directory: Path) -> Path:
    """The golden set with each post's ``loopback_scores`` appended as markers."""
    lines = []
    for line in (GOLDEN / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        scores = record.pop("loopback_scores")
        record["text"] += "".join(f" <<{category}:{score}>>" for category, score in scores.items())
        lines.append(json.dumps(record) + "\n")
    path = directory / f"{name}.marked.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def run_gate(
    name: str, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, object], str]:
    """``modworker eval`` of the golden set under ``policy`` gated on the baseline: (exit code, report, stderr)."""
    data = marked_copy(name, tmp_path)
    report_path = tmp_path / f"{name}.report.json"
    known = Policy.load(DEPLOY / f"policy.{name}.example.yaml").category_descriptions()
    with LlmServer(api_key=None, dialect=DIALECT_OF[name], categories=known) as server:  # type: ignore[arg-type]
        monkeypatch.setenv("MODWORKER_LLM__BASE_URL", server.base_url)
        monkeypatch.setenv("MODWORKER_LLM__DIALECT", DIALECT_OF[name])
        monkeypatch.setenv("MODWORKER_LLM__PARSE_RETRIES", "0")
        argv = ["eval", str(data), "--backend", "llm", "--model", "guard", "--policy", str(policy)]
        code = main(
            [*argv, "--report", str(report_path), "--no-plots", "--gate", str(GOLDEN / f"{name}.baseline.json")]
        )
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return code, report, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(DIALECT_OF))
def test_each_example_policy_keeps_its_golden_set_f1(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, err = run_gate(name, DEPLOY / f"policy.{name}.example.yaml", tmp_path, monkeypatch, capsys)
    measured = {c: {"f1": entry["f1"]} for c, entry in report["categories"].items()}  # type: ignore[attr-defined]
    assert code == 0, f"golden F1 moved beyond {GATE_TOLERANCE}:\n{err}\nmeasured: {json.dumps(measured)}"
    golden_posts = len((GOLDEN / f"{name}.jsonl").read_text(encoding="utf-8").splitlines())
    assert report["examples"] == golden_posts and report["rejected"] == 0, "every golden post scored"
    assert 20 <= golden_posts <= 40


def test_a_raised_threshold_fails_the_gate_naming_the_category(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (DEPLOY / "policy.forum-llm.example.yaml").read_text(encoding="utf-8")
    edited = text.replace("  spam:\n    threshold: 0.8\n", "  spam:\n    threshold: 0.95\n")
    assert edited != text
    policy = tmp_path / "policy.yaml"
    policy.write_text(edited, encoding="utf-8")
    code, _, err = run_gate("forum-llm", policy, tmp_path, monkeypatch, capsys)
    assert code == 1
    assert "eval: gate: spam: F1" in err and "gate FAILED" in err
    assert "off_topic" not in err, "only the edited category moved"


def test_a_reworded_question_fails_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    document = yaml.safe_load((DEPLOY / "policy.forum-shieldstral.example.yaml").read_text(encoding="utf-8"))
    document["categories"]["pii"]["description"] = "Does this content reveal someone's private details?"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(document), encoding="utf-8")
    code, _, err = run_gate("forum-shieldstral", policy, tmp_path, monkeypatch, capsys)
    assert code == 1
    assert "eval: gate: pii: F1 0.0000" in err, "the question the model no longer recognises scores nothing"
    assert "spam" not in err, "only the reworded category moved"
