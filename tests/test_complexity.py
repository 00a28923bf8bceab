"""Tissue-complexity measures on hand-built patches whose answers are known."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter
from skimage.draw import disk

from segrefine import SegRefineError
from segrefine.complexity import patch_complexity, trainset_complexity


def _four_cells():
    t = np.zeros((40, 40), np.int32)
    t[2:12, 2:12] = 1  # centroid (6.5, 6.5)
    t[2:12, 20:30] = 2  # (6.5, 24.5)
    t[20:30, 2:12] = 3  # (24.5, 6.5)
    t[20:30, 12:22] = 4  # (24.5, 16.5), touching cell 3
    return t


def test_distances_density_and_distribution():
    t = _four_cells()
    c = patch_complexity(t, (t > 0) * 1000.0, grid=2)
    assert c["n_cells"] == 4
    assert c["nn_distance"] == pytest.approx((18 + 18 + 10 + 10) / 4)
    assert c["compactness"] == pytest.approx(14 / math.sqrt(4 * 100 / math.pi))
    assert c["density"] == pytest.approx(4 / 1600 * 1e4)
    assert c["distribution"] == pytest.approx(np.std([1, 1, 2, 0]) / 1.0)  # 2x2 blocks: 1, 1, 2, 0 cells


def test_shape_complexity_orders_shapes():
    disc = np.zeros((64, 64), np.int32)
    disc[disk((32, 32), 20)] = 1
    thin = np.zeros((64, 64), np.int32)
    thin[30:33, 2:62] = 1
    img = np.ones((64, 64))
    d, s = patch_complexity(disc, img)["shape_complexity"], patch_complexity(thin, img)["shape_complexity"]
    assert d == pytest.approx(1.0, abs=0.1) and s > 4 * d


def test_edge_contrast_drops_with_blur():
    t = _four_cells()
    sharp = (t > 0) * 1000.0
    a = patch_complexity(t, sharp)["edge_contrast"]
    b = patch_complexity(t, gaussian_filter(sharp, 3))["edge_contrast"]
    assert a > 2 * b > 0


def test_empty_and_single_cell_patches_and_bad_shapes():
    c = patch_complexity(np.zeros((20, 20), np.int32), np.ones((20, 20)))
    assert c["n_cells"] == 0 and c["density"] == 0 and math.isnan(c["nn_distance"]) and math.isnan(c["edge_contrast"])
    one = np.zeros((20, 20), np.int32)
    one[5:10, 5:10] = 1
    assert math.isnan(patch_complexity(one, np.ones((20, 20)))["compactness"])
    with pytest.raises(SegRefineError, match="differ in shape"):
        patch_complexity(one, np.ones((20, 21)))


def test_trainset_complexity_beside_accuracy(real_trainset, tmp_path):
    rows = pd.read_csv(real_trainset, sep="\t")
    test_patch = rows[rows["split"] == "test"]["patch"].iloc[0]
    long = pd.DataFrame(
        [
            {"model": "m", "stage": s, "image": test_patch, "mode": "standard", "metric": "f1", "value": v}
            for s, v in (("pretrained", 0.4), ("finetuned", 0.7))
        ]
    )
    long.to_csv(tmp_path / "long.csv", index=False)
    table = trainset_complexity(real_trainset, tmp_path / "c.csv", tmp_path / "long.csv", tmp_path / "j.csv")
    assert list(table["image"]) == list(rows["patch"]) and (table["n_cells"] == rows["n_cells"]).all()
    joined = pd.read_csv(tmp_path / "j.csv")
    assert dict(zip(joined["stage"], joined["f1"])) == {"pretrained": 0.4, "finetuned": 0.7}
    assert (joined["n_cells"] == table.set_index("image").loc[test_patch, "n_cells"]).all()
