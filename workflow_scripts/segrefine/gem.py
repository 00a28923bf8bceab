"""GEM files (Stereo-seq bin1 gene expression) and their exact aggregation by cell labels.

Accepted variants, as real files come: plain or gzip; with or without ``#``
header lines (``#OffsetX=``, ``#OffsetY=``, ``#Stereo-seqChip=``, ...); columns
``geneID``, optional ``geneName``, ``x``, ``y``, the count as ``MIDCount``,
``MIDCounts`` or ``UMICount``, optional ``ExonCount``. Problems are reported
with the file and, where possible, the line.

The exact aggregation is the reference the cgef is checked against: every
transcript at DNB (x, y) belongs to the cell whose label covers that pixel.
"""
from __future__ import annotations

import gzip
import io
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
        return int(self.header.get("OffsetX", 0)), int(self.header.get("OffsetY", 0))


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
        with _open_text(path) as fh:  # second pass: skip the header lines, parse the table
            for _ in range(n_header):
                fh.readline()
            table = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise SegRefineError(f"{path}: the gzip stream is damaged or ends early ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise SegRefineError(f"{path}: not a text GEM file ({exc})") from exc
    except pd.errors.ParserError as exc:
        raise SegRefineError(f"{path}: malformed GEM table ({exc})") from exc
    count_col = next((c for c in COUNT_COLUMNS if c in table.columns), None)
    missing = [c for c in ("geneID", "x", "y") if c not in table.columns] + ([] if count_col else ["MIDCount"])
    if missing:
        raise SegRefineError(f"{path}: missing column(s) {missing}; found {list(table.columns)} "
                             f"(a count column is one of {list(COUNT_COLUMNS)})")
    first_data_line = n_header + 2  # 1-based: header lines, the column line, then data

    def integers(col: str, minimum: int) -> np.ndarray:
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
