"""From nuclei to cells: every cell one piece, and nuclei grown into cells by a distance, in bounded memory.

Every cell one piece (``fragment_pixels`` / ``largest_component``)
    A cell keeps only its largest 8-connected component; the other components
    (fragments: stray pixels a model left) go to background. Ties between
    components of equal size keep the one whose first pixel comes first in
    raster order (``scipy.ndimage.label``'s numbering). The workflow applies it
    in ``segrefine.stitch``, tile by tile, on each tile's owned cells after the
    overlap trimming and before the paste: a tile owns whole cells and every
    pixel of an owned cell lies in the tile's window, so the per-tile cleanup is
    exactly the whole-slide cleanup, costs one ``ndimage.label`` on each cell's
    bounding box, and leaves labels.tif, the cell table and the outlines all
    clean (a later pass over labels.tif would have to fix the table and the
    outlines again, and read the slide twice). The stitch report counts the
    fragments (``fragment_cells``, ``fragment_pixels``, ``fragment_cell_ids``).

Nuclei grown into cells (``expand_labels`` / ``expand_label_image``)
    A background pixel p goes to the nucleus whose nearest pixel is closest to
    p (Euclidean distance between pixel centres), if that distance is at most
    ``d`` px; nuclei pixels keep their label; a pixel never goes to two cells.
    Ties (nuclei of different ids at the same smallest distance) go to the
    lowest id: the rule does not depend on any scan order, so the result is the
    same however the image is cut. Cell ids are the nuclei's ids: cell k is
    nucleus k grown, so the two matrices link one to one. Computation: the exact
    Euclidean distance transform of the background (``scipy.ndimage``) gives,
    per pixel, the squared distance D to the nearest nucleus pixel (an integer);
    then, per value of D <= floor(d^2), the pixels at that distance take the
    lowest nonzero label among the pixel offsets (dy, dx) with dy^2 + dx^2 = D.
    Whole-slide labels are processed in bands of rows (and blocks of columns)
    read with a halo of ceil(d) rows and columns: a nucleus pixel within d of a
    pixel lies within ceil(d) rows and columns of it, so each band's result is
    exactly the whole-image result (tested against the whole image and against
    a brute-force reference).

    cellbin2's ``correct_r`` (``cellbin2.contrib.fast_correct.Fast``, default
    10 px) differs: it binarises the mask, re-finds cells as 8-connected
    components (touching nuclei become one cell), grows them by a breadth-first
    flood limited to background pixels whose distance to the mask is at most
    ``correct_r``, leaves a pixel whose 8-neighbours carry two labels as
    background, works on 2,000-px blocks stitched with 50-px margins, and writes
    a binary mask. Ours keeps the nuclei's ids, assigns by exact Euclidean
    distance with a documented tie rule, and is exact across bands.

A user's own cell mask (``use_mask``)
    Instead of growing the nuclei, a label image given by the user, which must
    have the nuclei labels' height and width; it is copied band by band as it
    is (its own ids).

Outputs: a pyramidal OME-TIFF like labels.tif (level 0 uint32, written by
``segrefine.io.write_pyramid_ome_tiff``) and a JSON report.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.cells")

DEFAULT_DISTANCE_PX = 10.0  # cellbin2's correct_r
MAX_DISTANCE_PX = 200.0  # beyond this a "cell" is a neighbourhood, not a cell
MAX_DISTANCE_UM = 100.0
BAND_ROWS = 1024
BLOCK_COLS = 4096
EIGHT = np.ones((3, 3), bool)


# --- every cell one piece ---------------------------------------------------------------------------------------------
def _touching_pairs(lab: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """(k, 2) array of the distinct pairs (a < b) of different nonzero labels that are 8-neighbours (``fg``:
    ``lab > 0``)."""
    out = []
    for sa, sb in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
        ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
        ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),
    ):
        a, b = lab[sa], lab[sb]
        m = a != b
        m &= fg[sa]
        m &= fg[sb]
        if m.any():
            x, y = a[m].astype(np.int64), b[m].astype(np.int64)
            out.append(np.stack([np.minimum(x, y), np.maximum(x, y)], axis=1))
    if not out:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(out), axis=0)


def _colours(n: int, pairs: np.ndarray) -> np.ndarray:
    """A colour per label 0..n (greedy, in id order) such that no two touching labels share one."""
    colour = np.zeros(n + 1, np.int32)
    if not len(pairs):
        return colour
    both = np.concatenate([pairs, pairs[:, ::-1]])
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    starts = np.searchsorted(both[:, 0], np.arange(n + 2))
    nbrs = both[:, 1].tolist()
    for c in np.unique(both[:, 0]).tolist():
        used = {int(colour[d]) for d in nbrs[starts[c] : starts[c + 1]] if d < c}
        k = 0
        while k in used:
            k += 1
        colour[c] = k
    return colour


def fragment_pixels(labels: np.ndarray) -> np.ndarray:
    """Boolean image: the pixels of each cell outside its largest 8-connected component (its fragments).

    Cells are coloured so that no two touching cells share a colour; one ``scipy.ndimage.label`` per colour then
    finds the 8-connected components of all its cells at once (a component never spans two cells). Of a cell's
    components the largest stays; of equal sizes the one whose first pixel comes first in raster order."""
    from scipy import ndimage

    frag = np.zeros(labels.shape, bool)
    if labels.size == 0 or not labels.any():
        return frag
    lab = np.asarray(labels)
    if int(lab.max()) > 4 * lab.size:  # sparse large ids: number them 1..n first
        _, inv = np.unique(lab, return_inverse=True)
        lab = inv.reshape(lab.shape)
    n = int(lab.max())
    lab = lab.astype(np.int32 if n < 2**31 else np.int64, copy=False)
    fg = lab > 0
    colour = _colours(n, _touching_pairs(lab, fg))
    many = bool(colour.max() > 0)
    pix_colour = colour[lab] if many else None
    present = np.bincount(lab.ravel(), minlength=n + 1) > 0
    present[0] = False
    for k in range(int(colour.max()) + 1):
        mask = fg & (pix_colour == k) if many else fg
        comp, m = ndimage.label(mask, structure=EIGHT)
        if m <= int((present & (colour == k)).sum()):  # one component per cell: no fragment in this colour
            continue
        size = np.bincount(comp.ravel(), minlength=m + 1)
        cell = np.zeros(m + 1, np.int64)
        cell[comp[mask]] = lab[mask]  # every component lies in one cell
        ncomp = np.bincount(cell[1:], minlength=n + 1)
        if not (ncomp > 1).any():
            continue
        idx = np.arange(1, m + 1)
        order = np.lexsort((idx, -size[1:], cell[1:]))  # per cell: largest first, then raster order
        first = np.ones(m, bool)
        first[1:] = cell[1:][order][1:] != cell[1:][order][:-1]
        keep = np.ones(m + 1, bool)
        keep[idx[order][~first]] = False
        frag |= mask & ~keep[comp]
    return frag


def largest_component(labels: np.ndarray) -> Tuple[np.ndarray, dict]:
    """``labels`` with every cell reduced to its largest 8-connected component, and the counts:
    ``{"fragment_cells": cells that lost pixels, "fragment_pixels": pixels removed, "fragment_cell_ids": [ids]}``."""
    frag = fragment_pixels(labels)
    out = labels.copy()
    ids = np.unique(labels[frag])
    out[frag] = 0
    return out, {
        "fragment_cells": int(len(ids)),
        "fragment_pixels": int(frag.sum()),
        "fragment_cell_ids": [int(i) for i in ids],
    }


# --- distances --------------------------------------------------------------------------------------------------------
def distance_px(distance: float, unit: str = "px", um_per_px: Optional[float] = None, where: str = "") -> float:
    """The expansion distance in pixels, checked: > 0, at most MAX_DISTANCE_PX px (and MAX_DISTANCE_UM µm)."""
    pre = f"{where}: " if where else ""
    try:
        d = float(distance)
    except (TypeError, ValueError):
        raise SegRefineError(f"{pre}expansion distance {distance!r} is not a number") from None
    if unit not in ("px", "um"):
        raise SegRefineError(f"{pre}expansion distance unit {unit!r}: px or um")
    if not math.isfinite(d) or d <= 0:
        raise SegRefineError(
            f"{pre}expansion distance {distance} {unit} must be > 0 "
            "(expression.cells.mode: nuclei builds the nuclei matrix only)"
        )
    if unit == "um":
        if um_per_px is None or not math.isfinite(float(um_per_px)) or float(um_per_px) <= 0:
            raise SegRefineError(
                f"{pre}expansion distance in µm needs the slide's µm per pixel (> 0), got {um_per_px!r}"
            )
        if d > MAX_DISTANCE_UM:
            raise SegRefineError(f"{pre}expansion distance {d:g} µm is absurd (at most {MAX_DISTANCE_UM:g} µm)")
        d = d / float(um_per_px)
    if d > MAX_DISTANCE_PX:
        raise SegRefineError(f"{pre}expansion distance {d:g} px is absurd (at most {MAX_DISTANCE_PX:g} px)")
    return d


def _offsets_by_d2(r2: int) -> Dict[int, np.ndarray]:
    """{D: (k, 2) array of the offsets (dy, dx) with dy^2 + dx^2 = D}, for 1 <= D <= r2."""
    r = int(math.isqrt(r2))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = (dy * dy + dx * dx).ravel()
    keep = (d2 >= 1) & (d2 <= r2)
    dy, dx, d2 = dy.ravel()[keep], dx.ravel()[keep], d2[keep]
    out = {}
    for k in np.unique(d2):
        sel = d2 == k
        out[int(k)] = np.stack([dy[sel], dx[sel]], axis=1)
    return out


def expand_labels(labels: np.ndarray, distance: float, _offsets: Optional[Dict[int, np.ndarray]] = None) -> np.ndarray:
    """Nuclei grown into cells by ``distance`` px in one array (module docstring: nearest nucleus within the
    distance, ties to the lowest id, nuclei unchanged). Exact for every pixel of ``labels``; a band of a larger
    image is exact for the pixels at least ceil(distance) px from the band's cut edges."""
    from scipy import ndimage

    labels = np.asarray(labels)
    out = labels.astype(np.uint32, copy=True)
    bg = labels == 0
    if not bg.any() or bg.all():
        return out
    r2 = int(math.floor(float(distance) ** 2 + 1e-9))
    if r2 < 1:
        return out
    dist = ndimage.distance_transform_edt(bg)
    d2 = np.rint(dist * dist).astype(np.int64)  # squared distances between pixel centres are integers
    del dist
    cand = np.flatnonzero(bg.ravel() & (d2.ravel() <= r2))
    if not len(cand):
        return out
    order = np.argsort(d2.ravel()[cand], kind="stable")
    cand = cand[order]
    cd2 = d2.ravel()[cand]
    del d2, order
    offsets = _offsets if _offsets is not None else _offsets_by_d2(r2)
    H, W = labels.shape
    flat = labels.ravel()
    big = np.uint64(1) << np.uint64(40)
    bounds = np.searchsorted(cd2, np.arange(1, r2 + 2))  # cand[bounds[k-1]:bounds[k]] lie at squared distance k
    result = out.ravel()
    for k in range(1, r2 + 1):
        s, e = int(bounds[k - 1]), int(bounds[k])
        if e <= s:
            continue
        p = cand[s:e]
        py, px = p // W, p % W
        best = np.full(len(p), big, np.uint64)
        for dy, dx in offsets[k]:
            qy, qx = py + dy, px + dx
            ok = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            lab = np.zeros(len(p), np.uint64)
            lab[ok] = flat[qy[ok] * W + qx[ok]]
            np.minimum(best, np.where(lab > 0, lab, big), out=best)
        if (best == big).any():  # the distance transform promised a nucleus pixel at exactly this distance
            raise RuntimeError(
                f"expand_labels: no nucleus at squared distance {k} of {int((best == big).sum())} "
                "pixel(s) (inexact distance transform)"
            )
        result[p] = best.astype(np.uint32)
    return out


