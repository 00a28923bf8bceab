"""The alignment check: the fraction of UMIs in cells, and the shift of the matrix that would raise it."""

import numpy as np
import pytest

from segrefine.frame_check import describe, sample_windows, shift_scan


def _chip(seed=0, size=400, n_cells=200, radius=6):
    """Round cells at random places (tissue is not a lattice), and records drawn around the cells' centres (90 %)
    or anywhere."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.uint32)
    yy, xx = np.mgrid[:size, :size]
    centres = []
    for k in range(n_cells):
        cy, cx = rng.integers(radius, size - radius, 2)
        sl = (slice(cy - radius, cy + radius + 1), slice(cx - radius, cx + radius + 1))
        lab[sl][(yy[sl] - cy) ** 2 + (xx[sl] - cx) ** 2 <= radius**2] = k + 1
        centres.append((cy, cx))
    centres = np.array(centres)
    n = 20000
    pick = centres[rng.integers(0, len(centres), n)]
    y = np.clip(np.round(pick[:, 0] + rng.normal(0, radius / 2, n)), 0, size - 1).astype(int)
    x = np.clip(np.round(pick[:, 1] + rng.normal(0, radius / 2, n)), 0, size - 1).astype(int)
    bg = rng.random(n) < 0.1
    y[bg], x[bg] = rng.integers(0, size, bg.sum()), rng.integers(0, size, bg.sum())
    return lab, x, y, rng.integers(1, 4, n)


def _windows(lab, x, y, c, calls, max_shift, **kw):
    def records_in_rows(y0, y1):
        sel = (y >= y0) & (y < y1)
        return x[sel], y[sel], c[sel]

    def read_rows(y0, y1):
        calls.append((y0, y1))
        return lab[y0:y1]

    return sample_windows(
        records_in_rows, read_rows, (int(y.min()), int(y.max())), lab.shape[0], max_shift=max_shift, **kw
    )


def test_an_aligned_matrix_is_left_alone():
    lab, x, y, c = _chip()
    res = shift_scan(_windows(lab, x, y, c, [], 24), max_shift=24)
    assert res["best_shift"] == [0, 0] and res["checked"] and not res["misaligned"]
    assert res["fraction_in_cells"] > 0.7
    assert "frame looks right" in describe(res, "m.gem", "labels.tif", (0, 0))


@pytest.mark.parametrize("shift", [(13, -7), (-22, 18)])
def test_a_shifted_matrix_is_found_with_its_shift_and_the_origin_to_set(shift):
    lab, x, y, c = _chip(seed=1)
    dx, dy = shift
    keep = (x - dx >= 0) & (x - dx < lab.shape[1]) & (y - dy >= 0) & (y - dy < lab.shape[0])
    xs, ys, cs = x[keep] - dx, y[keep] - dy, c[keep]  # the matrix moved by (-dx, -dy): (+dx, +dy) puts it back
    calls = []
    res = shift_scan(_windows(lab, xs, ys, cs, calls, 24, n_windows=4, window_rows=40), max_shift=24)
    assert res["best_shift"] == [dx, dy] and res["misaligned"] and res["windows"] == 4
    assert res["fraction_in_cells"] < 0.4 < 0.7 < res["fraction_in_cells_at_best_shift"], res
    assert sum(b - a for a, b in calls) <= 4 * (40 + 2 * 24) < lab.shape[0]  # only the sampled bands are read
    msg = describe(res, "m.gem", "labels.tif", (100, 50))
    assert f"({dx:+d}, {dy:+d}) px" in msg and f"expression.origin to '{100 - dx},{50 - dy}'" in msg


def test_no_cells_at_all_is_not_called_a_shift():
    lab, x, y, c = _chip()
    res = shift_scan(_windows(np.zeros_like(lab), x, y, c, [], 8), max_shift=8)
    assert res["best_shift"] == [0, 0] and res["fraction_in_cells"] == 0 and not res["misaligned"]


def test_too_few_umis_are_not_judged():
    lab, x, y, c = _chip()
    res = shift_scan(_windows(lab, x[:50], y[:50], c[:50], [], 8), max_shift=8)
    assert not res["checked"] and not res["misaligned"] and "not checked" in describe(res, "m", "l", (0, 0))
