import subprocess

import pytest

from conftest import REPO, run_step
from segrefine.cli import build_parser
from segrefine.envs import env_dir

STEPS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("step", STEPS)
def test_every_step_has_help(step):
    out = run_step("core", step, "--help").stdout
    assert out.startswith(f"usage: segrefine {step}")


@pytest.mark.parametrize("env,step", [("stereopy", "h5ad"), ("gef", "cgef"), ("cellpose", "finetune")])
def test_the_package_imports_in_every_framework_env(env, step):
    """The stereopy env is Python 3.8 and the gef env 3.10: the CLI must load in both."""
    assert "usage" in run_step(env, step, "--help").stdout


def test_console_script_entry_point():
    exe = env_dir(REPO / "envs" / "core.yaml") / "bin" / "segrefine"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0.1.0"


def test_errors_are_one_clear_line_and_exit_1(tmp_path):
    proc = run_step("core", "convert-annotation", "--annotation", tmp_path / "S1-x0_y0_w8_h8.geojson",
                    "--out", tmp_path / "m.tif", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("segrefine convert-annotation: error: ")
    assert "S1-x0_y0_w8_h8.geojson: cannot read" in proc.stderr
    assert not (tmp_path / "m.tif").exists()
