"""What the benchmarks share: the repository's paths, and one ``segrefine`` step run in a project env.

Benchmarks run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and ``import benchlib`` works; it
also puts ``workflow_scripts`` on the path for the ``segrefine`` imports that follow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from segrefine.envs import env_python  # noqa: E402


def step(env: str, *args) -> subprocess.CompletedProcess:
    """``segrefine <args>`` in ``env``'s interpreter; exits the benchmark with the step's stderr if it fails."""
    proc = subprocess.run(
        [str(env_python(env)), "-m", "segrefine", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
    )
    if proc.returncode:
        sys.exit(f"segrefine {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc
