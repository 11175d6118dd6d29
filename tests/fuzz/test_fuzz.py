"""The fuzz targets of ``tests.fuzz.run``: each kept corpus holds its property, and each
target fuzzes for a fixed budget (``SECONDS_PER_TARGET``) without a crash.

New inputs go to a scratch directory, never into the kept corpus; a crash or a slow input
(over ``-timeout``) is written under build/fuzz/<target>/ and the failure names the file and
the command that replays it. ``make fuzz`` runs longer and grows the kept corpus.
"""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.fuzz.run import ROOT, TARGETS, command

SECONDS_PER_TARGET = 15
"""The CI budget: five targets, about 90 s in all with their start-up."""
SLOW_INPUT_S = 10
"""An input that takes longer than this is a failure: a denial of service on one record."""


@pytest.mark.parametrize("name", TARGETS)
def test_every_kept_input_holds_the_target_s_property(name: str) -> None:
    # In-process and without atheris: the regressions of earlier crashes are in the corpus.
    module = importlib.import_module(TARGETS[name].module)
    inputs = sorted(path for path in TARGETS[name].corpus(name).iterdir() if path.is_file())
    assert len(inputs) >= 5, f"tests/fuzz/corpus/{name} has {len(inputs)} inputs; seed it"
    for path in inputs:
        try:
            module.check(path.read_bytes())
        except BaseException as err:
            err.add_note(f"kept corpus input: {path}")
            raise


@pytest.mark.slow
@pytest.mark.fuzz
@pytest.mark.timeout(SECONDS_PER_TARGET + 120)
@pytest.mark.parametrize("name", TARGETS)
def test_fuzzing_for_the_budget_finds_no_crash(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (the test extra, Linux wheels) is not installed")
    kept = TARGETS[name].corpus(name)
    kept_before = sorted(p.name for p in kept.iterdir())
    scratch = tmp_path / "new"
    scratch.mkdir()
    artifacts = ROOT / "build" / "fuzz" / name
    artifacts.mkdir(parents=True, exist_ok=True)
    earlier = set(artifacts.iterdir())
    flags = [
        f"-max_total_time={SECONDS_PER_TARGET}",
        f"-timeout={SLOW_INPUT_S}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    result = subprocess.run(
        command(name, *flags, str(scratch), str(kept)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS_PER_TARGET + 90,
        check=False,
    )
    output = result.stdout + result.stderr
    found = sorted(set(artifacts.iterdir()) - earlier)
    assert result.returncode == 0 and not found, (
        f"fuzz target {name} failed (exit {result.returncode}); crashing input: "
        f"{', '.join(map(str, found)) or 'none written'}; replay it with "
        f"`python -m tests.fuzz.run {name} <input>`\n{_report(output)}"
    )
    assert sorted(p.name for p in kept.iterdir()) == kept_before, "the run wrote into the kept corpus"
    # Guidance is real: the parser's module was instrumented and the run saw its branches.
    assert re.search(rf"INFO: Instrumenting {re.escape(TARGETS[name].parser)}\n", output), _report(output)
    done = re.search(r"Done (\d+) runs", output)
    coverage = [int(c) for c in re.findall(r" cov: (\d+)", output)]
    assert done and int(done.group(1)) > 0 and coverage and max(coverage) >= 20, _report(output)


def _report(output: str) -> str:
    """libFuzzer's output without its progress lines (one per new input): the seed, the
    exception with its traceback, the crashing input."""
    return "\n".join(line for line in output.splitlines() if not line.startswith("#"))[-6000:]
