"""An exact cell-bin GEF (cgef) writer: every transcript goes to the cell whose label covers its DNB.

gefpy's ``generate_cgef`` reads the mask as binary and finds cells as connected
components, so touching cells must be cut apart first and the cut pixels lose
their transcripts. This writer aggregates the GEM by the instance labels
themselves and writes the same HDF5 layout as gefpy 1.3.3's cgef (version 2):

- ``cellBin/cell``: one row per cell (id, centre x/y in GEM coordinates, offset
  into cellExp, geneCount, expCount, dnbCount, area, cellTypeID, clusterID),
  ordered by 256 x 256 block of the centre (row-major), then by label id;
  ``cellBin/blockIndex`` and ``cellBin/blockSize`` index those blocks.
- ``cellBin/cellExp``: per cell, (geneID, count) sorted by gene.
- ``cellBin/gene``: every gene of the matrix (genes with no count in any cell
  included, as gefpy does), with its slice of ``cellBin/geneExp`` (cellID, count).
- ``cellBin/cellBorder``: up to 32 outline vertices per cell, offsets from the
  centre, padded with 32767. Each vertex is the cell pixel farthest from the
  centre within one of 32 equal angular sectors (a star-shaped outline).

Cell ids are row numbers (uint32), so any number of cells fits; a single
cell-gene count above 65,535 (gefpy's uint16) is refused. The numpy and h5py
code here runs in the gef env and needs no gefpy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from segrefine import SegRefineError

BLOCK = 256
BORDER_POINTS = 32
BORDER_PAD = 32767
GEF_VERSION = 2
GEFTOOL_VERSION = (1, 3, 3)  # the gefpy release whose layout this file reproduces

CELL_DTYPE = np.dtype([("id", "<u4"), ("x", "<i4"), ("y", "<i4"), ("offset", "<u4"), ("geneCount", "<u4"),
                       ("expCount", "<u4"), ("dnbCount", "<u4"), ("area", "<u4"), ("cellTypeID", "<u2"),
                       ("clusterID", "<u2")])
GENE_DTYPE = np.dtype([("geneName", "S64"), ("offset", "<u4"), ("cellCount", "<u4"), ("expCount", "<u4"),
                       ("maxMIDcount", "<u2")])
CELL_EXP_DTYPE = np.dtype([("geneID", "<u4"), ("count", "<u2")])
GENE_EXP_DTYPE = np.dtype([("cellID", "<u4"), ("count", "<u2")])


class _Index:
    """Label id -> row in the sorted ``ids`` (-1 for labels not listed): a lookup table when ids are dense."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        top = int(ids.max()) if len(ids) else 0
        self.lut = None
        if top <= max(1 << 24, 8 * len(ids)):
            self.lut = np.full(top + 2, -1, np.int64)
            self.lut[ids] = np.arange(len(ids))

    def __call__(self, lab: np.ndarray) -> np.ndarray:
        lab = lab.astype(np.int64, copy=False)
        if self.lut is not None:
            return self.lut[np.minimum(lab, len(self.lut) - 1)]
        pos = np.searchsorted(self.ids, lab)
        pos[pos >= len(self.ids)] = 0
        return np.where(self.ids[pos] == lab, pos, -1) if len(self.ids) else np.full(lab.shape, -1, np.int64)


def _bands(height: int, rows: int):
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


