import os

import numpy as np
import pytest

from segrefine import SegRefineError
from segrefine.expression import run_isolated, separate_touching


def _touching_labels():
    rng = np.random.default_rng(0)
    lab = np.zeros((60, 60), np.uint32)
    for k in range(1, 40):
        y, x = rng.integers(0, 55, 2)
        lab[y : y + 8, x : x + 8] = k  # overlapping squares: many touching cells, some labels > 65535 below
    lab[lab == 5] = 70000
    return lab


def test_no_two_cells_touch_after_separation():
    from scipy import ndimage

    lab = _touching_labels()
    keep = separate_touching(lab)
    sep = np.where(keep, lab, 0)
    assert not keep[lab == 0].any()  # never adds foreground
    # every 8-connected component of the kept mask lies within one original cell
    comps, n = ndimage.label(keep, structure=np.ones((3, 3)))
    for c in range(1, n + 1):
        assert len(np.unique(sep[comps == c])) == 1
    # only the lower-numbered side of a contact loses pixels: the highest label keeps all
    top = lab.max()
    assert keep[lab == top].all()


def test_isolated_cells_are_untouched():
    lab = np.zeros((20, 20), np.uint32)
    lab[2:6, 2:6] = 1
    lab[10:15, 10:15] = 2
    np.testing.assert_array_equal(separate_touching(lab), lab > 0)


def _exit_like_gefpy():
    os._exit(255)


def _raise():
    raise ValueError("bad mask")


def test_a_library_that_kills_its_process_becomes_a_clear_error():
    with pytest.raises(SegRefineError, match="gefpy step failed: the process exited with code 255"):
        run_isolated("gefpy step", _exit_like_gefpy)
    with pytest.raises(SegRefineError, match="ValueError: bad mask"):
        run_isolated("gefpy step", _raise)
    run_isolated("fine", int)  # a clean call passes


@pytest.mark.integration
@pytest.mark.parametrize("writer", ["direct", "stereopy"])
def test_h5ad_refuses_a_cell_table_that_does_not_match_and_writes_nothing(tmp_path, writer):
    import gzip

    import tifffile

    from conftest import run_step

    lab = np.zeros((10, 10), np.uint32)
    lab[1:4, 1:4], lab[5:9, 5:9] = 1, 2
    tifffile.imwrite(tmp_path / "labels.tif", lab)
    with gzip.open(tmp_path / "g.gem.gz", "wt") as fh:
        fh.write("geneID\tx\ty\tMIDCount\nA\t2\t2\t3\nB\t6\t6\t2\nA\t9\t9\t1\n")
    run_step(
        "gef",
        "cgef",
        "--gem",
        tmp_path / "g.gem.gz",
        "--labels",
        tmp_path / "labels.tif",
        "--cgef",
        tmp_path / "c.cgef",
        "--cellmap",
        tmp_path / "c.csv",
    )
    cellmap = (tmp_path / "c.csv").read_text().splitlines()
    (tmp_path / "short.csv").write_text("\n".join(cellmap[:-1]) + "\n")  # one cell missing
    proc = run_step(
        "stereopy",
        "h5ad",
        "--cgef",
        tmp_path / "c.cgef",
        "--cellmap",
        tmp_path / "short.csv",
        "--out",
        tmp_path / "out" / "cells.h5ad",
        "--writer",
        writer,
        check=False,
    )
    assert proc.returncode == 1 and "cells do not line up with" in proc.stderr and "short.csv" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("layout", ["tiled", "striped", "contiguous", "pyramid", "bigendian"])
def test_label_image_reads_any_window_of_level_0_by_segments(tmp_path, layout):
    import tifffile

    from segrefine.expression import LabelImage

    rng = np.random.default_rng(3)
    lab = rng.integers(0, 70000, (150, 97)).astype(np.uint32)
    path = tmp_path / "l.tif"
    if layout == "tiled":
        tifffile.imwrite(path, lab, tile=(32, 48), compression="zlib")
    elif layout == "striped":
        tifffile.imwrite(path, lab, rowsperstrip=7, compression="zlib", predictor=True)
    elif layout == "contiguous":
        tifffile.imwrite(path, lab)
    elif layout == "bigendian":
        tifffile.imwrite(path, lab, byteorder=">")
    else:  # OME-TIFF pyramid, level 0 tiled, with a sub-resolution
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(lab, tile=(32, 32), subifds=1, compression="zlib")
            tw.write(lab[::2, ::2], tile=(32, 32), subfiletype=1, compression="zlib")
    img = LabelImage(path)
    assert img.shape == lab.shape
    for y0, y1, x0, x1 in [(0, 150, 0, 97), (31, 33, 47, 49), (149, 150, 96, 97), (5, 70, 10, 11), (0, 0, 0, 97)]:
        np.testing.assert_array_equal(img.rows(y0, y1, x0, x1), lab[y0:y1, x0:x1])
    img.close()
    with pytest.raises(SegRefineError, match="l.tif: rows 0..151"):
        LabelImage(path).rows(0, 151)
