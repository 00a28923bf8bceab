"""Is the expression matrix in the image's frame? The fraction of UMIs in cells, and the shift that would raise it.

A matrix shifted by a few tens of pixels still lies inside the image, so the
frame check of ``segrefine cgef`` (every transcript inside the label image)
passes, yet most UMIs then fall beside their cells: a wrong result with exit 0.
Transcripts concentrate in and around cells, so the fraction of UMIs that fall
in cells peaks at the true alignment. ``shift_scan`` measures that fraction for
a sample of the records at every shift within ``max_shift`` px (a coarse grid,
then every pixel around its best point) and reports the best shift; a best
shift other than (0, 0) that raises the fraction by ``min_gain`` (absolute)
and by ``min_ratio`` (relative) means the matrix and the image are not aligned.

The labels are read only where the sampled records lie (rows in bands), so the
check costs a sample, not the slide.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Tuple

import numpy as np

log = logging.getLogger("segrefine.frame_check")


def _in_cell_fraction(rows: np.ndarray, x: np.ndarray, y: np.ndarray, count: np.ndarray,
                      row0: int, dx: int, dy: int) -> float:
    """UMI fraction of the records at (x + dx, y + dy) that land on a label > 0 of ``rows`` (rows start at y row0)."""
    xs, ys = x + dx, y + dy - row0
    ok = (xs >= 0) & (xs < rows.shape[1]) & (ys >= 0) & (ys < rows.shape[0])
    hit = np.zeros(len(x), bool)
    hit[ok] = rows[ys[ok], xs[ok]] > 0
    total = count.sum()
    return float(count[hit].sum() / total) if total else 0.0


def shift_scan(x: np.ndarray, y: np.ndarray, count: np.ndarray, read_rows: Callable[[int, int], np.ndarray],
               height: int, max_shift: int = 48, coarse: int = 4, min_gain: float = 0.10,
               min_ratio: float = 1.5, band_records: int = 1 << 18) -> Dict[str, object]:
    """In-cell UMI fraction of records (x, y, count) (label pixel coordinates) at shift 0 and at the best shift.

    ``read_rows(y0, y1)`` returns label rows y0..y1 (2-D, full width). Records are
    processed in bands of rows so only a band (plus ``max_shift`` rows) of labels
    is in memory. Returns {fraction, best_shift (dx, dy), best_fraction, misaligned}.
    """
    x, y, count = (np.asarray(v, np.int64) for v in (x, y, count))
    order = np.argsort(y, kind="stable")
    x, y, count = x[order], y[order], count[order]
    coarse_shifts = [(dx, dy) for dy in range(-max_shift, max_shift + 1, coarse)
                     for dx in range(-max_shift, max_shift + 1, coarse)]

    def score(shifts) -> Dict[Tuple[int, int], float]:
        hits = {s: 0 for s in shifts}
        total = int(count.sum())
        for start in range(0, len(x), band_records):
            sl = slice(start, start + band_records)
            bx, by, bc = x[sl], y[sl], count[sl]
            r0 = max(0, int(by.min()) - max_shift)
            r1 = min(height, int(by.max()) + max_shift + 1)
            rows = np.asarray(read_rows(r0, r1))
            for s in shifts:
                hits[s] += _in_cell_fraction(rows, bx, by, bc, r0, *s) * int(bc.sum())
        return {s: (h / total if total else 0.0) for s, h in hits.items()}

    scores = score(coarse_shifts + [(0, 0)])
    cx, cy = max(coarse_shifts, key=lambda s: (scores[s], -abs(s[0]) - abs(s[1])))
    fine = [(dx, dy) for dy in range(cy - coarse + 1, cy + coarse) for dx in range(cx - coarse + 1, cx + coarse)
            if abs(dx) <= max_shift and abs(dy) <= max_shift and (dx, dy) not in scores]
    scores.update(score(fine) if fine else {})
    best = max(scores, key=lambda s: (scores[s], -abs(s[0]) - abs(s[1])))  # ties: the smallest shift
    at0, at_best = scores[(0, 0)], scores[best]
    misaligned = best != (0, 0) and at_best - at0 >= min_gain and at_best >= min_ratio * max(at0, 1e-9)
    return {"records_sampled": int(len(x)), "umis_sampled": int(count.sum()), "fraction_in_cells": at0,
            "best_shift": [int(best[0]), int(best[1])], "fraction_in_cells_at_best_shift": at_best,
            "max_shift_px": int(max_shift), "misaligned": bool(misaligned)}


def describe(result: Dict[str, object], matrix, labels, origin) -> str:
    """The one-paragraph warning for a misaligned matrix (or the one-line note for an aligned one)."""
    dx, dy = result["best_shift"]
    f0, fb = result["fraction_in_cells"], result["fraction_in_cells_at_best_shift"]
    if not result["misaligned"]:
        return (f"{matrix}: {f0:.1%} of the sampled UMIs fall in cells of {labels}; no shift within "
                f"{result['max_shift_px']} px raises that (frame looks right)")
    ox, oy = origin
    return (f"{matrix}: only {f0:.1%} of the sampled UMIs fall in cells of {labels}, but {fb:.1%} would if the "
            f"matrix were shifted by ({dx:+d}, {dy:+d}) px: the matrix and the image are probably not aligned. "
            f"Check the registration, or set expression.origin to '{ox - dx},{oy - dy}' (now '{ox},{oy}')")
