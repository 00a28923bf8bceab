import json

import numpy as np
import pytest

from segrefine import SegRefineError
from segrefine.io import write_tiff
from segrefine.trainset import assign_splits, build_rows, read_trainset, version_of, write_trainset


def _names(n, sn="S1"):
    return [f"{sn}-x{256 * i}_y0_w256_h256" for i in range(n)]


def test_splits_follow_the_fractions_per_chip():
    names = _names(400, "A") + _names(400, "B")
    split = assign_splits(names, seed=0, val_fraction=0.1, test_fraction=0.2)
    for sn in "AB":
        mine = [split[n] for n in names if n.startswith(sn)]
        assert abs(mine.count("test") / 400 - 0.2) < 0.06
        assert abs(mine.count("val") / 400 - 0.1) < 0.05


def test_adding_patches_never_moves_existing_ones():
    before = assign_splits(_names(20), 0, 0.1, 0.2)
    after = assign_splits(_names(30), 0, 0.1, 0.2)
    assert all(after[n] == s for n, s in before.items())


def test_tiny_sets_get_a_test_and_validation_patch():
    for seed in range(20):
        split = assign_splits(_names(3), seed, 0.1, 0.2)
        assert sorted(split.values()) == ["test", "train", "val"]


def test_bad_fractions_are_refused():
    with pytest.raises(SegRefineError, match="sum below 1"):
        assign_splits(_names(3), 0, 0.6, 0.5)


def _pair(tmp_path, name, cells, shape=(32, 32)):
    img = np.random.default_rng(len(name)).integers(0, 255, shape).astype(np.uint8)
    mask = np.zeros(shape, np.uint16)
    for k in range(cells):
        mask[2 + 6 * k : 6 + 6 * k, 2:6] = k + 1
    write_tiff(tmp_path / f"{name}-img.tif", img)
    write_tiff(tmp_path / f"{name}-mask.tif", mask)
    return str(tmp_path / f"{name}-img.tif"), str(tmp_path / f"{name}-mask.tif")


def test_table_and_version(tmp_path):
    pairs = [_pair(tmp_path, n, 3) for n in _names(6)]
    rows = build_rows([p[0] for p in pairs], [p[1] for p in pairs], 0, 0.1, 0.2)
    assert [r["n_cells"] for r in rows] == [3] * 6
    version = write_trainset(tmp_path / "t.tsv", rows, 0, 0.1, 0.2)
    assert read_trainset(tmp_path / "t.tsv")[0]["n_cells"] == 3
    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["version"] == version and sum(summary["patches"].values()) == 6
    # same content -> same version; one changed mask -> another version
    assert version_of(build_rows([p[0] for p in pairs], [p[1] for p in pairs], 0, 0.1, 0.2)) == version
    write_tiff(pairs[0][1], np.ones((32, 32), np.uint16))
    assert version_of(build_rows([p[0] for p in pairs], [p[1] for p in pairs], 0, 0.1, 0.2)) != version


def test_image_mask_size_mismatch_names_the_files(tmp_path):
    img, _ = _pair(tmp_path, "S1-x0_y0_w32_h32", 2)
    (tmp_path / "other").mkdir()
    _, mask = _pair(tmp_path / "other", "S1-x0_y0_w32_h32", 2, shape=(30, 32))
    with pytest.raises(
        SegRefineError, match=r"other/S1-x0_y0_w32_h32-mask.tif: mask is 32x30 px but image .* is 32x32"
    ):
        build_rows([img], [mask], 0, 0.0, 0.0)


def test_no_cells_to_train_on_is_refused(tmp_path):
    pairs = [_pair(tmp_path, n, 0) for n in _names(4)]
    with pytest.raises(SegRefineError, match="training split holds no cells"):
        build_rows([p[0] for p in pairs], [p[1] for p in pairs], 0, 0.0, 0.0)


def test_images_and_masks_are_paired_by_patch_name_not_position(tmp_path):
    """Masks listed in another order than their images still meet their own image (rows name both files)."""
    pairs = [_pair(tmp_path, n, k + 1) for k, n in enumerate(_names(4))]
    rows = build_rows([p[0] for p in pairs], [p[1] for p in reversed(pairs)], 0, 0.1, 0.2)
    assert [r["n_cells"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["mask"] == r["image"].replace("-img.tif", "-mask.tif")


def test_unmatched_images_and_masks_are_refused_naming_them(tmp_path):
    pairs = [_pair(tmp_path, n, 2) for n in _names(3)]
    other = _pair(tmp_path, "S2-x0_y0_w256_h256", 1)
    with pytest.raises(SegRefineError) as err:
        build_rows([p[0] for p in pairs[:2]] + [other[0]], [p[1] for p in pairs], 0, 0.1, 0.2)
    msg = str(err.value)
    assert f"image(s) without a mask: {other[0]}" in msg and f"mask(s) without an image: {pairs[2][1]}" in msg
    with pytest.raises(SegRefineError, match="two masks of patch S1-x0_y0_w256_h256"):
        build_rows([pairs[0][0]], [pairs[0][1], pairs[0][1]], 0, 0.1, 0.2)
    with pytest.raises(SegRefineError, match="notapatch.tif: mask file not named after its patch"):
        build_rows([pairs[0][0]], [str(tmp_path / "notapatch.tif")], 0, 0.1, 0.2)
