"""The consumer-side models install alone, as ``moderation_contracts``, and need only pydantic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import annotated_types
import pydantic
import pydantic_core
import typing_extensions
import typing_inspection

ROOT = Path(__file__).parents[1]

ALLOWED = {"moderation_contracts", "pydantic", "pydantic_core", "typing_extensions", "annotated_types",
           "typing_inspection"}  # fmt: skip

READ_A_VERDICT = """
import json, sys
sys.path[:0] = sys.argv[1:3]
for name in ("schemas", "worker", "aiokafka", "yaml"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the package is not alone")
from moderation_contracts import CONTRACT_VERSION, OutputHeaders, Verdict
verdict = Verdict.model_validate_json(sys.stdin.read())
third_party = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_sysconfigdata")} - set(sys.stdlib_module_names) - {"__main__"})
print(json.dumps({"action": verdict.action, "event_id": verdict.event_id, "modules": third_party,
                  "version": CONTRACT_VERSION, "header": OutputHeaders.CONTRACT}))
"""


def test_the_contracts_package_installs_alone_and_reads_a_verdict_it_partly_does_not_know(tmp_path: Path):
    source = tmp_path / "contracts"  # a copy, links followed: the build leaves nothing in the checkout
    shutil.copytree(ROOT / "contracts", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("moderation_contracts-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert (site / "moderation_contracts" / "json" / "verdict.schema.json").is_file()
    # pydantic and its own dependencies, nothing else of this environment
    deps = tmp_path / "deps"
    deps.mkdir()
    for module in (pydantic, pydantic_core, annotated_types, typing_inspection):
        (deps / module.__name__).symlink_to(Path(module.__file__).parent)
    (deps / "typing_extensions.py").symlink_to(typing_extensions.__file__)
    verdict = {
        "verdict_id": "v1", "event_id": "c1", "kind": "content", "action": "block", "flagged": True,
        "violations": [{"category": "sexual", "score": 0.9, "threshold": 0.5, "action": "block", "new": 1}],
        "scores": {"sexual": 0.9}, "model": "m", "backend": "mistral", "policy_version": "0123456789ab",
        "input": {"topic": "ugc.content", "partition": 0, "offset": 7}, "decided_at": "2026-01-01T00:00:00Z",
        "a_field_added_later": {"any": "thing"},
    }  # fmt: skip
    # -S: no site-packages, so neither this environment's packages nor the worker's checkout
    read = subprocess.run(
        [sys.executable, "-S", "-c", READ_A_VERDICT, str(site), str(deps)],
        input=json.dumps(verdict), capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert read.returncode == 0, read.stderr + read.stdout
    answer = json.loads(read.stdout)
    assert (answer["action"], answer["event_id"], answer["version"]) == ("block", "c1", "2")
    assert answer["header"] == "modworker-contract"
    assert set(answer["modules"]) <= ALLOWED, answer["modules"]
    assert "moderation_contracts" in answer["modules"]
