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

It streams (``RecordSpill`` then ``exact_cell_bin``): records spilled by label
row to a temporary folder, labels read in bands, (cell, gene) partial sums
spilled per band and merged by buckets of cells, then of genes; memory follows
the band and bucket sizes and the number of cells and genes, not the records.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from segrefine import SegRefineError

BLOCK = 256
BORDER_POINTS = 32
BORDER_PAD = 32767
GEF_VERSION = 2
GEFTOOL_VERSION = (1, 3, 3)  # the gefpy release whose layout this file reproduces
BAND_RECORDS = 1 << 20  # at most this many records (or cell-gene partials) per band / bucket
BAND_ROWS = 512  # at most this many label rows per band
BAND_PIXELS = 1 << 22  # and, by default, at most this many label pixels
BORDER_ROWS = 1 << 16  # cell outlines written (and their extent taken) by this many cells at a time
UINT32_MAX = (1 << 32) - 1

CELL_DTYPE = np.dtype(
    [
        ("id", "<u4"),
        ("x", "<i4"),
        ("y", "<i4"),
        ("offset", "<u4"),
        ("geneCount", "<u4"),
        ("expCount", "<u4"),
        ("dnbCount", "<u4"),
        ("area", "<u4"),
        ("cellTypeID", "<u2"),
        ("clusterID", "<u2"),
    ]
)
GENE_DTYPE = np.dtype(
    [("geneName", "S64"), ("offset", "<u4"), ("cellCount", "<u4"), ("expCount", "<u4"), ("maxMIDcount", "<u2")]
)
CELL_EXP_DTYPE = np.dtype([("geneID", "<u4"), ("count", "<u2")])
GENE_EXP_DTYPE = np.dtype([("cellID", "<u4"), ("count", "<u2")])
# spilled to the temporary folder, each run sorted by its key "k"
RECORD_DTYPE = np.dtype([("k", "<u4"), ("x", "<u4"), ("gene", "<u4"), ("count", "<u4")])  # k = label row
PARTIAL_DTYPE = np.dtype([("k", "<u4"), ("gene", "<u4"), ("count", "<u8")])  # k = cell row
BY_GENE_DTYPE = np.dtype([("k", "<u4"), ("cellID", "<u4"), ("count", "<u2")])  # k = gene
BORDER_RUN_DTYPE = np.dtype([("k", "<u4"), ("border", "<i2", (BORDER_POINTS, 2))])  # k = cell row


class ArrayBands:
    """A label image held in memory, read like a ``LabelImage`` (tests, small images)."""

    def __init__(self, array: np.ndarray, name: str = "labels"):
        self.array, self.shape, self.path = np.asarray(array), tuple(np.shape(array)), name

    def rows(self, y0: int, y1: int, x0: int = 0, x1: Optional[int] = None) -> np.ndarray:
        return self.array[y0:y1, x0:x1]