def cell_geometry(labels: np.ndarray, ids: np.ndarray, band_rows: int = 1024) -> Dict[str, np.ndarray]:
    """Area, centroid (row, col) and star outline of the cells ``ids`` (sorted) in ``labels``.

    Pixels of cells not in ``ids`` are ignored. Outlines are (n, 32, 2) int64 (x, y)
    offsets from the rounded centroid, padded with 32767: in each of 32 equal angular
    sectors around the centre, the cell's boundary pixel farthest from it. The image
    is read in bands of rows (two passes), so memory follows the band, not the slide.
    """
    n = len(ids)
    index = _Index(ids)
    H, W = labels.shape
    area = np.zeros(n, np.int64)
    sum_r, sum_c = np.zeros(n), np.zeros(n)
    for y0, y1 in _bands(H, band_rows):
        rows, cols = np.nonzero(labels[y0:y1])
        idx = index(labels[y0:y1][rows, cols])
        ok = idx >= 0
        idx, rows, cols = idx[ok], rows[ok] + y0, cols[ok]
        area += np.bincount(idx, minlength=n)
        sum_r += np.bincount(idx, weights=rows, minlength=n)
        sum_c += np.bincount(idx, weights=cols, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.floor(sum_r / area + 0.5)
        cx = np.floor(sum_c / area + 0.5)
    cyi = np.nan_to_num(cy).astype(np.int64)
    cxi = np.nan_to_num(cx).astype(np.int64)
    # pass 2: boundary pixels (a 4-neighbour of another label or outside the image); per band the farthest
    # boundary pixel of each (cell, sector), then the farthest over bands
    cand = []
    for y0, y1 in _bands(H, band_rows):
        a, b = max(0, y0 - 1), min(H, y1 + 1)
        block = np.pad(labels[a:b], 1, mode="constant", constant_values=0)  # outside the image: background
        core = block[1 + (y0 - a):1 + (y0 - a) + (y1 - y0), 1:-1]
        up = block[(y0 - a):(y0 - a) + (y1 - y0), 1:-1]
        down = block[2 + (y0 - a):2 + (y0 - a) + (y1 - y0), 1:-1]
        left = block[1 + (y0 - a):1 + (y0 - a) + (y1 - y0), :-2]
        right = block[1 + (y0 - a):1 + (y0 - a) + (y1 - y0), 2:]
        edge = (core > 0) & ((up != core) | (down != core) | (left != core) | (right != core))
        rows, cols = np.nonzero(edge)
        idx = index(core[rows, cols])
        ok = idx >= 0
        idx, rows, cols = idx[ok], rows[ok] + y0, cols[ok]
        dx, dy = cols - cxi[idx], rows - cyi[idx]
        cand.append(_farthest_per_sector(idx, dx, dy))
    idx = np.concatenate([c[0] for c in cand]) if cand else np.zeros(0, np.int64)
    dx = np.concatenate([c[1] for c in cand]) if cand else np.zeros(0, np.int64)
    dy = np.concatenate([c[2] for c in cand]) if cand else np.zeros(0, np.int64)
    idx, dx, dy = _farthest_per_sector(idx, dx, dy)
    border = np.full((n, BORDER_POINTS, 2), BORDER_PAD, np.int64)
    slot = np.arange(len(idx)) - np.searchsorted(idx, idx)  # vertex number within its cell, in angle order
    border[idx, slot, 0] = dx
    border[idx, slot, 1] = dy
    return {"area": area, "cy": cyi, "cx": cxi, "border": border}


def _farthest_per_sector(idx: np.ndarray, dx: np.ndarray, dy: np.ndarray):
    """For each (cell, angular sector) the pixel farthest from the centre; sorted by cell, then angle."""
    sector = np.floor((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * BORDER_POINTS).astype(np.int64) % BORDER_POINTS
    r2 = np.minimum(dx * dx + dy * dy, (1 << 32) - 1)
    group = idx * BORDER_POINTS + sector
    order = np.argsort(group * (1 << 32) + ((1 << 32) - 1 - r2), kind="stable")  # by cell, sector, farthest first
    key = group[order]
    first = np.ones(len(order), bool)
    first[1:] = key[1:] != key[:-1]
    pick = order[first]
    return idx[pick], dx[pick], dy[pick]


def present_labels(labels: np.ndarray, band_rows: int = 1024) -> np.ndarray:
    """Sorted ids > 0 present in ``labels`` (counted by bands; no sort of the whole image)."""
    top = int(labels.max()) if labels.size else 0
    if top > (1 << 26):
        ids = np.unique(labels)
        return ids[ids > 0].astype(np.int64)
    seen = np.zeros(top + 1, bool)
    for y0, y1 in _bands(labels.shape[0], band_rows):
        seen[np.bincount(labels[y0:y1].ravel(), minlength=top + 1) > 0] = True
    seen[0] = False
    return np.flatnonzero(seen).astype(np.int64)


def _stats(ds, name: str, values: np.ndarray, dtype) -> None:
    v = np.asarray(values)
    ds.attrs[f"average{name}"] = np.array([v.mean() if len(v) else 0], np.float32)
    ds.attrs[f"max{name}"] = np.array([v.max() if len(v) else 0], dtype)
    ds.attrs[f"median{name}"] = np.array([np.median(v) if len(v) else 0], np.float32)
    ds.attrs[f"min{name}"] = np.array([v.min() if len(v) else 0], dtype)


def exact_cell_bin(gem, labels: np.ndarray, origin: Tuple[int, int], source: str = "GEM") -> Dict[str, np.ndarray]:
    """The exact cell x gene aggregation and every table of the cgef.

    ``labels``: instance labels whose pixel (0, 0) is GEM coordinate ``origin``; every
    transcript must fall inside it (checked by the caller). Cells are those labels that
    cover at least one pixel of the GEM's bounding box, empty ones included.
    """
    ox, oy = origin
    n_genes = len(gem.genes)
    lx, ly = gem.x - ox, gem.y - oy
    if len(lx) and (lx.min() < 0 or ly.min() < 0 or lx.max() >= labels.shape[1] or ly.max() >= labels.shape[0]):
        raise SegRefineError(f"{source}: transcripts fall outside the label image (checked too late: frame bug)")
    if len(lx):
        x0, x1, y0, y1 = int(lx.min()), int(lx.max()), int(ly.min()), int(ly.max())
    else:
        x0 = x1 = y0 = y1 = 0
    ids = present_labels(labels[y0:y1 + 1, x0:x1 + 1])
    geo = cell_geometry(labels, ids)
    cx, cy = geo["cx"] + ox, geo["cy"] + oy  # GEM coordinates of the centres
    # order cells by the 256 x 256 block of their centre (row-major over 0..max), then by label id
    max_x = int(max(gem.x.max() if len(gem.x) else 0, cx.max() if len(cx) else 0))
    max_y = int(max(gem.y.max() if len(gem.y) else 0, cy.max() if len(cy) else 0))
    nbx, nby = max_x // BLOCK + 1, max_y // BLOCK + 1
    block = np.clip(cy, 0, None) // BLOCK * nbx + np.clip(cx, 0, None) // BLOCK
    order = np.lexsort((ids, block))
    ids, block = ids[order], block[order]
    cx, cy, area, border = cx[order], cy[order], geo["area"][order], geo["border"][order]
    n_cells = len(ids)
    block_index = np.searchsorted(block, np.arange(nbx * nby + 1)).astype(np.uint32)

    # transcripts -> (cell row, gene), summed
    lab = labels[ly, lx].astype(np.int64)
    in_cell = lab > 0
    by_id = np.argsort(ids)  # row of the j-th smallest label id
    row = by_id[_Index(ids[by_id])(lab[in_cell])] if n_cells else np.zeros(0, np.int64)
    gene = gem.gene[in_cell]
    count = gem.count[in_cell]
    key = row * n_genes + gene
    ukey, inv = np.unique(key, return_inverse=True)
    summed = np.bincount(inv, weights=count, minlength=len(ukey)).astype(np.int64)
    c_row, c_gene = ukey // max(n_genes, 1), ukey % max(n_genes, 1)
    if len(summed) and summed.max() > 65535:
        i = int(np.argmax(summed))
        raise SegRefineError(f"{source}: cell {ids[c_row[i]]} has {summed[i]} UMIs of gene {gem.genes[c_gene[i]]}; "
                             "the cgef layout stores at most 65,535 per cell and gene")
    n_pix = labels.shape[0] * labels.shape[1]
    dnb = np.unique(row * n_pix + ly[in_cell].astype(np.int64) * labels.shape[1] + lx[in_cell])
    dnb_count = np.bincount(dnb // n_pix, minlength=n_cells) if len(dnb) else np.zeros(n_cells, np.int64)

    gene_count = np.bincount(c_row, minlength=n_cells)
    exp_count = np.bincount(c_row, weights=summed, minlength=n_cells).astype(np.int64)
    cell = np.zeros(n_cells, CELL_DTYPE)
    cell["id"] = np.arange(n_cells)
    cell["x"], cell["y"] = cx, cy
    cell["offset"] = np.concatenate([[0], np.cumsum(gene_count)[:-1]]) if n_cells else []
    cell["geneCount"], cell["expCount"], cell["dnbCount"] = gene_count, exp_count, dnb_count
    cell["area"] = area
    cell_exp = np.zeros(len(ukey), CELL_EXP_DTYPE)  # ukey is sorted by (row, gene) already
    cell_exp["geneID"], cell_exp["count"] = c_gene, summed

    by_gene = np.lexsort((c_row, c_gene))
    gene_exp = np.zeros(len(ukey), GENE_EXP_DTYPE)
    gene_exp["cellID"], gene_exp["count"] = c_row[by_gene], summed[by_gene]
    cell_count = np.bincount(c_gene, minlength=n_genes)
    genes = np.zeros(n_genes, GENE_DTYPE)
    genes["geneName"] = [str(g).encode() for g in gem.genes]
    genes["offset"] = np.concatenate([[0], np.cumsum(cell_count)[:-1]]) if n_genes else []
    genes["cellCount"] = cell_count
    genes["expCount"] = np.bincount(c_gene, weights=summed, minlength=n_genes).astype(np.int64)
    mx = np.zeros(n_genes, np.int64)
    np.maximum.at(mx, c_gene, summed)
    genes["maxMIDcount"] = mx

    big = np.abs(np.where(border == BORDER_PAD, 0, border)).max() if n_cells else 0
    if big >= BORDER_PAD:
        raise SegRefineError(f"{source}: a cell spans more than {BORDER_PAD} px from its centre (not a cell)")
    return {"label_id": ids, "cell": cell, "cell_exp": cell_exp, "gene": genes, "gene_exp": gene_exp,
            "border": border.astype(np.int16), "block_index": block_index,
            "block_size": np.array([BLOCK, BLOCK, nbx, nby], np.uint32), "max_x": max_x, "max_y": max_y}


def write_cgef(tables: Dict[str, np.ndarray], path, resolution: int = 500) -> None:
    """Write the tables of ``exact_cell_bin`` as a cgef (the caller makes the write atomic)."""
    import h5py

    cell, border = tables["cell"], tables["border"]
    with h5py.File(path, "w") as f:
        u32 = np.uint32
        f.attrs["bin_type"] = np.array([b"CellBin"], "S32")
        f.attrs["geftool_ver"] = np.array(GEFTOOL_VERSION, u32)
        f.attrs["maxX"] = np.array([tables["max_x"]], np.int32)
        f.attrs["maxY"] = np.array([tables["max_y"]], np.int32)
        f.attrs["offsetX"] = np.array([0], np.int32)
        f.attrs["offsetY"] = np.array([0], np.int32)
        f.attrs["omics"] = np.array([b"Transcriptomics"], "S32")
        f.attrs["resolution"] = np.array([resolution], u32)
        f.attrs["version"] = np.array([GEF_VERSION], u32)
        f.attrs["segrefine_writer"] = np.array([b"exact"], "S32")
        g = f.create_group("cellBin")
        g.create_dataset("blockIndex", data=tables["block_index"])
        g.create_dataset("blockSize", data=tables["block_size"])
        d = g.create_dataset("cell", data=cell)
        for name, field in (("Area", "area"), ("DnbCount", "dnbCount"), ("ExpCount", "expCount"),
                            ("GeneCount", "geneCount")):
            _stats(d, name, cell[field], u32)
        for name, field in (("X", "x"), ("Y", "y")):
            v = cell[field]
            d.attrs[f"max{name}"] = np.array([v.max() if len(v) else 0], np.int32)
            d.attrs[f"min{name}"] = np.array([v.min() if len(v) else 0], np.int32)
        b = g.create_dataset("cellBorder", data=border)
        real = border[..., 0] != BORDER_PAD
        bx = (border[..., 0].astype(np.int64) + cell["x"][:, None])[real]
        by = (border[..., 1].astype(np.int64) + cell["y"][:, None])[real]
        for name, v in (("X", bx), ("Y", by)):
            b.attrs[f"max{name}"] = np.array([v.max() if len(v) else 0], np.int32)
            b.attrs[f"min{name}"] = np.array([v.min() if len(v) else 0], np.int32)
        ce = g.create_dataset("cellExp", data=tables["cell_exp"])
        ce.attrs["maxCount"] = np.array([tables["cell_exp"]["count"].max() if len(tables["cell_exp"]) else 0],
                                        np.uint16)
        g.create_dataset("cellTypeList", data=np.array([b"default"], "S32"))
        gd = g.create_dataset("gene", data=tables["gene"])
        for name, field in (("CellCount", "cellCount"), ("ExpCount", "expCount")):
            v = tables["gene"][field]
            gd.attrs[f"max{name}"] = np.array([v.max() if len(v) else 0], u32)
            gd.attrs[f"min{name}"] = np.array([v.min() if len(v) else 0], u32)
        ge = g.create_dataset("geneExp", data=tables["gene_exp"])
        ge.attrs["maxCount"] = ce.attrs["maxCount"]


def read_cell_table(path) -> np.ndarray:
    """The ``cellBin/cell`` table of a cgef (either writer), with a clear error if there is none."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "cellBin/cell" not in f:
                raise SegRefineError(f"{path}: no cellBin/cell table (not a cell-bin GEF)")
            return f["cellBin/cell"][:]
    except OSError as exc:
        raise SegRefineError(f"{path}: cannot read as HDF5 ({exc})") from exc
