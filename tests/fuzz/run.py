"""Coverage-guided fuzzing of the parsers that read outside input (atheris on libFuzzer).

Each target (``TARGETS``) is a module of ``tests/fuzz`` with ``check(data: bytes)``, which
raises when its property fails: an exception the parser does not document, or a result
that breaks its contract. The parser's modules are instrumented as they are imported,
so libFuzzer's mutations are guided by the branches of the project's code (and of PyYAML's).

    python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus dirs or input files]
    python -m tests.fuzz.run --grow SECONDS [TARGET ...]

The first form is libFuzzer's own command line (``-max_total_time=60``, ``-runs=``,
``-help=1``); given files, it runs each once, which replays a crash. With directories, new
inputs go into the first one: put a scratch directory before ``tests/fuzz/corpus/TARGET``
to leave the kept corpus as it is. ``--grow`` fuzzes each target (all by default) for
SECONDS from its kept corpus, then merges into the kept corpus only the new inputs that
reach coverage it lacked. ``tests/fuzz/test_fuzz.py`` runs every target for a fixed budget.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"
DICTS = HERE / "dicts"


@dataclass(frozen=True)
class Target:
    """One fuzz target: the module holding ``check``, the module whose parser it fuzzes, and
    the packages to instrument (top-level names: atheris instruments whole packages)."""

    module: str
    parser: str
    instrument: tuple[str, ...]

    def corpus(self, name: str) -> Path:
        return CORPUS / name

    def flags(self, name: str) -> list[str]:
        """libFuzzer flags every run of this target takes: its dictionary, when it has one."""
        dictionary = DICTS / f"{name}.dict"
        return [f"-dict={dictionary}"] if dictionary.exists() else []


TARGETS: dict[str, Target] = {
    "decode": Target("tests.fuzz.fuzz_decode", "worker.pipeline.decode", ("worker", "schemas")),
    "policy": Target("tests.fuzz.fuzz_policy", "worker.pipeline.policy", ("worker", "schemas", "yaml")),
    "llm_answer": Target("tests.fuzz.fuzz_llm_answer", "worker.backends.llm_dialects", ("worker", "schemas")),
    "changelog": Target("tests.fuzz.fuzz_changelog", "worker.pipeline.conversation_state", ("worker", "schemas")),
    "headers": Target("tests.fuzz.fuzz_headers", "worker.backends.pacing", ("worker", "email")),
}


def command(name: str, *args: str) -> list[str]:
    """The command line that fuzzes target ``name`` with libFuzzer ``args``."""
    return [sys.executable, "-m", "tests.fuzz.run", name, *TARGETS[name].flags(name), *args]


def fuzz(name: str, args: list[str]) -> None:
    """Instrument target ``name``'s packages, import its ``check`` and hand over to libFuzzer
    (which exits the process: 0 when the budget ran out clean, non-zero on a crash)."""
    import atheris

    target = TARGETS[name]
    with atheris.instrument_imports(include=list(target.instrument)):
        module = importlib.import_module(target.module)
    # libFuzzer runs argv[0] through the shell for its child processes (-merge, -fork): the
    # command that fuzzes this target, not the path of this file.
    atheris.Setup([f"{sys.executable} -m tests.fuzz.run {name}", *args], module.check)
    atheris.Fuzz()


def grow(seconds: int, names: list[str]) -> int:
    """Fuzz each target for ``seconds`` from its kept corpus, then merge into it the new
    inputs that add coverage (libFuzzer ``-merge=1``). Crashing inputs are written under
    build/fuzz/<target>/; returns the number of targets that crashed."""
    crashed = 0
    for name in names:
        kept = TARGETS[name].corpus(name)
        kept.mkdir(parents=True, exist_ok=True)
        artifacts = ROOT / "build" / "fuzz" / name
        artifacts.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch:
            flags = [
                f"-max_total_time={seconds}",
                "-timeout=10",
                f"-artifact_prefix={artifacts}/",
                "-print_final_stats=1",
            ]
            run = subprocess.run(command(name, *flags, scratch, str(kept)), cwd=ROOT, check=False)
            if run.returncode != 0:
                crashed += 1
                print(
                    f"fuzz target {name} crashed (exit {run.returncode}): the input is under {artifacts}",
                    file=sys.stderr,
                )
            subprocess.run(command(name, "-merge=1", str(kept), scratch), cwd=ROOT, check=True)
    return crashed


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "--grow":
        sys.exit(1 if grow(int(argv[1]), argv[2:] or list(TARGETS)) else 0)
    if not argv or argv[0] not in TARGETS:
        sys.exit(
            f"usage: python -m tests.fuzz.run TARGET [libFuzzer args] | --grow SECONDS [TARGET ...]; "
            f"targets: {', '.join(TARGETS)}"
        )
    fuzz(argv[0], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
