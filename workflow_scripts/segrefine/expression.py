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

The frame: pixel (0, 0) of the label image is GEM coordinate ``origin``; a
transcript at GEM (x, y) lies on label pixel (x - origin_x, y - origin_y).
``origin`` is explicit (config) or read from the expression file
(``auto``: GEM ``#OffsetX/#OffsetY`` or bgef ``offsetX/offsetY`` attrs, a
transcript at (x, y) lying at image (x + OffsetX, y + OffsetY); 0 when absent).
A matrix that does not fit inside the label image in that frame is refused.
"""
from __future__ import annotations

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


def parse_origin(spec: Union[str, Tuple[int, int], None]) -> Optional[Tuple[int, int]]:
    """``auto``/None -> None (read from the file); ``"x,y"`` or (x, y) -> ints."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return None
    try:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        x, y = (int(str(v).strip()) for v in parts)
    except (ValueError, TypeError):
        raise SegRefineError(f"origin {spec!r}: expected 'auto' or two integers 'x,y' "
                             "(the GEM coordinate of label pixel (0, 0))") from None
    return x, y


def resolve_origin(gem, spec) -> Tuple[Tuple[int, int], str]:
    """The origin to use and where it came from (for the log and error messages)."""
    explicit = parse_origin(spec)
    if explicit is not None:
        return explicit, "config"
    ox, oy = gem.offset
    return (-ox, -oy), ("the file's OffsetX/OffsetY" if (ox or oy) else "default (0, 0)")


