"""Fuzz target ``policy``: ``Policy.load`` on any file content.

Property: any bytes give a ``Policy`` or a ``PolicyError`` with a message, nothing else
(no ``RecursionError``, ``TypeError``, ``KeyError`` ... out of the YAML or the checks). A
policy that loads works: its version is 12 hex digits, it decides every category it
names (and one it does not) for the base rules and every override's match, and its
validated document, loaded again, is the same policy (the same version).
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path

from schemas import ACTION_SEVERITY
from worker.pipeline.policy import Policy, PolicyError

_DIR = tempfile.mkdtemp(prefix="fuzz-policy-")
atexit.register(shutil.rmtree, _DIR, True)
_FILE = Path(_DIR) / "policy.yaml"


def check(data: bytes) -> None:
    _FILE.write_bytes(data)
    try:
        policy = Policy.load(_FILE)
    except PolicyError as err:
        assert str(err).strip(), "a PolicyError without a message"
        return
    assert re.fullmatch(r"[0-9a-f]{12}", policy.version), f"version {policy.version!r}"
    names = list(policy.category_descriptions())
    scores = dict.fromkeys([*names, "a-category-the-policy-does-not-name"], 1.0)
    contexts = [(None, None)] + [(o.match.tenant, o.match.source) for o in policy._overrides]
    for tenant, source in contexts:
        decision = policy.decide(scores, tenant=tenant, source=source)
        assert decision.action in ACTION_SEVERITY, f"action {decision.action!r}"
        assert decision.action == (decision.violations[0].action if decision.violations else "allow")
    for name in [*names, None]:
        assert policy.possible_actions(name) <= ACTION_SEVERITY.keys()
    for name in names:
        policy.thresholds(name)
        policy.cascade_band(name)
    again = Policy.from_mapping(policy.document())
    assert again.version == policy.version, "the validated document, loaded again, is another policy"
