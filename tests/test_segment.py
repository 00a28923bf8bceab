"""`segrefine segment` (segrefine.segment): plan, shards and stitch in one process."""

import numpy as np
import tifffile

from conftest import run_step


def test_segment_by_hand_runs_in_a_model_env_without_pyarrow(slide, tmp_path):
    """`segrefine segment` (plan, shards, stitch in one process) is run by hand in the model's env; the model
    envs have no pyarrow: every output but cells.parquet, and the same labels as the core env's run."""
    slide_path, img, card = slide
    args = ["--card", card, "--slide", slide_path, "--tile-size", 192, "--halo", 24, "--no-tissue"]
    proc = run_step("cellpose", "segment", *args, "--out-dir", tmp_path / "cp")
    assert "pyarrow is not installed in this env: no cells.parquet (cells.csv holds the same table)" in proc.stderr
    run_step("core", "segment", *args, "--out-dir", tmp_path / "core")
    assert not (tmp_path / "cp" / "cells.parquet").exists() and (tmp_path / "core" / "cells.parquet").is_file()
    for name in ("cells.csv", "cells.geojson"):
        assert (tmp_path / "cp" / name).read_bytes() == (tmp_path / "core" / name).read_bytes()
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "cp" / "labels.tif"), tifffile.imread(tmp_path / "core" / "labels.tif")
    )
