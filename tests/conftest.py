"""Shared test helpers. Tests run with the core env's Python (make test); steps that
need another framework run through `segrefine <step>` in that framework's env."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
REALDATA = REPO.parent / "shared" / "realdata"
sys.path.insert(0, str(SCRIPTS))

from segrefine.envs import env_python  # noqa: E402


def run_step(env, *args, check=True, cwd=None):
    """Run `segrefine <args>` in env's interpreter; returns the CompletedProcess."""
    proc = subprocess.run([str(env_python(env)), "-m", "segrefine", *map(str, args)],
                          env=dict(os.environ, PYTHONPATH=str(SCRIPTS)), capture_output=True, text=True, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"segrefine {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def realdata():
    if not REALDATA.is_dir():
        pytest.fail(f"real test data not found at {REALDATA} (shared/ must sit beside the clone)")
    return REALDATA
