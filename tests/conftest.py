"""Shared test helpers. Tests run with the core env's Python (make test); steps that
need another framework run through `segrefine <step>` in that framework's env."""

import os
import shutil
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
    proc = subprocess.run(
        [str(env_python(env)), "-m", "segrefine", *map(str, args)],
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"segrefine {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def env_json(env, code: str) -> dict:
    """Run Python ``code`` in env's interpreter (PYTHONPATH=workflow_scripts); it prints one JSON object as its last
    line, returned here. A failure shows the end of its stderr."""
    import json
    import textwrap

    proc = subprocess.run(
        [str(env_python(env)), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS), TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def realdata():
    if not REALDATA.is_dir():
        pytest.fail(f"real test data not found at {REALDATA} (shared/ must sit beside the clone)")
    return REALDATA


def make_real_trainset(d: Path, realdata: Path, stains, val_fraction: float, test_fraction: float) -> Path:
    """A training set in ``d`` of the real CellBinDB crops of ``stains`` (one 256 px patch each; binary masks ->
    instances by `segrefine convert-annotation`), split by `segrefine trainset`."""
    images, masks = [], []
    for k, stain in enumerate(stains):
        name = f"REAL{k}-x0_y0_w256_h256"
        shutil.copy(realdata / "cellbindb-demo" / f"{stain}_img.tif", d / f"{name}-img.tif")
        shutil.copy(realdata / "cellbindb-demo" / f"{stain}_mask.tif", d / f"{name}-mask.tif")
        run_step("core", "convert-annotation", "--annotation", d / f"{name}-mask.tif", "--out", d / f"{name}-mask.tif")
        images.append(d / f"{name}-img.tif")
        masks.append(d / f"{name}-mask.tif")
    run_step(
        "core",
        "trainset",
        "--images",
        *images,
        "--masks",
        *masks,
        "--out",
        d / "trainset.tsv",
        "--val-fraction",
        val_fraction,
        "--test-fraction",
        test_fraction,
    )
    return d / "trainset.tsv"


@pytest.fixture(scope="session")
def real_trainset(tmp_path_factory, realdata):
    """A training set of the real ssDNA and DAPI crops (binary masks -> instances)."""
    return make_real_trainset(tmp_path_factory.mktemp("real"), realdata, ["ssDNA", "DAPI", "ssDNA", "DAPI"], 0.25, 0.25)


@pytest.fixture(scope="session")
def slide(tmp_path_factory):
    """The 384 px demo chip with a blank background band on the right (so some tiles hold no tissue), and a
    classical model card: (slide path, image, card path)."""
    import numpy as np

    from segrefine.demo import make_slide
    from segrefine.io import write_tiff

    d = tmp_path_factory.mktemp("slide")
    img, truth, _ = make_slide(384, seed=3)
    img = np.concatenate([img, np.full((384, 192), img.min(), img.dtype)], axis=1)  # 576 wide, right third blank
    write_tiff(d / "slide.tif", img, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    card = d / "classical"
    run_step(
        "core", "pretrained-card", "--framework", "classical", "--name", "c", "--source", "none", "--out-dir", card
    )
    return d / "slide.tif", img, card / "card.json"
