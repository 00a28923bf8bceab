"""Slide and label image I/O (segrefine.io): pyramid levels read and written, the stitch's sparse disk array."""

import os

import numpy as np
import pytest
import tifffile

from segrefine import SegRefineError
from segrefine.demo import make_slide
from segrefine.io import Slide, write_tiff
from segrefine.tiling import make_plan


def test_pyramid_levels_are_nearest_downsamples(tmp_path):
    from segrefine.io import label_pyramid_levels, write_pyramid_ome_tiff

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5000, (1500, 2300)).astype(np.uint32)
    levels = label_pyramid_levels(lab, tmp_path, min_side=400, block=512)
    write_pyramid_ome_tiff(tmp_path / "p.tif", levels, tile=256)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        got = [lv.asarray() for lv in tif.series[0].levels]
    assert len(got) == 4
    assert all((g == lab[:: 2**k, :: 2**k]).all() for k, g in enumerate(got))


def test_pyramid_levels_read_and_missing_level_named(tmp_path):
    img, _, _ = make_slide(512, seed=1)
    with tifffile.TiffWriter(tmp_path / "pyr.ome.tif", ome=True) as tif:
        tif.write(img, tile=(128, 128), subifds=2, metadata={"axes": "YX"})
        tif.write(img[::2, ::2], tile=(128, 128), subfiletype=1)
        tif.write(img[::4, ::4], tile=(128, 128), subfiletype=1)
    with Slide(tmp_path / "pyr.ome.tif") as s:
        assert s.levels == [(512, 512), (256, 256), (128, 128)] and s.downsample(2) == 4
        assert (s.read_level(1) == img[::2, ::2]).all()
        thumb, f = s.thumbnail(4)
        assert f == 4 and thumb.shape == (128, 128)
        with pytest.raises(SegRefineError, match=r"pyr.ome.tif: pyramid level 3 is missing: the slide has 3 level"):
            s.thumbnail(16, level=3)
    with pytest.raises(SegRefineError, match="pyramid level 5 is missing"):
        make_plan(tmp_path / "pyr.ome.tif", 128, 16, tissue_level=5)
    # a plain TIFF: the tissue view is a block mean streamed from level 0
    write_tiff(tmp_path / "plain.tif", img)
    with Slide(tmp_path / "plain.tif") as s:
        thumb, f = s.thumbnail(8, strip=64)
        assert f == 8 and np.allclose(thumb, img.astype(np.float32).reshape(64, 8, 64, 8).mean(axis=(1, 3)))


def test_disk_array_reads_what_was_written_and_stays_sparse(tmp_path):
    """The stitch's working store: regions written and read back equal a numpy array's; full-width rows, edges,
    empty slices; never-written regions read as 0 and take no disk."""
    from segrefine.io import DiskArray

    rng = np.random.default_rng(2)
    H, W = 700, 900
    want = np.zeros((H, W), np.uint32)
    a = DiskArray(tmp_path / "a.raw", (H, W))
    try:
        for _ in range(40):
            y0, x0 = int(rng.integers(0, H)), int(rng.integers(0, W))
            y1, x1 = int(rng.integers(y0, H + 1)), int(rng.integers(x0, W + 1))
            v = rng.integers(0, 2**32, (y1 - y0, x1 - x0), dtype=np.uint64).astype(np.uint32)
            a[y0:y1, x0:x1] = v
            want[y0:y1, x0:x1] = v
            assert (a[y0:y1, x0:x1] == v).all()
        a[100:110, :] = 7  # full-width rows, a broadcast scalar
        want[100:110, :] = 7
        assert (a[:, :] == want).all() and (np.asarray(a) == want).all()
        assert (a[-5:, 3:9] == want[-5:, 3:9]).all() and a[5:5, :].shape == (0, W)
        with pytest.raises(TypeError, match="DiskArray slices take no step"):
            a[::2, :]
    finally:
        a.close()
    b = DiskArray(tmp_path / "b.raw", (20000, 20000))  # 1.6 GB if it were not sparse
    try:
        b[0:64, 0:64] = 1
        assert (b[0:64, 0:64] == 1).all() and (b[10000:10010, 5000:5010] == 0).all()
        assert os.stat(tmp_path / "b.raw").st_blocks * 512 < 10 * 2**20
    finally:
        b.close()
