"""Run Python where ``sparsebert`` cannot be imported: what a user with only torch and transformers has.

``python -I`` (isolated: no ``PYTHONPATH``, no user site, not the working directory) plus a finder that refuses
the project's packages, which the editable install would otherwise still provide; the script first checks that
``import sparsebert`` fails. Offline, with its own dynamic-modules cache, and no terminal to answer transformers'
"run the custom code?" question (no answer is a refusal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_PRELUDE = """
import importlib.abc, json, sys


def emit(result):
    # what the test reads back (stdout also holds transformers' prompts)
    with open("result.json", "w") as f:
        json.dump(result, f)


class _NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sparsebert", "eval", "data_prep"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)


sys.meta_path.insert(0, _NoProject())
try:
    import sparsebert
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("sparsebert is importable: not a transformers-only process")
"""


def run(script: str, workdir: Path, timeout: int = 300) -> dict:
    """Run ``script`` there; what it passes to ``emit(...)`` is returned."""
    path = workdir / "transformers_only.py"
    path.write_text(_PRELUDE + textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "hf_modules"), TRANSFORMERS_VERBOSITY="error"
    )
    proc = subprocess.run(
        [sys.executable, "-I", str(path)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((workdir / "result.json").read_text())
