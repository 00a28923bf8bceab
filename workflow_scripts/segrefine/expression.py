"""Cell-by-gene matrices: GEM -> bgef -> cgef with gefpy, cgef -> AnnData with stereopy.

gefpy's cgef writer reads the mask as binary and finds cells as connected
components, so touching cells would merge. ``separate_touching`` removes, for
every pair of 8-adjacent cells, the boundary pixels of the lower-numbered one:
no two cells touch any more, at the cost of one pixel ring on one side.
gefpy also needs the mask at the exact extent of the expression matrix and
kills the whole process (exit 255) on error, so its calls run in a child
process and a failure becomes an error of this step.
"""
from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.expression")


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
            nb = padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
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


def make_cgef(gem, labels_path, cgef_out, cellmap_out, threads: int = 2) -> int:
    """GEM + whole-slide labels (same coordinate frame) -> cgef, and the cgef-cell -> label-id table."""
    import tifffile

    from segrefine.io import atomic_path

    gem, labels_path = Path(gem), Path(labels_path)
    for p, what in ((gem, "GEM"), (labels_path, "label image")):
        if not p.is_file():
            raise SegRefineError(f"{p}: {what} not found")
    labels = tifffile.imread(labels_path)
    work = Path(tempfile.mkdtemp(prefix=".cgef.", dir=Path(cgef_out).parent))
    try:
        bgef = work / "bin1.bgef"
        run_isolated(f"gefpy generate_bgef on {gem}", _gem_to_bgef, gem, bgef, threads)
        x0, x1, y0, y1 = bgef_extent(bgef)
        H, W = labels.shape
        if x1 >= W or y1 >= H:
            raise SegRefineError(
                f"{gem}: transcripts span x {x0}..{x1}, y {y0}..{y1} but the mask {labels_path} is {W}x{H} px: "
                "the matrix and the image are not in the same coordinate frame (check the offset)")
        region = labels[y0:y1 + 1, x0:x1 + 1]
        if not region.any():
            raise SegRefineError(f"{labels_path}: no cell lies inside the expression matrix of {gem} "
                                 f"(x {x0}..{x1}, y {y0}..{y1}): nothing to aggregate")
        n_cut = len(np.setdiff1d(np.unique(labels), np.unique(region)))
        if n_cut:
            log.warning("%d cells lie wholly outside the expression matrix (x %d..%d, y %d..%d)", n_cut, x0, x1, y0, y1)
        mask = work / "mask.tif"
        tifffile.imwrite(mask, (separate_touching(region) * 255).astype(np.uint8), compression="zlib")
        cgef_tmp = work / "out.cgef"
        run_isolated(f"gefpy generate_cgef on {gem} with {labels_path}", _bgef_to_cgef, cgef_tmp, bgef, mask)
        n = write_cellmap(cgef_tmp, region, (x0, y0), cellmap_out)
        Path(cgef_out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cgef_out) as tmp:
            shutil.move(str(cgef_tmp), str(tmp))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return n


def write_cellmap(cgef, region: np.ndarray, origin: Tuple[int, int], out_csv) -> int:
    """For each cgef cell, the id of the cell in the whole-slide label image under its centre."""
    import h5py

    from segrefine.io import atomic_path

    with h5py.File(cgef, "r") as f:
        if "cellBin/cell" not in f:
            raise SegRefineError(f"gefpy wrote no cell table into {cgef} (see its messages above)")
        cells = f["cellBin/cell"][:]
    x0, y0 = origin
    lx = np.clip(cells["x"].astype(np.int64) - x0, 0, region.shape[1] - 1)
    ly = np.clip(cells["y"].astype(np.int64) - y0, 0, region.shape[0] - 1)
    label_id = region[ly, lx].astype(np.int64)
    with atomic_path(out_csv) as tmp:
        with open(tmp, "w") as fh:
            fh.write("cgef_cell,label_id,x,y\n")
            for c, lab, x, y in zip(cells["id"], label_id, cells["x"], cells["y"]):
                fh.write(f"{c},{lab},{x},{y}\n")
    return len(cells)


def cgef_to_h5ad(cgef, cellmap_csv, out_h5ad) -> int:
    """cgef -> AnnData with stereopy; obs gains the label id of each cell in the whole-slide mask."""
    import anndata
    import pandas as pd
    import stereo as st

    from segrefine.io import atomic_path

    data = st.io.read_gef(str(cgef), bin_type="cell_bins")
    with tempfile.TemporaryDirectory(dir=Path(out_h5ad).parent) as tmpdir:
        raw = Path(tmpdir) / "stereopy.h5ad"
        st.io.stereo_to_anndata(data, flavor="scanpy", output=str(raw))
        adata = anndata.read_h5ad(raw)
    cellmap = pd.read_csv(cellmap_csv)
    # stereopy keeps the cgef's cell order; its obs names encode the centre, which we check
    same = (len(cellmap) == adata.n_obs and np.array_equal(cellmap["x"].to_numpy(), adata.obs["x"].to_numpy())
            and np.array_equal(cellmap["y"].to_numpy(), adata.obs["y"].to_numpy()))
    if not same:
        raise SegRefineError(f"{cgef}: stereopy's cells do not line up with {cellmap_csv} (cell order changed)")
    adata.obs["cgef_cell"] = cellmap["cgef_cell"].to_numpy()
    adata.obs["label_id"] = cellmap["label_id"].to_numpy()
    X = adata.X
    adata.obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel()
    adata.obs["n_genes"] = np.asarray((X > 0).sum(axis=1)).ravel()
    with atomic_path(out_h5ad, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return adata.n_obs
