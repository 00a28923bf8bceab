"""Whole-slide tiled inference: the tile plan, tissue detection, and the shard runner.

The slide is cut into a grid of square *cores* (a partition of the slide);
each core's *window* is the core grown by ``margin = halo + context`` px on
every side (clipped at the slide). The model predicts each window; the tile
keeps exactly the cells it *owns* (see ``own_cells``), so after stitching
(``segrefine.stitch``) every cell appears once, whole, with one id.

Ownership rule: a cell predicted in a tile's window belongs to that tile iff
its anchor, the pixel floor(centroid) in slide coordinates, lies in the tile's
core (and, with tissue detection on, in the plan's tissue mask). Cores
partition the slide, so one tile owns each cell. A cell smaller
than the halo whose anchor lies in the core lies entirely inside the window
and away from its edge, so it is never cut; a kept cell that touches a window
edge that is not the slide's edge is larger than the halo: it is kept as seen
(clipped by the window) and reported with its location.

Prediction groups: the shard predicts up to ``group`` x ``group`` adjacent
tiles of the plan in one window (the bounding box of their windows, grown by
the model's context) and crops each tile's window out of it, so that a model
that needs a wide context (Cellpose: ~225 px) sees little more than the
slide; each tile's window lies at least that context inside the grouped
window, so the result is the same as predicting the tiles one by one.

Needed pixels: a model that can skip work (``Adapter.skips_unneeded``:
Cellpose's network blocks) is given, with each window, the pixels a kept cell
can cover (``needed_pixels``), and runs only what they depend on; blocks two
windows of a shard share run once (``CellposeAdapter.cache_blocks``).

Only numpy, scipy, scikit-image, tifffile, zarr and pandas are imported here:
the shard runner runs in every model framework's env.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from segrefine import SegRefineError
from segrefine.outlines import outline_texts

log = logging.getLogger("segrefine.tiling")

PLAN_COLUMNS = ["tile_id", "shard", "row", "col", "x0", "y0", "x1", "y1", "wx0", "wy0", "wx1", "wy1", "in_tissue"]
#: the plan table: a numpy record array (``plan["x0"]`` a column, ``plan[k]`` / ``for t in plan`` a tile with
#: attributes ``t.x0``...); numpy, not pandas, so the shard and stitch jobs do not pay pandas' import (0.5 s each)
PLAN_DTYPE = np.dtype([(c, np.int64) for c in PLAN_COLUMNS[:-1]] + [("in_tissue", np.bool_)])


# --- the plan ---------------------------------------------------------------------------------------------------------
def grid_tiles(shape: Tuple[int, int], tile_size: int, margin: int) -> np.recarray:
    """The tile grid of a slide (``PLAN_DTYPE`` records): cores [x0, x1) x [y0, y1) and windows (core + margin,
    clipped), in raster order; no shard yet (-1), all in tissue."""
    if tile_size < 16:
        raise SegRefineError(f"tile size {tile_size} px is too small (at least 16)")
    if margin < 0:
        raise SegRefineError(f"halo/context margin {margin} px is negative")
    H, W = shape
    rows = []
    for r, y0 in enumerate(range(0, H, tile_size)):
        for c, x0 in enumerate(range(0, W, tile_size)):
            x1, y1 = min(W, x0 + tile_size), min(H, y0 + tile_size)
            rows.append(
                (
                    len(rows),
                    -1,
                    r,
                    c,
                    x0,
                    y0,
                    x1,
                    y1,
                    max(0, x0 - margin),
                    max(0, y0 - margin),
                    min(W, x1 + margin),
                    min(H, y1 + margin),
                    True,
                )
            )
    return np.rec.array(rows, dtype=PLAN_DTYPE) if rows else np.recarray(0, dtype=PLAN_DTYPE)


#: tissue detection closes the mask of bright low-resolution pixels at this radius (level-0 px): the gaps between
#: nuclei, which a block mean at 16 px can land in, join into the tissue region
TISSUE_CLOSE_PX = 48


def background_level(g: np.ndarray) -> Tuple[float, float]:
    """(level, noise sigma) of the background of a low-resolution view, whatever fraction of it the tissue covers.

    The level is the darkest half's histogram mode (256 bins, smoothed over 3): the background is a narrow
    peak, the tissue a spread of brighter values, so the mode is the background's even where tissue covers
    most of the view. Sigma comes from the peak's left side (darker than the mode: background only): for a
    Gaussian, 31.73 % of that half lies more than one sigma below the mode."""
    v = np.asarray(g, np.float32).ravel()
    lo, med = float(v.min()), float(np.median(v))
    if med <= lo:
        return lo, 0.0
    counts, edges = np.histogram(v[v <= med], bins=256, range=(lo, med))
    k = int(np.argmax(np.convolve(counts, np.ones(3), mode="same")))
    level = 0.5 * float(edges[k] + edges[k + 1])
    left = v[v <= level]
    sigma = level - float(np.percentile(left, 31.73)) if len(left) > 1 else 0.0
    return level, max(sigma, 0.0)


def detect_tissue(thumb: np.ndarray, bright_field: bool = False, downsample: float = 1.0) -> Tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution grayscale view (``downsample`` level-0 px per view px), and the threshold.

    The background's level and noise come from ``background_level`` (the view inverted for bright-field
    stains). A pixel is bright when it stands above that level by 6 sigma or by 5% of the dynamic range,
    whichever is larger; sparse isolated nuclei still lift their low-resolution pixel well above that. The
    tissue is the bright pixels closed at ``TISSUE_CLOSE_PX`` (the view pixels between nuclei join the region;
    a closing only adds pixels), grown by one pixel so a tile at the tissue edge is never skipped."""
    g = np.asarray(thumb, np.float32)
    if bright_field:
        g = g.max() - g
    hi = float(np.percentile(g, 99.9))
    bg, sigma = background_level(g)
    if hi <= bg:
        return np.zeros(g.shape, bool), hi
    thr = bg + max(6.0 * sigma, 0.05 * (hi - bg))
    radius = max(1, int(round(TISSUE_CLOSE_PX / max(float(downsample), 1.0))))
    return _grow(_closing(g > thr, radius)), thr


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing by a (2 radius + 1) square: dilation, then erosion; pixels outside the view count
    as neither, so the result contains ``mask`` up to the view's edges."""
    out = mask
    for _ in range(radius):
        out = _grow(out)
    out = ~out
    for _ in range(radius):
        out = _grow(out)
    return ~out


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel (3 x 3 square): scipy's binary_dilation, without importing scipy into
    tile-plan for it (its import costs as much as the dilation of a whole slide's view)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    rows = out.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


#: an upper bound of the context (px) a framework's adapter declares (``Adapter.context_px``), used only to size
#: the prediction groups when the plan is made (the plan must not depend on the fine-tuned model, whose context
#: is known only in the shard): Cellpose 3.1's ceil(226 / r) + 2 is at most 256 px for a rescale r >= 0.9 (cell
#: diameter <= 33 px at diam_mean 30). A model whose context exceeds it is still exact (the shard grows windows
#: by the real context); only its pixel ratio is higher.
FRAMEWORK_CONTEXT_BOUND_PX = {"cellpose": 256}
#: ``group: auto`` aims at windows with at most this many pixels per core pixel ...
TARGET_SEEN_RATIO = 1.3
#: ... with no grouped window wider than this (memory: one window's image and labels in the shard)
MAX_GROUP_WINDOW_PX = 6144


def auto_group(
    tile_size: int, margin_px: int, target: float = TARGET_SEEN_RATIO, max_window: int = MAX_GROUP_WINDOW_PX
) -> int:
    """Tiles per side of a prediction group: the smallest g whose window (g x tile_size + 2 x margin) has at most
    ``target`` times the pixels of its g x g cores, or the largest g whose window fits ``max_window``."""
    g = 1
    while ((g * tile_size + 2 * margin_px) / (g * tile_size)) ** 2 > target and (
        g + 1
    ) * tile_size + 2 * margin_px <= max_window:
        g += 1
    return g


def prediction_windows(tiles, group: int, extra: int, shape: Tuple[int, int]):
    """The windows a shard predicts for ``tiles`` (plan records): [(tiles, (x0, y0, x1, y1))], in group order.

    Tiles are grouped by their ``group`` x ``group`` block of the plan grid. A window is the bounding box of some
    tiles' plan windows grown by ``extra`` px (the model's context) and clipped at the slide; a group's tiles are
    predicted in the windows of the guillotine cut of the group (the whole group, or its two parts on either side
    of a row or column boundary, cut again, down to single tiles) that sees the fewest pixels: one window for a
    group full of tissue, a few that follow the tissue's edge otherwise. Every tile's plan window lies ``extra``
    px inside its prediction window, wherever that is not the slide's edge: the model predicts the tile's pixels
    as it would in the whole slide."""
    H, W = shape
    group = max(1, int(group))

    def box(ts):
        return (
            max(0, min(int(t.wx0) for t in ts) - extra),
            max(0, min(int(t.wy0) for t in ts) - extra),
            min(W, max(int(t.wx1) for t in ts) + extra),
            min(H, max(int(t.wy1) for t in ts) + extra),
        )

    def area(b):
        return (b[2] - b[0]) * (b[3] - b[1])

    groups: Dict[Tuple[int, int], list] = {}
    for t in tiles:
        groups.setdefault((int(t.row) // group, int(t.col) // group), []).append(t)
    out = []
    for key in sorted(groups):
        at = {(int(t.row), int(t.col)): t for t in groups[key]}
        memo: Dict[Tuple[int, int, int, int], Tuple[int, list]] = {}

        def best(r0, r1, c0, c1, at=at, memo=memo):  # this group's tiles and table, bound now
            """(pixels seen, windows) of the cheapest guillotine cover of the tiles in rows [r0, r1) x cols [c0, c1)."""
            k = (r0, r1, c0, c1)
            if k not in memo:
                ts = [at[rc] for rc in sorted(at) if r0 <= rc[0] < r1 and c0 <= rc[1] < c1]
                if not ts:
                    memo[k] = (0, [])
                else:
                    b = box(ts)
                    cands = [(area(b), [(ts, b)])]
                    for r in range(r0 + 1, r1):
                        (a1, w1), (a2, w2) = best(r0, r, c0, c1), best(r, r1, c0, c1)
                        cands.append((a1 + a2, w1 + w2))
                    for c in range(c0 + 1, c1):
                        (a1, w1), (a2, w2) = best(r0, r1, c0, c), best(r0, r1, c, c1)
                        cands.append((a1 + a2, w1 + w2))
                    memo[k] = min(cands, key=lambda x: (x[0], len(x[1])))
            return memo[k]

        rows = [rc[0] for rc in at]
        cols = [rc[1] for rc in at]
        out.extend(best(min(rows), max(rows) + 1, min(cols), max(cols) + 1)[1])
    return out


def seen_pixels(windows) -> int:
    """Pixels the model sees for ``prediction_windows``' windows."""
    return int(sum((b[2] - b[0]) * (b[3] - b[1]) for _, b in windows))


def core_pixels(tiles) -> int:
    return int(sum((int(t.x1) - int(t.x0)) * (int(t.y1) - int(t.y0)) for t in tiles))


def largest_training_cell(trainset_tsv) -> Tuple[int, str, int]:
    """(largest cell extent in px = max of bbox height and width, its mask file, its label) over the training masks."""
    from scipy import ndimage

    from segrefine.io import read_tiff

    with open(trainset_tsv, newline="") as fh:
        table = csv.DictReader(fh, delimiter="\t")
        if "mask" not in (table.fieldnames or []):
            raise SegRefineError(f"{trainset_tsv}: training-set table has no 'mask' column")
        masks = [row["mask"] for row in table]
    best = (0, "", 0)
    for mask_path in masks:
        labels = read_tiff(mask_path)
        for lab, sl in enumerate(ndimage.find_objects(labels.astype(np.int64)), 1):
            if sl is not None:
                d = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
                if d > best[0]:
                    best = (d, str(mask_path), lab)
    return best


def _slide_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_halo(halo_px: int, trainset) -> dict:
    """The largest training cell ({extent_px, mask, label}); an error naming it when the halo is smaller."""
    diam, mask, lab = largest_training_cell(trainset)
    if halo_px < diam:
        raise SegRefineError(
            f"halo {halo_px} px is smaller than the largest cell in the training masks ({diam} px: cell {lab} of "
            f"{mask}, from {trainset}); cells that large would be cut at tile seams: set "
            f"segmentation.tiling.halo to at least {diam} px"
        )
    return {"extent_px": diam, "mask": mask, "label": lab}


def halo_check(plan_json, trainset, out_json) -> dict:
    """The workflow's halo check (rule ``halo_check``): the plan's halo against the training masks' largest cell,
    apart from the plan so that the plan, and the pretrained stage's segmentation, do not depend on the training
    set; writes {halo_px, largest_training_cell, plan_id} to ``out_json``."""
    from segrefine.io import write_text_atomic

    plan_json = Path(plan_json)
    if not plan_json.is_file():
        raise SegRefineError(f"{plan_json}: tile plan metadata not found (run `segrefine tile-plan` first)")
    meta = json.loads(plan_json.read_text())
    if "halo_px" not in meta:
        raise SegRefineError(f"{plan_json}: not a tile plan's metadata (no halo_px)")
    cell = check_halo(int(meta["halo_px"]), trainset)
    out = {
        "halo_px": int(meta["halo_px"]),
        "largest_training_cell": cell,
        "plan_id": meta.get("plan_id"),
        "trainset": str(trainset),
    }
    write_text_atomic(out_json, json.dumps(out, indent=2, sort_keys=True) + "\n")
    log.info(
        "halo %d px covers the largest training cell (%d px: cell %d of %s)",
        out["halo_px"],
        cell["extent_px"],
        cell["label"],
        cell["mask"],
    )
    return out


def make_plan(
    slide_path,
    tile_size: int,
    halo_px: int,
    context_px: int = 0,
    shards: int = 1,
    tissue: bool = True,
    tissue_level: Optional[int] = None,
    tissue_downsample: int = 16,
    bright_field: bool = False,
    trainset=None,
    group=1,
    context_bound_px: int = 0,
    channel: Optional[int] = None,
):
    """(plan table, plan metadata) of a slide. Checks the halo against the largest training cell when given a
    training set (``segrefine segment``; the workflow checks it in its own rule, ``halo_check``).

    ``group``: tiles per side the shard predicts in one window (``prediction_windows``), or ``"auto"``: the
    smallest group whose windows, grown by the margin and ``context_bound_px`` (an upper bound of the model's
    context, ``FRAMEWORK_CONTEXT_BOUND_PX``), have at most ``TARGET_SEEN_RATIO`` times the pixels of their cores,
    reduced while the slide's tissue has fewer groups than shards. Shards are assigned by group."""
    from segrefine.intensity import intensity_reference
    from segrefine.io import Slide

    if shards < 1:
        raise SegRefineError(f"shards must be at least 1, got {shards}")
    if context_bound_px < 0:
        raise SegRefineError(f"model context bound {context_bound_px} px is negative")
    if group != "auto" and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise SegRefineError(f"group must be a positive number of tiles or 'auto', got {group!r}")
    meta: Dict[str, object] = {
        "tile_size": int(tile_size),
        "halo_px": int(halo_px),
        "context_px": int(context_px),
        "margin_px": int(halo_px) + int(context_px),
        "shards": int(shards),
        "context_bound_px": int(context_bound_px),
    }
    if trainset is not None:
        meta["largest_training_cell"] = check_halo(halo_px, trainset)
    slide_path = Path(slide_path)
    with Slide(slide_path, channel=channel) as slide:
        meta["slide_description"] = slide.describe()  # what the file is, and what the model is given
        meta["channel"] = slide.channel  # every later read of the slide (shards, stitch) reads the same channel
        H, W = slide.shape
        plan = grid_tiles(slide.shape, tile_size, halo_px + context_px)
        meta.update(slide=str(slide_path), slide_stamp=_slide_stamp(slide_path), height=H, width=W, levels=slide.levels)
        mask = None
        if tissue:
            mask, thr, f = slide_tissue(slide, tissue_downsample, tissue_level, bright_field)
            h, w = mask.shape
            fy, fx = H / h, W / w
            flags = []
            for t in plan:
                ty0, ty1 = int(t.y0 // fy), min(h, int(np.ceil(t.y1 / fy)) + 1)
                tx0, tx1 = int(t.x0 // fx), min(w, int(np.ceil(t.x1 / fx)) + 1)
                flags.append(bool(mask[max(0, ty0 - 1) : ty1, max(0, tx0 - 1) : tx1].any()))
            plan["in_tissue"] = flags
            meta["tissue"] = {
                "activate": True,
                "downsample": round(float(f), 3),
                "threshold": float(thr),
                "level": tissue_level if tissue_level is not None else "auto",
                "tissue_fraction": float(mask.mean()),
                "mask": encode_tissue(mask, f),
            }
        else:
            meta["tissue"] = {"activate": False}
        # the intensity statistics of the slide's tissue, so every window is normalised like the whole slide
        meta["intensity_reference"] = intensity_reference(slide, tissue=None if mask is None else (mask, f))
    inside = np.nonzero(plan["in_tissue"])[0]
    margin = int(halo_px) + int(context_px)

    def group_ids(g):
        keys = [(int(r) // g, int(c) // g) for r, c in zip(plan["row"][inside], plan["col"][inside])]
        index = {k: i for i, k in enumerate(sorted(set(keys)))}
        return np.array([index[k] for k in keys], np.int64), len(index)

    if group == "auto":
        g = auto_group(int(tile_size), margin + int(context_bound_px))
        while g > 1 and group_ids(g)[1] < shards:  # never leave a shard (a GPU) without work for a larger group
            g -= 1
    else:
        g = int(group)
    gid, n_groups = group_ids(g)
    # round robin over the groups in raster order: each shard gets a share of every region, a group in one shard
    plan["shard"][inside] = gid % shards
    meta.update(
        tiles=int(len(plan)),
        tiles_in_tissue=int(len(inside)),
        tiles_skipped_background=int(len(plan) - len(inside)),
        group_tiles=int(g),
        group="auto" if group == "auto" else int(group),
        groups=int(n_groups),
    )
    # what the model will see, per pixel of the cores it predicts: the plan's windows, and the shards' windows if the
    # model's context is the bound (the shards report the real figure: seen_ratio in shards/K.json)
    tissue_tiles = plan[inside]
    cores = core_pixels(tissue_tiles)
    H, W = int(meta["height"]), int(meta["width"])
    est = sum(
        seen_pixels(prediction_windows([t for t in tissue_tiles if t.shard == k], g, int(context_bound_px), (H, W)))
        for k in range(shards)
    )
    pixels = {
        "slide": H * W,
        "cores_in_tissue": cores,
        "windows_planned": seen_pixels(prediction_windows(tissue_tiles, 1, 0, (H, W))),
        "seen_at_context_bound": int(est),
    }
    if mask is not None:
        pixels["tissue"] = int(round(float(mask.sum()) * (H / mask.shape[0]) * (W / mask.shape[1])))
    meta["pixels"] = pixels
    meta["seen_ratio_at_context_bound"] = est / cores if cores else None
    key = json.dumps(
        {
            k: meta[k]
            for k in ("tile_size", "margin_px", "height", "width", "slide_stamp", "group_tiles")
            + (("channel",) if meta["channel"] is not None else ())
        },
        sort_keys=True,
    )
    meta["plan_id"] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return plan, meta


def encode_tissue(mask: np.ndarray, f: float) -> dict:
    """The plan's tissue mask for its JSON: shape, level-0 px per mask px (``f``), the bits (numpy ``packbits``,
    zlib, base64: a few kB for a chip's mask at 16 px) and their sha256, which the tile fingerprints include."""
    import base64
    import zlib

    mask = np.asarray(mask, bool)
    packed = np.packbits(mask, axis=None).tobytes()
    return {
        "shape": [int(n) for n in mask.shape],
        "px_per_mask_px": float(f),
        "packbits_zlib_base64": base64.b64encode(zlib.compress(packed, 9)).decode("ascii"),
        "sha256": hashlib.sha256(json.dumps(mask.shape).encode() + packed).hexdigest(),
    }


def plan_tissue(meta: dict) -> Optional[Tuple[np.ndarray, float]]:
    """(tissue mask, level-0 px per mask px) of a plan (``encode_tissue``), or None: tissue detection off, or a
    plan made by an older version (then nothing is skipped below the tile level and no cell is filtered)."""
    import base64
    import zlib

    enc = (meta.get("tissue") or {}).get("mask")
    if enc is None:
        return None
    h, w = enc["shape"]
    bits = np.frombuffer(zlib.decompress(base64.b64decode(enc["packbits_zlib_base64"])), np.uint8)
    return np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool), float(enc["px_per_mask_px"])


def grow_tissue(tissue: Tuple[np.ndarray, float], px: int) -> Tuple[np.ndarray, float]:
    """The tissue mask grown so that it holds every level-0 pixel closer than ``px`` (in x and in y) to a tissue
    pixel (``intensity.tissue_pixels``' rule): ceil(px / f) + 1 mask pixels, which covers the rounding."""
    mask, f = tissue
    for _ in range(int(np.ceil(max(int(px), 0) / f)) + 1):
        mask = _grow(mask)
    return mask, f


def needed_pixels(job, grown: Optional[Tuple[np.ndarray, float]]) -> np.ndarray:
    """(h, w) bool over a prediction window ``job`` = (tiles, (x0, y0, x1, y1)): the pixels whose model output a
    cell the tiles keep can depend on: their plan windows (core + halo), within ``grown`` (the tissue grown by the
    halo, ``grow_tissue``; None: everywhere). A cell smaller than the halo anchored in a core and in the tissue
    lies in it."""
    from segrefine.intensity import tissue_pixels

    gx0, gy0, gx1, gy1 = job[1]
    out = np.zeros((gy1 - gy0, gx1 - gx0), bool)
    for t in job[0]:
        out[int(t.wy0) - gy0 : int(t.wy1) - gy0, int(t.wx0) - gx0 : int(t.wx1) - gx0] = True
    if grown is not None:
        out &= tissue_pixels(grown, gx0, gy0, gx1 - gx0, gy1 - gy0)
    return out


def slide_tissue(slide, downsample: int = 16, level: Optional[int] = None, bright_field: bool = False):
    """(tissue mask, threshold, level-0 px per mask px) of an open ``segrefine.io.Slide``, from its low-resolution
    view (``Slide.thumbnail``): the mask that both the tile plan's tissue flags and the slide's intensity
    reference use."""
    thumb, f = slide.thumbnail(downsample, level=level)
    mask, thr = detect_tissue(thumb, bright_field, f)
    return mask, thr, float(f)


def write_plan(plan, meta: dict, out_tsv, out_json) -> None:
    from segrefine.io import atomic_path, write_text_atomic

    with atomic_path(out_tsv) as tmp:
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh, delimiter="\t", lineterminator="\n")
            out.writerow(PLAN_COLUMNS)
            out.writerows(plan.tolist())  # python ints and bools: True/False as pandas wrote them
    write_text_atomic(out_json, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info(
        "plan: %d tiles of %d px (margin %d px), %d in tissue, %d background tiles skipped, %d shard(s) -> %s",
        meta["tiles"],
        meta["tile_size"],
        meta["margin_px"],
        meta["tiles_in_tissue"],
        meta["tiles_skipped_background"],
        meta["shards"],
        out_tsv,
    )


def read_plan(plan_tsv, plan_json=None):
    """(plan records, plan metadata) as ``write_plan`` wrote them."""
    plan_tsv = Path(plan_tsv)
    plan_json = Path(plan_json) if plan_json else plan_tsv.with_suffix(".json")
    for p in (plan_tsv, plan_json):
        if not p.is_file():
            raise SegRefineError(f"{p}: tile plan not found (run `segrefine tile-plan` first)")
    with open(plan_tsv, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    header = rows[0] if rows else []
    missing = [c for c in PLAN_COLUMNS if c not in header]
    if missing:
        raise SegRefineError(f"{plan_tsv}: not a tile plan (columns {missing} missing)")
    idx = [header.index(c) for c in PLAN_COLUMNS]
    try:
        records = [
            tuple(int(r[i]) for i in idx[:-1]) + ({"True": True, "False": False}[r[idx[-1]]],) for r in rows[1:] if r
        ]
    except (ValueError, KeyError, IndexError) as exc:
        raise SegRefineError(f"{plan_tsv}: not a tile plan (a row does not parse: {exc!r})") from None
    plan = np.rec.array(records, dtype=PLAN_DTYPE) if records else np.recarray(0, dtype=PLAN_DTYPE)
    return plan, json.loads(plan_json.read_text())


# --- ownership --------------------------------------------------------------------------------------------------------
def own_cells(labels: np.ndarray, tile, slide_shape: Tuple[int, int], with_stats: bool = False, tissue=None):
    """The cells of one window's prediction that the tile owns: those whose anchor lies in the tile's core, and in
    the tissue when ``tissue`` = (the plan's tissue mask, level-0 px per mask px) is given (``plan_tissue``).

    Returns (owned labels cropped to their bounding box, numbered 1..n in
    raster order of their anchors, as uint32; crop origin (x, y) in slide
    coordinates; list of cells larger than the halo as dicts). ``with_stats``:
    a fourth element, the (n, 7) int64 ``cell_stats`` of the owned cells (from
    the sums the ownership rule computes anyway)."""
    from scipy import ndimage

    H, W = slide_shape
    h, w = labels.shape
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    if labels.min() < 0:
        raise SegRefineError(f"tile {tile.tile_id}: the model returned negative labels")
    if top <= 4 * labels.size:  # the usual case (ids 1..n): use them as they are
        seq = labels.astype(np.int32, copy=False)
    else:  # sparse huge ids: renumber
        ids, inv = np.unique(labels, return_inverse=True)
        seq = inv.reshape(labels.shape).astype(np.int32) + (0 if ids[0] == 0 else 1)
    n = int(seq.max()) if seq.size else 0
    empty = (np.zeros((0, 0), np.uint32), (int(tile.wx0), int(tile.wy0)), []) + (
        (np.zeros((0, len(STAT_COLUMNS)), np.int64),) if with_stats else ()
    )
    if n == 0:
        return empty
    flat = seq.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    rows = np.repeat(np.arange(h, dtype=np.float64), w)
    cols = np.tile(np.arange(w, dtype=np.float64), h)
    sum_y = np.bincount(flat, weights=rows, minlength=n + 1)
    sum_x = np.bincount(flat, weights=cols, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = sum_y / area
        cx = sum_x / area
    ay = np.floor(np.nan_to_num(cy, nan=-1e9)).astype(np.int64) + int(tile.wy0)  # nan: ids with no pixel
    ax = np.floor(np.nan_to_num(cx, nan=-1e9)).astype(np.int64) + int(tile.wx0)
    keep = (area > 0) & (ax >= tile.x0) & (ax < tile.x1) & (ay >= tile.y0) & (ay < tile.y1)
    keep[0] = False
    if tissue is not None:
        from segrefine.intensity import tissue_at

        keep[keep] &= tissue_at(tissue, ax[keep], ay[keep])
    kept_ids = np.nonzero(keep)[0]
    if len(kept_ids) == 0:
        return empty
    large = []
    objects = ndimage.find_objects(seq)
    for i in kept_ids:
        sl = objects[i - 1]
        if sl is None:
            continue
        touches = (
            (sl[0].start == 0 and tile.wy0 > 0)
            or (sl[0].stop == h and tile.wy1 < H)
            or (sl[1].start == 0 and tile.wx0 > 0)
            or (sl[1].stop == w and tile.wx1 < W)
        )
        if touches:
            large.append(
                {
                    "tile_id": int(tile.tile_id),
                    "anchor_x": int(ax[i]),
                    "anchor_y": int(ay[i]),
                    "bbox_x0": int(sl[1].start + tile.wx0),
                    "bbox_y0": int(sl[0].start + tile.wy0),
                    "bbox_x1": int(sl[1].stop + tile.wx0),
                    "bbox_y1": int(sl[0].stop + tile.wy0),
                    "area_px_in_window": int(area[i]),
                }
            )
    order = kept_ids[np.lexsort((ax[kept_ids], ay[kept_ids]))]
    lut = np.zeros(n + 1, np.uint32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.uint32)
    owned = lut[seq]
    ys, xs = np.nonzero(owned.any(axis=1))[0], np.nonzero(owned.any(axis=0))[0]
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    result = (owned[y0:y1, x0:x1].copy(), (int(tile.wx0 + x0), int(tile.wy0 + y0)), large)
    if not with_stats:
        return result
    # the cell table's sums in crop coordinates (integers: exact in float64), bounding boxes from find_objects
    boxes = np.array(
        [
            [objects[i - 1][1].start, objects[i - 1][0].start, objects[i - 1][1].stop, objects[i - 1][0].stop]
            for i in order
        ],
        np.int64,
    ).reshape(-1, 4) - [x0, y0, x0, y0]
    a = area[order]
    stats = np.column_stack([a, sum_x[order] - a * x0, sum_y[order] - a * y0]).round().astype(np.int64)
    return result + (np.concatenate([stats, boxes], axis=1),)


STAT_COLUMNS = ["area_px", "sum_x", "sum_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]


def cell_stats(labels: np.ndarray, n: Optional[int] = None) -> np.ndarray:
    """(n, 7) int64 per cell id 1..n of a label crop, in crop coordinates: area, the sums of the pixels' x and y
    (centroid = sum / area), bounding box [x0, x1) x [y0, y1). Ids without pixels get zeros."""
    from scipy import ndimage

    labels = np.asarray(labels)
    n = int(labels.max()) if n is None and labels.size else int(n or 0)
    out = np.zeros((n, len(STAT_COLUMNS)), np.int64)
    if n == 0 or labels.size == 0:
        return out
    h, w = labels.shape
    flat = labels.ravel().astype(np.intp, copy=False)
    out[:, 0] = np.bincount(flat, minlength=n + 1)[1 : n + 1]
    out[:, 1] = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n + 1)[
        1 : n + 1
    ].round()
    out[:, 2] = np.bincount(flat, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n + 1)[
        1 : n + 1
    ].round()
    for k, sl in enumerate(ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=n)):
        if sl is not None:
            out[k, 3:] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


# --- per-tile results -------------------------------------------------------------------------------------------------
def tile_file(tiles_dir, tile_id: int) -> Path:
    return Path(tiles_dir) / f"tile{int(tile_id):06d}.npz"


def tile_fingerprint(meta: dict, card_sha: str, tile, model_context: bool = True) -> str:
    """What a tile result was computed from: the plan, the model card, the slide's intensity reference, the
    window, whether the window was grown by the model's own context (the card fixes how much), and the plan's
    tissue mask (which cells the tile keeps, which pixels the model predicts)."""
    ref = meta.get("intensity_reference")
    norm = hashlib.sha256(json.dumps(ref, sort_keys=True).encode()).hexdigest()[:8] if ref is not None else "none"
    tissue = ((meta.get("tissue") or {}).get("mask") or {}).get("sha256")
    return (
        f"{meta['plan_id']}:{card_sha[:16]}:{norm}:{int(tile.tile_id)}:"
        f"{int(tile.wx0)},{int(tile.wy0)},{int(tile.wx1)},{int(tile.wy1)}"
        + (":mc" if model_context else "")
        + (f":t{tissue[:16]}" if tissue else "")
    )


#: 3: + each cell's mean model probability (``cell_prob``); 2: + per-cell table sums and GeoJSON ring text;
#: 1: labels and outline coordinates only. A shard recomputes a tile of an older format (``tile_done``), so a
#: resumed run never mixes tiles without probabilities into a slide with them; the stitch still reads them all.
TILE_FORMAT = 3


def read_tile(path):
    """(owned labels, metadata, cells) of one tile result; cells: ``stats`` (``cell_stats`` of the owned labels),
    ``prob`` (each cell's mean model probability, NaN when the model gives none), ``geo_ids`` (local ids with an
    outline), ``geo_text`` and ``geo_offsets`` (ring k's GeoJSON text is
    ``geo_text[geo_offsets[k]:geo_offsets[k + 1]]``). A tile written by an older version (format 1) is read
    from its labels: the same values, computed here; tiles of formats 1 and 2 have no probabilities (NaN)."""
    import zlib

    try:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"]))
            raw = zlib.decompress(d["labels_zlib"].tobytes())
            owned = np.frombuffer(raw, np.uint32).reshape(meta["shape"]).copy()
            if meta.get("format", 1) >= 2:
                cells = {
                    "stats": d["cell_stats"].reshape(-1, len(STAT_COLUMNS)),
                    "geo_ids": d["geo_ids"],
                    "geo_offsets": d["geo_offsets"],
                    "geo_text": zlib.decompress(d["geo_zlib"].tobytes()).decode(),
                }
                if "cell_prob" in d.files:
                    cells["prob"] = np.asarray(d["cell_prob"], np.float64)
            else:
                cells = None
        if cells is None:  # format 1: only labels + outline coordinates were stored
            cells = _tile_cells(owned, meta["origin"])
        if "prob" not in cells:  # formats 1 and 2: no probabilities
            cells["prob"] = np.full(len(cells["stats"]), np.nan)
        return owned, meta, cells
    except Exception as exc:
        raise SegRefineError(
            f"{path}: unreadable tile result ({type(exc).__name__}: {exc}); delete it and rerun its shard"
        ) from exc


def _tile_cells(owned: np.ndarray, origin, stats: Optional[np.ndarray] = None) -> dict:
    ids, texts = outline_texts(owned, origin)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    return {
        "stats": cell_stats(owned) if stats is None else stats,
        "geo_ids": ids,
        "geo_offsets": offsets,
        "geo_text": "".join(texts),
    }


def tile_done(path, fingerprint: str) -> bool:
    """True when a tile's result exists, is of the current format and was computed for this plan, window and
    model (an older format is recomputed)."""
    if not Path(path).is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"]))
            return (
                "labels_zlib" in d.files
                and "geo_zlib" in d.files
                and "cell_stats" in d.files
                and "cell_prob" in d.files
                and meta.get("format") == TILE_FORMAT
                and meta.get("fingerprint") == fingerprint
            )
    except Exception:
        return False  # unreadable: recompute it (it is replaced atomically)


def write_tile(
    path,
    owned: np.ndarray,
    origin,
    large: list,
    meta: dict,
    stats: Optional[np.ndarray] = None,
    prob: Optional[np.ndarray] = None,
) -> None:
    """One tile's owned cells (zlib), their table sums (``cell_stats``), mean model probabilities (``prob``, one
    per cell; NaN when None) and GeoJSON outline text (see ``segrefine.outlines``; computed here, on the shard's writer
    thread while the model predicts the next tile, so the stitcher only fills in the global ids) and metadata,
    atomically."""
    from segrefine.io import atomic_path

    import zlib

    owned = np.ascontiguousarray(owned, dtype=np.uint32)
    meta = dict(
        meta,
        origin=list(origin),
        large=large,
        n_cells=int(owned.max()) if owned.size else 0,
        shape=list(owned.shape),
        format=TILE_FORMAT,
    )
    packed = np.frombuffer(zlib.compress(owned.tobytes(), 1), np.uint8)  # level 1: fast, label images shrink ~20x
    cells = _tile_cells(owned, origin, stats)
    n = len(cells["stats"])
    prob = np.full(n, np.nan) if prob is None else np.asarray(prob, np.float64).ravel()
    if len(prob) != n:
        raise SegRefineError(f"{path}: {len(prob)} cell probabilities for {n} cells")
    geo = np.frombuffer(zlib.compress(cells["geo_text"].encode(), 1), np.uint8)
    try:
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    labels_zlib=packed,
                    meta=np.array(json.dumps(meta)),
                    cell_stats=np.asarray(cells["stats"], np.int64),
                    cell_prob=prob,
                    geo_ids=cells["geo_ids"],
                    geo_offsets=cells["geo_offsets"],
                    geo_zlib=geo,
                )
    except OSError as exc:
        raise SegRefineError(f"{path}: cannot write the tile result ({exc}; is the disk full?)") from exc


# --- the shard runner -------------------------------------------------------------------------------------------------
class Progress:
    """Log lines with tiles done, tiles/s and the time left, at most every ``every_s`` seconds."""

    def __init__(self, total: int, what: str, every_s: float = 10.0):
        self.total, self.what, self.every_s = total, what, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s and done != self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        log.info(
            "%s: %d/%d tiles (%.0f%%), %.2f tiles/s, %.0f s left",
            self.what,
            done,
            self.total,
            100.0 * done / max(self.total, 1),
            rate,
            left,
        )


def window_predictor(model):
    """``f(image, (x, y))``: the model's labels of a window whose top-left pixel is (x, y) in the slide
    (``Adapter.predict_window``: models with a slide-anchored grid need it); ``predict(image)`` for duck-typed
    models (tests, benchmarks) that have only that."""
    return getattr(model, "predict_window", None) or (lambda image, origin: model.predict(image))


def window_probability_predictor(model):
    """``f(image, (x, y), needed)`` -> (labels, probability map or None): ``Adapter.predict_window_with_probability``
    (the labels are exactly ``predict_window``'s; ``needed`` goes to a model that ``skips_unneeded``, others
    predict the whole window), or ``window_predictor``'s labels and None for models without it (duck-typed test
    and benchmark models)."""
    f = getattr(model, "predict_window_with_probability", None)
    if f is not None:
        if getattr(model, "skips_unneeded", False):
            return f
        return lambda image, origin, needed=None: f(image, origin)
    labels_of = window_predictor(model)
    return lambda image, origin, needed=None: (labels_of(image, origin), None)


def model_context_px(model) -> int:
    """The margin (px) beyond a window that the model must see to predict the window's cells as it would in the
    whole slide (``Adapter.context_px``; 0 for models that do not declare one)."""
    f = getattr(model, "context_px", None)
    return max(0, int(f())) if f is not None else 0


def run_shard(
    plan_tsv,
    shard: int,
    card_path,
    slide_path,
    tiles_dir,
    out_json,
    gpus: int = 0,
    prefetch: int = 2,
    model=None,
    model_context: bool = True,
) -> dict:
    """Predict every tile of one shard not already done; write each tile's owned cells atomically.

    The model is loaded once; a reader thread reads the next ``prefetch``
    windows while the model works, and a writer thread applies the ownership
    rule and writes the previous tile's result. A killed shard leaves only
    complete tile files, so its rerun predicts only the unfinished tiles.
    ``model_context``: grow each window by the model's own context
    (``model_context_px``, clipped at the slide) for the prediction and crop
    the labels back to the window before the ownership rule: the plan's
    margin stays what the cells need, the model sees what it needs.
    The shard predicts the plan's groups of adjacent tiles in one window each
    (``prediction_windows``, ``group_tiles`` in the plan) and crops each tile's
    window out of the group's labels; the shard's JSON reports the pixels the
    model saw per core pixel (``seen_ratio``).
    ``model``: an already loaded model to use instead of the card's
    (benchmarks, tests); the card still identifies it in the tile fingerprints."""
    from segrefine.devices import gpu_device
    from segrefine.io import Slide, sha256_file, write_text_atomic

    t_start = time.monotonic()
    plan, meta = read_plan(plan_tsv)
    if not 0 <= shard < int(meta["shards"]):
        raise SegRefineError(f"{plan_tsv}: shard {shard} is not in the plan (0..{int(meta['shards']) - 1})")
    slide_path = Path(slide_path)
    if Path(slide_path).is_file() and _slide_stamp(slide_path) != meta["slide_stamp"]:
        raise SegRefineError(
            f"{slide_path}: the slide changed since the tile plan {plan_tsv} was made; rerun tile-plan"
        )
    card_sha = sha256_file(card_path)
    tiles = [t for t in plan if t.shard == shard]
    Path(tiles_dir).mkdir(parents=True, exist_ok=True)
    todo = [
        t
        for t in tiles
        if not tile_done(tile_file(tiles_dir, t.tile_id), tile_fingerprint(meta, card_sha, t, model_context))
    ]
    stats = _shard_stats(shard, meta, card_sha, len(tiles), len(todo))
    log.info("shard %d: %d tiles, %d already done, %d to predict", shard, len(tiles), len(tiles) - len(todo), len(todo))
    if todo:
        with gpu_device(gpus) as dev, Slide(slide_path, channel=meta.get("channel")) as slide:
            if tuple(slide.shape) != (meta["height"], meta["width"]):
                raise SegRefineError(
                    f"{slide_path}: slide size {slide.shape} differs from the plan's "
                    f"({meta['height']}, {meta['width']})"
                )
            model, extra = _shard_model(model, card_path, meta, shard, model_context, stats)
            stats["gpu"] = dev
            jobs = prediction_windows(todo, int(meta.get("group_tiles", 1)), extra, slide.shape)
            tissue = plan_tissue(meta)
            needed_of = _network_plan(model, jobs, tissue, int(meta["halo_px"]), stats)
            counts_before = model.network_counts() if hasattr(model, "network_counts") else None
            _window_stats(stats, jobs, todo, tissue)

            own_and_write = functools.partial(
                _own_and_write,
                meta=meta,
                card_sha=card_sha,
                tiles_dir=tiles_dir,
                model_context=model_context,
                slide_shape=slide.shape,
                tissue=tissue,
            )
            _predict_windows(
                slide,
                model,
                jobs,
                own_and_write=own_and_write,
                stats=stats,
                prefetch=prefetch,
                card_path=card_path,
                progress=Progress(len(todo), f"shard {shard}"),
                needed_of=needed_of,
            )
            _network_stats(model, stats, counts_before)
    stats["wall_s"] = time.monotonic() - t_start
    stats["tiles_per_s"] = stats["tiles_computed"] / stats["wall_s"] if stats["wall_s"] > 0 else 0.0
    write_text_atomic(out_json, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    log.info(
        "shard %d done: %d tiles predicted (%.2f tiles/s), %d resumed; predict %.1f s, read %.1f s "
        "(waited %.1f s), ownership+write %.1f s",
        shard,
        stats["tiles_computed"],
        stats["tiles_per_s"],
        stats["tiles_resumed"],
        stats["predict_s"],
        stats["read_s"],
        stats["wait_read_s"],
        stats["own_write_s"],
    )
    return stats


def _shard_stats(shard: int, meta: dict, card_sha: str, n_tiles: int, n_todo: int) -> dict:
    """A shard's report before any prediction (the timings and window figures are filled in as it runs)."""
    return {
        "shard": shard,
        "tiles": n_tiles,
        "tiles_resumed": n_tiles - n_todo,
        "tiles_computed": n_todo,
        "card_sha256": card_sha,
        "plan_id": meta["plan_id"],
        "read_s": 0.0,
        "predict_s": 0.0,
        "predict_cpu_s": 0.0,
        "wait_read_s": 0.0,
        "wait_write_s": 0.0,
        "own_write_s": 0.0,
        "cells": 0,
        "large_cells": 0,
        "device": None,
        "group_tiles": int(meta.get("group_tiles", 1)),
        "windows": 0,
        "max_window_px": [0, 0],
        "pixels_seen": 0,
        "pixels_cores": 0,
        "seen_ratio": None,
        "intensity_reference": None,  # "slide" or "per window" once the model is loaded (None: all resumed)
    }


def _shard_model(model, card_path, meta: dict, shard: int, model_context: bool, stats: dict):
    """(model, context px the windows grow by): the card's model (or ``model``), given the plan's intensity
    reference; the device, the normalisation and the context go into ``stats``."""
    if model is None:
        from segrefine.models import load_model

        model, card = load_model(card_path)
    else:
        card = {"name": type(model).__name__, "stage": "given"}
    ref = meta.get("intensity_reference")
    setter = getattr(model, "set_intensity_reference", None)  # duck-typed test/bench models may lack it
    applied = bool(setter(ref)) if ref is not None and setter is not None else False
    stats["intensity_reference"] = "slide" if applied else "per window"
    if not applied:
        log.warning(
            "shard %d: %s; each window is normalised by its own statistics, so tiles may differ "
            "from whole-image inference",
            shard,
            "the plan has no intensity reference (made by an older version: rerun tile-plan)"
            if ref is None
            else f"model {type(model).__name__} does not take a slide-level intensity reference",
        )
    stats["device"] = str(model.device)
    extra = model_context_px(model) if model_context else 0
    stats["model_context_px"] = extra
    log.info(
        "shard %d: model %s [%s] on %s; windows grown by the model's context: %d px",
        shard,
        card.get("name"),
        card.get("stage"),
        model.device,
        extra,
    )
    return model, extra


def _network_plan(model, jobs, tissue, halo_px: int, stats: dict):
    """For a model that skips what no kept cell needs (``Adapter.skips_unneeded``: Cellpose's network blocks):
    the function that gives a window's needed pixels (``needed_pixels`` within the tissue grown by the halo), and,
    for a model with a block cache (``network_blocks`` + ``cache_blocks``: Cellpose), the number of windows that
    need each network block, so that a block in the overlap of two windows is predicted once. None otherwise."""
    if not getattr(model, "skips_unneeded", False):
        return None
    grown = grow_tissue(tissue, halo_px) if tissue is not None else None
    needed_of = functools.partial(needed_pixels, grown=grown)
    if hasattr(model, "network_blocks") and hasattr(model, "cache_blocks"):
        uses = collections.Counter()
        for job in jobs:
            uses.update(model.network_blocks(needed_of(job), job[1][:2]))
        model.cache_blocks(uses)
        stats["network_blocks_needed"] = len(uses)
    return needed_of


def _network_stats(model, stats: dict, before: Optional[dict]) -> None:
    """The network's input as the model counted it (``network_counts``: Cellpose's blocks) since ``before`` (its
    counts when the shard began), into ``stats``: blocks computed, reused from the cache and skipped, and
    ``model_input_px`` = blocks computed x the source pixels one block step covers; ``model_input_per_tissue_px``
    per pixel of the tissue in the predicted cores."""
    if before is None:
        return
    counts = {k: v - before[k] for k, v in model.network_counts().items()}
    stats["network"] = counts
    stats["model_input_px"] = int(round(counts["input_px"]))
    tissue_px = stats.get("pixels_tissue")
    stats["model_input_per_tissue_px"] = counts["input_px"] / tissue_px if tissue_px else None
    log.info(
        "shard %d: network blocks computed %d, reused %d, skipped %d: the network saw %.3f px per tissue px",
        stats["shard"],
        counts["computed"],
        counts["reused"],
        counts["skipped"],
        stats["model_input_per_tissue_px"] or 0.0,
    )


def _window_stats(stats: dict, jobs, todo, tissue=None) -> None:
    """What the model will see (windows, pixels per core pixel), into ``stats`` and the log; with the plan's
    tissue mask, the tissue pixels of the cores (``pixels_tissue``)."""
    from segrefine.intensity import tissue_pixels

    stats["windows"] = len(jobs)
    stats["pixels_seen"] = seen_pixels(jobs)
    stats["pixels_cores"] = core_pixels(todo)
    if tissue is not None:
        stats["pixels_tissue"] = int(
            sum(tissue_pixels(tissue, int(t.x0), int(t.y0), int(t.x1 - t.x0), int(t.y1 - t.y0)).sum() for t in todo)
        )
    stats["seen_ratio"] = stats["pixels_seen"] / stats["pixels_cores"] if stats["pixels_cores"] else None
    stats["max_window_px"] = [max(b[3] - b[1] for _, b in jobs), max(b[2] - b[0] for _, b in jobs)]
    log.info(
        "shard %d: %d tiles in %d window(s) (groups of up to %d x %d tiles, largest %d x %d px): the "
        "model sees %.3f px per core px",
        stats["shard"],
        len(todo),
        len(jobs),
        stats["group_tiles"],
        stats["group_tiles"],
        stats["max_window_px"][1],
        stats["max_window_px"][0],
        stats["seen_ratio"] or 0.0,
    )


def _own_and_write(
    job, labels, prob, meta: dict, card_sha: str, tiles_dir, model_context: bool, slide_shape, tissue=None
):
    """Every tile of a predicted window: its plan window cut out of the labels, its owned cells (anchored in its
    core and in ``tissue``, the plan's mask, when given) written with their mean probability (``prob``: the
    window's probability map, or None). Returns (cells, large cells, seconds, tiles)."""
    from segrefine.uncertainty import cell_probability

    t0 = time.monotonic()
    gx0, gy0 = job[1][:2]
    n_cells = n_large = 0
    for t in job[0]:
        crop = labels[int(t.wy0) - gy0 : int(t.wy1) - gy0, int(t.wx0) - gx0 : int(t.wx1) - gx0]
        owned, origin, large, cstats = own_cells(crop, t, slide_shape, with_stats=True, tissue=tissue)
        cprob = None
        if prob is not None and owned.size:
            py, px = origin[1] - gy0, origin[0] - gx0  # the owned crop in the window's pixels
            cprob = cell_probability(owned, prob[py : py + owned.shape[0], px : px + owned.shape[1]], len(cstats))
        write_tile(
            tile_file(tiles_dir, t.tile_id),
            owned,
            origin,
            large,
            {"tile_id": int(t.tile_id), "fingerprint": tile_fingerprint(meta, card_sha, t, model_context)},
            stats=cstats,
            prob=cprob,
        )
        for cell in large:
            log.warning(
                "tile %d: cell at anchor (x=%d, y=%d) reaches the window edge: it is larger than "
                "the halo (%d px) and clipped there",
                t.tile_id,
                cell["anchor_x"],
                cell["anchor_y"],
                meta["halo_px"],
            )
        n_cells += int(owned.max()) if owned.size else 0
        n_large += len(large)
    return n_cells, n_large, time.monotonic() - t0, len(job[0])


def _predict_windows(
    slide, model, jobs, own_and_write, stats: dict, prefetch: int, card_path, progress, needed_of=None
) -> None:
    """The shard's pipeline: a reader thread reads the next ``prefetch`` windows (and their needed pixels,
    ``needed_of(job)``, for a model that takes them), this thread predicts, a writer thread runs ``own_and_write``
    on the previous window; timings go into ``stats``."""

    def read(job):
        t0 = time.monotonic()
        gx0, gy0, gx1, gy1 = job[1]
        img = slide.read(gx0, gy0, gx1 - gx0, gy1 - gy0)
        return (img, None if needed_of is None else needed_of(job)), time.monotonic() - t0

    predict_window = window_probability_predictor(model)
    done = 0
    with concurrent.futures.ThreadPoolExecutor(1) as reader, concurrent.futures.ThreadPoolExecutor(1) as writer:
        reads = collections.deque(reader.submit(read, j) for j in jobs[:prefetch])
        writes = collections.deque()
        for i, job in enumerate(jobs):
            t0 = time.monotonic()
            (img, needed), read_s = reads.popleft().result()
            stats["wait_read_s"] += time.monotonic() - t0
            stats["read_s"] += read_s
            if i + prefetch < len(jobs):
                reads.append(reader.submit(read, jobs[i + prefetch]))
            t0, c0 = time.monotonic(), time.thread_time()
            labels, prob = predict_window(img, job[1][:2], needed=needed)
            labels = np.asarray(labels)
            stats["predict_s"] += time.monotonic() - t0
            stats["predict_cpu_s"] += time.thread_time() - c0  # this thread's CPU (model threads not counted)
            _check_prediction(labels, prob, img.shape[:2], card_path, job)
            del img, needed
            writes.append(writer.submit(own_and_write, job, labels, prob))
            del labels, prob
            t0 = time.monotonic()
            while len(writes) > 1:  # at most one window's writes behind: errors (a full disk) surface at once
                done += _account(stats, writes.popleft().result())
            stats["wait_write_s"] += time.monotonic() - t0  # the writer thread slower than the model
            progress.update(done)
        t0 = time.monotonic()
        while writes:
            done += _account(stats, writes.popleft().result())
        stats["wait_write_s"] += time.monotonic() - t0
        progress.update(done, force=True)


def _check_prediction(labels, prob, shape, card_path, job) -> None:
    if labels.shape != shape:
        raise SegRefineError(
            f"model {card_path} returned labels of shape {labels.shape} for a "
            f"window of shape {shape} (tiles "
            f"{[int(t.tile_id) for t in job[0]]})"
        )
    if prob is not None and np.shape(prob) != labels.shape:
        raise SegRefineError(
            f"model {card_path} returned a probability map of shape {np.shape(prob)} for labels of shape {labels.shape}"
        )


def _account(stats: dict, result) -> int:
    n, n_large, s, n_tiles = result
    stats["cells"] += n
    stats["large_cells"] += n_large
    stats["own_write_s"] += s
    return n_tiles
