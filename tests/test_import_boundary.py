"""``modworker run`` with a remote backend loads none of the offline tools or their libraries,
and with the default HTTP engine not httpx either (~3 MB of resident memory with its imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "matplotlib", "sklearn", "worker.offline")

PROBE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stdout))
from worker.cli import main
sys.exit(main(["run"]))
"""


def test_run_with_the_mistral_backend_imports_no_offline_tool():
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # refused at once: the run ends after start-up
        "MISTRAL_API_KEY": "x",
        "MODWORKER_HTTP_PORT": "0",
        "MODWORKER_LOG_FORMAT": "json",
    }
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, timeout=60, check=False)
    modules = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert "worker.app" in modules and "worker.backends.mistral" in modules, "the probe did not reach the worker"
    loaded = [m for m in modules if m.startswith(HEAVY)]
    assert loaded == [], f"modworker run imported {loaded}"
    assert "aiohttp" in modules and "httpx" not in modules, "the default engine (aiohttp) loaded httpx"
