"""The API-only install must not need torch/transformers: the local stack imports them lazily."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("torch", "transformers", "numpy", "sklearn", "matplotlib", "safetensors")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_and_local_backend_import_without_loading_torch() -> None:
    done = run_python(
        f"""
        import sys
        from worker.cli import build_parser
        build_parser()
        import worker.backends.local, worker.backends.local_model, worker.offline.train, worker.offline.evaluate, worker.offline.demo
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_the_local_extra_start_says_what_to_install() -> None:
    done = run_python(
        """
        import asyncio, sys

        class HideTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, HideTorch())
        from worker.backends.local import LocalBackend
        from worker.backends.local_model import LocalModelError
        from worker.config import load_settings

        settings = load_settings(None, require_backend=False, backend="local",
                                 kafka={"bootstrap_servers": "unused.invalid:9092"})
        async def main():
            backend = LocalBackend(settings)
            try:
                await backend.start()
            except LocalModelError as err:
                print(err)
            finally:
                await backend.close()
        asyncio.run(main())
        """
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'moderation-worker[local]'" in done.stdout
