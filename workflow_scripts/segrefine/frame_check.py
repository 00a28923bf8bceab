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

The check reads a sample, not the slide: ``sample_windows`` takes the label
rows of a few bands spread over the matrix (8 bands of 256 rows by default,
each with ``max_shift`` rows of margin, kept as a boolean in-cell mask) and at
most 8,192 of each band's records.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Tuple

import numpy as np

log = logging.getLogger("segrefine.frame_check")


def _hits(mask: np.ndarray, row0: int, x: np.ndarray, y: np.ndarray, count: np.ndarray, dx: int, dy: int) -> int:
    """UMIs of the records at (x + dx, y + dy) that land in a cell of ``mask`` (rows start at label row ``row0``)."""
    xs, ys = x + dx, y + dy - row0
    ok = (xs >= 0) & (xs < mask.shape[1]) & (ys >= 0) & (ys < mask.shape[0])
    return int(count[ok][mask[ys[ok], xs[ok]]].sum())


def sample_windows(
    records_in_rows: Callable[[int, int], Tuple[np.ndarray, np.ndarray, np.ndarray]],
    read_rows: Callable[[int, int], np.ndarray],
    y_range: Tuple[int, int],
    height: int,
    n_windows: int = 8,
    window_rows: int = 256,
    max_shift: int = 48,
    max_records: int = 8192,
    seed: int = 0,
) -> List[tuple]:
    """``n_windows`` bands of ``window_rows`` label rows spread evenly over ``y_range`` (the matrix's rows):
    each (in-cell mask of its rows +- ``max_shift``, first row, x, y, count of at most ``max_records`` of its
    records, drawn with a seeded generator). Only these rows of the labels and these records are read."""
    rng = np.random.default_rng(seed)
    lo, hi = y_range
    if hi < lo:
        return []
    span = hi - lo + 1
    starts = sorted({lo + int(round(k * max(0, span - window_rows) / max(1, n_windows - 1))) for k in range(n_windows)})
    windows, last_end = [], lo
    for y0 in starts:
        y0 = max(y0, last_end)  # no record twice when windows would overlap (a short matrix)
        y1 = min(hi + 1, y0 + window_rows)
        if y1 <= y0:
            continue
        last_end = y1
        x, y, count = records_in_rows(y0, y1)
        if len(x) > max_records:
            pick = np.sort(rng.choice(len(x), max_records, replace=False))
            x, y, count = np.asarray(x)[pick], np.asarray(y)[pick], np.asarray(count)[pick]
        r0, r1 = max(0, y0 - max_shift), min(height, y1 + max_shift)
        windows.append(
            (
                np.asarray(read_rows(r0, r1)) > 0,
                r0,
                np.asarray(x, np.int64),
                np.asarray(y, np.int64),
                np.asarray(count, np.int64),
            )
        )
    return windows


def shift_scan(
    windows: List[tuple],
    max_shift: int = 48,
    coarse: int = 4,
    min_gain: float = 0.10,
    min_ratio: float = 1.5,
    min_umis: int = 1000,
) -> Dict[str, object]:
    """In-cell UMI fraction of the windows' records at shift 0 and at the best shift within ``max_shift`` px
    (``sample_windows``; records in label pixel coordinates). Returns {fraction_in_cells, best_shift (dx, dy),
    fraction_in_cells_at_best_shift, misaligned, ...}; with fewer than ``min_umis`` UMIs, or no cell in the windows,
    nothing is claimed (``checked`` false)."""
    total = sum(int(w[4].sum()) for w in windows)
    has_cells = any(bool(w[0].any()) for w in windows)  # no cell in the sampled bands: nothing to align to

    def score(shifts) -> Dict[Tuple[int, int], float]:
        return {
            s: (sum(_hits(m, r0, x, y, c, *s) for m, r0, x, y, c in windows) / total if total else 0.0) for s in shifts
        }

    scores = score([(0, 0)])
    best = (0, 0)
    if total >= min_umis and has_cells:
        coarse_shifts = [
            (dx, dy)
            for dy in range(-max_shift, max_shift + 1, coarse)
            for dx in range(-max_shift, max_shift + 1, coarse)
        ]
        scores.update(score([s for s in coarse_shifts if s not in scores]))
        cx, cy = max(coarse_shifts, key=lambda s: (scores[s], -abs(s[0]) - abs(s[1])))
        fine = [
            (dx, dy)
            for dy in range(cy - coarse + 1, cy + coarse)
            for dx in range(cx - coarse + 1, cx + coarse)
            if abs(dx) <= max_shift and abs(dy) <= max_shift and (dx, dy) not in scores
        ]
        scores.update(score(fine))
        best = max(scores, key=lambda s: (scores[s], -abs(s[0]) - abs(s[1])))  # ties: the smallest shift
    at0, at_best = scores[(0, 0)], scores[best]
    misaligned = best != (0, 0) and at_best - at0 >= min_gain and at_best >= min_ratio * max(at0, 1e-9)
    return {
        "windows": len(windows),
        "records_sampled": int(sum(len(w[2]) for w in windows)),
        "umis_sampled": total,
        "fraction_in_cells": at0,
        "best_shift": [int(best[0]), int(best[1])],
        "fraction_in_cells_at_best_shift": at_best,
        "max_shift_px": int(max_shift),
        "cells_sampled": has_cells,
        "checked": total >= min_umis and has_cells,
        "misaligned": bool(misaligned),
    }


def describe(result: Dict[str, object], matrix, labels, origin) -> str:
    """The one-paragraph warning for a misaligned matrix (or the one-line note for an aligned one)."""
    dx, dy = result["best_shift"]
    f0, fb = result["fraction_in_cells"], result["fraction_in_cells_at_best_shift"]
    if not result["checked"]:
        if not result.get("cells_sampled", True):
            return f"{matrix}: alignment not checked: no cell of {labels} in the sampled bands"
        return f"{matrix}: alignment not checked: only {result['umis_sampled']} UMIs in the sampled bands"
    if not result["misaligned"]:
        return (
            f"{matrix}: {f0:.1%} of the sampled UMIs fall in cells of {labels}; no shift within "
            f"{result['max_shift_px']} px raises that (frame looks right)"
        )
    ox, oy = origin
    return (
        f"{matrix}: only {f0:.1%} of the sampled UMIs fall in cells of {labels}, but {fb:.1%} would if the "
        f"matrix were shifted by ({dx:+d}, {dy:+d}) px: the matrix and the image are probably not aligned. "
        f"Check the registration, or set expression.origin to '{ox - dx},{oy - dy}' (now '{ox},{oy}')"
    )
