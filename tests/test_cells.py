"""segrefine.cells: every cell one piece, nuclei grown into cells (exact, banded), a user's cell mask."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile

from segrefine import SegRefineError
from segrefine.cells import (
    distance_px,
    expand_array_banded,
    expand_label_image,
    expand_labels,
    fragment_pixels,
    largest_component,
)
from segrefine.expression import LabelImage


def brute_force(labels, d):
    """Every background pixel against every nucleus pixel: the nearest within d, ties to the lowest id."""
    out = labels.astype(np.uint32).copy()
    ny, nx = np.nonzero(labels)
    lab = labels[ny, nx].astype(np.int64)
    by, bx = np.nonzero(labels == 0)
    if not len(ny):
        return out
    d2 = (by[:, None] - ny[None, :]) ** 2 + (bx[:, None] - nx[None, :]) ** 2
    m = d2.min(axis=1)
    cand = np.where(d2 == m[:, None], lab[None, :], np.iinfo(np.int64).max).min(axis=1)
    within = m <= math.floor(d * d + 1e-9)
    out[by[within], bx[within]] = cand[within]
    return out


def random_nuclei(seed, shape=(48, 64), n=12, r=(1, 4)):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        cy, cx, rr = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(r[0], r[1] + 1)
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= rr * rr) & (lab == 0)] = rng.integers(1, 1000)
    return lab


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d", [1, 2.5, 6, 10])
def test_expand_equals_brute_force(seed, d):
    lab = random_nuclei(seed)
    assert np.array_equal(expand_labels(lab, d), brute_force(lab, d))


def test_expand_distance_and_ids_preserved():
    lab = np.zeros((41, 41), np.uint32)
    lab[20, 20] = 7
    out = expand_labels(lab, 10)
    yy, xx = np.mgrid[:41, :41]
    assert np.array_equal(out == 7, (yy - 20) ** 2 + (xx - 20) ** 2 <= 100)  # a disc of radius 10, nothing beyond
    assert set(np.unique(out)) == {0, 7}
    lab2 = random_nuclei(3)
    out2 = expand_labels(lab2, 4)
    assert np.array_equal(out2[lab2 > 0], lab2[lab2 > 0])  # nuclei keep their pixels and ids
    assert set(np.unique(out2)) == set(np.unique(lab2))  # no new id, none lost


def test_expand_no_overlap_ties_lowest_id():
    lab = np.zeros((5, 9), np.uint32)
    lab[2, 0], lab[2, 8] = 9, 4  # (2, 4) lies 4 px from both
    out = expand_labels(lab, 5)
    assert out[2, 4] == 4  # the tie goes to the lower id, whatever the order of the nuclei
    assert list(out[2]) == [9, 9, 9, 9, 4, 4, 4, 4, 4]
    swapped = np.where(lab == 9, 4, np.where(lab == 4, 9, 0)).astype(np.uint32)
    assert expand_labels(swapped, 5)[2, 4] == 4
    # a single label per pixel by construction; every grown pixel is nearer to (or tied with) its own nucleus
    lab3 = random_nuclei(5, n=20)
    out3 = expand_labels(lab3, 6)
    ny, nx = np.nonzero(lab3)
    for y, x in zip(*np.nonzero((out3 > 0) & (lab3 == 0))):
        d2 = (ny - y) ** 2 + (nx - x) ** 2
        assert d2[lab3[ny, nx] == out3[y, x]].min() == d2.min()


def test_expand_agrees_with_scipy_where_no_tie():
    from scipy import ndimage

    lab = random_nuclei(7, n=15)
    d = 8
    out = expand_labels(lab, d)
    dist, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
    ref = np.where((lab == 0) & (dist <= d), lab[iy, ix], lab)
    bf = brute_force(lab, d)
    assert np.array_equal(out, bf)
    differs = ref != out
    # scipy picks any nearest pixel: it may differ from ours only at a tie between two ids
    ny, nx = np.nonzero(lab)
    for y, x in zip(*np.nonzero(differs)):
        d2 = (ny - y) ** 2 + (nx - x) ** 2
        assert len(np.unique(lab[ny, nx][d2 == d2.min()])) > 1


@pytest.mark.parametrize("band_rows,block_cols", [(1, 64), (3, 5), (7, 64), (16, 16), (48, 64), (100, 100)])
def test_bands_equal_whole_image(band_rows, block_cols):
    lab = random_nuclei(11, n=25)
    whole = expand_labels(lab, 6)
    assert np.array_equal(expand_array_banded(lab, 6, band_rows, block_cols), whole)


def test_nucleus_at_slide_edge():
    lab = np.zeros((20, 30), np.uint32)
    lab[0, 0] = 3  # a corner
    lab[19, 12:14] = 5  # the bottom edge
    out = expand_labels(lab, 3)
    assert np.array_equal(out, brute_force(lab, 3))
    assert out[3, 0] == 3 and out[0, 3] == 3 and out[2, 2] == 3  # 3 px; 2^2 + 2^2 = 8 <= 9: grown
    assert out[3, 1] == 0 and out[4, 0] == 0  # 3^2 + 1 = 10 > 9, 4 px: beyond
    assert out[16, 12] == 5 and out[15, 12] == 0
    assert np.array_equal(expand_array_banded(lab, 3, 4, 7), out)


def test_expand_empty_and_full():
    assert not expand_labels(np.zeros((5, 5), np.uint32), 3).any()
    full = np.ones((4, 4), np.uint32)
    assert np.array_equal(expand_labels(full, 3), full)


def test_largest_component_fragments_removed_and_counted():
    lab = np.zeros((12, 12), np.uint32)
    lab[1:5, 1:5] = 1
    lab[8, 8] = 1  # a stray pixel of cell 1
    lab[5, 5] = 1  # diagonal: 8-connected to the body, kept
    lab[1:3, 8:11] = 2
    lab[10, 1:3] = 2  # cell 2's fragment of 2 px
    lab[6:9, 1:3] = 3  # one piece
    clean, info = largest_component(lab)
    assert info == {"fragment_cells": 2, "fragment_pixels": 3, "fragment_cell_ids": [1, 2]}
    assert clean[8, 8] == 0 and clean[5, 5] == 1 and not clean[10].any()
    assert np.array_equal(clean[lab == 3], lab[lab == 3])
    assert np.array_equal(fragment_pixels(clean), np.zeros_like(clean, bool))
    # equal pieces: the first in raster order stays
    two = np.zeros((3, 5), np.uint32)
    two[0, 0], two[2, 4] = 4, 4
    clean2, info2 = largest_component(two)
    assert clean2[0, 0] == 4 and clean2[2, 4] == 0 and info2["fragment_pixels"] == 1


def _fragments_per_cell(labels):
    """Reference: each cell labelled on its own (8-connectivity), all but its largest piece (first of equal ones)."""
    from scipy import ndimage

    frag = np.zeros(labels.shape, bool)
    for cid in np.unique(labels[labels > 0]):
        comp, n = ndimage.label(labels == cid, structure=np.ones((3, 3)))
        if n > 1:
            size = np.bincount(comp.ravel())
            size[0] = -1
            frag |= (comp > 0) & (comp != int(np.argmax(size)))
    return frag


@pytest.mark.parametrize("seed", range(6))
def test_fragments_of_touching_cells_equal_a_per_cell_reference(seed):
    """Dense touching cells, scattered pixels of random cells (often touching another cell), large sparse ids."""
    rng = np.random.default_rng(seed)
    lab = expand_labels(random_nuclei(seed, shape=(60, 70), n=25), 5)
    ids = np.unique(lab[lab > 0])
    for _ in range(30):
        y, x = rng.integers(0, 60), rng.integers(0, 70)
        lab[y, x] = rng.choice(ids)
    want = _fragments_per_cell(lab)
    assert want.any()
    assert np.array_equal(fragment_pixels(lab), want)
    big = np.where(lab > 0, lab.astype(np.uint64) * 1_000_003 + 7, 0).astype(np.uint64)
    assert np.array_equal(fragment_pixels(big), want)


def test_distance_checks():
    assert distance_px(10) == 10
    assert distance_px(5, "um", 0.5) == 10
    for bad in (-1, 0, float("nan"), 201, "ten"):
        with pytest.raises(SegRefineError, match="distance"):
            distance_px(bad)
    with pytest.raises(SegRefineError, match="absurd"):
        distance_px(150, "um", 0.5)
    with pytest.raises(SegRefineError, match="absurd"):
        distance_px(90, "um", 0.1)  # 900 px
    with pytest.raises(SegRefineError, match="µm per pixel"):
        distance_px(5, "um", None)
    with pytest.raises(SegRefineError, match="unit"):
        distance_px(5, "mm")


def _write_labels(path, lab):
    tifffile.imwrite(path, lab, tile=(16, 16), compression="zlib")


def test_label_image_expand_and_report(tmp_path):
    lab = random_nuclei(2, shape=(70, 90), n=30)
    _write_labels(tmp_path / "labels.tif", lab)
    rep = expand_label_image(
        tmp_path / "labels.tif",
        tmp_path / "cells.tif",
        tmp_path / "cells.json",
        distance=3,
        unit="um",
        um_per_px=0.5,
        band_rows=16,
        block_cols=32,
    )
    got = LabelImage(tmp_path / "cells.tif")
    assert got.dtype == np.uint32 and got.shape == lab.shape
    assert np.array_equal(got.rows(0, 70), brute_force(lab, 6))
    got.close()
    with tifffile.TiffFile(tmp_path / "cells.tif") as tif:
        assert tif.is_ome
    saved = json.loads((tmp_path / "cells.json").read_text())
    assert saved["distance_px"] == 6 and saved["cells"] == saved["nuclei"] == len(np.unique(lab)) - 1
    assert saved["cell_pixels"] == int((brute_force(lab, 6) > 0).sum()) and rep["halo_px"] == 6


def test_label_image_mask(tmp_path):
    lab = random_nuclei(4, shape=(40, 50))
    mask = expand_labels(lab, 2) * 2
    _write_labels(tmp_path / "labels.tif", lab)
    tifffile.imwrite(tmp_path / "mask.tif", mask.astype(np.uint16))
    expand_label_image(
        tmp_path / "labels.tif",
        tmp_path / "cells.tif",
        tmp_path / "cells.json",
        mode="mask",
        mask_path=tmp_path / "mask.tif",
        band_rows=8,
    )
    got = LabelImage(tmp_path / "cells.tif")
    assert got.dtype == np.uint32 and np.array_equal(got.rows(0, 40), mask)  # the user's ids, as given
    got.close()
    assert json.loads((tmp_path / "cells.json").read_text())["mode"] == "mask"


def test_bad_inputs_leave_nothing(tmp_path):
    lab = random_nuclei(4, shape=(40, 50))
    _write_labels(tmp_path / "labels.tif", lab)
    tifffile.imwrite(tmp_path / "small.tif", lab[:30].astype(np.uint16))
    tifffile.imwrite(tmp_path / "float.tif", lab.astype(np.float32))
    out, rep = tmp_path / "out" / "cells.tif", tmp_path / "out" / "cells.json"
    with pytest.raises(SegRefineError, match=r"mask .*small.tif.* 50x30 .*labels.tif.* 50x40"):
        expand_label_image(tmp_path / "labels.tif", out, rep, mode="mask", mask_path=tmp_path / "small.tif")
    with pytest.raises(SegRefineError, match="float.tif"):
        expand_label_image(tmp_path / "labels.tif", out, rep, mode="mask", mask_path=tmp_path / "float.tif")
    with pytest.raises(SegRefineError, match="absurd"):
        expand_label_image(tmp_path / "labels.tif", out, rep, distance=500)
    with pytest.raises(SegRefineError, match="must be > 0"):
        expand_label_image(tmp_path / "labels.tif", out, rep, distance=-2)
    with pytest.raises(SegRefineError, match="not found"):
        expand_label_image(tmp_path / "missing.tif", out, rep)
    assert not out.exists() and not rep.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_stitch_keeps_every_cell_one_piece_and_counts_the_fragments(tmp_path):
    """A model that leaves a stray pixel beside some cells: the stitched labels hold none, the report counts them,
    and the cell table and outlines are those of the cleaned pixels."""
    from conftest import run_step
    from segrefine.demo import make_slide
    from segrefine.io import write_tiff
    from tiling_helpers import LocalClassical, _check_outputs_agree_with_labels, run_all

    class Stray(LocalClassical):
        def predict(self, img):
            lab = np.asarray(super().predict(img)).copy()
            for cid in np.unique(lab)[1::3]:  # every third cell: a pixel 2 px below-right of its bounding box
                ys, xs = np.nonzero(lab == cid)
                y, x = ys.max() + 2, xs.max() + 2
                if (
                    y < lab.shape[0]
                    and x < lab.shape[1]
                    and not lab[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].any()
                ):
                    lab[y, x] = cid
            return lab

    img, _, _ = make_slide(256, seed=5)
    write_tiff(tmp_path / "slide.tif", img, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    run_step(
        "core",
        "pretrained-card",
        "--framework",
        "classical",
        "--name",
        "c",
        "--source",
        "none",
        "--out-dir",
        tmp_path / "card",
    )
    _, _, rep = run_all(
        tmp_path / "run", tmp_path / "slide.tif", tmp_path / "card" / "card.json", Stray(), tile=96, halo=24
    )
    assert rep["fragment_cells"] > 0 and rep["fragment_pixels"] >= rep["fragment_cells"]
    assert len(rep["fragment_cell_ids"]) == rep["fragment_cells"]
    tiled = tifffile.imread(tmp_path / "run" / "labels.tif")
    assert not fragment_pixels(tiled).any()
    assert set(rep["fragment_cell_ids"]) <= set(np.unique(tiled).tolist())  # the cells stay, their pieces go
    _check_outputs_agree_with_labels(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["fragment_cells"] == rep["fragment_cells"]


def test_expression_qc_puts_cells_beside_nuclei(tmp_path):
    """Four tables (pretrained/fine-tuned x nuclei/cells): summary rows for each, before/after for both kinds."""
    import pandas as pd

    from segrefine.qc import expression_qc

    rng = np.random.default_rng(0)
    paths, stages = [], ["pretrained", "finetuned", "pretrained_cells", "finetuned_cells"]
    for i, st in enumerate(stages):
        n = 40 + 5 * i
        area = rng.integers(20, 60, n) * (3 if st.endswith("_cells") else 1)
        df = pd.DataFrame(
            {
                "cgef_cell": np.arange(n),
                "label_id": np.arange(1, n + 1),
                "x": rng.random(n),
                "y": rng.random(n),
                "area": area,
                "total_counts": rng.integers(0, 50, n) + area // 10,
                "n_genes": rng.integers(0, 20, n),
            }
        )
        paths.append(tmp_path / f"{st}.csv")
        df.to_csv(paths[-1], index=False)
    expression_qc(paths, ["S1"] * 4, tmp_path / "qc", stages=stages)
    summary = pd.read_csv(tmp_path / "qc" / "summary.csv")
    assert summary["stage"].tolist() == stages
    assert summary["cells"].tolist() == [40, 45, 50, 55]
    ba = pd.read_csv(tmp_path / "qc" / "before_after.csv")
    assert sorted(set(zip(ba["before"], ba["after"]))) == [
        ("pretrained", "finetuned"),
        ("pretrained_cells", "finetuned_cells"),
    ]
    assert (tmp_path / "qc" / "distributions.png").stat().st_size > 0