class Runs:
    """Sorted runs of records on disk (one .npy per run); ``take(lo, hi)`` gathers keys lo <= k < hi from all."""

    def __init__(self, folder, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = Path(folder), name, dtype
        self.sizes: List[int] = []
        self.bounds: List[Tuple[int, int]] = []

    def add(self, run: np.ndarray) -> None:
        np.save(self.folder / f"{self.name}.{len(self.sizes)}.npy", run)
        self.sizes.append(len(run))
        self.bounds.append((int(run["k"][0]), int(run["k"][-1])) if len(run) else (1, 0))

    def take(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        for i, (a, b) in enumerate(self.bounds):
            if b < lo or a >= hi:
                continue
            run = np.load(self.folder / f"{self.name}.{i}.npy", mmap_mode="r")
            s, e = np.searchsorted(run["k"], [lo, hi])
            if e > s:
                parts.append(np.array(run[s:e]))
            del run
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


def _bands(y0: int, y1: int, rows: int):
    for a in range(y0, y1, rows):
        yield a, min(y1, a + rows)


def _buckets(per_key: np.ndarray, limit: int, max_keys: Optional[int] = None) -> List[Tuple[int, int]]:
    """Consecutive key ranges [a, b), each holding at most ``limit`` items (or one key) and ``max_keys`` keys."""
    out, a, n = [], 0, len(per_key)
    cum = np.concatenate([[0], np.cumsum(per_key, dtype=np.int64)])
    while a < n:
        b = int(np.searchsorted(cum, cum[a] + limit, side="right")) - 1
        b = max(b, a + 1)
        if max_keys:
            b = min(b, a + max_keys)
        out.append((a, min(b, n)))
        a = min(b, n)
    return out


class _Index:
    """Label id -> row in the sorted ``ids`` (-1 for labels not listed): a lookup table when ids are dense."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        top = int(ids.max()) if len(ids) else 0
        self.lut = None
        if top <= max(1 << 24, 8 * len(ids)):
            self.lut = np.full(top + 2, -1, np.int32 if len(ids) < (1 << 31) else np.int64)
            self.lut[ids] = np.arange(len(ids))

    def __call__(self, lab: np.ndarray) -> np.ndarray:
        lab = lab.astype(np.int64, copy=False)
        if self.lut is not None:
            return self.lut[np.minimum(lab, len(self.lut) - 1)]
        pos = np.searchsorted(self.ids, lab)
        pos[pos >= len(self.ids)] = 0
        return np.where(self.ids[pos] == lab, pos, -1) if len(self.ids) else np.full(lab.shape, -1, np.int64)


def present_labels(labels, y0: int, y1: int, x0: int, x1: int, band_rows: int = BAND_ROWS) -> np.ndarray:
    """Sorted ids > 0 present in rows y0..y1-1, columns x0..x1-1 of ``labels`` (a band reader)."""
    ids = np.zeros(0, np.int64)
    for a, b in _bands(y0, y1, band_rows):
        band = labels.rows(a, b, x0, x1)
        top = int(band.max()) if band.size else 0
        if top <= (1 << 24):
            found = np.flatnonzero(np.bincount(band.ravel(), minlength=top + 1))
        else:
            found = np.unique(band)
        ids = np.union1d(ids, found[found > 0].astype(np.int64))
    return ids


def cell_centres(labels, ids: np.ndarray, band_rows: int = BAND_ROWS) -> Dict[str, np.ndarray]:
    """Area, rounded centroid (``cy``, ``cx``: row, col) and ``last`` (the last row of the last band of
    ``band_rows`` rows that holds a pixel of the cell) of the cells ``ids`` (sorted) in ``labels`` (a band reader),
    read in bands of rows. Pixels of cells not in ``ids`` are ignored."""
    n = len(ids)
    index = _Index(ids)
    H, W = labels.shape
    area = np.zeros(n, np.int64)
    sum_r, sum_c = np.zeros(n), np.zeros(n)
    last = np.full(n, -1, np.int32)
    for y0, y1 in _bands(0, H, band_rows):
        band = labels.rows(y0, y1)
        rows, cols = np.nonzero(band)
        idx = index(band[rows, cols])
        ok = idx >= 0
        idx, rows, cols = idx[ok], rows[ok] + y0, cols[ok]
        area += np.bincount(idx, minlength=n)
        sum_r += np.bincount(idx, weights=rows, minlength=n)
        sum_c += np.bincount(idx, weights=cols, minlength=n)
        last[idx] = y1 - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.floor(sum_r / area + 0.5)
        cx = np.floor(sum_c / area + 0.5)
    return {
        "area": area,
        "cy": np.nan_to_num(cy).astype(np.int64),
        "cx": np.nan_to_num(cx).astype(np.int64),
        "last": last,
    }


def cell_borders(
    labels, ids: np.ndarray, cy: np.ndarray, cx: np.ndarray, last: np.ndarray, emit, band_rows: int = BAND_ROWS
) -> bool:
    """The star outlines of the cells ``ids`` (sorted; centres and ``last`` from ``cell_centres`` with the same
    ``band_rows``), handed to ``emit(cells, border)`` band by band as the cells end, so that memory follows the
    cells a band crosses, not all cells.

    ``cells``: sorted positions in ``ids``; ``border``: (len(cells), 32, 2) int16 (x, y) offsets from the rounded
    centroid, padded with 32767: in each of 32 equal angular sectors around the centre, the cell's boundary pixel
    (a 4-neighbour of another label or outside the image) farthest from it, the earliest of equals in raster
    order; vertices in sector order, numbered from 0. Every cell is emitted once. Returns ``too_far``: some
    boundary pixel lies 32,767 px or more from its centre (not a cell; nothing more is emitted then)."""
    index = _Index(ids)
    H, W = labels.shape
    by_last = np.argsort(last, kind="stable")
    last_sorted = last[by_last]
    done_to = 0
    # the cells still open: per (cell, sector) the farthest boundary pixel so far, sorted by (cell, sector)
    s_idx = np.zeros(0, np.int64)
    s_sec, s_dx, s_dy, s_r2 = s_idx.copy(), s_idx.copy(), s_idx.copy(), s_idx.copy()
    for y0, y1 in _bands(0, H, band_rows):
        a, b = max(0, y0 - 1), min(H, y1 + 1)
        block = np.pad(labels.rows(a, b), 1, mode="constant", constant_values=0)  # outside the image: background
        core = block[1 + (y0 - a) : 1 + (y0 - a) + (y1 - y0), 1:-1]
        up = block[(y0 - a) : (y0 - a) + (y1 - y0), 1:-1]
        down = block[2 + (y0 - a) : 2 + (y0 - a) + (y1 - y0), 1:-1]
        left = block[1 + (y0 - a) : 1 + (y0 - a) + (y1 - y0), :-2]
        right = block[1 + (y0 - a) : 1 + (y0 - a) + (y1 - y0), 2:]
        edge = (core > 0) & ((up != core) | (down != core) | (left != core) | (right != core))
        rows, cols = np.nonzero(edge)
        idx = index(core[rows, cols])
        del block, core, up, down, left, right, edge
        ok = idx >= 0
        idx, rows, cols = idx[ok].astype(np.int64), rows[ok] + y0, cols[ok]
        idx, sector, dx, dy = _farthest_per_sector(idx, cols - cx[idx], rows - cy[idx])
        if len(dx) and max(int(np.abs(dx).max()), int(np.abs(dy).max())) >= BORDER_PAD:
            return True
        if len(idx):  # the band's vertices after the earlier bands' (ties: the earlier), the farthest per sector
            m_idx, m_sec = np.concatenate([s_idx, idx]), np.concatenate([s_sec, sector])
            m_dx, m_dy = np.concatenate([s_dx, dx]), np.concatenate([s_dy, dy])
            m_r2 = np.concatenate([s_r2, dx * dx + dy * dy])
            group = m_idx * BORDER_POINTS + m_sec
            order = np.lexsort((-m_r2, group))
            first = np.ones(len(order), bool)
            first[1:] = group[order][1:] != group[order][:-1]
            pick = order[first]
            s_idx, s_sec, s_dx, s_dy, s_r2 = m_idx[pick], m_sec[pick], m_dx[pick], m_dy[pick], m_r2[pick]
        # the cells whose last row lies in this band are complete
        end = int(np.searchsorted(last_sorted, y1, side="left"))
        if end > done_to:
            cells = np.sort(by_last[done_to:end])
            done_to = end
            fin = last[s_idx] < y1
            e_idx, e_dx, e_dy = s_idx[fin], s_dx[fin], s_dy[fin]
            s_idx, s_sec, s_dx, s_dy, s_r2 = (v[~fin] for v in (s_idx, s_sec, s_dx, s_dy, s_r2))
            border = np.full((len(cells), BORDER_POINTS, 2), BORDER_PAD, np.int16)
            pos = np.searchsorted(cells, e_idx)
            slot = np.arange(len(e_idx)) - np.searchsorted(e_idx, e_idx, side="left")  # entries sorted by cell
            border[pos, slot, 0] = e_dx
            border[pos, slot, 1] = e_dy
            emit(cells, border)
    return False


def _farthest_per_sector(idx: np.ndarray, dx: np.ndarray, dy: np.ndarray):
    """For each (cell, angular sector) the pixel farthest from the centre (the first of equals):
    cell, sector, dx, dy."""
    sector = np.floor((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * BORDER_POINTS).astype(np.int64) % BORDER_POINTS
    r2 = np.minimum(dx * dx + dy * dy, (1 << 32) - 1)
    group = idx * BORDER_POINTS + sector
    order = np.argsort(group * (1 << 32) + ((1 << 32) - 1 - r2), kind="stable")  # by cell, sector, farthest first
    key = group[order]
    first = np.ones(len(order), bool)
    first[1:] = key[1:] != key[:-1]
    pick = order[first]
    return idx[pick], sector[pick], dx[pick], dy[pick]


class RecordSpill:
    """Pass 1: the records of a chunked expression reader, in label-pixel coordinates, spilled to ``work``.

    Each chunk becomes one run sorted by label row, so a band of rows is gathered from
    every run by binary search. Also the extent (GEM coordinates, inclusive), the number
    of records per label row, and the UMIs. Records outside the label image are not
    spilled; ``inside`` tells whether there were any (the caller refuses the frame).
    """

    def __init__(self, reader, origin: Tuple[int, int], shape: Tuple[int, int], work):
        self.reader, self.origin, self.shape = reader, origin, shape
        self.runs = Runs(work, "records", RECORD_DTYPE)
        H, W = shape
        ox, oy = origin
        self.per_row = np.zeros(H, np.int64)
        self.n_records = self.umis = 0
        lo, hi = [np.iinfo(np.int64).max] * 2, [np.iinfo(np.int64).min] * 2
        self.inside = True
        for chunk in reader.chunks():
            if not len(chunk.count):
                continue
            lo = [min(lo[0], int(chunk.x.min())), min(lo[1], int(chunk.y.min()))]
            hi = [max(hi[0], int(chunk.x.max())), max(hi[1], int(chunk.y.max()))]
            self.n_records += len(chunk.count)
            self.umis += int(chunk.count.sum())
            if int(chunk.count.max()) > UINT32_MAX:
                raise SegRefineError(f"{reader.path}: a record holds {int(chunk.count.max())} UMIs (> 2^32 - 1)")
            lx, ly = chunk.x - ox, chunk.y - oy
            if self.inside and (lx.min() < 0 or ly.min() < 0 or lx.max() >= W or ly.max() >= H):
                self.inside = False  # the frame is refused once the whole extent is known: stop spilling
            if not self.inside:
                continue
            order = np.argsort(ly, kind="stable")
            run = np.empty(len(order), RECORD_DTYPE)
            run["k"], run["x"], run["gene"], run["count"] = ly[order], lx[order], chunk.gene[order], chunk.count[order]
            self.runs.add(run)
            self.per_row += np.bincount(ly, minlength=H)
        self._extent = (lo[0], hi[0], lo[1], hi[1]) if self.n_records else (0, -1, 0, -1)
        self.genes, self.code = reader.gene_codes()

    def extent(self) -> Tuple[int, int, int, int]:
        """(min x, max x, min y, max y) of the transcripts (GEM coordinates), inclusive."""
        return self._extent

    def band(self, y0: int, y1: int) -> np.ndarray:
        """The records on label rows y0..y1-1 (gene codes final)."""
        rec = self.runs.take(y0, y1)
        rec["gene"] = self.code[rec["gene"]]
        return rec


def _stats(ds, name: str, values: np.ndarray, dtype) -> None:
    v = np.asarray(values)
    ds.attrs[f"average{name}"] = np.array([v.mean() if len(v) else 0], np.float32)
    ds.attrs[f"max{name}"] = np.array([v.max() if len(v) else 0], dtype)
    ds.attrs[f"median{name}"] = np.array([np.median(v) if len(v) else 0], np.float32)
    ds.attrs[f"min{name}"] = np.array([v.min() if len(v) else 0], dtype)


def exact_cell_bin(
    spill: RecordSpill,
    labels,
    work,
    out_path,
    band_records: int = BAND_RECORDS,
    band_rows: int = BAND_ROWS,
    resolution: int = 500,
    source: str = "GEM",
) -> Dict[str, np.ndarray]:
    """The exact cell x gene aggregation of the spilled records, written as a cgef at ``out_path``.

    ``labels``: a band reader (``rows(y0, y1, x0, x1)``, ``shape``) of instance labels whose
    pixel (0, 0) is GEM coordinate ``spill.origin``; every record lies inside it (checked
    by the caller). Cells are the labels that cover at least one pixel of the matrix's
    bounding box, empty ones included. Memory follows ``band_records`` / ``band_rows``
    and the number of cells and genes; partial sums go through ``work``. Returns the
    per-cell tables (``label_id``, ``cell``) for the cell map.
    """
    work = Path(work)
    ox, oy = spill.origin
    gx0, gx1, gy0, gy1 = spill.extent()
    box = (gx0 - ox, gx1 - ox, gy0 - oy, gy1 - oy)  # x0, x1, y0, y1: label pixels of the matrix's bounding box
    x0, x1, y0, y1 = box
    ids = present_labels(labels, y0, y1 + 1, x0, x1 + 1, band_rows)
    if len(ids) and ids[-1] > UINT32_MAX:
        raise SegRefineError(f"{labels.path}: label id {int(ids[-1])} does not fit in uint32")
    geo = cell_centres(labels, ids, band_rows)
    layout = _cell_layout(ids, geo, spill.origin, gx1, gy1)
    cell, row_of_rank = layout["cell"], layout["row_of_rank"]
    borders = _spill_borders(labels, ids, geo, row_of_rank, work, band_rows, source)
    del geo
    partials, per_cell = _partial_sums(
        spill, labels, _Index(ids), row_of_rank, cell, box, work, band_records, band_rows
    )
    merged = _merge_partials(partials, per_cell, cell, spill.genes, layout["label_id"], work, band_records, source)
    del per_cell
    gene = _gene_table(spill.genes, merged["cell_count"], merged["gene_umis"], merged["gene_max"])
    tables = {
        "label_id": layout["label_id"],
        "cell": cell,
        "gene": gene,
        "block_index": layout["block_index"],
        "block_size": layout["block_size"],
        "max_x": layout["max_x"],
        "max_y": layout["max_y"],
        "max_count": merged["max_count"],
        "n_exp": merged["n_exp"],
    }
    gene_offset = gene["offset"].astype(np.int64)
    fill_cell_exp = partial(_fill_cell_exp, merged["cell_exp"])
    fill_gene_exp = partial(_fill_gene_exp, merged["by_gene"], merged["cell_count"], gene_offset, band_records)
    fill_border = partial(_fill_border, borders, len(cell), source)
    write_cgef(tables, out_path, fill_cell_exp, fill_gene_exp, fill_border, resolution)
    return tables


def _cell_layout(ids: np.ndarray, geo: Dict[str, np.ndarray], origin: Tuple[int, int], gx1: int, gy1: int) -> dict:
    """The cell table in its final order: cells by the 256 x 256 block of their centre (row-major over 0..max),
    then by label id.

    ``ids``: the sorted label ids; ``geo``: their ``cell_centres``; ``origin``: the GEM coordinate of label pixel
    (0, 0); ``gx1``, ``gy1``: the matrix's largest GEM x and y. Returns ``cell`` (``CELL_DTYPE``: id, centre in GEM
    coordinates and area filled; the counts and offsets are filled by the later passes), ``row_of_rank`` (the
    final row of the j-th smallest label id), ``label_id`` (uint32, per final row), ``block_index``,
    ``block_size``, ``max_x`` and ``max_y``. Per-cell arrays are kept in the table's narrow dtypes, not int64.
    """
    ox, oy = origin
    cx, cy = geo["cx"] + ox, geo["cy"] + oy  # GEM coordinates of the centres
    max_x = int(max(gx1, cx.max() if len(cx) else 0))
    max_y = int(max(gy1, cy.max() if len(cy) else 0))
    nbx, nby = max_x // BLOCK + 1, max_y // BLOCK + 1
    block = np.clip(cy, 0, None) // BLOCK * nbx + np.clip(cx, 0, None) // BLOCK
    order = np.lexsort((ids, block))
    n_cells = len(ids)
    row_of_rank = np.empty(n_cells, np.uint32)
    row_of_rank[order] = np.arange(n_cells)
    cell = np.zeros(n_cells, CELL_DTYPE)
    cell["id"] = np.arange(n_cells)
    cell["x"], cell["y"], cell["area"] = cx[order], cy[order], geo["area"][order]
    return {
        "cell": cell,
        "row_of_rank": row_of_rank,
        "label_id": ids[order].astype(np.uint32),
        "block_index": np.searchsorted(block[order], np.arange(nbx * nby + 1)).astype(np.uint32),
        "block_size": np.array([BLOCK, BLOCK, nbx, nby], np.uint32),
        "max_x": max_x,
        "max_y": max_y,
    }


def _spill_borders(
    labels, ids: np.ndarray, geo: Dict[str, np.ndarray], row_of_rank: np.ndarray, work, band_rows: int, source: str
) -> Runs:
    """The cells' star outlines (``cell_borders``), spilled to ``work`` band by band as the cells end, each run
    sorted by final cell row, for ``write_cgef`` to gather by rows. Refuses a cell that spans ``BORDER_PAD`` px or
    more from its centre."""
    borders = Runs(work, "borders", BORDER_RUN_DTYPE)

    def emit(cells, border):
        rows = row_of_rank[cells]
        by_row = np.argsort(rows)
        run = np.empty(len(cells), BORDER_RUN_DTYPE)
        run["k"], run["border"] = rows[by_row], border[by_row]
        borders.add(run)

    if cell_borders(labels, ids, geo["cy"], geo["cx"], geo["last"], emit, band_rows):
        raise SegRefineError(f"{source}: a cell spans more than {BORDER_PAD} px from its centre (not a cell)")
    return borders


def _partial_sums(
    spill: RecordSpill,
    labels,
    index: _Index,
    row_of_rank: np.ndarray,
    cell: np.ndarray,
    box: Tuple[int, int, int, int],
    work,
    band_records: int,
    band_rows: int,
) -> Tuple[Runs, np.ndarray]:
    """Pass 2, by bands of label rows of ``box`` (x0, x1, y0, y1, inclusive) holding at most ``band_records``
    records: the (cell row, gene) partial sums of each band, spilled to ``work`` as runs sorted by cell row.

    Also counts the distinct DNBs of each cell into ``cell["dnbCount"]``. Returns the runs and the number of
    partials per cell row (to size the merge buckets). Each temporary is dropped as soon as it is used, so
    memory follows the band size.
    """
    x0, x1, y0, y1 = box
    n_genes = len(spill.genes)
    partials = Runs(work, "partials", PARTIAL_DTYPE)
    per_cell = np.zeros(len(row_of_rank), np.int64)
    dnb_count = cell["dnbCount"]
    W = int(x1 - x0 + 1)
    for a, b in _buckets(spill.per_row[y0 : y1 + 1], band_records, band_rows):
        a, b = a + y0, b + y0
        rec = spill.band(a, b)
        if not len(rec):
            continue  # an empty band: nothing to read
        band = labels.rows(a, b, x0, x1 + 1)
        ry = rec["k"].astype(np.int64) - a
        rx = rec["x"].astype(np.int64) - x0
        lab = band[ry, rx]
        del band
        inc = lab > 0
        if not inc.any():
            continue
        pix = ry[inc] * W + rx[inc]
        del ry, rx
        row = row_of_rank[index(lab[inc])].astype(np.int64)
        del lab
        key = row * n_genes + rec["gene"][inc]
        count = rec["count"][inc]
        del rec, inc
        ukey, inv = np.unique(key, return_inverse=True)
        del key
        part = np.empty(len(ukey), PARTIAL_DTYPE)
        part["k"], part["gene"] = ukey // n_genes, ukey % n_genes
        del ukey
        part["count"] = np.bincount(inv.ravel(), weights=count, minlength=len(part))
        del inv, count
        partials.add(part)
        c, n = np.unique(part["k"], return_counts=True)
        per_cell[c] += n
        del part
        _, first = np.unique(pix, return_index=True)  # a DNB lies in one label: count distinct DNBs per cell
        del pix
        c, n = np.unique(row[first], return_counts=True)
        dnb_count[c] += n.astype(np.uint32)
        del row, first
    return partials, per_cell


def _merge_partials(
    partials: Runs,
    per_cell: np.ndarray,
    cell: np.ndarray,
    genes,
    label_id: np.ndarray,
    work,
    band_records: int,
    source: str,
) -> dict:
    """The partial sums merged by buckets of cell rows (at most ``band_records`` partials each): per bucket, one
    cellExp file in final order (``cell_exp``: their paths, in order) and one run by gene for geneExp
    (``by_gene``).

    Fills ``cell``'s geneCount, expCount and offset. Returns also the per-gene ``cell_count``, ``gene_umis`` and
    ``gene_max`` (int64), ``n_exp`` (the cell-gene entries) and ``max_count``. Refuses a cell-gene count above
    65,535 and more entries than the layout's uint32 offsets hold.
    """
    n_genes = len(genes)
    gene_count, exp_count = cell["geneCount"], cell["expCount"]
    n_exp = max_exp = max_count = 0
    cell_count = np.zeros(n_genes, np.int64)
    gene_umis = np.zeros(n_genes, np.int64)
    gene_max = np.zeros(n_genes, np.int64)
    by_gene = Runs(work, "bygene", BY_GENE_DTYPE)
    cell_exp: List[Path] = []
    for c0, c1 in _buckets(per_cell, band_records):
        c_row, c_gene, summed = _sum_bucket(partials.take(c0, c1), n_genes)
        if len(summed) and summed.max() > 65535:
            i = int(np.argmax(summed))
            raise SegRefineError(
                f"{source}: cell {label_id[c_row[i]]} has {summed[i]} UMIs of gene {genes[c_gene[i]]}; "
                "the cgef layout stores at most 65,535 per cell and gene"
            )
        gene_count[c0:c1] = np.bincount(c_row - c0, minlength=c1 - c0)
        umis = np.bincount(c_row - c0, weights=summed, minlength=c1 - c0).astype(np.int64)
        n_exp, max_exp = n_exp + len(summed), max(max_exp, int(umis.max()) if len(umis) else 0)
        exp_count[c0:c1] = umis
        cell_count += np.bincount(c_gene, minlength=n_genes)
        gene_umis += np.bincount(c_gene, weights=summed, minlength=n_genes).astype(np.int64)
        np.maximum.at(gene_max, c_gene, summed)
        max_count = max(max_count, int(summed.max()) if len(summed) else 0)
        _spill_bucket(c_row, c_gene, summed, cell_exp, by_gene, work)
        del summed, c_row, c_gene
    if n_exp > UINT32_MAX or max_exp > UINT32_MAX:
        raise SegRefineError(f"{source}: {n_exp} cell-gene entries do not fit the cgef layout's uint32 offsets")
    if len(cell):
        cell["offset"][1:] = np.cumsum(gene_count[:-1], dtype=np.int64)
    return {
        "cell_exp": cell_exp,
        "by_gene": by_gene,
        "cell_count": cell_count,
        "gene_umis": gene_umis,
        "gene_max": gene_max,
        "n_exp": n_exp,
        "max_count": max_count,
    }


def _sum_bucket(part: np.ndarray, n_genes: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The partials of one merge bucket summed per (cell row, gene): cell rows, genes and sums (int64), sorted
    by (cell row, gene)."""
    key = part["k"].astype(np.int64) * n_genes + part["gene"]
    ukey, inv = np.unique(key, return_inverse=True)
    summed = np.bincount(inv.ravel(), weights=part["count"], minlength=len(ukey)).astype(np.int64)
    del part, key, inv
    return ukey // n_genes, ukey % n_genes, summed


def _spill_bucket(
    c_row: np.ndarray, c_gene: np.ndarray, summed: np.ndarray, cell_exp: List[Path], by_gene: Runs, work: Path
) -> None:
    """One merge bucket's sums (``_sum_bucket``) spilled to ``work``: its cellExp entries (already in final order)
    as the next file of ``cell_exp``, and its entries sorted by (gene, cell row) as a run of ``by_gene``."""
    exp = np.empty(len(summed), CELL_EXP_DTYPE)
    exp["geneID"], exp["count"] = c_gene, summed
    cell_exp.append(work / f"cellexp.{len(cell_exp)}.npy")
    np.save(cell_exp[-1], exp)
    del exp
    perm = np.lexsort((c_row, c_gene))
    run = np.empty(len(perm), BY_GENE_DTYPE)
    run["k"], run["cellID"], run["count"] = c_gene[perm], c_row[perm], summed[perm]
    by_gene.add(run)


def _gene_table(genes, cell_count: np.ndarray, gene_umis: np.ndarray, gene_max: np.ndarray) -> np.ndarray:
    """The gene table (``GENE_DTYPE``): every gene of the matrix in code order, with the offset of its slice of
    geneExp, its number of cells, its UMIs and its largest count in one cell."""
    gene = np.zeros(len(genes), GENE_DTYPE)
    gene["geneName"] = [str(g).encode() for g in genes]
    gene["offset"] = np.concatenate([[0], np.cumsum(cell_count)[:-1]]) if len(genes) else []
    gene["cellCount"], gene["expCount"], gene["maxMIDcount"] = cell_count, gene_umis, gene_max
    return gene


def _fill_cell_exp(cell_exp: List[Path], ds) -> None:
    """Fill the cellExp dataset ``ds`` from the merge's cellExp files, in order, removing each once copied."""
    at = 0
    for path in cell_exp:
        exp = np.load(path)
        if len(exp):
            ds[at : at + len(exp)] = exp
        at += len(exp)
        os.remove(path)


def _fill_gene_exp(by_gene: Runs, cell_count: np.ndarray, gene_offset: np.ndarray, band_records: int, ds) -> None:
    """Fill the geneExp dataset ``ds`` by buckets of genes (at most ``band_records`` entries each), each gene's
    (cellID, count) sorted by cell, at the gene's ``gene_offset``."""
    for g0, g1 in _buckets(cell_count, band_records):
        run = by_gene.take(g0, g1)
        if not len(run):
            continue
        run = run[np.lexsort((run["cellID"], run["k"]))]
        exp = np.empty(len(run), GENE_EXP_DTYPE)
        exp["cellID"], exp["count"] = run["cellID"], run["count"]
        ds[gene_offset[g0] : gene_offset[g0] + len(exp)] = exp


def _fill_border(borders: Runs, n_cells: int, source: str, ds) -> None:
    """Fill the cellBorder dataset ``ds`` from the spilled outlines by blocks of ``BORDER_ROWS`` cell rows; every
    cell row must have exactly one outline."""
    for c0, c1 in _bands(0, n_cells, BORDER_ROWS):
        run = borders.take(c0, c1)
        if len(run) != c1 - c0:
            raise SegRefineError(f"{source}: internal error: {len(run)} outlines for cells {c0}..{c1 - 1}")
        ds[c0:c1] = run["border"][np.argsort(run["k"], kind="stable")]


def write_cgef(
    tables: Dict[str, np.ndarray], path, fill_cell_exp, fill_gene_exp, fill_border, resolution: int = 500
) -> None:
    """Write the tables of ``exact_cell_bin`` as a cgef; cellBorder, cellExp and geneExp are created whole and
    filled by slices (``fill_*(dataset)``)."""
    import h5py

    cell = tables["cell"]
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
        for name, fld in (
            ("Area", "area"),
            ("DnbCount", "dnbCount"),
            ("ExpCount", "expCount"),
            ("GeneCount", "geneCount"),
        ):
            _stats(d, name, cell[fld], u32)
        for name, fld in (("X", "x"), ("Y", "y")):
            v = cell[fld]
            d.attrs[f"max{name}"] = np.array([v.max() if len(v) else 0], np.int32)
            d.attrs[f"min{name}"] = np.array([v.min() if len(v) else 0], np.int32)
        b = g.create_dataset("cellBorder", shape=(len(cell), BORDER_POINTS, 2), dtype=np.int16)
        fill_border(b)
        lo, hi = {}, {}
        for c0, c1 in _bands(0, len(cell), BORDER_ROWS):  # the outline's extent in GEM coordinates, by blocks
            part = b[c0:c1]
            real = part[..., 0] != BORDER_PAD
            for i, name in ((0, "X"), (1, "Y")):
                v = (part[..., i].astype(np.int64) + cell[name.lower()][c0:c1, None])[real]
                if len(v):
                    lo[name] = min(lo.get(name, int(v.min())), int(v.min()))
                    hi[name] = max(hi.get(name, int(v.max())), int(v.max()))
        for name in ("X", "Y"):
            b.attrs[f"max{name}"] = np.array([hi.get(name, 0)], np.int32)
            b.attrs[f"min{name}"] = np.array([lo.get(name, 0)], np.int32)
        ce = g.create_dataset("cellExp", shape=(tables["n_exp"],), dtype=CELL_EXP_DTYPE)
        fill_cell_exp(ce)
        ce.attrs["maxCount"] = np.array([tables["max_count"]], np.uint16)
        g.create_dataset("cellTypeList", data=np.array([b"default"], "S32"))
        gd = g.create_dataset("gene", data=tables["gene"])
        for name, fld in (("CellCount", "cellCount"), ("ExpCount", "expCount")):
            v = tables["gene"][fld]
            gd.attrs[f"max{name}"] = np.array([v.max() if len(v) else 0], u32)
            gd.attrs[f"min{name}"] = np.array([v.min() if len(v) else 0], u32)
        ge = g.create_dataset("geneExp", shape=(tables["n_exp"],), dtype=GENE_EXP_DTYPE)
        fill_gene_exp(ge)
        ge.attrs["maxCount"] = ce.attrs["maxCount"]


def open_cell_bin(path, tables: Tuple[str, ...]):
    """A cgef opened read-only (``h5py.File``, for a ``with`` block) that holds ``cellBin/<t>`` for each of
    ``tables``; a clear error naming the file when it cannot be read or lacks one of them."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise SegRefineError(f"{path}: not a readable cell-bin GEF ({exc})") from None
    if any(f"cellBin/{t}" not in f for t in tables):
        f.close()
        names = f"{', '.join(tables[:-1])} and {tables[-1]} tables" if len(tables) > 1 else f"{tables[0]} table"
        raise SegRefineError(f"{path}: no cellBin/{names} (not a cell-bin GEF)")
    return f


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