def read_labels(path) -> np.ndarray:
    """Level 0 of the whole-slide label image (plain or pyramidal TIFF), 2-D integer."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: label image not found")
    try:
        with tifffile.TiffFile(path) as tif:
            labels = tif.series[0].levels[0].asarray()
    except Exception as exc:
        raise SegRefineError(f"{path}: not a readable TIFF label image ({type(exc).__name__}: {exc})") from exc
    labels = np.squeeze(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise SegRefineError(f"{path}: expected 2-D integer instance labels, got {labels.dtype} {labels.shape}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise SegRefineError(f"{path}: negative label ids")
    return labels


def check_frame(gem, labels_shape, origin, how: str, gem_path, labels_path) -> None:
    """Refuse a matrix that does not lie inside the label image in the given frame."""
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
            "(set expression.origin to the GEM coordinate of label pixel (0, 0), or check the files)")


def make_cgef(gem_path, labels_path, cgef_out, cellmap_out, threads: int = 2, writer: str = "exact",
              origin=None) -> int:
    """Expression (GEM/bgef) + whole-slide labels -> cgef and the per-cell table (cellmap.csv)."""
    from segrefine.gem import is_hdf5, read_expression

    if writer not in WRITERS:
        raise SegRefineError(f"unknown cgef writer {writer!r}: one of {list(WRITERS)}")
    gem_path, labels_path = Path(gem_path), Path(labels_path)
    gem = read_expression(gem_path)
    labels = read_labels(labels_path)
    org, how = resolve_origin(gem, origin)
    check_frame(gem, labels.shape, org, how, gem_path, labels_path)
    log.info("%s: %d records, %d UMIs, %d genes; origin %s [%s]; labels %s %dx%d", gem_path, len(gem.count),
             int(gem.count.sum()), len(gem.genes), org, how, labels_path, labels.shape[1], labels.shape[0])
    Path(cgef_out).parent.mkdir(parents=True, exist_ok=True)
    if writer == "exact":
        return _make_exact(gem, gem_path, labels, org, cgef_out, cellmap_out)
    return _make_gefpy(gem, gem_path, is_hdf5(gem_path), labels, org, cgef_out, cellmap_out, threads)


def _make_exact(gem, gem_path, labels, origin, cgef_out, cellmap_out) -> int:
    from segrefine.cgef import exact_cell_bin, write_cgef
    from segrefine.io import atomic_path

    tables = exact_cell_bin(gem, labels, origin, source=str(gem_path))
    cell = tables["cell"]
    with atomic_path(cgef_out, suffix=".cgef") as tmp:
        write_cgef(tables, tmp)
        _write_cellmap(cellmap_out, cell["id"], tables["label_id"], cell["x"], cell["y"], cell["area"],
                       cell["expCount"], cell["geneCount"])
    return len(cell)


def write_gem_v01(gem, path) -> None:
    """The records as a plain GEMv0.1 (the variant gefpy's bgef writer accepts)."""
    with open(path, "w") as fh:
        fh.write("#FileFormat=GEMv0.1\n#BinSize=1\n#OffsetX=0\n#OffsetY=0\ngeneID\tx\ty\tMIDCount\n")
        names = gem.genes[gem.gene]
        for chunk in range(0, len(names), 1 << 16):
            sl = slice(chunk, chunk + (1 << 16))
            fh.write("".join(f"{a}\t{b}\t{c}\t{d}\n" for a, b, c, d in
                             zip(names[sl], gem.x[sl], gem.y[sl], gem.count[sl])))


def _make_gefpy(gem, gem_path, given_bgef, labels, origin, cgef_out, cellmap_out, threads) -> int:
    import tifffile

    from segrefine.io import atomic_path

    work = Path(tempfile.mkdtemp(prefix=".cgef.", dir=Path(cgef_out).parent))
    try:
        if given_bgef:
            bgef = gem_path
        else:  # gefpy reads only some GEM variants: hand it a plain GEMv0.1 of the parsed records
            norm = work / "input.gem"
            write_gem_v01(gem, norm)
            bgef = work / "bin1.bgef"
            run_isolated(f"gefpy generate_bgef on {gem_path}", _gem_to_bgef, norm, bgef, threads)
        _, x1, _, y1 = bgef_extent(bgef)
        # gefpy wants the mask at 0..maxX x 0..maxY of the matrix: paste the separated labels at the origin
        ox, oy = origin
        keep = separate_touching(labels)
        mask = np.zeros((y1 + 1, x1 + 1), np.uint8)
        ys, xs = slice(max(oy, 0), min(oy + labels.shape[0], y1 + 1)), slice(max(ox, 0), min(ox + labels.shape[1], x1 + 1))
        mask[ys, xs] = keep[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox] * np.uint8(255)
        if not mask.any():
            raise SegRefineError(f"no cell of the label image lies inside the expression matrix of {gem_path}")
        mask_path = work / "mask.tif"
        tifffile.imwrite(mask_path, mask, compression="zlib")
        del mask
        cgef_tmp = work / "out.cgef"
        run_isolated(f"gefpy generate_cgef on {gem_path}", _bgef_to_cgef, cgef_tmp, bgef, mask_path)
        from segrefine.cgef import read_cell_table

        cells = read_cell_table(cgef_tmp)
        lx = np.clip(cells["x"].astype(np.int64) - ox, 0, labels.shape[1] - 1)
        ly = np.clip(cells["y"].astype(np.int64) - oy, 0, labels.shape[0] - 1)
        with atomic_path(cgef_out, suffix=".cgef") as tmp:
            shutil.move(str(cgef_tmp), str(tmp))
            _write_cellmap(cellmap_out, cells["id"], labels[ly, lx], cells["x"], cells["y"], cells["area"],
                           cells["expCount"], cells["geneCount"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return len(cells)


def _write_cellmap(path, cgef_cell, label_id, x, y, area, total, n_genes) -> None:
    """Per cgef cell: its id in the label image under its centre, centre, area, UMIs, genes."""
    from segrefine.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(",".join(CELLMAP_COLUMNS) + "\n")
            for row in zip(cgef_cell, label_id, x, y, area, total, n_genes):
                fh.write(",".join(str(int(v)) for v in row) + "\n")


def cgef_to_h5ad(cgef, cellmap_csv, out_h5ad) -> int:
    """cgef -> AnnData with stereopy; obs gains the label id of each cell in the whole-slide mask."""
    import anndata
    import pandas as pd
    import stereo as st

    from segrefine.io import atomic_path

    Path(out_h5ad).parent.mkdir(parents=True, exist_ok=True)
    data = st.io.read_gef(str(cgef), bin_type="cell_bins")
    with tempfile.TemporaryDirectory(dir=Path(out_h5ad).parent) as tmpdir:
        raw = Path(tmpdir) / "stereopy.h5ad"
        st.io.stereo_to_anndata(data, flavor="scanpy", output=str(raw))
        adata = anndata.read_h5ad(raw)
    cellmap = pd.read_csv(cellmap_csv)
    missing = [c for c in CELLMAP_COLUMNS if c not in cellmap.columns]
    if missing:
        raise SegRefineError(f"{cellmap_csv}: missing column(s) {missing} (written by an older `segrefine cgef`?)")
    # stereopy keeps the cgef's cell order; its obs names encode the centre, which we check
    same = (len(cellmap) == adata.n_obs and np.array_equal(cellmap["x"].to_numpy(), adata.obs["x"].to_numpy())
            and np.array_equal(cellmap["y"].to_numpy(), adata.obs["y"].to_numpy()))
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
