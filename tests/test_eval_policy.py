"""`modworker eval` measures the policy `modworker run` applies with the same settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from worker import backends
from worker.backends.local_model import starter_model_dir
from worker.cli import CommandError, cmd_run
from worker.config import ConfigError, load_settings
from worker.offline.evaluate import load_policy_and_data
from worker.pipeline.policy import Policy, PolicyError


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "labelled.jsonl"
    path.write_text(json.dumps({"text": "hello there", "labels": {"t": []}}) + "\n", encoding="utf-8")
    return path


def _eval_args(data: Path, policy: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(policy=policy, data=[data], limit=None, holdout=None)


def test_eval_with_the_local_starter_model_measures_the_starter_models_own_policy(tmp_path: Path) -> None:
    settings = load_settings(None, require_backend=False, require_kafka=False, backend="local")
    evaluated, _ = load_policy_and_data(_eval_args(_data(tmp_path)), settings)
    assert evaluated.document() == backends.load_policy(settings).document()
    assert evaluated.document() == Policy.load(starter_model_dir() / "policy.yaml").document()
    assert evaluated.document() != Policy.load(None).document(), "the starter's policy is not the built-in one"


def test_eval_policy_flag_still_overrides_the_resolved_policy(tmp_path: Path) -> None:
    settings = load_settings(None, require_backend=False, require_kafka=False, backend="local")
    builtin = tmp_path / "policy.yaml"
    builtin.write_text(json.dumps(Policy.load(None).document()), encoding="utf-8")
    evaluated, _ = load_policy_and_data(_eval_args(_data(tmp_path), builtin), settings)
    assert evaluated.document() == Policy.load(None).document()


def test_run_and_eval_resolve_the_policy_through_the_same_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both commands call ``worker.backends.load_policy``: a policy it cannot load stops both."""

    def refuse(settings: object) -> Policy:
        raise PolicyError("resolved by load_policy")

    monkeypatch.setattr(backends, "load_policy", refuse)
    settings = load_settings(None, require_backend=False, require_kafka=False, backend="local")
    with pytest.raises(CommandError, match="resolved by load_policy"):
        load_policy_and_data(_eval_args(_data(tmp_path)), settings)
    monkeypatch.setenv("MODWORKER_BACKEND", "local")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    run_args = argparse.Namespace(config=None)
    with pytest.raises(ConfigError, match="resolved by load_policy"):
        cmd_run(run_args)
