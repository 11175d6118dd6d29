"""``deploy/constraints.txt``: the exact versions the image installs, from this environment.

    python -m worker.offline.constraints > deploy/constraints.txt

Every distribution that ``pip install .`` and ``pip install '.[local]'`` pull in (the
project's requirements, followed transitively through the installed packages' metadata,
markers evaluated here) pinned to the version installed in this environment: the one the
tests ran with. The Dockerfile installs with ``-c`` from it, so an image built later gets
the same versions, not whatever is newest. Local version labels are dropped
(``torch==2.13.0`` matches the CPU build ``2.13.0+cpu`` and the default one alike).
A test fails when the file and the environment disagree.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "moderation-worker"
EXTRAS = ("local",)
"""Extras whose dependencies are pinned too (the image's ``EXTRAS`` build argument)."""


def runtime_closure(project: str = PROJECT, extras: Iterable[str] = EXTRAS) -> dict[str, str]:
    """``{canonical name: installed version}`` of every distribution ``project`` with
    ``extras`` needs at run time. Raises ``importlib.metadata.PackageNotFoundError`` when
    one is not installed here."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(project, frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        distribution = importlib.metadata.distribution(name)
        if canonicalize_name(name) != canonicalize_name(project):
            found[canonicalize_name(name)] = distribution.version.split("+")[0]
        for line in distribution.requires or ():
            requirement = Requirement(line)
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *wanted)
            ):
                continue
            if canonicalize_name(requirement.name) == canonicalize_name(project):
                continue  # a self-reference (test = moderation-worker[bench]): not a run-time need
            todo.append((requirement.name, frozenset(requirement.extras)))
    return dict(sorted(found.items()))


def constraints_text(project: str = PROJECT, extras: Iterable[str] = EXTRAS) -> str:
    pins = runtime_closure(project, extras)
    header = [
        "# The versions the image installs (pip install -c): those the tests ran with.",
        "# Regenerate: python -m worker.offline.constraints > deploy/constraints.txt",
    ]
    return "\n".join([*header, *(f"{name}=={version}" for name, version in pins.items())]) + "\n"


if __name__ == "__main__":
    sys.stdout.write(constraints_text())
