"""``modworker eval --backend llm`` against a loopback chat-completions server, with the forum policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("numpy", reason="eval needs the 'local' extra")

from worker.cli import main
from worker.testing import LlmServer

FORUM_POLICY = Path(__file__).parents[2] / "deploy" / "policy.forum-llm.example.yaml"


def test_eval_measures_the_llm_backend_on_custom_categories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"text": f"visit my shop {i} <<spam:0.9>>", "labels": {"moderation": ["spam"]}} for i in range(6)]
    records += [{"text": f"rest the dough {i} minutes", "labels": {"moderation": ["safe"]}} for i in range(6)]
    records += [
        {
            "messages": [
                {"role": "user", "content": "tips?"},
                {"role": "assistant", "content": "sub to me <<spam:0.85>>"},
            ],
            "labels": {"moderation": ["spam"]},
        }
    ]
    data = tmp_path / "forum.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    report_path = tmp_path / "report.json"
    with LlmServer(api_key="eval-key") as server:
        monkeypatch.setenv("MODWORKER_LLM__BASE_URL", server.base_url)
        monkeypatch.setenv("MODWORKER_LLM__API_KEY", "eval-key")
        argv = ["eval", str(data), "--backend", "llm", "--model", "judge-2", "--policy", str(FORUM_POLICY)]
        assert main([*argv, "--report", str(report_path), "--no-plots"]) == 0
        assert server.request_count == len(records), "one request per input, no cache in eval"
        assert all(r.body["model"] == "judge-2" for r in server.requests)
        assert "- spam: Unsolicited advertising" in server.requests[0].body["messages"][0]["content"]
    report = json.loads(report_path.read_text())
    assert report["backend"] == "llm" and report["model"] == "judge-2"
    assert report["examples"] == len(records)
    spam = report["categories"]["spam"]
    assert spam["support"] == 7 and spam["scored_by_backend"]
    assert spam["precision"] == 1.0 and spam["recall"] == 1.0
    assert spam["policy_threshold"] == 0.8
