"""Exact stitching of the per-tile results into one whole-slide result, in bounded memory.

Tiles are pasted one at a time, in tile-id order (raster order of the cores),
into a chunked, compressed level-0 store on disk; memory holds one window at a
time, never the slide. Every owned cell gets the next global id (uint32,
1..N, in tile order), so ids are unique across the slide.

Conflicts in overlaps: two tiles own the same physical cell only when their
predictions of it differ enough to move its anchor across the seam (the
model saw different context). When a tile's cell overlaps cells already
pasted by earlier tiles:
  * if half or more of its pixels, or half or more of such a cell's pixels in
    the window, are shared, it is the same cell: the earlier tile's copy stays
    and this copy is dropped (counted as a duplicate resolved);
  * otherwise the shared pixels stay with the earlier cell and this cell
    keeps its other pixels (counted as pixels trimmed).
Every cell is then its largest 8-connected component: the other pieces of
a cell (stray pixels a model left, or a cell cut in two by the trimming) go
to background, counted in the report (``segrefine.cells``: a tile owns
whole cells, so the per-tile cleanup is the whole-slide one).
The cell table, the outlines and the pyramid agree with the stitched
pixels (labels.tif) exactly: a cell kept whole has the pixels the shard saw,
so its table sums and outline text come from the tile file (computed on the
shard's writer thread while the model works; the stitch only fills in the
global id); the few cells trimmed in an overlap are recomputed from the
stitched pixels. The overlay's slide view is read on a second thread while
the tiles are pasted, and drawn while labels.tif is compressed.

Outputs: labels.tif (tiled, zlib, pyramidal OME-TIFF; level 0 = full-size
uint32 labels), cells.csv and cells.parquet, cells.geojson (QuPath
detections), overlay.png (downsampled outlines on the slide), and a JSON
report with counts, cells larger than the halo and timings.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import json
import logging
import shutil
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

import numpy as np

from segrefine import SegRefineError
from segrefine.cells import fragment_pixels
from segrefine.outlines import outline_texts
from segrefine.tiling import cell_stats

log = logging.getLogger("segrefine.stitch")

CELL_COLUMNS = [
    "cell_id",
    "centroid_x",
    "centroid_y",
    "area_px",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
    "probability",
]
MAX_ID = 2**32 - 1


def _cell_rows(stats: np.ndarray, origin, first: int, prob: Optional[np.ndarray] = None) -> dict:
    """Columns of the cell table for cells ``first, first+1, ...`` from their ``cell_stats`` rows (crop
    coordinates; the crop's top-left is ``origin`` in the slide): centroid = mean pixel position, bbox =
    [x0, x1) x [y0, y1) in slide pixels; probability = the cell's mean model probability (``prob``, NaN when
    None)."""
    ox, oy = origin
    area = stats[:, 0]
    return {
        "cell_id": np.arange(first, first + len(stats), dtype=np.int64),
        "centroid_x": stats[:, 1].astype(np.float64) / area + ox,
        "centroid_y": stats[:, 2].astype(np.float64) / area + oy,
        "area_px": area.astype(np.int64),
        "bbox_x0": stats[:, 3] + ox,
        "bbox_y0": stats[:, 4] + oy,
        "bbox_x1": stats[:, 5] + ox,
        "bbox_y1": stats[:, 6] + oy,
        "probability": np.full(len(stats), np.nan) if prob is None else np.asarray(prob, np.float64),
    }


def _timed(fn, *args):
    """(fn(*args), seconds it took)."""
    t0 = time.monotonic()
    return fn(*args), time.monotonic() - t0


class _Clock:
    """Wall and CPU (this thread's) seconds per named part, summed over the ``with clock.part(name)`` blocks."""

    def __init__(self, *names):
        self.wall = dict.fromkeys(names, 0.0)
        self.cpu = dict.fromkeys(names, 0.0)

    @contextlib.contextmanager
    def part(self, name):
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            yield
        finally:
            self.wall[name] += time.monotonic() - t0
            self.cpu[name] += time.thread_time() - c0


def _duplicates(owned: np.ndarray, existing: np.ndarray) -> np.ndarray:
    """Boolean per owned id (index 0 unused): True when the cell is an earlier tile's cell seen again."""
    n = int(owned.max())
    dup = np.zeros(n + 1, bool)
    both = (owned > 0) & (existing > 0)
    if not both.any():
        return dup
    area_new = np.bincount(owned.ravel(), minlength=n + 1)
    ex_ids, ex_area = np.unique(existing[existing > 0], return_counts=True)
    pairs = (owned[both].astype(np.uint64) << np.uint64(32)) | existing[both].astype(np.uint64)
    up, shared = np.unique(pairs, return_counts=True)
    pn = (up >> np.uint64(32)).astype(np.int64)
    pe = (up & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    pe_area = ex_area[np.searchsorted(ex_ids, pe)]
    same = (shared * 2 >= area_new[pn]) | (shared * 2 >= pe_area)
    dup[pn[same]] = True
    return dup


class _TableWriter:
    """cells.csv (streamed rows) and cells.parquet (streamed row groups), both atomic."""

    def __init__(self, stack: contextlib.ExitStack, csv_path, parquet_path):
        from segrefine.io import atomic_path

        self.csv_tmp = stack.enter_context(atomic_path(csv_path))
        self.fh = stack.enter_context(open(self.csv_tmp, "w", newline=""))
        self.csv = csv.writer(self.fh)
        self.csv.writerow(CELL_COLUMNS + [])
        self.parquet_tmp = stack.enter_context(atomic_path(parquet_path)) if parquet_path else None
        self.pq_writer = None
        self.batch: List[dict] = []
        self.batch_rows = 0

    def add(self, cols: dict) -> None:
        n = len(cols["cell_id"])
        if n == 0:
            return
        self.csv.writerows(zip(*(cols[c].tolist() for c in CELL_COLUMNS)))
        if self.parquet_tmp is not None:
            self.batch.append(cols)
            self.batch_rows += n
            if self.batch_rows >= 200_000:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.batch:
            return
        table = pa.table({c: np.concatenate([b[c] for b in self.batch]) for c in CELL_COLUMNS + ["tile_id"]})
        if self.pq_writer is None:
            self.pq_writer = pq.ParquetWriter(str(self.parquet_tmp), table.schema, compression="zstd")
        self.pq_writer.write_table(table)
        self.batch, self.batch_rows = [], 0

    def close(self) -> None:
        if self.parquet_tmp is not None:
            self._flush()
            if self.pq_writer is None:  # no cell at all: an empty table with the schema
                import pyarrow as pa
                import pyarrow.parquet as pq

                empty = {
                    c: np.zeros(0, np.float64 if c.startswith("centroid") or c == "probability" else np.int64)
                    for c in CELL_COLUMNS + ["tile_id"]
                }
                pq.write_table(pa.table(empty), str(self.parquet_tmp), compression="zstd")
            else:
                self.pq_writer.close()
        self.fh.close()


PROBABILITY_BIN_PX = 64
#: viridis at 0, 0.25, 0.5, 0.75, 1 (matplotlib's values), interpolated linearly: the probability map's colours
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def _colours(v: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours of values in [0, 1] (viridis, interpolated between its quartiles)."""
    x = np.clip(v, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


class _ProbabilityGrid:
    """Mean cell probability per ``bin_px`` x ``bin_px`` square of the slide, over the cells whose centroid lies in
    it (cells without a probability left out): a (H / bin_px, W / bin_px) grid, small for any slide."""

    def __init__(self, shape, bin_px: int):
        if bin_px < 1:
            raise SegRefineError(f"probability map bin size must be at least 1 px, got {bin_px}")
        self.bin = int(bin_px)
        self.shape = (-(-int(shape[0]) // self.bin), -(-int(shape[1]) // self.bin))
        self.sum = np.zeros(self.shape, np.float64)
        self.n = np.zeros(self.shape, np.int64)
        self.cells = 0

    def add(self, cols: dict) -> None:
        p = cols["probability"]
        self.cells += len(p)
        ok = ~np.isnan(p)
        if not ok.any():
            return
        r = np.clip((cols["centroid_y"][ok] // self.bin).astype(np.int64), 0, self.shape[0] - 1)
        c = np.clip((cols["centroid_x"][ok] // self.bin).astype(np.int64), 0, self.shape[1] - 1)
        np.add.at(self.sum, (r, c), p[ok])
        np.add.at(self.n, (r, c), 1)

    def summary(self) -> dict:
        n = int(self.n.sum())
        return {
            "cells_with_probability": n,
            "cells": self.cells,
            "mean": float(self.sum.sum() / n) if n else None,
            "bin_px": self.bin,
        }

    def write_png(self, path, min_side: int = 512) -> None:
        """The grid as an RGB PNG, each bin ``k`` px square (k: the smallest that gives ``min_side`` px a side), a
        colour bar (probability 0 at the left, 1 at the right) below it; light gray: no cell with a probability."""
        from PIL import Image, ImageDraw

        k = max(1, -(-min_side // max(self.shape)))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum / self.n
        rgb = np.full(self.shape + (3,), 224, np.uint8)
        has = self.n > 0
        rgb[has] = _colours(mean[has])
        grid = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
        h, w = grid.shape[:2]
        bar = np.full((40, w, 3), 255, np.uint8)
        bar[4:16, 10 : w - 10] = _colours(np.linspace(0, 1, max(w - 20, 1)))[None]
        img = Image.fromarray(np.concatenate([grid, bar]), "RGB")
        draw = ImageDraw.Draw(img)
        draw.text((10, h + 18), "0", fill=(0, 0, 0))
        draw.text((w - 16, h + 18), "1", fill=(0, 0, 0))
        note = f"mean cell probability per {self.bin} px" if has.any() else "the model gives no cell probability"
        draw.text((max(w // 2 - 3 * len(note), 20), h + 18), note, fill=(0, 0, 0))
        img.save(path, format="png")


def _feature_template() -> str:
    """``json.dumps`` of one QuPath detection feature with ``%(id)d`` / ``%(ring)s`` holes (so that filling them
    gives exactly ``json.dumps`` of the feature)."""
    sentinel = 987654321
    feature = {
        "type": "Feature",
        "id": f"cell-{sentinel}",
        "geometry": {"type": "Polygon", "coordinates": ["@RING@"]},
        "properties": {
            "objectType": "detection",
            "name": f"cell {sentinel}",
            "classification": {"name": "Nucleus", "color": [255, 0, 0]},
            "measurements": {"cell_id": sentinel},
        },
    }
    text = json.dumps(feature)
    assert "%" not in text
    return text.replace(str(sentinel), "%(id)d").replace('"@RING@"', "%(ring)s")


FEATURE = _feature_template()


class _GeoJSONWriter:
    """A QuPath-importable FeatureCollection of detection objects, written tile by tile."""

    def __init__(self, stack: contextlib.ExitStack, path):
        from segrefine.io import atomic_path

        self.fh = stack.enter_context(open(stack.enter_context(atomic_path(path)), "w"))
        self.fh.write('{"type": "FeatureCollection", "features": [\n')
        self.first = True

    def add(self, labels: np.ndarray, origin) -> None:
        ids, texts = outline_texts(labels, origin)
        self.add_texts(ids.tolist(), texts)

    def add_texts(self, ids, texts) -> None:
        """Features of cells ``ids`` (global ids) whose rings' GeoJSON texts are ``texts``."""
        if not len(ids):
            return
        body = ",\n".join([FEATURE % {"id": cid, "ring": ring} for cid, ring in zip(ids, texts)])
        self.fh.write(body if self.first else ",\n" + body)
        self.first = False

    def close(self) -> None:
        self.fh.write("\n]}\n")
        self.fh.close()


def _pyramid_shapes(shape, min_side: int = 1024) -> list:
    """The level shapes ``label_pyramid_levels`` makes of a level 0 of ``shape``."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > min_side:
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    return shapes


def _overlay_level(shapes: list, max_side: int = 1024) -> int:
    return next((i for i, sh in enumerate(shapes) if max(sh) <= max_side), len(shapes) - 1)


def _overlay_background(slide_path, shape, factor: int, channel: Optional[int] = None) -> np.ndarray:
    """The overlay's gray slide view, (h, w) uint8, for a label level of ``shape`` that is ``factor`` times
    smaller than level 0. Needs only the slide: computed while the tiles are pasted."""
    from segrefine.io import Slide

    with Slide(slide_path, channel=channel) as slide:
        thumb, f = slide.thumbnail(factor)
    ys = np.minimum((np.arange(shape[0]) * factor / f).astype(int), thumb.shape[0] - 1)
    xs = np.minimum((np.arange(shape[1]) * factor / f).astype(int), thumb.shape[1] - 1)
    g = thumb[np.ix_(ys, xs)]
    lo, hi = np.percentile(g, [1, 99.5])
    g = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)
    return (g * 255).astype(np.uint8)


def inner_boundaries(lab: np.ndarray) -> np.ndarray:
    """Cell pixels with a 4-neighbour of another label (or background): scikit-image's
    ``find_boundaries(lab, mode="inner")`` (the slide's edge continues each pixel's own label), in numpy, so the
    stitch does not import scikit-image and scipy for the overlay."""
    p = np.pad(lab, 1, mode="edge")
    centre = p[1:-1, 1:-1]
    differs = (p[:-2, 1:-1] != centre) | (p[2:, 1:-1] != centre) | (p[1:-1, :-2] != centre) | (p[1:-1, 2:] != centre)
    return differs & (lab != 0)


def _overlay(levels: list, slide_path, out_png, max_side: int = 1024, background=None) -> None:
    """A downsampled RGB view: the slide in gray, the stitched cells' outlines in yellow. ``background``: the
    ``_overlay_background`` already computed for these levels. Written as an RGBA PNG (alpha 255) at 100 dpi,
    the pixels ``matplotlib.image.imsave`` writes, by Pillow directly (importing matplotlib costs seconds)."""
    from PIL import Image

    k = _overlay_level([lv.shape for lv in levels], max_side)
    lab = np.asarray(levels[k][:, :])
    gray = background if background is not None else _overlay_background(slide_path, lab.shape, 2**k)
    rgba = np.full(gray.shape + (4,), 255, np.uint8)
    rgba[..., :3] = gray[..., None]
    rgba[inner_boundaries(lab), :3] = (np.array([1.0, 0.85, 0.0]) * 255).astype(np.uint8)  # yellow
    Image.fromarray(rgba, "RGBA").save(out_png, format="png", dpi=(100, 100))


def stitch(
    plan_tsv,
    tiles_dir,
    shard_jsons: List,
    slide_path,
    labels_out,
    cells_csv,
    cells_parquet=None,
    geojson_out=None,
    overlay_out=None,
    report_out=None,
    pixel_size_um: Optional[float] = None,
    probability_map_out=None,
    probability_bin_px: int = PROBABILITY_BIN_PX,
    work_dir=None,
) -> dict:
    """Stitch all tiles of a plan; returns the report (also written to ``report_out``)."""
    from segrefine.io import DiskArray, write_text_atomic
    from segrefine.tiling import read_plan

    t_start = time.monotonic()
    plan, meta = read_plan(plan_tsv)
    shards = _read_shards(shard_jsons)
    tiles = _tiles_to_paste(plan, tiles_dir)
    H, W = int(meta["height"]), int(meta["width"])
    labels_out = Path(labels_out)
    labels_out.parent.mkdir(parents=True, exist_ok=True)
    work = _new_work_dir(Path(work_dir or labels_out.parent))
    report = _new_report(slide_path, meta, shards)
    timings = report["timings_s"]
    # the overlay on a second thread: its slide view needs only the slide (made while the tiles are pasted), its
    # drawing only the small pyramid level (made while labels.tif is compressed); numpy, zlib and file reads release
    # the GIL
    pool = concurrent.futures.ThreadPoolExecutor(1)
    background = None
    if overlay_out:
        shapes = _pyramid_shapes((H, W))
        k_ov = _overlay_level(shapes)
        background = pool.submit(_timed, _overlay_background, slide_path, shapes[k_ov], 2**k_ov, meta.get("channel"))
    try:
        clock = _Clock("paste", "cell_table", "geojson")
        with contextlib.ExitStack() as stack:
            store = DiskArray(work / "level0.raw", (H, W), np.uint32)  # sparse: background is never written
            stack.callback(store.close)
            table = _TableWriter(stack, cells_csv, cells_parquet)
            prob_grid = _ProbabilityGrid((H, W), probability_bin_px)
            geo = _GeoJSONWriter(stack, geojson_out) if geojson_out else None
            n_cells = _paste_tiles(
                tiles=tiles,
                tiles_dir=tiles_dir,
                plan_id=meta["plan_id"],
                store=store,
                table=table,
                prob_grid=prob_grid,
                geo=geo,
                clock=clock,
                report=report,
            )
            _close_cell_outputs(
                stack=stack,
                table=table,
                prob_grid=prob_grid,
                geo=geo,
                probability_map_out=probability_map_out,
                report=report,
            )
            timings.update(clock.wall)
            report["timings_cpu_s"] = dict(clock.cpu)
            report["cells"] = n_cells
            _write_labels_and_overlay(
                stack=stack,
                store=store,
                work=work,
                labels_out=labels_out,
                pixel_size_um=pixel_size_um,
                overlay_out=overlay_out,
                background=background,
                pool=pool,
                slide_path=slide_path,
                report=report,
            )
        # leaving the stack published every output together; any failure above removed them all
    except OSError as exc:
        raise SegRefineError(
            f"{labels_out.parent}: cannot write the stitched outputs ({exc}; is the disk full?); "
            "nothing was published, rerun when there is space"
        ) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no thread still reading the slide or writing
        shutil.rmtree(work, ignore_errors=True)
    timings["stitch_total"] = time.monotonic() - t_start
    _add_shard_totals(report, shards, halo_px=meta["halo_px"])
    if report_out:
        write_text_atomic(report_out, json.dumps(report, indent=2, sort_keys=True) + "\n")
    _log_summary(report, n_tiles=len(tiles), labels_out=labels_out, slide_path=slide_path, geojson_out=geojson_out)
    return report


def _read_shards(shard_jsons: List) -> list:
    """The shard summaries, refused when one is missing or they were computed with different models."""
    shards = []
    for p in shard_jsons:
        if not Path(p).is_file():
            raise SegRefineError(f"{p}: shard summary not found (run its segment-shard job first)")
        shards.append(json.loads(Path(p).read_text()))
    card_shas = {s["card_sha256"] for s in shards}
    if len(card_shas) > 1:
        raise SegRefineError(f"shards {shard_jsons} were computed with different models; rerun them")
    return shards


def _tiles_to_paste(plan: np.ndarray, tiles_dir) -> np.ndarray:
    """The plan's tiles in tissue, in tile-id order, refused when any tile's result is missing."""
    from segrefine.tiling import tile_file

    tiles = plan[plan["in_tissue"]]
    tiles = tiles[np.argsort(tiles["tile_id"], kind="stable")]
    missing = [int(t) for t in tiles["tile_id"] if not tile_file(tiles_dir, t).is_file()]
    if missing:
        raise SegRefineError(
            f"{tiles_dir}: {len(missing)} tile result(s) missing (tiles {missing[:10]}); "
            "rerun their shards (snakemake --forcerun segment_shard)"
        )
    return tiles


def _new_work_dir(work_parent: Path) -> Path:
    """A fresh ``.stitch-*`` work folder in ``work_parent``, after removing those of killed runs (one job per output
    folder)."""
    from segrefine.io import new_work_dir

    return new_work_dir(work_parent, ".stitch-")


def _new_report(slide_path, meta: dict, shards: list) -> dict:
    """The report before any tile is pasted: the plan's figures, zero counts, empty timings."""
    return {
        "slide": str(slide_path),
        "height": int(meta["height"]),
        "width": int(meta["width"]),
        "tiles": int(meta["tiles"]),
        "tiles_in_tissue": int(meta["tiles_in_tissue"]),
        "tiles_skipped_background": int(meta["tiles_skipped_background"]),
        "halo_px": int(meta["halo_px"]),
        "context_px": int(meta["context_px"]),
        "tile_size": int(meta["tile_size"]),
        "shards": len(shards),
        "duplicates_resolved": 0,
        "pixels_trimmed": 0,
        "large_cells": [],
        "timings_s": {},
        "fragment_cells": 0,
        "fragment_pixels": 0,
        "fragment_cell_ids": [],
        "intensity_reference": meta.get("intensity_reference"),
        # how the shards that predicted tiles normalised them ("slide" or "per window")
        "normalization": sorted({str(s["intensity_reference"]) for s in shards if s.get("intensity_reference")}),
        "network": _network_totals(shards),
    }


def _network_totals(shards: list) -> Optional[dict]:
    """The shards' network figures summed (``tiling._network_stats``: Cellpose's blocks), or None when no shard
    counted blocks: blocks computed, reused and skipped, the input in source px, and per tissue px of the cores."""
    counted = [s for s in shards if s.get("network")]
    if not counted:
        return None
    out = {k: sum(int(s["network"][k]) for s in counted) for k in ("computed", "reused", "skipped")}
    out["input_px"] = float(sum(s["network"]["input_px"] for s in counted))
    tissue = sum(int(s.get("pixels_tissue") or 0) for s in counted)
    out["tissue_px"] = tissue
    out["input_per_tissue_px"] = out["input_px"] / tissue if tissue else None
    return out


def _paste_tiles(
    tiles: np.ndarray,
    tiles_dir,
    plan_id: str,
    store,
    table: _TableWriter,
    prob_grid: _ProbabilityGrid,
    geo: Optional[_GeoJSONWriter],
    clock: _Clock,
    report: dict,
) -> int:
    """Paste the tiles, in their order, into the level-0 ``store`` and stream their cells into the cell table, the
    probability grid and the outlines (``geo``, if any); returns the number of cells (ids 1..N)."""
    from segrefine.tiling import Progress, read_tile, tile_file

    next_id = 1
    progress = Progress(len(tiles), "stitch")
    order = list(tiles)
    # the next tile is read (np.load, zlib: GIL released) on a reader thread while this one is pasted
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read_tile, tile_file(tiles_dir, order[0].tile_id)) if order else None
        for i, t in enumerate(order):
            owned, tmeta, cells = pending.result()
            pending = (
                reader.submit(read_tile, tile_file(tiles_dir, order[i + 1].tile_id)) if i + 1 < len(order) else None
            )
            if tmeta.get("fingerprint", "").split(":")[0] != plan_id:
                raise SegRefineError(
                    f"{tile_file(tiles_dir, t.tile_id)}: computed for another tile plan; rerun its shard"
                )
            report["large_cells"].extend(tmeta.get("large", []))
            if owned.size == 0 or owned.max() == 0:
                progress.update(i + 1)
                continue
            ox, oy = tmeta["origin"]
            with clock.part("paste"):
                pasted = _paste_tile(store, owned, (ox, oy), next_id, report)
                next_id += pasted.cells
            with clock.part("cell_table"):
                cols = _tile_rows(cells, pasted, owned, (ox, oy), int(t.tile_id))
                table.add(cols)
                prob_grid.add(cols)
            if geo is not None:
                with clock.part("geojson"):
                    _add_tile_outlines(geo, cells, pasted, owned, (ox, oy))
            progress.update(i + 1)
    return next_id - 1


class _Pasted(NamedTuple):
    """One tile pasted: per owned id (index 0: background), ``lut`` its global id (0: dropped), ``survive`` whether
    it was kept, ``trimmed`` whether it was kept but lost pixels (to an earlier tile's cells or as fragments), so
    that its row and outline are recomputed; ``free`` the window's pixels no earlier tile had (less this tile's
    fragments), ``new`` the global ids this tile pasted, ``first`` its first global id, ``cells`` how many."""

    lut: np.ndarray
    survive: np.ndarray
    trimmed: np.ndarray
    free: np.ndarray
    new: np.ndarray
    first: int
    cells: int


def _paste_tile(store, owned: np.ndarray, origin, next_id: int, report: dict) -> _Pasted:
    """Paste one tile's owned labels into the level-0 ``store`` at ``origin`` (x, y), its kept cells numbered from
    ``next_id``, conflicts with the cells of earlier tiles resolved (see the module's docstring) and counted in
    ``report``."""
    ox, oy = origin
    h, w = owned.shape
    existing = np.asarray(store[oy : oy + h, ox : ox + w])
    n = int(owned.max())
    free = existing == 0
    if free.all():  # nothing pasted here yet: no conflict, every cell is kept whole
        area = np.bincount(owned.ravel(), minlength=n + 1)
        survive = area > 0
        report["duplicates_resolved"] += int((area[1:] == 0).sum())
        trimmed = np.zeros(n + 1, bool)
    else:
        dup = _duplicates(owned, existing)
        area_free = np.bincount(owned[free].ravel(), minlength=n + 1)
        survive = (area_free > 0) & ~dup
        report["duplicates_resolved"] += int((dup[1:] | (area_free[1:] == 0)).sum())
        # trimmed: kept cells that lose some pixels to an earlier tile's cells
        trimmed = (np.bincount(owned[~free].ravel(), minlength=n + 1) > 0) & survive
        trimmed[0] = False
    survive[0] = False
    k = int(survive.sum())
    if next_id - 1 + k > MAX_ID:
        raise SegRefineError(f"more than {MAX_ID} cells: uint32 ids exhausted")
    lut = np.zeros(n + 1, np.uint32)
    lut[survive] = np.arange(next_id, next_id + k, dtype=np.uint32)
    new = lut[owned]
    if trimmed.any():
        report["pixels_trimmed"] += int((~free & survive[owned]).sum())
    new[~free] = 0
    # every cell one piece (segrefine.cells): its fragments go to background; its row and outline
    # are recomputed from the pixels, as for a trimmed cell
    frag = fragment_pixels(np.where(new > 0, owned, 0))
    if frag.any():
        cut = np.unique(owned[frag])
        trimmed[cut] = True
        new[frag] = 0
        free &= ~frag
        report["fragment_cells"] += len(cut)
        report["fragment_pixels"] += int(frag.sum())
        report["fragment_cell_ids"] += lut[cut].tolist()
    store[oy : oy + h, ox : ox + w] = np.where(new > 0, new, existing)
    return _Pasted(lut=lut, survive=survive, trimmed=trimmed, free=free, new=new, first=next_id, cells=k)


def _tile_rows(cells: dict, pasted: _Pasted, owned: np.ndarray, origin, tile_id: int) -> dict:
    """The cell-table columns of a pasted tile's kept cells: from the shard's per-cell sums for cells kept whole,
    recomputed from the pasted pixels for the trimmed ones."""
    kept = np.nonzero(pasted.survive)[0]
    stats = cells["stats"][kept - 1]
    if pasted.trimmed.any():
        redo = pasted.trimmed[kept]
        stats[redo] = cell_stats(np.where(pasted.trimmed[owned] & pasted.free, owned, 0), len(pasted.lut) - 1)[
            kept[redo] - 1
        ]
    # a trimmed cell keeps the mean probability of the pixels its tile predicted
    cols = _cell_rows(stats, origin, pasted.first, cells["prob"][kept - 1])
    cols["tile_id"] = np.full(len(cols["cell_id"]), tile_id, np.int64)
    return cols


def _add_tile_outlines(geo: _GeoJSONWriter, cells: dict, pasted: _Pasted, owned: np.ndarray, origin) -> None:
    """The outlines of a pasted tile's kept cells: the shard's text for cells kept whole, recomputed for the few
    trimmed ones."""
    g_ids, g_off, g_text = cells["geo_ids"], cells["geo_offsets"], cells["geo_text"]
    whole = np.nonzero(pasted.survive[g_ids] & ~pasted.trimmed[g_ids])[0]
    geo.add_texts(pasted.lut[g_ids[whole]].tolist(), [g_text[g_off[j] : g_off[j + 1]] for j in whole.tolist()])
    if pasted.trimmed.any():
        geo.add(np.where(pasted.trimmed[owned] & (pasted.new > 0), pasted.new, 0), origin)


def _close_cell_outputs(
    stack: contextlib.ExitStack,
    table: _TableWriter,
    prob_grid: _ProbabilityGrid,
    geo: Optional[_GeoJSONWriter],
    probability_map_out,
    report: dict,
) -> None:
    """Finish the cell table and the outlines, write the probability map (if asked), and put the probability
    summary in the report (published when ``stack`` closes)."""
    from segrefine.io import atomic_path

    table.close()
    report["probability"] = prob_grid.summary()
    if probability_map_out:
        prob_grid.write_png(stack.enter_context(atomic_path(probability_map_out, suffix=".png")))
    if geo is not None:
        geo.close()


def _write_labels_and_overlay(
    stack: contextlib.ExitStack,
    store,
    work: Path,
    labels_out: Path,
    pixel_size_um: Optional[float],
    overlay_out,
    background,
    pool,
    slide_path,
    report: dict,
) -> None:
    """labels.tif (the pyramid of the level-0 ``store``, its levels built under ``work``) and, if asked, the
    overlay, drawn on ``pool``'s thread over its slide view (``background``, a future) while labels.tif is
    compressed; both published when ``stack`` closes. Timings and the pyramid's shapes go into the report."""
    from segrefine.io import atomic_path, label_pyramid_levels, write_pyramid_ome_tiff

    timings = report["timings_s"]
    t0, c0 = time.monotonic(), time.thread_time()
    levels = label_pyramid_levels(store, work)
    for lv in levels[1:]:
        stack.callback(lv.close)
    drawn = None
    if overlay_out:
        png = stack.enter_context(atomic_path(overlay_out, suffix=".png"))
        drawn = pool.submit(lambda: _timed(_overlay, levels, slide_path, png, 1024, background.result()[0]))
        stack.callback(concurrent.futures.wait, [drawn])  # on any failure: done before its file is removed
    write_pyramid_ome_tiff(
        stack.enter_context(atomic_path(labels_out, suffix=".tif")), levels, pixel_size_um=pixel_size_um, zlib_level=3
    )
    timings["pyramid_write"] = time.monotonic() - t0
    report["timings_cpu_s"]["pyramid_write"] = time.thread_time() - c0  # + tifffile's encoder threads
    report["pyramid_levels"] = [list(lv.shape) for lv in levels]
    if drawn is not None:
        t0 = time.monotonic()
        timings["overlay_background"] = background.result()[1]
        timings["overlay_draw"] = drawn.result()[1]
        timings["overlay"] = time.monotonic() - t0  # waited for the overlay after labels.tif was written


def _add_shard_totals(report: dict, shards: list, halo_px: int) -> None:
    """The shards' summed timings and the count of large cells in the report; a warning when there are any."""
    for key in ("read_s", "predict_s", "wait_read_s", "own_write_s"):
        report[f"shards_{key}"] = float(sum(s.get(key, 0.0) for s in shards))
    report["n_large_cells"] = len(report["large_cells"])
    if report["large_cells"]:
        log.warning(
            "%d cell(s) larger than the halo (%d px) reach a tile window's edge and are clipped there; "
            "first at x=%d y=%d (all listed in the report): raise segmentation.tiling.halo",
            len(report["large_cells"]),
            halo_px,
            report["large_cells"][0]["anchor_x"],
            report["large_cells"][0]["anchor_y"],
        )


def _log_summary(report: dict, n_tiles: int, labels_out: Path, slide_path, geojson_out) -> None:
    """The log lines of a finished stitch: its counts, the fragments removed, a warning when it found no cell."""
    log.info(
        "stitched %d cells from %d tiles (%d background tiles skipped), %d duplicates resolved, %d px trimmed, "
        "%d large cells -> %s (%.1f s)",
        report["cells"],
        n_tiles,
        report["tiles_skipped_background"],
        report["duplicates_resolved"],
        report["pixels_trimmed"],
        report["n_large_cells"],
        labels_out,
        report["timings_s"]["stitch_total"],
    )
    if report["fragment_cells"]:
        log.info(
            "%d cell(s) had pieces not 8-connected to their largest one: %d px went to background (ids in the "
            "report: fragment_cell_ids)",
            report["fragment_cells"],
            report["fragment_pixels"],
        )
    if report["cells"] == 0:
        log.warning(
            "no cell found in %s: the labels, cell table%s are written empty",
            slide_path,
            " and outlines" if geojson_out else "",
        )


def seam_report(
    reference: np.ndarray, tiled: np.ndarray, tile_size: int, near: int = 0, min_share: float = 0.1
) -> dict:
    """How a stitched result differs from a whole-image reference at the seams (benchmarks and tests).

    Seam cells: reference cells whose bounding box comes within ``near`` px of
    a core seam (or crosses one). cut_at_seams: seam cells that cross a seam
    and whose pixels are split among two or more stitched cells each holding
    >= ``min_share`` of the cell. duplicates: stitched cells beyond the first
    that lie mostly (>= 50% of their own pixels) inside the same seam cell."""
    from scipy import ndimage

    ref = reference.astype(np.int64).ravel()
    til = tiled.astype(np.int64).ravel()
    both = (ref > 0) & (til > 0)
    pairs, shared = np.unique(np.stack([ref[both], til[both]]), axis=1, return_counts=True)
    ref_area = np.bincount(ref)
    til_area = np.bincount(til)
    r, t = pairs
    big = shared >= min_share * ref_area[r]
    split_refs, n_split = np.unique(r[big], return_counts=True)
    split_refs = split_refs[n_split >= 2]
    crosses, seam = set(), np.zeros(len(ref_area), bool)
    for lab, sl in enumerate(ndimage.find_objects(reference.astype(np.int64)), 1):
        if sl is None:
            continue
        if any(s.start // tile_size != (s.stop - 1) // tile_size for s in sl):
            crosses.add(lab)
        seam[lab] = any(max(s.start - near, 0) // tile_size != (s.stop - 1 + near) // tile_size for s in sl)
    cut = [int(x) for x in split_refs if int(x) in crosses]
    inside = (shared * 2 >= til_area[t]) & seam[r]
    _, n_inside = np.unique(r[inside], return_counts=True)
    return {
        "cut_at_seams": len(cut),
        "cells_crossing_seams": len(crosses),
        "seam_cells": int(seam.sum()),
        "duplicates": int(np.maximum(n_inside - 1, 0).sum()),
        "ids_unique_and_dense": bool(tiled.max() == len(np.unique(tiled)) - 1),
    }
