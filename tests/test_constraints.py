"""deploy/constraints.txt: the image installs exactly the versions the tests ran with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from worker.offline.constraints import constraints_text, runtime_closure

ROOT = Path(__file__).parents[1]
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
REGENERATE = "run `python -m worker.offline.constraints > deploy/constraints.txt`"


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version
    return found


def test_the_constraints_pin_every_run_time_dependency_at_the_tested_version():
    assert CONSTRAINTS.read_text() == constraints_text(), (
        f"deploy/constraints.txt differs from this environment: {REGENERATE}"
    )
    closure = runtime_closure()
    for needed in ("aiokafka", "pydantic", "pydantic-core", "httpx", "yarl", "torch"):  # direct and transitive
        assert needed in closure, needed


def test_every_pin_satisfies_the_project_s_own_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["local"]]
    pinned = pins()
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pinned[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (line, version)


def test_the_image_installs_with_the_constraints():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*deploy/constraints\.txt \./$", dockerfile, re.M)
    (install,) = re.findall(r"^RUN pip install .*$", dockerfile, re.M)
    assert " -c constraints.txt " in install
