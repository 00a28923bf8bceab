"""GEM and bin GEF files (Stereo-seq bin1 gene expression) and their exact aggregation by cell labels.

Accepted variants, as real files come: plain or gzip; with or without ``#``
header lines (``#OffsetX=``, ``#OffsetY=``, ``#Stereo-seqChip=``, ...); columns
``geneID``, optional ``geneName``, ``x``, ``y``, the count as ``MIDCount``,
``MIDCounts`` or ``UMICount``, optional ``ExonCount``. Problems are reported
with the file and, where possible, the line.

A bin GEF (``.bgef`` / ``.gef`` as gefpy or SAW write it) is read from its
``geneExp/bin1`` tables into the same arrays (``read_expression`` picks by content).

The exact aggregation is the reference the cgef is checked against: every
transcript at DNB (x, y) belongs to the cell whose label covers that pixel.
"""
from __future__ import annotations

import gzip
import io
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from segrefine import SegRefineError

COUNT_COLUMNS = ("MIDCount", "MIDCounts", "UMICount")


@dataclass
class Gem:
    genes: np.ndarray          # gene names (str), index = gene code
    gene: np.ndarray           # per record: gene code (int64)
    x: np.ndarray              # per record: DNB x (int64)
    y: np.ndarray              # per record: DNB y (int64)
    count: np.ndarray          # per record: UMI count (int64, > 0)
    header: Dict[str, str] = field(default_factory=dict)

    @property
    def offset(self) -> Tuple[int, int]:
        """The file's own (OffsetX, OffsetY): a transcript at (x, y) lies at chip/image (x + OffsetX, y + OffsetY)."""
        return int(self.header.get("OffsetX", 0)), int(self.header.get("OffsetY", 0))

    def extent(self) -> Tuple[int, int, int, int]:
        """(min x, max x, min y, max y) of the transcripts, inclusive."""
        if not len(self.x):
            return 0, -1, 0, -1
        return int(self.x.min()), int(self.x.max()), int(self.y.min()), int(self.y.max())


