"""Cell outlines: each cell's outer ring by marching squares, as coordinates or as GeoJSON text.

``cell_outlines`` traces one cell at a time with scikit-image's marching squares; ``outline_texts`` computes the
same rings for every cell of a label crop at once with numpy (``_marching_rings``) and writes them as the text
``json.dumps`` gives. The shards write each tile's outline text (``segrefine.tiling``), the stitch that of the
cells it trims (``segrefine.stitch``).

Only numpy, scipy and scikit-image are imported here: the shard runner runs in every model framework's env.
"""

from __future__ import annotations

import json
from typing import List, Tuple

import numpy as np


def _contour_functions():
    """skimage's marching squares as find_contours runs it (segments, then assembly), without its per-call input
    checks; find_contours itself where those internals moved."""
    try:
        from skimage.measure._find_contours import _assemble_contours
        from skimage.measure._find_contours_cy import _get_contour_segments

        return lambda img: _assemble_contours(_get_contour_segments(img, 0.5, False, None))
    except ImportError:  # pragma: no cover - other skimage layouts
        from skimage.measure import find_contours

        return lambda img: find_contours(img, 0.5)


def _dense_labels(labels: np.ndarray):
    """(ids, labels renumbered 1..n as int32 in the order of ids) of a label crop; ids is None for no cell."""
    top = int(labels.max()) if labels.size else 0
    if top == 0:
        return None, None
    if top <= max(labels.size, 2**16):  # by a lookup table (memory: that of the crop; not for large global ids)
        present = np.bincount(labels.ravel(), minlength=top + 1) > 0
        present[0] = False
        ids = np.nonzero(present)[0]
        if len(ids) == top:
            return ids, labels.astype(np.int32, copy=False)
        lut = np.zeros(top + 1, np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        return ids, lut[labels]
    ids = np.unique(labels[labels > 0])
    dense = np.searchsorted(ids, labels).astype(np.int32) + 1
    dense[labels == 0] = 0
    return ids, dense


def _outline_arrays(labels: np.ndarray, origin=(0, 0)):
    """(cell id, ring as an (m, 2) float64 array of x, y) per cell; see ``cell_outlines``."""
    from scipy import ndimage

    contours_of = _contour_functions()
    ox, oy = origin
    ids, dense = _dense_labels(np.asarray(labels))  # ids made 1..n: find_objects costs n, not the max id
    if ids is None:
        return
    for k, sl in enumerate(ndimage.find_objects(dense), 1):
        if sl is None:
            continue
        sub = dense[sl] == k
        img = np.zeros((sub.shape[0] + 2, sub.shape[1] + 2), np.float64)  # padded: every contour closes
        img[1:-1, 1:-1] = sub
        contours = contours_of(img)
        if not contours:
            continue
        c = max(contours, key=len)
        ring = np.empty(c.shape, np.float64)
        ring[:, 0] = np.round(c[:, 1] - 1 + sl[1].start + ox + 0.5, 2)
        ring[:, 1] = np.round(c[:, 0] - 1 + sl[0].start + oy + 0.5, 2)
        if not (ring[0] == ring[-1]).all():
            ring = np.concatenate([ring, ring[:1]])
        yield int(ids[k - 1]), ring


def cell_outlines(labels: np.ndarray, origin=(0, 0)):
    """(cell id, closed outer ring [[x, y], ...]) per cell, in slide pixel coordinates (pixel i spans [i, i+1)).

    The ring is the marching-squares contour of the cell's mask at 0.5: it runs
    along pixel edges and cuts pixel corners diagonally (holes are ignored;
    nuclei have none). One contour per cell; for a cell in several pieces,
    the longest."""
    return [(cid, ring.tolist()) for cid, ring in _outline_arrays(labels, origin)]


def outline_texts(labels: np.ndarray, origin=(0, 0)) -> Tuple[np.ndarray, List[str]]:
    """(cell ids, each cell's ring as GeoJSON text): exactly ``json.dumps`` of its ``cell_outlines`` ring.

    Computed for all cells of the crop at once (``_marching_rings``); per cell with skimage where a check of
    that computation fails."""
    labels = np.asarray(labels)
    ids, dense = _dense_labels(labels)
    if ids is None:
        return np.zeros(0, np.uint32), []
    rings = _marching_rings(dense, origin)
    if rings is None:  # pragma: no cover - the checks of _marching_rings did not pass: the per-cell way
        out, texts = [], []
        dumps = json.JSONEncoder().encode
        for cid, ring in _outline_arrays(labels, origin):
            out.append(cid)
            texts.append(dumps(ring.tolist()))
        return np.array(out, np.uint32), texts
    dense_ids, x2, y2, starts = rings
    if not len(x2):
        return np.zeros(0, np.uint32), []
    # coordinates are multiples of 0.5 (x2, y2: twice them): their JSON text (float repr) from a table
    x0, y0 = int(x2.min()), int(y2.min())
    tx = np.array([repr(v / 2) for v in range(x0, int(x2.max()) + 1)], dtype=object)[x2 - x0].tolist()
    ty = np.array([repr(v / 2) for v in range(y0, int(y2.max()) + 1)], dtype=object)[y2 - y0].tolist()
    pts = [f"[{a}, {b}]" for a, b in zip(tx, ty)]
    ends = starts[1:] + [len(pts)]
    texts = ["[" + ", ".join(pts[a:b]) + ", " + pts[a] + "]" for a, b in zip(starts, ends)]  # closed: first again
    return ids[dense_ids - 1].astype(np.uint32), texts


# marching squares of one cell's mask at 0.5 as skimage's find_contours emits it (fully_connected="low"): per
# square (corners ul=1, ur=2, ll=4, lr=8 inside the cell) up to two segments (from, to), on the middle of the
# square's top, bottom, left or right side, in doubled coordinates relative to the square's top-left pixel
_T, _B, _L, _R = (0, 1), (2, 1), (1, 0), (1, 2)
_MS_CASES = {
    1: [(_T, _L)],
    2: [(_R, _T)],
    3: [(_R, _L)],
    4: [(_L, _B)],
    5: [(_T, _B)],
    6: [(_R, _T), (_L, _B)],
    7: [(_R, _B)],
    8: [(_B, _R)],
    9: [(_T, _L), (_B, _R)],
    10: [(_B, _T)],
    11: [(_B, _L)],
    12: [(_L, _R)],
    13: [(_T, _R)],
    14: [(_L, _T)],
}
_MS_SEG = np.zeros((16, 2, 2, 2), np.int64)  # case, segment, from / to, (row, col)
_MS_NSEG = np.zeros(16, np.int64)
for _case, _segs in _MS_CASES.items():
    _MS_NSEG[_case] = len(_segs)
    for _k, _seg in enumerate(_segs):
        _MS_SEG[_case, _k] = _seg


def _marching_rings(dense: np.ndarray, origin):
    """The ``cell_outlines`` rings of every cell of a label crop (ids 1..n, int32) at once, with numpy.

    skimage's find_contours on a cell's padded mask emits the squares' segments in raster order and chains
    them; every point has one incoming and one outgoing segment, so each contour is a cycle, and the chain it
    returns starts at the end point of the cycle's last segment in raster order (the segment that closes it)
    and follows the segments; contours come in the order of their first segment. This computes the same:
    the segments of all cells (a square on the border of several cells gives segments to each), each one's
    successor, per cycle its first and last segment and each segment's place (pointer doubling), and per cell
    the longest cycle (ties: the first). Returns (dense ids, 2x, 2y of the ring points, start of each ring)
    or None where a check fails (then the caller goes cell by cell)."""
    ox, oy = origin
    h, w = dense.shape
    P = np.zeros((h + 2, w + 2), np.int32)
    P[1:-1, 1:-1] = dense
    a, b, c, d = P[:-1, :-1], P[:-1, 1:], P[1:, :-1], P[1:, 1:]
    rr, cc = np.nonzero((a != b) | (a != c) | (a != d))  # squares on some cell's border
    base = rr * (w + 2) + cc
    Pf = P.ravel()
    corners = (Pf[base], Pf[base + 1], Pf[base + w + 2], Pf[base + w + 3])
    sq, lab = [], []
    for j, cj in enumerate(corners):  # each cell present in the square once
        m = cj != 0
        for prev in corners[:j]:
            m &= cj != prev
        sq.append(np.nonzero(m)[0])
        lab.append(cj[m])
    sq = np.concatenate(sq)
    lab = np.concatenate(lab).astype(np.int64)
    if not len(sq):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), []
    case = (
        (corners[0][sq] == lab) * 1
        + (corners[1][sq] == lab) * 2
        + (corners[2][sq] == lab) * 4
        + (corners[3][sq] == lab) * 8
    )
    two = _MS_NSEG[case] == 2
    sq = np.concatenate([sq, sq[two]])
    k = np.concatenate([np.zeros(len(case), np.int64), np.ones(int(two.sum()), np.int64)])
    lab = np.concatenate([lab, lab[two]])
    case = np.concatenate([case, case[two]])
    order = np.argsort(base[sq] * 2 + k, kind="stable")  # raster order of the squares, then within a square
    sq, k, lab, case = sq[order], k[order], lab[order], case[order]
    seg = _MS_SEG[case, k]
    r2, c2 = 2 * rr[sq], 2 * cc[sq]
    fr, fc = r2 + seg[:, 0, 0], c2 + seg[:, 0, 1]
    stride = 2 * w + 5
    cell = lab * ((2 * h + 5) * stride)
    fkey = cell + fr * stride + fc
    tkey = cell + (r2 + seg[:, 1, 0]) * stride + c2 + seg[:, 1, 1]
    n = len(fkey)
    fo = np.argsort(fkey)
    at = np.searchsorted(fkey[fo], tkey)
    if (at >= n).any():
        return None
    succ = fo[at]
    if (fkey[succ] != tkey).any() or np.bincount(succ, minlength=n).max() != 1:  # not a permutation
        return None
    idx = np.arange(n)
    first, last, p = idx.copy(), idx.copy(), succ.copy()
    for _ in range(64):  # min / max over 2^i segments ahead; stable once 2^i >= the cycle's length
        first2, last2 = np.minimum(first, first[p]), np.maximum(last, last[p])
        if (first2 == first).all() and (last2 == last).all():
            break
        first, last, p = first2, last2, p[p]
    else:
        return None
    closing = idx == last
    ahead = (~closing).astype(np.int64)  # segments from each to its cycle's last one
    p = np.where(closing, idx, succ)
    for _ in range(64):
        if (p[p] == p).all():
            break
        ahead = ahead + ahead[p]
        p = p[p]
    else:
        return None
    length = np.bincount(first, minlength=n)[first]
    place = length - 1 - ahead
    heads = np.nonzero(idx == first)[0]
    ho = heads[np.lexsort((heads, -length[heads], lab[heads]))]
    keep = np.ones(len(ho), bool)
    keep[1:] = lab[ho][1:] != lab[ho][:-1]
    chosen = np.zeros(n, bool)
    chosen[ho[keep]] = True
    sel = np.nonzero(chosen[first])[0]
    sel = sel[np.lexsort((place[sel], lab[sel]))]
    labs = lab[sel]
    starts = np.nonzero(np.concatenate([[True], labs[1:] != labs[:-1]]))[0]
    # x = (column in the padded crop) - 1 + ox + 0.5, so 2x = 2 * column - 1 + 2 ox
    return labs[starts], fc[sel] - 1 + 2 * int(ox), fr[sel] - 1 + 2 * int(oy), starts.tolist()
