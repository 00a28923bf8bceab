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


def test_every_option_has_help_text():
    """Walk the parser: every option of every step says what it is (and its help formats, e.g. %(default)s)."""
    import argparse

    missing = []
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        parser.format_help()
        missing += [
            f"{name} {'/'.join(a.option_strings)}"
            for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
        ]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("env,step", [("stereopy", "h5ad"), ("gef", "cgef"), ("cellpose", "finetune")])
def test_the_package_imports_in_every_framework_env(env, step):
    """The stereopy env is Python 3.8 and the gef env 3.10: the CLI must load in both."""
    assert "usage" in run_step(env, step, "--help").stdout


def test_console_script_entry_point():
    exe = env_dir(REPO / "envs" / "core.yaml") / "bin" / "segrefine"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0.1.0"


def test_errors_are_one_clear_line_and_exit_1(tmp_path):
    proc = run_step(
        "core",
        "convert-annotation",
        "--annotation",
        tmp_path / "S1-x0_y0_w8_h8.geojson",
        "--out",
        tmp_path / "m.tif",
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("segrefine convert-annotation: error: ")
    assert "S1-x0_y0_w8_h8.geojson: cannot read" in proc.stderr
    assert not (tmp_path / "m.tif").exists()


def test_offline_fetch_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGREFINE_OFFLINE", "1")
    target = tmp_path / "cache" / "cellpose" / "cyto3"
    proc = run_step(
        "cellpose", "fetch-pretrained", "--framework", "cellpose", "--name", "cyto3", "--out", target, check=False
    )
    assert proc.returncode == 1
    assert f"put the file at {target}" in proc.stderr and not target.exists()
    proc = run_step(
        "cellpose", "fetch-pretrained", "--framework", "cellpose", "--name", "cyto9", "--out", target, check=False
    )
    assert "unknown pretrained cellpose model 'cyto9'" in proc.stderr


def test_padded_patches_and_masks_stay_aligned(tmp_path):
    """pad_to pads the patch image and its mask alike, so the training set accepts them."""
    run_step(
        "core", "demo-data", "--out", tmp_path / "d", "--sn", "P1", "--size", 256, "--patches", 2, "--patch-size", 96
    )
    images, masks = [], []
    for ann in sorted((tmp_path / "d" / "annotations").glob("*.geojson")):
        run_step(
            "core",
            "patches",
            "--slide",
            tmp_path / "d" / "P1.tif",
            "--name",
            ann.stem,
            "--pad-to",
            128,
            "--out-dir",
            tmp_path / "p",
        )
        run_step(
            "core",
            "convert-annotation",
            "--annotation",
            ann,
            "--pad-to",
            128,
            "--out",
            tmp_path / "m" / f"{ann.stem}-mask.tif",
        )
        images.append(tmp_path / "p" / f"{ann.stem}-img.tif")
        masks.append(tmp_path / "m" / f"{ann.stem}-mask.tif")
    run_step(
        "core",
        "trainset",
        "--images",
        *images,
        "--masks",
        *masks,
        "--out",
        tmp_path / "t.tsv",
        "--val-fraction",
        0,
        "--test-fraction",
        0,
    )
    import tifffile

    assert all(tifffile.imread(p).shape == (128, 128) for p in images + masks)
