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
        lab[y:y + 8, x:x + 8] = k   # overlapping squares: many touching cells, some labels > 65535 below
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