# --- whole-slide: bands with a halo -----------------------------------------------------------------------------------
def _band_windows(H: int, W: int, band_rows: int, block_cols: int, halo: int):
    """(core y0, y1, x0, x1, read y0, y1, x0, x1) of every block of the image, in raster order."""
    for y0 in range(0, H, band_rows):
        y1 = min(H, y0 + band_rows)
        for x0 in range(0, W, block_cols):
            x1 = min(W, x0 + block_cols)
            yield y0, y1, x0, x1, max(0, y0 - halo), min(H, y1 + halo), max(0, x0 - halo), min(W, x1 + halo)


def expand_array_banded(
    labels: np.ndarray, distance: float, band_rows: int = BAND_ROWS, block_cols: int = BLOCK_COLS
) -> np.ndarray:
    """``expand_labels`` of an in-memory image computed block by block with a halo (the whole-slide scheme on an
    array; used by the tests to show bands change nothing)."""
    H, W = labels.shape
    halo = int(math.ceil(distance))
    r2 = int(math.floor(float(distance) ** 2 + 1e-9))
    offsets = _offsets_by_d2(max(r2, 1))
    out = np.zeros((H, W), np.uint32)
    for y0, y1, x0, x1, ry0, ry1, rx0, rx1 in _band_windows(H, W, band_rows, block_cols, halo):
        grown = expand_labels(labels[ry0:ry1, rx0:rx1], distance, offsets)
        out[y0:y1, x0:x1] = grown[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
    return out


class _IdSet:
    """The distinct nonzero ids seen, as a growing bitmap (bounded by the largest id, not the pixels)."""

    def __init__(self):
        self.seen = np.zeros(1, bool)

    def add(self, block: np.ndarray) -> None:
        ids = np.unique(block)
        ids = ids[ids > 0]
        if not len(ids):
            return
        top = int(ids[-1])
        if top >= len(self.seen):
            grown = np.zeros(max(top + 1, 2 * len(self.seen)), bool)
            grown[: len(self.seen)] = self.seen
            self.seen = grown
        self.seen[ids] = True

    def count(self) -> int:
        return int(self.seen.sum())


def expand_label_image(
    labels_path,
    out_tif,
    report_out=None,
    mode: str = "expand",
    distance: float = DEFAULT_DISTANCE_PX,
    unit: str = "px",
    um_per_px: Optional[float] = None,
    mask_path=None,
    band_rows: int = BAND_ROWS,
    block_cols: int = BLOCK_COLS,
    pixel_size_um: Optional[float] = None,
    work_dir=None,
) -> dict:
    """Whole-slide nuclei labels -> cell labels (``mode`` expand: grown by ``distance`` ``unit``; mask: the user's
    ``mask_path``), as a pyramidal OME-TIFF; returns the report (also written to ``report_out``). Everything is
    checked before anything is written; the outputs appear together or not at all."""
    from segrefine.expression import LabelImage
    from segrefine.io import DiskArray, label_pyramid_levels, new_work_dir, write_pyramid_ome_tiff, write_text_atomic

    t0 = time.monotonic()
    labels_path, out_tif = Path(labels_path), Path(out_tif)
    if band_rows < 1 or block_cols < 1:
        raise SegRefineError(f"band rows {band_rows} and block columns {block_cols} must be >= 1")
    if mode not in ("expand", "mask"):
        raise SegRefineError(f"cells mode {mode!r}: expand or mask (nuclei needs no cell labels)")
    d_px = None
    if mode == "expand":
        d_px = distance_px(distance, unit, um_per_px, where=str(labels_path))
    elif mask_path is None:
        raise SegRefineError(f"{labels_path}: cells mode mask needs the user's cell mask (--mask)")
    nuclei = LabelImage(labels_path)
    mask = None
    try:
        H, W = nuclei.shape
        if mode == "mask":
            mask = LabelImage(mask_path)
            if mask.shape != nuclei.shape:
                raise SegRefineError(
                    f"cell mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} px (width x height) "
                    f"but the nuclei labels {labels_path} are {W}x{H} px: the mask must be in the "
                    "labels' frame (same size, same origin)"
                )
        report = {
            "labels": str(labels_path),
            "mode": mode,
            "height": H,
            "width": W,
            "mask": str(mask_path) if mode == "mask" else None,
            "distance_px": d_px,
            "distance_given": None if mode == "mask" else {"value": float(distance), "unit": unit},
            "um_per_px": um_per_px,
            "tie_rule": "nearest nucleus pixel (Euclidean); equal distances: lowest id",
            "band_rows": band_rows,
            "block_cols": block_cols,
            "halo_px": int(math.ceil(d_px)) if d_px else 0,
        }
        halo = report["halo_px"]
        r2 = int(math.floor(d_px**2 + 1e-9)) if d_px else 0
        offsets = _offsets_by_d2(r2) if r2 >= 1 else {}
        out_tif.parent.mkdir(parents=True, exist_ok=True)
        work_parent = Path(work_dir or out_tif.parent)
        work = new_work_dir(work_parent, ".cells-")  # one job per folder: the leftovers are its killed runs'
        try:
            nuclei_ids, cell_ids = _IdSet(), _IdSet()
            px_nuclei = px_cells = 0
            store = DiskArray(work / "level0.raw", (H, W), np.uint32)
            try:
                band, band_y = None, (-1, -1)
                for y0, y1, x0, x1, ry0, ry1, rx0, rx1 in _band_windows(H, W, band_rows, block_cols, halo):
                    if band_y != (ry0, ry1):  # one read per band of rows (with its halo), full width
                        band, band_y = nuclei.rows(ry0, ry1), (ry0, ry1)
                    core = band[y0 - ry0 : y1 - ry0, x0:x1]
                    nuclei_ids.add(core)
                    px_nuclei += int(np.count_nonzero(core))
                    if mode == "mask":
                        cells = mask.rows(y0, y1, x0, x1).astype(np.uint32)
                    else:
                        grown = expand_labels(band[:, rx0:rx1], d_px, offsets)
                        cells = grown[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
                    if cells.any():
                        cell_ids.add(cells)
                        px_cells += int(np.count_nonzero(cells))
                        store[y0:y1, x0:x1] = cells
                band = None
                report.update(
                    nuclei=nuclei_ids.count(), cells=cell_ids.count(), nuclei_pixels=px_nuclei, cell_pixels=px_cells
                )
                if mode == "expand":
                    report["mean_area_gain"] = px_cells / px_nuclei if px_nuclei else None
                t1 = time.monotonic()
                levels = label_pyramid_levels(store, work)
                try:
                    write_pyramid_ome_tiff(
                        out_tif, levels, pixel_size_um=pixel_size_um or um_per_px, name="cells", zlib_level=3
                    )
                finally:
                    for lv in levels[1:]:
                        lv.close()
                report["pyramid_levels"] = [list(lv.shape) for lv in levels]
                report["timings_s"] = {"cells": t1 - t0, "pyramid_write": time.monotonic() - t1}
            finally:
                store.close()
        except OSError as exc:
            raise SegRefineError(
                f"{out_tif}: cannot write the cell labels ({exc}; is the disk full?); nothing was "
                "published, rerun when there is space"
            ) from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        nuclei.close()
        if mask is not None:
            mask.close()
    report["timings_s"]["total"] = time.monotonic() - t0
    if report_out:
        try:
            write_text_atomic(report_out, json.dumps(report, indent=2, sort_keys=True) + "\n")
        except BaseException:
            out_tif.unlink(missing_ok=True)  # the two outputs together or not at all
            raise
    log.info(
        "%s: %d nuclei -> %d cells (%s) -> %s (%.1f s)",
        labels_path,
        report["nuclei"],
        report["cells"],
        f"grown by {d_px:g} px" if mode == "expand" else f"mask {mask_path}",
        out_tif,
        report["timings_s"]["total"],
    )
    return report