def is_hdf5(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def read_bgef(path) -> Gem:
    """Read the bin1 matrix of a bin GEF (bgef) into a Gem; refuses a cell-bin GEF."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "cellBin" in f and "geneExp" not in f:
                raise SegRefineError(f"{path}: a cell-bin GEF (cgef) is not an expression input; give the GEM or bgef")
            if "geneExp/bin1/expression" not in f or "geneExp/bin1/gene" not in f:
                raise SegRefineError(f"{path}: no geneExp/bin1 expression and gene tables (not a bin GEF)")
            exp = f["geneExp/bin1/expression"][:]
            genes = f["geneExp/bin1/gene"][:]
            header = {}
            for key, name in (("offsetX", "OffsetX"), ("offsetY", "OffsetY")):
                if key in f.attrs:
                    header[name] = str(int(np.asarray(f.attrs[key]).ravel()[0]))
    except OSError as exc:
        raise SegRefineError(f"{path}: cannot read as HDF5 ({exc}); truncated?") from exc
    name_field = "gene" if "gene" in genes.dtype.names else genes.dtype.names[0]
    names = np.array([g.decode() if isinstance(g, bytes) else str(g) for g in genes[name_field]], dtype=str)
    n_rec = genes["count"].astype(np.int64)
    if int(n_rec.sum()) != len(exp) or np.any(genes["offset"].astype(np.int64) != np.concatenate([[0], np.cumsum(n_rec)[:-1]])):
        raise SegRefineError(f"{path}: the gene table's offsets/counts do not tile the expression table")
    gene = np.repeat(np.arange(len(names), dtype=np.int64), n_rec)
    order = np.argsort(names, kind="stable")  # gene codes by sorted name, as read_gem does
    code = np.empty(len(names), np.int64)
    code[order] = np.arange(len(names))
    count = exp["count"].astype(np.int64)
    keep = count > 0
    return Gem(genes=names[order], gene=code[gene][keep], x=exp["x"].astype(np.int64)[keep],
               y=exp["y"].astype(np.int64)[keep], count=count[keep], header=header)


def read_expression(path) -> Gem:
    """A GEM (plain or gzip) or a bin GEF, told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: expression file (GEM or bgef) not found")
    return read_bgef(path) if is_hdf5(path) else read_gem(path)


def _open_text(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8") if gz else open(path, encoding="utf-8")


def read_gem(path) -> Gem:
    """Read a whole GEM (one chip region) into arrays; every error names the file (and line)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: GEM file not found")
    header: Dict[str, str] = {}
    n_header = 0
    try:
        with _open_text(path) as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                n_header += 1
                key, _, value = line[1:].strip().partition("=")
                header[key.strip()] = value.strip()
        with _open_text(path) as fh:
            for _ in range(n_header):
                fh.readline()
            columns = fh.readline().rstrip("\r\n").split("\t")
        count_col = next((c for c in COUNT_COLUMNS if c in columns), None)
        missing = [c for c in ("geneID", "x", "y") if c not in columns] + ([] if count_col else ["MIDCount"])
        if missing:
            raise SegRefineError(f"{path}: missing column(s) {missing}; found {columns} "
                                 f"(a count column is one of {list(COUNT_COLUMNS)})")
        table = None
        with _open_text(path) as fh:  # fast pass: integer columns parsed as integers
            for _ in range(n_header):
                fh.readline()
            try:
                table = pd.read_csv(fh, sep="\t", keep_default_na=False, na_filter=False,
                                    dtype={"geneID": str, "x": np.int64, "y": np.int64, count_col: np.int64})
            except (ValueError, TypeError, pd.errors.ParserError):
                table = None  # some value is not an integer or a line is malformed: find which, below
        if table is None:
            with _open_text(path) as fh:  # second pass: every field as text, for an exact message
                for _ in range(n_header):
                    fh.readline()
                table = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise SegRefineError(f"{path}: the gzip stream is damaged or ends early ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise SegRefineError(f"{path}: not a text GEM file ({exc})") from exc
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:  # pandas counts lines from the column line (1)
            raise SegRefineError(f"{path}:{n_header + int(m.group(2))}: malformed GEM line: {m.group(3)} fields, "
                                 f"the header names {m.group(1)}") from exc
        raise SegRefineError(f"{path}: malformed GEM table ({str(exc).strip()})") from exc
    first_data_line = n_header + 2  # 1-based: header lines, the column line, then data

    def integers(col: str, minimum: int) -> np.ndarray:
        if table[col].dtype.kind == "i":  # the fast pass parsed it
            values = table[col].to_numpy()
            bad = values < minimum
            if bad.any():
                i = int(np.argmax(bad))
                raise SegRefineError(f"{path}:{first_data_line + i}: column {col} must be an integer >= {minimum}, "
                                     f"got {str(values[i])!r}")
            return values.astype(np.int64)
        empty = (table[col] == "").to_numpy()
        if empty.any():
            i = int(np.argmax(empty))
            raise SegRefineError(f"{path}:{first_data_line + i}: malformed GEM line: no value in column {col} "
                                 f"(fewer fields than the header's {len(table.columns)})")
        values = pd.to_numeric(table[col], errors="coerce")
        bad = values.isna() | (values != values.round()) | (values < minimum)
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise SegRefineError(f"{path}:{first_data_line + i}: column {col} must be an integer >= {minimum}, "
                                 f"got {table[col].iloc[i]!r}")
        return values.to_numpy().astype(np.int64)

    x, y = integers("x", 0), integers("y", 0)
    count = integers(count_col, 0)
    codes, genes = pd.factorize(table["geneID"], sort=True)
    keep = count > 0  # zero-count records carry nothing
    return Gem(genes=np.asarray(genes, dtype=str), gene=codes[keep].astype(np.int64), x=x[keep], y=y[keep],
               count=count[keep], header=header)


def aggregate_by_labels(gem: Gem, labels: np.ndarray, origin: Tuple[int, int] = (0, 0)):
    """Exact cell x gene counts: (sorted cell ids, sparse CSR matrix cells x genes, UMIs outside cells).

    ``origin`` is the DNB coordinate of pixel (0, 0) of ``labels``; transcripts outside
    the label image count as outside cells.
    """
    from scipy import sparse

    ox, oy = origin
    lx, ly = gem.x - ox, gem.y - oy
    inside = (lx >= 0) & (ly >= 0) & (lx < labels.shape[1]) & (ly < labels.shape[0])
    cell = np.zeros(len(gem.count), np.int64)
    cell[inside] = labels[ly[inside], lx[inside]]
    in_cell = cell > 0
    ids, rows = np.unique(cell[in_cell], return_inverse=True)
    matrix = sparse.coo_matrix((gem.count[in_cell], (rows, gem.gene[in_cell])),
                               shape=(len(ids), len(gem.genes))).tocsr()
    matrix.sum_duplicates()
    return ids, matrix, int(gem.count[~in_cell].sum())


def density_labels(gem: Gem, origin: Tuple[int, int], shape: Tuple[int, int], sigma: float = 3.0,
                   min_distance: int = 5, radius: int = 5, min_rel: float = 0.2) -> np.ndarray:
    """Nucleus-like instance labels from the GEM's own UMI density (a mask for a GEM that has no image).

    The UMI density on the DNB grid is smoothed with a Gaussian (``sigma`` DNB);
    every local maximum at least ``min_distance`` DNB from a higher one and
    above ``min_rel`` x the highest is a cell centre; each cell takes the pixels
    within ``radius`` DNB that are nearer to its centre than to any other
    (touching cells where centres are close). Labels are numbered 1..n in
    row-major order of the centres; pixel (0, 0) is GEM coordinate ``origin``.
    """
    from scipy import ndimage

    ox, oy = origin
    H, W = shape
    lx, ly = gem.x - ox, gem.y - oy
    ok = (lx >= 0) & (ly >= 0) & (lx < W) & (ly < H)
    density = np.zeros((H, W), np.float64)
    np.add.at(density, (ly[ok], lx[ok]), gem.count[ok])
    smooth = ndimage.gaussian_filter(density, sigma)
    size = 2 * min_distance + 1
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size, mode="constant")) & (smooth > min_rel * smooth.max())
    seeds = np.zeros((H, W), np.uint32)
    py, px = np.nonzero(peaks)
    seeds[py, px] = np.arange(1, len(py) + 1, dtype=np.uint32)
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[iy, ix]
    labels[dist > radius] = 0
    return labels
