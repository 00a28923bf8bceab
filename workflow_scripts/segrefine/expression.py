"""Cell-by-gene matrices: GEM/bgef + whole-slide labels -> cgef, cgef -> AnnData with stereopy.

Two cgef writers (config ``expression.writer``):

- ``exact`` (default, ``segrefine.cgef``): every transcript goes to the cell
  whose label covers its DNB; the file has gefpy's cgef layout and is read by
  gefpy's ``CgefR`` and stereopy's ``read_gef(bin_type='cell_bins')``.
- ``gefpy``: gefpy's own ``generate_cgef``. It reads the mask as binary and
  finds cells as connected components, so touching cells would merge:
  ``separate_touching`` removes, for every pair of 8-adjacent cells, the
  boundary pixels of the lower-numbered one (their transcripts are lost).
  gefpy also needs the mask at the extent 0..maxX x 0..maxY of its bgef and
  kills the whole process (exit 255) on error, so its calls run in a child
  process and a failure becomes an error of this step.

Both stream: the expression is read in chunks and spilled to a temporary folder
beside the output, the labels are read in bands (``LabelImage``), so memory
follows the chunk and band sizes and the number of cells, not the slide.

The frame: pixel (0, 0) of the label image is GEM coordinate ``origin``; a
transcript at GEM (x, y) lies on label pixel (x - origin_x, y - origin_y).
``origin`` is explicit (config) or read from the expression file
(``auto``: GEM ``#OffsetX/#OffsetY`` or bgef ``offsetX/offsetY`` attrs, a
transcript at (x, y) lying at image (x + OffsetX, y + OffsetY); 0 when absent).
A matrix that does not fit inside the label image in that frame is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.expression")

WRITERS = ("exact", "gefpy")
CELLMAP_COLUMNS = ("cgef_cell", "label_id", "x", "y", "area", "total_counts", "n_genes")


def separate_touching(labels: np.ndarray) -> np.ndarray:
    """Foreground mask in which no two differently labelled pixels are 8-adjacent."""
    labels = np.asarray(labels)
    H, W = labels.shape
    padded = np.pad(labels, 1)
    keep = labels > 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = padded[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
            keep &= ~(nb > labels)  # a higher-labelled neighbour (never background: 0 is lowest)
    return keep


def _child(func, args, queue):
    try:
        func(*args)
        queue.put(None)
    except BaseException as exc:  # report anything back to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def run_isolated(what: str, func, *args) -> None:
    """Run ``func(*args)`` in a forked child; gefpy's exit(255) becomes a SegRefineError."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(func, args, queue))
    proc.start()
    proc.join()
    err = queue.get() if not queue.empty() else None
    if proc.exitcode != 0 or err:
        detail = err or f"the process exited with code {proc.exitcode} (gefpy prints its reason above)"
        raise SegRefineError(f"{what} failed: {detail}")


def _gem_to_bgef(gem, bgef, threads):
    from gefpy.bgef_writer_cy import generate_bgef

    generate_bgef(str(gem), str(bgef), n_thread=threads, bin_sizes=[1])


def _bgef_to_cgef(cgef, bgef, mask):
    from gefpy.cgef_writer_cy import generate_cgef

    generate_cgef(str(cgef), str(bgef), str(mask), [256, 256])


def bgef_extent(bgef) -> Tuple[int, int, int, int]:
    """(min_x, max_x, min_y, max_y) of the bin1 expression matrix, inclusive."""
    import h5py

    with h5py.File(bgef, "r") as f:
        a = f["geneExp/bin1/expression"].attrs
        return tuple(int(np.asarray(a[k]).ravel()[0]) for k in ("minX", "maxX", "minY", "maxY"))


