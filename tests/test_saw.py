"""SAW v8 outputs as inputs: the outs folder resolved to the image and matrices, SAW's cells as a QC stage."""

import gzip

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import run_step
from segrefine import SegRefineError
from segrefine.saw import resolve_outs


def _outs(tmp_path, sn="C04042E3", stain="ssDNA", gefs=("raw", "tissue", "cellbin", "adjusted.cellbin")):
    outs = tmp_path / "outs"
    (outs / "image").mkdir(parents=True)
    (outs / "feature_expression").mkdir()
    tifffile.imwrite(outs / "image" / f"{sn}_{stain}_regist.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(outs / "image" / f"{sn}_{stain}_mask.tif", np.zeros((8, 8), np.uint8))
    for g in gefs:
        (outs / "feature_expression" / f"{sn}.{g}.gef").write_bytes(b"")
    return outs


def test_outs_folder_gives_the_registered_image_the_tissue_gef_and_saws_cellbins(tmp_path):
    outs = _outs(tmp_path)
    got = resolve_outs(outs, "C04042E3", "ssDNA")
    assert got.image == str(outs / "image" / "C04042E3_ssDNA_regist.tif")
    assert got.expression == str(outs / "feature_expression" / "C04042E3.tissue.gef")
    assert got.cellbins == {
        "saw_nuclei": str(outs / "feature_expression" / "C04042E3.cellbin.gef"),
        "saw_cells": str(outs / "feature_expression" / "C04042E3.adjusted.cellbin.gef"),
    }


def test_raw_gef_when_there_is_no_tissue_gef_and_saws_if_stain_name(tmp_path):
    outs = _outs(tmp_path, stain="IF", gefs=("raw",))
    got = resolve_outs(outs, "C04042E3", "mIF")
    assert got.image.endswith("C04042E3_IF_regist.tif")
    assert got.expression.endswith("C04042E3.raw.gef")
    assert got.cellbins == {}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no folder", "SAW outs folder not found"),
        ("no image dir", "no image/ folder"),
        ("no image", "no registered image C04042E3_ssDNA_regist.tif"),
        ("no gef", "no C04042E3.tissue.gef or C04042E3.raw.gef"),
        ("two images", "2 files could be the registered image"),
    ],
)
def test_outs_problems_name_the_folder_and_what_is_missing(tmp_path, case, message):
    outs = _outs(tmp_path)
    if case == "no folder":
        outs = tmp_path / "nowhere"
    elif case == "no image dir":
        for p in (outs / "image").iterdir():
            p.unlink()
        (outs / "image").rmdir()
    elif case == "no image":
        (outs / "image" / "C04042E3_ssDNA_regist.tif").unlink()
    elif case == "no gef":
        for p in (outs / "feature_expression").glob("*.gef"):
            p.unlink()
    elif case == "two images":
        (outs / "image" / "C04042E3_ssDNA_regist.tif").rename(outs / "image" / "C04042E3_DAPI_regist.tif")
        tifffile.imwrite(outs / "image" / "C04042E3_HE_regist.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(SegRefineError, match=message):
        resolve_outs(outs, "C04042E3", "ssDNA")


def _chip(tmp_path):
    """Two touching cells and one apart; a GEM and gefpy's own bgef and cgef of it (SAW's writer is gefpy's)."""
    lab = np.zeros((12, 16), np.uint32)
    lab[1:5, 1:5] = 1
    lab[1:5, 5:9] = 2
    lab[8:11, 10:14] = 3
    rows = [("A", 2, 2, 3), ("B", 6, 3, 1), ("A", 11, 9, 2), ("C", 11, 9, 4), ("A", 15, 0, 1)]
    with gzip.open(tmp_path / "chip.gem.gz", "wt") as fh:
        fh.write("#FileFormat=GEMv0.1\ngeneID\tx\ty\tMIDCount\n")
        fh.write("".join(f"{g}\t{x}\t{y}\t{n}\n" for g, x, y, n in rows))
    tifffile.imwrite(tmp_path / "labels.tif", lab)
    return tmp_path


def test_saws_cellbin_gef_becomes_a_cell_table_like_ours(tmp_path):
    chip = _chip(tmp_path)
    # a cell-bin GEF written by gefpy, as SAW writes its cellbin.gef
    run_step(
        "gef",
        "cgef",
        "--gem",
        chip / "chip.gem.gz",
        "--labels",
        chip / "labels.tif",
        "--cgef",
        chip / "saw.cellbin.gef",
        "--cellmap",
        chip / "gefpy.csv",
        "--writer",
        "gefpy",
        "--origin",
        "0,0",
        "--threads",
        1,
    )
    run_step("gef", "saw-cells", "--cellbin", chip / "saw.cellbin.gef", "--out", chip / "saw.csv")
    saw, ref = pd.read_csv(chip / "saw.csv"), pd.read_csv(chip / "gefpy.csv")
    assert list(saw.columns) == list(ref.columns)
    for col in ("cgef_cell", "x", "y", "area", "total_counts", "n_genes"):
        assert saw[col].tolist() == ref[col].tolist(), col
    # the known counts: cell 1 has A=3, cell 2 (touching 1; gefpy cut 1's contact column) B=1, cell 3 A=2 + C=4
    assert sorted(zip(saw["total_counts"], saw["n_genes"])) == [(1, 1), (3, 1), (6, 2)]


def test_a_file_that_is_not_a_cellbin_gef_is_refused_by_name(tmp_path):
    chip = _chip(tmp_path)
    proc = run_step("gef", "saw-cells", "--cellbin", chip / "chip.gem.gz", "--out", chip / "saw.csv", check=False)
    assert proc.returncode == 1 and "chip.gem.gz" in proc.stderr and "HDF5" in proc.stderr, proc.stderr
    assert not (chip / "saw.csv").exists()
