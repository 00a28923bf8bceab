"""GEM and bin GEF files (Stereo-seq bin1 gene expression), read in chunks, and their exact aggregation by labels.

Accepted variants, as real files come: plain or gzip; with or without ``#``
header lines (``#OffsetX=``, ``#OffsetY=``, ``#Stereo-seqChip=``, ...); columns
``geneID``, optional ``geneName``, ``x``, ``y``, the count as ``MIDCount``,
``MIDCounts`` or ``UMICount``, optional ``ExonCount``. Problems are reported
with the file and, where possible, the line.

A bin GEF (``.bgef`` / ``.gef`` as gefpy or SAW write it) is read from its
``geneExp/bin1`` tables by HDF5 slices of the expression table.

``open_expression`` gives a reader whose ``chunks()`` yields at most ``chunk``
records at a time, so memory follows the chunk, not the file. Gene codes in the
chunks are provisional (order of first appearance in a GEM, row of the gene
table in a bgef); after a full pass ``gene_codes()`` gives the final coding:
genes by sorted name, every gene of the file included (zero-count ones too).
Zero-count records carry nothing and are dropped.

``read_gem``/``read_expression`` concatenate the chunks into a ``Gem`` held in
memory: for tests, benchmarks and small matrices only. The exact aggregation
``aggregate_by_labels`` is the in-memory reference the cgef is checked against:
every transcript at DNB (x, y) belongs to the cell whose label covers that pixel.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from segrefine import SegRefineError

COUNT_COLUMNS = ("MIDCount", "MIDCounts", "UMICount")
CHUNK_RECORDS = 1 << 21  # records per chunk (bgef table rows; GEM: about as many lines, chunk x 32 characters)


@dataclass
class Gem:
    genes: np.ndarray  # gene names (str), index = gene code
    gene: np.ndarray  # per record: gene code (int64)
    x: np.ndarray  # per record: DNB x (int64)
    y: np.ndarray  # per record: DNB y (int64)
    count: np.ndarray  # per record: UMI count (int64, > 0)
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


@dataclass
class Chunk:
    gene: np.ndarray  # provisional gene code (int64)
    x: np.ndarray  # int64
    y: np.ndarray  # int64
    count: np.ndarray  # int64, > 0


def is_hdf5(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


class _Reader:
    """Common part of the chunked readers: header, gene names, the final gene coding."""

    path: Path
    header: Dict[str, str]
    names: List[str]

    @property
    def offset(self) -> Tuple[int, int]:
        return int(self.header.get("OffsetX", 0)), int(self.header.get("OffsetY", 0))

    def gene_codes(self) -> Tuple[np.ndarray, np.ndarray]:
        """(gene names sorted, provisional code -> final code); complete after a full pass of ``chunks()``."""
        names = np.array(self.names, dtype=str)
        order = np.argsort(names, kind="stable")
        code = np.empty(len(names), np.int64)
        code[order] = np.arange(len(names))
        return names[order], code


class BgefReader(_Reader):
    """The bin1 matrix of a bin GEF (bgef), read by slices of ``geneExp/bin1/expression``; refuses a cgef."""

    def __init__(self, path, chunk: int = CHUNK_RECORDS):
        import h5py

        self.path, self.chunk = Path(path), max(1, int(chunk))
        try:
            with h5py.File(self.path, "r") as f:
                if "cellBin" in f and "geneExp" not in f:
                    raise SegRefineError(
                        f"{self.path}: a cell-bin GEF (cgef) is not an expression input; give the GEM or bgef"
                    )
                if "geneExp/bin1/expression" not in f or "geneExp/bin1/gene" not in f:
                    raise SegRefineError(f"{self.path}: no geneExp/bin1 expression and gene tables (not a bin GEF)")
                genes = f["geneExp/bin1/gene"][:]  # one row per gene: small
                self.n_records = len(f["geneExp/bin1/expression"])
                self.header = {}
                for key, name in (("offsetX", "OffsetX"), ("offsetY", "OffsetY")):
                    if key in f.attrs:
                        self.header[name] = str(int(np.asarray(f.attrs[key]).ravel()[0]))
        except OSError as exc:
            raise SegRefineError(f"{self.path}: cannot read as HDF5 ({exc}); truncated?") from exc
        name_field = "gene" if "gene" in genes.dtype.names else genes.dtype.names[0]
        self.names = [g.decode() if isinstance(g, bytes) else str(g) for g in genes[name_field]]
        n_rec = genes["count"].astype(np.int64)
        self.ends = np.cumsum(n_rec)
        if int(n_rec.sum()) != self.n_records or np.any(
            genes["offset"].astype(np.int64) != np.concatenate([[0], self.ends[:-1]])
        ):
            raise SegRefineError(f"{self.path}: the gene table's offsets/counts do not tile the expression table")

    def chunks(self) -> Iterator[Chunk]:
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                exp = f["geneExp/bin1/expression"]
                for s in range(0, self.n_records, self.chunk):
                    e = min(self.n_records, s + self.chunk)
                    part = exp[s:e]
                    gene = np.searchsorted(self.ends, np.arange(s, e), side="right").astype(np.int64)
                    count = part["count"].astype(np.int64)
                    keep = count > 0
                    yield Chunk(
                        gene=gene[keep],
                        x=part["x"].astype(np.int64)[keep],
                        y=part["y"].astype(np.int64)[keep],
                        count=count[keep],
                    )
        except OSError as exc:
            raise SegRefineError(f"{self.path}: cannot read as HDF5 ({exc}); truncated?") from exc


def _open_text(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8") if gz else open(path, encoding="utf-8")


class GemReader(_Reader):
    """A GEM (plain or gzip) read ``chunk`` lines at a time; every error names the file and line."""

    def __init__(self, path, chunk: int = CHUNK_RECORDS):
        self.path, self.chunk = Path(path), max(1, int(chunk))
        if not self.path.is_file():
            raise SegRefineError(f"{self.path}: GEM file not found")
        self.header: Dict[str, str] = {}
        self.n_header = 0
        with self._guard():
            with _open_text(self.path) as fh:
                line = fh.readline()
                while line.startswith("#"):
                    self.n_header += 1
                    key, _, value = line[1:].strip().partition("=")
                    self.header[key.strip()] = value.strip()
                    line = fh.readline()
        self.column_line = line.rstrip("\r\n")
        self.columns = self.column_line.split("\t")
        self.count_col = next((c for c in COUNT_COLUMNS if c in self.columns), None)
        missing = [c for c in ("geneID", "x", "y") if c not in self.columns] + ([] if self.count_col else ["MIDCount"])
        if missing:
            raise SegRefineError(
                f"{self.path}: missing column(s) {missing}; found {self.columns} "
                f"(a count column is one of {list(COUNT_COLUMNS)})"
            )
        self.names: List[str] = []
        self._code: Dict[str, int] = {}

    def _guard(self):
        import contextlib

        path = self.path

        @contextlib.contextmanager
        def guard():
            try:
                yield
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise SegRefineError(f"{path}: the gzip stream is damaged or ends early ({exc})") from exc
            except UnicodeDecodeError as exc:
                raise SegRefineError(f"{path}: not a text GEM file ({exc})") from exc

        return guard()

    def chunks(self) -> Iterator[Chunk]:
        """Blocks of about ``chunk`` lines (``chunk`` x 32 characters, cut at a line end; at least one line)."""
        self.names, self._code = [], {}
        first = self.n_header + 2  # 1-based line of the first data line
        with self._guard():
            with _open_text(self.path) as fh:
                for _ in range(self.n_header + 1):
                    fh.readline()
                rest = ""
                while True:
                    block = fh.read(self.chunk * 32)
                    text = rest + block
                    if not block:
                        rest = ""
                        if not text:
                            break
                        if not text.endswith("\n"):
                            text += "\n"
                    else:
                        cut = text.rfind("\n")
                        if cut < 0:
                            rest = text
                            continue
                        text, rest = text[: cut + 1], text[cut + 1 :]
                    fields = text[: text.find("\n")].rstrip("\r").count("\t") + 1
                    if fields > len(self.columns):  # pandas would take the extra fields of a chunk's first line
                        raise SegRefineError(
                            f"{self.path}:{first}: malformed GEM line: {fields} fields, "  # as index
                            f"the header names {len(self.columns)}"
                        )
                    yield self._parse(text, first)
                    first += text.count("\n")
                    del text

    def _parse(self, text: str, first: int) -> Chunk:
        """One chunk of data lines whose first is file line ``first``."""
        import pandas as pd

        path, col = self.path, self.count_col
        body = self.column_line + "\n" + text
        try:
            try:
                table = pd.read_csv(
                    io.StringIO(body),
                    sep="\t",
                    keep_default_na=False,
                    na_filter=False,
                    dtype={"geneID": "category", "x": np.int64, "y": np.int64, col: np.int64},
                )
            except (ValueError, TypeError, pd.errors.ParserError):
                # some value is not an integer or a line is malformed: every field as text, for an exact message
                table = pd.read_csv(io.StringIO(body), sep="\t", dtype=str, keep_default_na=False)
        except pd.errors.ParserError as exc:
            m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
            if m:  # pandas counts lines from the column line (1)
                raise SegRefineError(
                    f"{path}:{first - 2 + int(m.group(2))}: malformed GEM line: {m.group(3)} "
                    f"fields, the header names {m.group(1)}"
                ) from exc
            raise SegRefineError(f"{path}: malformed GEM table near line {first} ({str(exc).strip()})") from exc

        def integers(name: str, minimum: int) -> np.ndarray:
            if table[name].dtype.kind == "i":  # the fast pass parsed it
                values = table[name].to_numpy()
                bad = values < minimum
                if bad.any():
                    i = int(np.argmax(bad))
                    raise SegRefineError(
                        f"{path}:{first + i}: column {name} must be an integer >= {minimum}, got {str(values[i])!r}"
                    )
                return values.astype(np.int64)
            empty = (table[name] == "").to_numpy()
            if empty.any():
                i = int(np.argmax(empty))
                raise SegRefineError(
                    f"{path}:{first + i}: malformed GEM line: no value in column {name} "
                    f"(fewer fields than the header's {len(table.columns)})"
                )
            values = pd.to_numeric(table[name], errors="coerce")
            bad = values.isna() | (values != values.round()) | (values < minimum)
            if bad.any():
                i = int(np.argmax(bad.to_numpy()))
                raise SegRefineError(
                    f"{path}:{first + i}: column {name} must be an integer >= {minimum}, got {table[name].iloc[i]!r}"
                )
            return values.to_numpy().astype(np.int64)

        x, y = integers("x", 0), integers("y", 0)
        count = integers(col, 0)
        names = table["geneID"]
        if isinstance(names.dtype, pd.CategoricalDtype):  # the fast pass: one string per gene, not per record
            codes, uniques = names.cat.codes.to_numpy().astype(np.int64), list(names.cat.categories)
        else:
            codes, uniques = pd.factorize(names)
        local = np.empty(len(uniques), np.int64)
        for i, name in enumerate(uniques):
            c = self._code.get(name)
            if c is None:
                c = self._code[name] = len(self.names)
                self.names.append(name)
            local[i] = c
        keep = count > 0  # zero-count records carry nothing
        return Chunk(gene=local[codes[keep]], x=x[keep], y=y[keep], count=count[keep])


def open_expression(path, chunk: int = CHUNK_RECORDS):
    """A GEM (plain or gzip) or a bin GEF, told apart by content, as a chunked reader."""
    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: expression file (GEM or bgef) not found")
    return BgefReader(path, chunk) if is_hdf5(path) else GemReader(path, chunk)


def _whole(reader) -> Gem:
    parts = list(reader.chunks())
    genes, code = reader.gene_codes()

    def cat(name):
        return np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0, np.int64)

    return Gem(
        genes=genes, gene=code[cat("gene")], x=cat("x"), y=cat("y"), count=cat("count"), header=dict(reader.header)
    )


def read_gem(path, chunk: int = CHUNK_RECORDS) -> Gem:
    """A whole GEM in memory (small files: tests, benchmarks); the cgef step streams instead."""
    return _whole(GemReader(path, chunk))


def read_bgef(path, chunk: int = CHUNK_RECORDS) -> Gem:
    """A whole bgef's bin1 matrix in memory (small files: tests, benchmarks)."""
    return _whole(BgefReader(path, chunk))


def read_expression(path, chunk: int = CHUNK_RECORDS) -> Gem:
    """A whole GEM or bin GEF in memory, told apart by content (small files only)."""
    return _whole(open_expression(path, chunk))


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
    matrix = sparse.coo_matrix(
        (gem.count[in_cell], (rows, gem.gene[in_cell])), shape=(len(ids), len(gem.genes))
    ).tocsr()
    matrix.sum_duplicates()
    return ids, matrix, int(gem.count[~in_cell].sum())


def density_labels(
    gem: Gem,
    origin: Tuple[int, int],
    shape: Tuple[int, int],
    sigma: float = 3.0,
    min_distance: int = 5,
    radius: int = 5,
    min_rel: float = 0.2,
) -> np.ndarray:
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