def parse_origin(spec: Union[str, Tuple[int, int], None]) -> Optional[Tuple[int, int]]:
    """``auto``/None -> None (read from the file); ``"x,y"`` or (x, y) -> ints."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return None
    try:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        x, y = (int(str(v).strip()) for v in parts)
    except (ValueError, TypeError):
        raise SegRefineError(
            f"origin {spec!r}: expected 'auto' or two integers 'x,y' (the GEM coordinate of label pixel (0, 0))"
        ) from None
    return x, y


def resolve_origin(gem, spec) -> Tuple[Tuple[int, int], str]:
    """The origin to use and where it came from (for the log and error messages); ``gem`` has ``offset``."""
    explicit = parse_origin(spec)
    if explicit is not None:
        return explicit, "config"
    ox, oy = gem.offset
    return (-ox, -oy), ("the file's OffsetX/OffsetY" if (ox or oy) else "default (0, 0)")


class LabelImage:
    """Level 0 of a whole-slide label image (TIFF / OME-TIFF, tiled or striped, pyramidal or not), read by bands.

    ``rows(y0, y1, x0, x1)`` decodes only the strips or tiles that cover the window
    (an uncompressed contiguous image is memory-mapped), so memory follows the band,
    not the slide. Works without zarr (the gef env is Python 3.10).
    """

    def __init__(self, path):
        import tifffile

        self.path = Path(path)
        if not self.path.is_file():
            raise SegRefineError(f"{self.path}: label image not found")
        try:
            self._tif = tifffile.TiffFile(self.path)
            level = self._tif.series[0].levels[0]
            pages = [p for p in level.pages if p is not None]
            page = pages[0].keyframe if hasattr(pages[0], "keyframe") and pages[0].keyframe is not None else pages[0]
        except Exception as exc:
            raise SegRefineError(f"{self.path}: not a readable TIFF label image ({type(exc).__name__}: {exc})") from exc
        dtype = np.dtype(level.dtype)
        if len(pages) != 1 or page.imagedepth != 1 or page.samplesperpixel != 1 or dtype.kind not in "ui":
            self._tif.close()
            raise SegRefineError(f"{self.path}: expected 2-D integer instance labels, got {dtype} {level.shape}")
        self._page, self.dtype = page, dtype
        self.shape = (int(page.imagelength), int(page.imagewidth))
        self._memmap, self._cache = None, {}
        if page.is_contiguous and (not page.is_tiled or page.tilewidth == page.imagewidth):
            self._memmap = np.memmap(
                self.path,
                dtype=dtype.newbyteorder(self._tif.byteorder),
                mode="r",
                offset=int(page.dataoffsets[0]),
                shape=self.shape,
            )

    def rows(self, y0: int, y1: int, x0: int = 0, x1: Optional[int] = None) -> np.ndarray:
        """Label rows y0..y1-1, columns x0..x1-1, as a native-endian 2-D array."""
        H, W = self.shape
        x1 = W if x1 is None else x1
        if not (0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W):
            raise SegRefineError(f"{self.path}: rows {y0}..{y1}, columns {x0}..{x1} lie outside the {W}x{H} image")
        try:
            if self._memmap is not None:
                out = np.asarray(self._memmap[y0:y1, x0:x1]).astype(self.dtype.newbyteorder("="))
            else:
                out = self._segments(y0, y1, x0, x1)
        except SegRefineError:
            raise
        except Exception as exc:
            raise SegRefineError(
                f"{self.path}: cannot read label rows {y0}..{y1} "
                f"(truncated or corrupt file? {type(exc).__name__}: {exc})"
            ) from exc
        if self.dtype.kind == "i" and out.size and out.min() < 0:
            raise SegRefineError(f"{self.path}: negative label ids")
        if self.dtype.itemsize > 4 and out.size and int(out.max()) > (1 << 32) - 1:
            raise SegRefineError(
                f"{self.path}: label id {int(out.max())} does not fit in uint32 "
                "(the cgef layout numbers at most 4,294,967,295 cells)"
            )
        return out

    def _segments(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        page = self._page
        out = np.zeros((y1 - y0, x1 - x0), self.dtype.newbyteorder("="))
        if y1 <= y0 or x1 <= x0:
            return out
        H, W = self.shape
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
            ntx = -(-W // tw)
            index = [
                ty * ntx + tx
                for ty in range(y0 // th, (y1 - 1) // th + 1)
                for tx in range(x0 // tw, (x1 - 1) // tw + 1)
            ]
        else:
            rps = max(1, min(int(page.rowsperstrip or H), H))
            index = list(range(y0 // rps, (y1 - 1) // rps + 1))
        offsets, counts = page.dataoffsets, page.databytecounts
        fh = self._tif.filehandle
        decode = page.decode
        cache = {}  # the segments of this window, kept for the next (consecutive bands share tiles / strips)
        for i in sorted(index, key=lambda j: offsets[j]):
            if i in self._cache:
                seg, sy, sx = cache[i] = self._cache[i]
            else:
                data = None
                if counts[i] > 0 and offsets[i] > 0:
                    fh.seek(offsets[i])
                    data = fh.read(counts[i])
                    if len(data) != counts[i]:
                        raise SegRefineError(f"{self.path}: segment {i} ends early (truncated file)")
                seg, (_, _, sy, sx, _), shape = decode(data, i, jpegtables=page.jpegtables)
                if seg is not None:
                    seg = np.asarray(seg).reshape(shape)[0, :, :, 0]
                cache[i] = (seg, sy, sx)
            if seg is None:
                continue  # an empty segment reads as 0
            ay, by = max(sy, y0), min(sy + seg.shape[0], y1, H)
            ax, bx = max(sx, x0), min(sx + seg.shape[1], x1, W)
            if by > ay and bx > ax:
                out[ay - y0 : by - y0, ax - x0 : bx - x0] = seg[ay - sy : by - sy, ax - sx : bx - sx]
        self._cache = cache
        return out

    def close(self) -> None:
        self._memmap, self._cache = None, {}
        self._tif.close()


def labels_at(labels, xs: np.ndarray, ys: np.ndarray, band_rows: int = 512) -> np.ndarray:
    """The labels under points (label pixel coordinates), read band by band."""
    out = np.zeros(len(xs), np.int64)
    order = np.argsort(ys, kind="stable")
    ys_sorted = ys[order]
    for y0 in range(0, labels.shape[0], band_rows):
        s, e = np.searchsorted(ys_sorted, [y0, y0 + band_rows])
        if e > s:
            pick = order[s:e]
            band = labels.rows(y0, min(labels.shape[0], y0 + band_rows))
            out[pick] = band[ys[pick] - y0, xs[pick]]
    return out


def check_frame(gem, labels_shape, origin, how: str, gem_path, labels_path) -> None:
    """Refuse a matrix that does not lie inside the label image in the given frame (``gem`` has ``extent()``)."""
    x0, x1, y0, y1 = gem.extent()
    if x1 < x0:
        raise SegRefineError(f"{gem_path}: no transcript with a count > 0")
    ox, oy = origin
    H, W = labels_shape
    if x0 - ox < 0 or y0 - oy < 0 or x1 - ox >= W or y1 - oy >= H:
        raise SegRefineError(
            f"{gem_path}: transcripts span x {x0}..{x1}, y {y0}..{y1}, i.e. label pixels x {x0 - ox}..{x1 - ox}, "
            f"y {y0 - oy}..{y1 - oy} with origin ({ox}, {oy}) [{how}], but the label image {labels_path} is "
            f"{W}x{H} px: the matrix and the image are not in the same coordinate frame "
            "(set expression.origin to the GEM coordinate of label pixel (0, 0), or check the files)"
        )


def make_cgef(
    gem_path,
    labels_path,
    cgef_out,
    cellmap_out,
    threads: int = 2,
    writer: str = "exact",
    origin=None,
    chunk: Optional[int] = None,
    band_records: Optional[int] = None,
    band_rows: Optional[int] = None,
    report_out=None,
) -> int:
    """Expression (GEM/bgef) + whole-slide labels -> cgef and the per-cell table (cellmap.csv), streaming.

    Pass 1 reads the expression in chunks of ``chunk`` records and spills them, sorted by
    label row, into a temporary folder beside the output (removed whatever happens);
    the labels are read in bands of at most ``band_rows`` rows holding at most
    ``band_records`` records. See ``segrefine.cgef.exact_cell_bin``.

    Then the alignment check (``segrefine.frame_check``): the UMIs that fell in
    cells, and whether a shift of the matrix would put many more in cells (a
    warning naming the shift and the ``expression.origin`` to set); written to
    ``report_out`` (JSON) for the expression QC.
    """
    import signal
    import sys
    import threading

    from segrefine.cgef import BAND_PIXELS, BAND_RECORDS, BAND_ROWS, RecordSpill
    from segrefine.gem import CHUNK_RECORDS, open_expression
    from segrefine.io import new_work_dir

    if writer not in WRITERS:
        raise SegRefineError(f"unknown cgef writer {writer!r}: one of {list(WRITERS)}")
    chunk, band_records = chunk or CHUNK_RECORDS, band_records or BAND_RECORDS
    gem_path, labels_path = Path(gem_path), Path(labels_path)
    reader = open_expression(gem_path, chunk)
    labels = LabelImage(labels_path)
    # bands of at most band_rows rows and, by default, BAND_PIXELS pixels (a 60,000 px wide chip: 69 rows)
    band_rows = band_rows or max(1, min(BAND_ROWS, BAND_PIXELS // max(1, labels.shape[1])))
    org, how = resolve_origin(reader, origin)
    Path(cgef_out).parent.mkdir(parents=True, exist_ok=True)
    previous = None
    if threading.current_thread() is threading.main_thread():  # a terminated job still removes its temporary files
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = new_work_dir(Path(cgef_out).parent, ".cgef.")  # one cgef job per folder: the leftovers are its own
    try:
        spill = RecordSpill(reader, org, labels.shape, work)
        check_frame(spill, labels.shape, org, how, gem_path, labels_path)
        log.info(
            "%s: %d records, %d UMIs, %d genes; origin %s [%s]; labels %s %dx%d",
            gem_path,
            spill.n_records,
            spill.umis,
            len(spill.genes),
            org,
            how,
            labels_path,
            labels.shape[1],
            labels.shape[0],
        )
        if writer == "exact":
            n, in_cells = _make_exact(spill, gem_path, labels, work, cgef_out, cellmap_out, band_records, band_rows)
        else:
            n, in_cells = _make_gefpy(
                spill,
                gem_path,
                reader.__class__.__name__ == "BgefReader",
                labels,
                org,
                work,
                cgef_out,
                cellmap_out,
                threads,
                band_rows,
            )
        report = alignment_report(spill, labels, org, in_cells, gem_path, labels_path, n)
        if report_out:
            from segrefine.io import write_text_atomic

            write_text_atomic(report_out, json.dumps(report, indent=2) + "\n")
        return n
    finally:
        shutil.rmtree(work, ignore_errors=True)
        labels.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _make_exact(spill, gem_path, labels, work, cgef_out, cellmap_out, band_records, band_rows) -> int:
    from segrefine.cgef import exact_cell_bin
    from segrefine.io import atomic_path

    with atomic_path(cgef_out, suffix=".cgef") as tmp:
        tables = exact_cell_bin(spill, labels, work, tmp, band_records, band_rows, source=str(gem_path))
        cell = tables["cell"]
        in_cells = write_cellmap(
            cellmap_out,
            cell["id"],
            tables["label_id"],
            cell["x"],
            cell["y"],
            cell["area"],
            cell["expCount"],
            cell["geneCount"],
        )
    return len(cell), in_cells


def write_gem_v01(spill, path, rows: int = 1 << 16) -> None:
    """The spilled records as a plain GEMv0.1 (the variant gefpy's bgef writer accepts), run by run."""
    ox, oy = spill.origin
    names = spill.genes
    with open(path, "w") as fh:
        fh.write("#FileFormat=GEMv0.1\n#BinSize=1\n#OffsetX=0\n#OffsetY=0\ngeneID\tx\ty\tMIDCount\n")
        for i in range(len(spill.runs.sizes)):
            run = np.load(spill.runs.folder / f"{spill.runs.name}.{i}.npy", mmap_mode="r")
            for s in range(0, len(run), rows):
                part = np.array(run[s : s + rows])
                g = names[spill.code[part["gene"]]]
                x, y = part["x"].astype(np.int64) + ox, part["k"].astype(np.int64) + oy
                fh.write("".join(f"{a}\t{b}\t{c}\t{d}\n" for a, b, c, d in zip(g, x, y, part["count"])))
            del run


def _mask_strips(labels, origin, height: int, width: int, rows: int):
    """zlib-compressed strips of gefpy's mask: the separated labels pasted at ``origin`` into height x width."""
    import zlib

    ox, oy = origin
    H, W = labels.shape
    xs = slice(max(ox, 0), min(ox + W, width))
    for m0 in range(0, height, rows):
        m1 = min(height, m0 + rows)
        strip = np.zeros((m1 - m0, width), np.uint8)
        a, b = max(m0 - oy, 0), min(m1 - oy, H)  # label rows of this strip
        if b > a and xs.stop > xs.start:
            ha, hb = max(a - 1, 0), min(b + 1, H)  # one row of context each side for 8-contacts
            keep = separate_touching(labels.rows(ha, hb))[a - ha : b - ha]
            strip[a + oy - m0 : b + oy - m0, xs] = keep[:, xs.start - ox : xs.stop - ox] * np.uint8(255)
        yield strip, zlib.compress(strip.tobytes())


def _make_gefpy(spill, gem_path, given_bgef, labels, origin, work, cgef_out, cellmap_out, threads, band_rows) -> int:
    import tifffile

    from segrefine.io import atomic_path

    if given_bgef:
        bgef = gem_path
    else:  # gefpy reads only some GEM variants: hand it a plain GEMv0.1 of the parsed records
        norm = work / "input.gem"
        write_gem_v01(spill, norm)
        bgef = work / "bin1.bgef"
        run_isolated(f"gefpy generate_bgef on {gem_path}", _gem_to_bgef, norm, bgef, threads)
        norm.unlink()
    _, x1, _, y1 = bgef_extent(bgef)
    # gefpy wants the mask at 0..maxX x 0..maxY of the matrix: the separated labels pasted at the origin, by strips
    any_cell = []

    def strips():
        for strip, data in _mask_strips(labels, origin, y1 + 1, x1 + 1, band_rows):
            if not any_cell and strip.any():
                any_cell.append(True)
            yield data

    mask_path = work / "mask.tif"
    tifffile.imwrite(
        mask_path, data=strips(), shape=(y1 + 1, x1 + 1), dtype=np.uint8, rowsperstrip=band_rows, compression="zlib"
    )
    if not any_cell:
        raise SegRefineError(f"no cell of the label image lies inside the expression matrix of {gem_path}")
    cgef_tmp = work / "out.cgef"
    run_isolated(f"gefpy generate_cgef on {gem_path}", _bgef_to_cgef, cgef_tmp, bgef, mask_path)
    from segrefine.cgef import read_cell_table

    cells = read_cell_table(cgef_tmp)
    ox, oy = origin
    lx = np.clip(cells["x"].astype(np.int64) - ox, 0, labels.shape[1] - 1)
    ly = np.clip(cells["y"].astype(np.int64) - oy, 0, labels.shape[0] - 1)
    with atomic_path(cgef_out, suffix=".cgef") as tmp:
        shutil.move(str(cgef_tmp), str(tmp))
        in_cells = write_cellmap(
            cellmap_out,
            cells["id"],
            labels_at(labels, lx, ly, band_rows),
            cells["x"],
            cells["y"],
            cells["area"],
            cells["expCount"],
            cells["geneCount"],
        )
    return len(cells), in_cells


def alignment_report(spill, labels, origin, umis_in_cells: int, gem_path, labels_path, n_cells: int) -> dict:
    """UMIs in cells (all of them, as written) and the shift scan on a sample of bands; logged, loudly if the
    matrix looks shifted."""
    from segrefine.frame_check import describe, sample_windows, shift_scan

    ox, oy = origin
    x0, x1, y0, y1 = spill.extent()

    def records_in_rows(a, b):
        rec = spill.band(a, b)
        return rec["x"], rec["k"], rec["count"]

    windows = sample_windows(records_in_rows, labels.rows, (y0 - oy, y1 - oy), labels.shape[0])
    scan = shift_scan(windows)
    report = {
        "matrix": str(gem_path),
        "labels": str(labels_path),
        "origin": [int(ox), int(oy)],
        "cells": int(n_cells),
        "umis": int(spill.umis),
        "umis_in_cells": int(umis_in_cells),
        "fraction_umis_in_cells": umis_in_cells / spill.umis if spill.umis else 0.0,
        "alignment": scan,
    }
    message = describe(scan, gem_path, labels_path, origin)
    log.info(
        "%s: %d of %d UMIs (%.1f %%) fell in %d cells",
        gem_path,
        umis_in_cells,
        spill.umis,
        100 * report["fraction_umis_in_cells"],
        n_cells,
    )
    (log.warning if scan["misaligned"] else log.info)(("ALIGNMENT: " if scan["misaligned"] else "") + message)
    return report


def write_cellmap(path, cgef_cell, label_id, x, y, area, total, n_genes, rows: int = 1 << 16) -> int:
    """Per cgef cell: its id in the label image under its centre, centre, area, UMIs, genes; returns the UMIs."""
    from segrefine.io import atomic_path

    columns = [np.asarray(c) for c in (cgef_cell, label_id, x, y, area, total, n_genes)]  # as given: no copies
    umis = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(",".join(CELLMAP_COLUMNS) + "\n")
            for s in range(0, len(columns[0]), rows):
                block = np.column_stack([c[s : s + rows].astype(np.int64) for c in columns])
                np.savetxt(fh, block, fmt="%d", delimiter=",")
                umis += int(block[:, 5].sum())
    return umis


H5AD_WRITERS = ("direct", "stereopy")


def cgef_to_h5ad(cgef, cellmap_csv, out_h5ad, writer: str = "direct", chunk: int = 1 << 22) -> int:
    """cgef -> AnnData (.h5ad): ``direct`` (bounded: the sparse matrix streamed from the cgef, ``cgef_to_h5ad_direct``)
    or ``stereopy`` (stereopy's reader and converter, ``cgef_to_h5ad_stereopy``)."""
    if writer not in H5AD_WRITERS:
        raise SegRefineError(f"unknown h5ad writer {writer!r}: one of {list(H5AD_WRITERS)}")
    if writer == "direct":
        return cgef_to_h5ad_direct(cgef, cellmap_csv, out_h5ad, chunk)
    return cgef_to_h5ad_stereopy(cgef, cellmap_csv, out_h5ad)


def _read_cellmap(cellmap_csv):
    import pandas as pd

    cellmap = pd.read_csv(cellmap_csv)
    missing = [c for c in CELLMAP_COLUMNS if c not in cellmap.columns]
    if missing:
        raise SegRefineError(f"{cellmap_csv}: missing column(s) {missing} (written by an older `segrefine cgef`?)")
    return cellmap


@contextlib.contextmanager
def _quiet_hdf5_teardown():
    """A failed HDF5 write (full disk) makes h5py's objects fail again as they are freed, each printing a traceback
    (Cython's unraisable errors go through sys.excepthook and sys.unraisablehook): the write error itself is raised
    (and reported in one line), those are noise."""
    import sys

    hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda unraisable: log.debug("ignored while unwinding: %s", unraisable.exc_value)
    sys.excepthook = lambda kind, value, tb: log.debug("ignored while unwinding: %s", value)
    try:
        yield
    except BaseException:
        import gc

        gc.collect()  # free the failed file's objects while the quiet hook is in place
        raise
    finally:
        sys.unraisablehook, sys.excepthook = hooks


def cgef_to_h5ad_direct(cgef, cellmap_csv, out_h5ad, chunk: int = 1 << 22) -> int:
    """cgef -> AnnData in bounded memory: obs, var and obsm (per cell and per gene) are built with anndata and
    written by it; ``X`` (cells x genes, UMIs, CSR) is then written into the same file by slices of ``chunk``
    entries of the cgef's ``cellExp`` (already in cell order, sorted by gene), following anndata's on-disk
    ``csr_matrix`` encoding. obs: ``label_id`` (the cell's id in labels.tif; also the obs name), ``cgef_cell``,
    ``centroid_x``/``centroid_y`` and ``x``/``y`` (centre, GEM coordinates), ``area``, ``dnbCount``,
    ``total_counts``, ``n_genes``; obsm: ``spatial`` (centres), ``cell_border`` (32 outline points, offsets from the
    centre, padded with 32767); uns: ``bin_type``, ``resolution``. Checked against ``cellmap.csv``."""
    import anndata
    import h5py
    import pandas as pd

    from segrefine.cgef import open_cell_bin
    from segrefine.io import atomic_path

    Path(out_h5ad).parent.mkdir(parents=True, exist_ok=True)
    cellmap = _read_cellmap(cellmap_csv)
    with open_cell_bin(cgef, ("cell", "cellExp", "gene")) as f:
        cell = f["cellBin/cell"][:]
        genes = np.array([g.decode() for g in f["cellBin/gene"]["geneName"]], dtype=object)
        border = f["cellBin/cellBorder"][:] if "cellBin/cellBorder" in f else np.zeros((len(cell), 0, 2), np.int16)
        resolution = int(np.asarray(f.attrs["resolution"]).ravel()[0]) if "resolution" in f.attrs else 500
        if len(cellmap) != len(cell) or not (
            np.array_equal(cellmap["x"].to_numpy(), cell["x"])
            and np.array_equal(cellmap["y"].to_numpy(), cell["y"])
            and np.array_equal(cellmap["total_counts"].to_numpy(), cell["expCount"])
            and np.array_equal(cellmap["n_genes"].to_numpy(), cell["geneCount"])
        ):
            raise SegRefineError(f"{cgef}: its cells do not line up with {cellmap_csv} (rerun `segrefine cgef`)")
        obs = pd.DataFrame(
            {
                "label_id": cellmap["label_id"].to_numpy(np.int64),
                "cgef_cell": cellmap["cgef_cell"].to_numpy(np.int64),
                "centroid_x": cell["x"].astype(np.int64),
                "centroid_y": cell["y"].astype(np.int64),
                "x": cell["x"].astype(np.int64),
                "y": cell["y"].astype(np.int64),
                "area": cell["area"].astype(np.int64),
                "dnbCount": cell["dnbCount"].astype(np.int64),
                "total_counts": cell["expCount"].astype(np.int64),
                "n_genes": cell["geneCount"].astype(np.int64),
            },
            index=pd.Index(cellmap["label_id"].astype(str).to_numpy(), dtype=object),
        )
        adata = anndata.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
        adata.obsm["spatial"] = np.column_stack([cell["x"], cell["y"]]).astype(np.int64)
        adata.obsm["cell_border"] = border.astype(np.int16)
        adata.uns["bin_type"] = "cell_bins"
        adata.uns["resolution"] = resolution
        exp = f["cellBin/cellExp"]
        nnz = int(exp.shape[0])
        if int(cell["geneCount"].astype(np.int64).sum()) != nnz:
            raise SegRefineError(
                f"{cgef}: cellExp holds {nnz} entries but the cells' geneCount sum to "
                f"{int(cell['geneCount'].astype(np.int64).sum())} (damaged file)"
            )
        with _quiet_hdf5_teardown(), atomic_path(out_h5ad, suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)
            with h5py.File(tmp, "a") as out:
                if "X" in out:
                    del out["X"]
                X = out.create_group("X")
                X.attrs["encoding-type"] = "csr_matrix"
                X.attrs["encoding-version"] = "0.1.0"
                X.attrs["shape"] = np.array([len(cell), len(genes)], np.int64)
                indptr = np.zeros(len(cell) + 1, np.int64)
                np.cumsum(cell["geneCount"].astype(np.int64), out=indptr[1:])
                X.create_dataset("indptr", data=indptr)
                data = X.create_dataset("data", shape=(nnz,), dtype=np.uint32)
                index_dtype = np.int32 if len(genes) < 2**31 else np.int64
                indices = X.create_dataset("indices", shape=(nnz,), dtype=index_dtype)
                for s in range(0, nnz, chunk):
                    part = exp[s : s + chunk]
                    data[s : s + len(part)] = part["count"]
                    indices[s : s + len(part)] = part["geneID"]
    if not len(cell):
        log.warning("%s holds no cell: wrote an AnnData of 0 cells x %d genes to %s", cgef, len(genes), out_h5ad)
    log.info("%s: %d cells x %d genes, %d entries -> %s (direct writer)", cgef, len(cell), len(genes), nnz, out_h5ad)
    return int(len(cell))


def remove_stereopy_leftovers(folder) -> None:
    """Remove the temporary folders (``tmp<random>`` holding only ``stereopy.h5ad``) that killed runs of
    ``cgef_to_h5ad_stereopy`` left in ``folder``; any other folder stays."""
    import re

    for d in Path(folder).glob("tmp*"):
        with contextlib.suppress(OSError):
            if (
                re.fullmatch(r"tmp[a-z0-9_]{8}", d.name)
                and d.is_dir()
                and {f.name for f in d.iterdir()} <= {"stereopy.h5ad"}
            ):
                shutil.rmtree(d)


def cgef_to_h5ad_stereopy(cgef, cellmap_csv, out_h5ad) -> int:
    """cgef -> AnnData with stereopy; obs gains the label id of each cell in the whole-slide mask.

    A cgef without any cell (no cell over any transcript) gives a valid AnnData of 0 cells with the same columns,
    written without stereopy (whose reader crashes on it with a segmentation fault)."""
    import anndata
    import h5py

    from segrefine.io import atomic_path

    Path(out_h5ad).parent.mkdir(parents=True, exist_ok=True)
    cellmap = _read_cellmap(cellmap_csv)
    try:
        with h5py.File(cgef, "r") as f:
            n_cells = int(f["cellBin/cell"].shape[0])
            genes = [g.decode() for g in f["cellBin/gene"]["geneName"]] if not n_cells else []
            resolution = int(f.attrs["resolution"][0]) if "resolution" in f.attrs else 500
    except (OSError, KeyError) as exc:
        raise SegRefineError(f"{cgef}: not a readable cell-bin GEF ({exc})") from None
    if n_cells == 0:
        if len(cellmap):
            raise SegRefineError(f"{cgef} holds no cell but {cellmap_csv} lists {len(cellmap)}: rerun `segrefine cgef`")
        adata = _empty_cell_bin_anndata(genes, resolution, Path(cgef).stem)
        with atomic_path(out_h5ad, suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)
        log.warning("%s holds no cell: wrote an AnnData of 0 cells x %d genes to %s", cgef, len(genes), out_h5ad)
        return 0
    import stereo as st

    data = st.io.read_gef(str(cgef), bin_type="cell_bins")
    remove_stereopy_leftovers(Path(out_h5ad).parent)
    with _quiet_hdf5_teardown():
        with tempfile.TemporaryDirectory(dir=Path(out_h5ad).parent) as tmpdir:
            raw = Path(tmpdir) / "stereopy.h5ad"
            st.io.stereo_to_anndata(data, flavor="scanpy", output=str(raw))
            adata = anndata.read_h5ad(raw)
    # stereopy keeps the cgef's cell order; its obs names encode the centre, which we check
    same = (
        len(cellmap) == adata.n_obs
        and np.array_equal(cellmap["x"].to_numpy(), adata.obs["x"].to_numpy())
        and np.array_equal(cellmap["y"].to_numpy(), adata.obs["y"].to_numpy())
    )
    if not same:
        raise SegRefineError(f"{cgef}: stereopy's cells do not line up with {cellmap_csv} (cell order changed)")
    adata.obs["cgef_cell"] = cellmap["cgef_cell"].to_numpy()
    adata.obs["label_id"] = cellmap["label_id"].to_numpy()
    adata.obs["centroid_x"] = cellmap["x"].to_numpy()
    adata.obs["centroid_y"] = cellmap["y"].to_numpy()
    adata.obs["area"] = cellmap["area"].to_numpy()
    X = adata.X
    adata.obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel().astype(np.int64)
    adata.obs["n_genes"] = np.asarray((X > 0).sum(axis=1)).ravel().astype(np.int64)
    for col in ("total_counts", "n_genes"):
        if not np.array_equal(adata.obs[col].to_numpy(), cellmap[col].to_numpy()):
            raise SegRefineError(f"{cgef}: stereopy's matrix disagrees with {cellmap_csv} on {col}")
    if "spatial" not in adata.obsm:
        adata.obsm["spatial"] = cellmap[["x", "y"]].to_numpy()
    adata.var_names = adata.var_names.astype(str)
    with atomic_path(out_h5ad, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return adata.n_obs


def _empty_cell_bin_anndata(genes, resolution: int, sn: str):
    """An AnnData of 0 cells laid out like ``cgef_to_h5ad``'s (stereopy's obs, obsm and uns, then ours)."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    obs = pd.DataFrame(
        {
            "dnbCount": np.zeros(0, np.uint32),
            "area": np.zeros(0, np.int64),
            "orig.ident": pd.Categorical([], categories=["sample"]),
            "x": np.zeros(0, np.uint32),
            "y": np.zeros(0, np.uint32),
            **{
                c: np.zeros(0, np.int64)
                for c in ("cgef_cell", "label_id", "centroid_x", "centroid_y", "total_counts", "n_genes")
            },
        },
        index=pd.Index([], dtype=str),
    )
    adata = anndata.AnnData(
        X=sp.csr_matrix((0, len(genes)), dtype=np.uint32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index([str(g) for g in genes], dtype=str)),
    )
    adata.obsm["spatial"] = np.zeros((0, 2), np.uint32)
    adata.obsm["cell_border"] = np.zeros((0, 32, 2), np.int64)
    adata.uns.update(
        {
            "bin_size": 1,
            "bin_type": "cell_bins",
            "merged": False,
            "resolution": resolution,
            "sn": pd.DataFrame({"batch": [-1], "sn": [sn]}),
        }
    )
    return adata
