"""Downstream quality of a segmentation: does each cell's expression come from one cell?

Two measures, per whole-slide stage (docs/expression.md, "Purity"):

- ``truth_purity`` (a sample with ground truth, like the demo): every transcript
  at DNB (x, y) has a true cell, the truth label at that pixel (0: background).
  Per segmented cell with at least one UMI: its *dominant* true cell (the true
  cell giving it the most UMIs; ties to the lower id; none when all its UMIs
  are background), ``purity`` = UMIs from the dominant true cell / all its
  UMIs, ``second_fraction`` = UMIs from the second true cell / all its UMIs,
  ``other_fraction`` = UMIs from every true cell but the dominant one / all its
  UMIs, ``mixed`` when ``other_fraction >= mixed_fraction`` (default 0.10: one
  UMI in ten from other cells, ten times what the demo's background gives a
  cell; counting all other cells, not only the second, so that a merge of many
  small cells, each giving less than the threshold, is mixed too), and, with
  marker sets, ``marker_purity`` = marker UMIs of the
  cell's own type (the dominant true cell's type) / all its marker UMIs.
- ``mecr`` (any sample, no truth): the mutually exclusive co-expression rate
  of Hartman & Satija (2024): for a pair of markers of two different cell
  types, the cells expressing both / the cells expressing at least one;
  ``mecr`` is the mean over all such pairs with at least one expressing cell.
  Also the fraction of cells expressing markers of two or more types among
  the cells expressing any marker. Lower is better for both.

Both stream. ``truth_purity`` reads the expression in chunks and spills it
by label row (``segrefine.cgef.RecordSpill``, as the cgef step does), then
reads the segmentation and the truth labels band by band
(``segrefine.expression.LabelImage``): memory follows the band, the chunk and
the number of (cell, true cell, marker type) triples. ``mecr`` reads only the
marker genes' slices of the cgef's ``cellBin/geneExp``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from itertools import combinations
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.purity")

MIXED_FRACTION = 0.10
CELL_COLUMNS = (
    "label_id",
    "umis",
    "dominant_truth",
    "truth_type",
    "purity",
    "second_fraction",
    "other_fraction",
    "background_fraction",
    "mixed",
    "marker_umis",
    "marker_purity",
)
PAIR_COLUMNS = ("sample", "stage", "gene_a", "type_a", "gene_b", "type_b", "cells_a", "cells_b", "cells_both", "mecr")
_TRIPLE = np.dtype([("seg", "<u8"), ("tru", "<u8"), ("kind", "<i8"), ("umis", "<i8")])


# --- inputs -----------------------------------------------------------------------------------------------------------
def check_markers(markers) -> Dict[str, List[str]]:
    """``{type: [genes]}`` with at least two types, each with genes, no gene in two types (a config error
    otherwise)."""
    if not isinstance(markers, dict) or len(markers) < 2:
        raise SegRefineError(f"markers {markers!r}: expected at least two cell types, each with a list of marker genes")
    out: Dict[str, List[str]] = {}
    owner: Dict[str, str] = {}
    for kind, genes in markers.items():
        if isinstance(genes, str) or not genes or not all(isinstance(g, str) and g for g in genes):
            raise SegRefineError(
                f"markers of cell type {kind!r}: expected a non-empty list of gene names, got {genes!r}"
            )
        for g in genes:
            if g in owner and owner[g] != str(kind):
                raise SegRefineError(
                    f"marker gene {g!r} is given for two cell types ({owner[g]!r}, {kind!r}); "
                    "the markers of different types must be mutually exclusive"
                )
            owner[g] = str(kind)
        out[str(kind)] = list(dict.fromkeys(genes))
    return out


def read_markers(spec) -> Dict[str, List[str]]:
    """Marker sets from a JSON object (the rule passes the config's ``expression.markers``) or a JSON file."""
    text = spec
    if isinstance(spec, str) and Path(spec).is_file():
        text = Path(spec).read_text()
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise SegRefineError(f"markers {spec!r}: not valid JSON ({exc})") from None
    return check_markers(value)


def read_truth_types(path) -> Dict[int, str]:
    """``label,type`` CSV (the demo's ``{SN}-truth-types.csv``) -> {truth label: type}."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: truth cell types (label,type CSV) not found")
    try:
        table = pd.read_csv(path, dtype={"type": str})
    except Exception as exc:
        raise SegRefineError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    if list(table.columns[:2]) != ["label", "type"]:
        raise SegRefineError(f"{path}: expected the columns 'label,type', got {list(table.columns)}")
    if table["type"].isna().any() or not pd.api.types.is_integer_dtype(table["label"]) or (table["label"] <= 0).any():
        raise SegRefineError(f"{path}: every row needs a positive integer label and a type")
    if table["label"].duplicated().any():
        twice = int(table["label"][table["label"].duplicated()].iloc[0])
        raise SegRefineError(f"{path}: label {twice} is listed twice")
    return dict(zip(table["label"].astype(int), table["type"].astype(str)))


# --- truth-based purity -----------------------------------------------------------------------------------------------
def _reduce(parts: List[np.ndarray]) -> np.ndarray:
    """Sum the UMIs of equal (seg, tru, kind) keys."""
    t = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if not len(t):
        return t
    order = np.lexsort((t["kind"], t["tru"], t["seg"]))
    t = t[order]
    first = np.ones(len(t), bool)
    first[1:] = (t["seg"][1:] != t["seg"][:-1]) | (t["tru"][1:] != t["tru"][:-1]) | (t["kind"][1:] != t["kind"][:-1])
    out = t[first].copy()
    out["umis"] = np.add.reduceat(t["umis"], np.flatnonzero(first))
    return out


def triples(spill, labels, truth, gene_kind: np.ndarray, band_rows: int, limit: int = 1 << 21) -> np.ndarray:
    """(segmented cell, true cell, marker kind, UMIs) summed over the spilled records, label rows band by band;
    records outside segmented cells are dropped. ``gene_kind``: per final gene code, 0 (not a marker) or 1 + the
    index of its cell type."""
    H = labels.shape[0]
    parts: List[np.ndarray] = []
    held = 0
    for y0 in range(0, H, band_rows):
        y1 = min(H, y0 + band_rows)
        if not spill.per_row[y0:y1].any():
            continue
        rec = spill.band(y0, y1)
        rows = rec["k"].astype(np.int64) - y0
        cols = rec["x"].astype(np.int64)
        seg = labels.rows(y0, y1)[rows, cols]
        keep = seg > 0
        if not keep.any():
            continue
        tru = truth.rows(y0, y1)[rows[keep], cols[keep]]
        t = np.empty(int(keep.sum()), _TRIPLE)
        t["seg"], t["tru"] = seg[keep], tru
        t["kind"] = gene_kind[rec["gene"][keep].astype(np.int64)]
        t["umis"] = rec["count"][keep]
        parts.append(_reduce([t]))
        held += len(parts[-1])
        if held > limit and len(parts) > 1:
            parts = [_reduce(parts)]
            held = len(parts[0])
    return _reduce(parts) if parts else np.empty(0, _TRIPLE)


def cell_purity(
    t: np.ndarray, truth_types: Optional[Dict[int, str]], kinds: Sequence[str], mixed_fraction: float = MIXED_FRACTION
):
    """Per-cell table (``CELL_COLUMNS``) from the (seg, tru, kind, umis) triples."""
    import pandas as pd

    cells, inv = np.unique(t["seg"], return_inverse=True)
    n = len(cells)
    umis = np.bincount(inv, weights=t["umis"], minlength=n)
    background = np.bincount(inv, weights=np.where(t["tru"] == 0, t["umis"], 0), minlength=n)
    # UMIs per (cell, true cell), true cells only, ordered by cell, UMIs descending, true id ascending
    fg = t["tru"] > 0
    pairs = t[fg].copy()
    pairs["kind"] = 0
    pairs = _reduce([pairs]) if len(pairs) else pairs
    p_cell = np.searchsorted(cells, pairs["seg"])
    order = np.lexsort((pairs["tru"], -pairs["umis"], p_cell))
    p_cell, p_tru, p_umis = p_cell[order], pairs["tru"][order], pairs["umis"][order]
    start = np.ones(len(p_cell), bool)
    start[1:] = p_cell[1:] != p_cell[:-1]
    dominant = np.zeros(n, np.int64)
    dom_umis = np.zeros(n)
    second = np.zeros(n)
    dominant[p_cell[start]] = p_tru[start]
    dom_umis[p_cell[start]] = p_umis[start]
    is_second = np.zeros(len(p_cell), bool)
    is_second[1:] = start[:-1] & ~start[1:]
    second[p_cell[is_second]] = p_umis[is_second]
    table = pd.DataFrame(
        {"label_id": cells.astype(np.int64), "umis": umis.astype(np.int64), "dominant_truth": dominant}
    )
    table["truth_type"] = [truth_types.get(int(d), "") if (truth_types and d) else "" for d in dominant]
    table["purity"] = dom_umis / umis
    table["second_fraction"] = second / umis
    table["other_fraction"] = np.clip(umis - background - dom_umis, 0, None) / umis
    table["background_fraction"] = background / umis
    table["mixed"] = table["other_fraction"] >= mixed_fraction
    marker = t["kind"] > 0
    table["marker_umis"] = np.bincount(inv[marker], weights=t["umis"][marker], minlength=n).astype(np.int64)
    own = np.zeros(n)
    if kinds:
        kind_of_type = {k: i + 1 for i, k in enumerate(kinds)}
        cell_kind = np.array([kind_of_type.get(x, -1) for x in table["truth_type"]], np.int64)
        mine = marker & (t["kind"] == cell_kind[inv])
        own = np.bincount(inv[mine], weights=t["umis"][mine], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mp = own / table["marker_umis"].to_numpy()
    mp[(table["marker_umis"].to_numpy() == 0) | (table["truth_type"].to_numpy() == "")] = np.nan
    table["marker_purity"] = mp if kinds else np.nan
    return table[list(CELL_COLUMNS)]


def summarize_purity(table, mixed_fraction: float = MIXED_FRACTION) -> dict:
    """Per-stage figures of a per-cell purity table."""
    n = len(table)
    mp = table["marker_purity"].dropna()

    def num(v):
        return float(v) if v == v else None  # NaN -> null in JSON

    return {
        "cells": int(n),
        "mixed_fraction_threshold": float(mixed_fraction),
        "cells_without_true_cell": int((table["dominant_truth"] == 0).sum()),
        "mean_purity": num(table["purity"].mean()) if n else None,
        "median_purity": num(table["purity"].median()) if n else None,
        "fraction_mixed": float(table["mixed"].mean()) if n else None,
        "mean_background_fraction": num(table["background_fraction"].mean()) if n else None,
        "cells_with_markers": int(len(mp)),
        "mean_marker_purity": float(mp.mean()) if len(mp) else None,
        "median_marker_purity": float(mp.median()) if len(mp) else None,
    }


def truth_purity(
    expression,
    labels_path,
    truth_path,
    truth_types_path=None,
    markers=None,
    mixed_fraction: float = MIXED_FRACTION,
    origin=None,
    out_cells=None,
    out_summary=None,
    chunk: Optional[int] = None,
    band_rows: Optional[int] = None,
    work_dir=None,
):
    """Per-cell purity of a segmentation against the truth labels (module docstring); returns (table, summary).

    ``expression``: GEM or bgef; ``labels_path``, ``truth_path``: label images of the same size, pixel (0, 0) at
    GEM coordinate ``origin`` (``auto``: the file's offsets, as `segrefine cgef`); ``markers``: ``{type: [genes]}``
    (marker purity needs them and ``truth_types_path``). The expression spills to a hidden ``.purity.<random>``
    folder in ``work_dir`` (default: the outputs' folder; one job at a time there), where those of killed runs are
    removed first; with neither, to the system's temporary folder."""
    import signal
    import sys
    import threading

    from segrefine.cgef import BAND_PIXELS, BAND_ROWS, RecordSpill
    from segrefine.expression import LabelImage, check_frame, resolve_origin
    from segrefine.gem import CHUNK_RECORDS, open_expression
    from segrefine.io import new_work_dir, write_text_atomic

    if not 0 < mixed_fraction <= 0.5:
        raise SegRefineError(f"mixed fraction {mixed_fraction}: expected a fraction in (0, 0.5]")
    markers = check_markers(markers) if markers else {}
    types = read_truth_types(truth_types_path) if truth_types_path else None
    reader = open_expression(expression, chunk or CHUNK_RECORDS)
    labels, truth = LabelImage(labels_path), LabelImage(truth_path)
    work = None
    previous = None
    if threading.current_thread() is threading.main_thread():  # a terminated job still removes its spill
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if truth.shape != labels.shape:
            raise SegRefineError(
                f"{truth_path}: the truth labels are {truth.shape[1]}x{truth.shape[0]} px but the "
                f"segmentation {labels_path} is {labels.shape[1]}x{labels.shape[0]}: "
                "not the same frame"
            )
        band_rows = band_rows or max(1, min(BAND_ROWS, BAND_PIXELS // max(1, labels.shape[1])))
        org, how = resolve_origin(reader, origin)
        if work_dir or out_cells or out_summary:
            work = new_work_dir(work_dir or Path(out_cells or out_summary).parent, ".purity.")
        else:  # a library call without outputs
            work = Path(tempfile.mkdtemp(prefix="segrefine-purity-"))
        spill = RecordSpill(reader, org, labels.shape, work)
        check_frame(spill, labels.shape, org, how, expression, labels_path)
        kinds = list(markers)
        gene_kind = np.zeros(len(spill.genes), np.int64)
        index = {g: i for i, g in enumerate(spill.genes)}
        for i, kind in enumerate(kinds):
            found = [index[g] for g in markers[kind] if g in index]
            if not found:
                raise SegRefineError(
                    f"{expression}: none of the markers of cell type {kind!r} "
                    f"({', '.join(markers[kind])}) is a gene of the matrix"
                )
            gene_kind[found] = i + 1
        t = triples(spill, labels, truth, gene_kind, band_rows)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        labels.close()
        truth.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    table = cell_purity(t, types, kinds if types else [], mixed_fraction)
    summary = summarize_purity(table, mixed_fraction)
    if types:
        summary["cells_per_type"] = {
            k: int(v) for k, v in table["truth_type"].replace("", "none").value_counts().sort_index().items()
        }
    if out_cells:
        write_text_atomic(out_cells, table.to_csv(index=False, float_format="%.6g"))
    if out_summary:
        write_text_atomic(out_summary, json.dumps(summary, indent=2) + "\n")
    log.info(
        "%s vs %s: %d cells, mean purity %s, %s mixed, mean marker purity %s",
        labels_path,
        truth_path,
        summary["cells"],
        summary["mean_purity"],
        summary["fraction_mixed"],
        summary["mean_marker_purity"],
    )
    return table, summary


# --- MECR -------------------------------------------------------------------------------------------------------------
def marker_cells(cgef, genes: Sequence[str]) -> Tuple[int, Dict[str, np.ndarray]]:
    """(number of cells, {gene: sorted cgef cell ids with a count > 0}) for the genes of a cgef that are in it."""
    from segrefine.cgef import open_cell_bin

    with open_cell_bin(cgef, ("cell", "gene", "geneExp")) as f:
        n = int(f["cellBin/cell"].shape[0])
        table = f["cellBin/gene"][:]  # one row per gene: small
        names = [g.decode() if isinstance(g, bytes) else str(g) for g in table["geneName"]]
        exp = f["cellBin/geneExp"]
        out = {}
        wanted = set(genes)
        for row, name in zip(table, names):
            if name in wanted:
                s, c = int(row["offset"]), int(row["cellCount"])
                part = exp[s : s + c]
                out[name] = np.unique(part["cellID"][part["count"] > 0].astype(np.int64))
    return n, out


def mecr(cgef, markers) -> Tuple[dict, List[dict]]:
    """MECR of a cgef (module docstring): (summary, one row per marker pair)."""
    markers = check_markers(markers)
    n, present = marker_cells(cgef, [g for genes in markers.values() for g in genes])
    return mecr_of_sets(n, present, markers)


def mecr_of_sets(n: int, present: Dict[str, np.ndarray], markers: Dict[str, List[str]]) -> Tuple[dict, List[dict]]:
    """MECR from, per marker gene, the sorted ids (0..n-1) of the cells expressing it: (summary, pair rows)."""
    missing = [g for genes in markers.values() for g in genes if g not in present]
    pairs = []
    for (ta, ga), (tb, gb) in combinations(markers.items(), 2):
        for a in ga:
            for b in gb:
                if a not in present or b not in present:
                    continue
                both = len(np.intersect1d(present[a], present[b], assume_unique=True))
                either = len(present[a]) + len(present[b]) - both
                pairs.append(
                    {
                        "gene_a": a,
                        "type_a": ta,
                        "gene_b": b,
                        "type_b": tb,
                        "cells_a": len(present[a]),
                        "cells_b": len(present[b]),
                        "cells_both": both,
                        "mecr": both / either if either else None,
                    }
                )
    values = [p["mecr"] for p in pairs if p["mecr"] is not None]
    has_type = np.zeros((len(markers), n), bool)
    for i, genes in enumerate(markers.values()):
        for g in genes:
            if g in present:
                has_type[i, present[g]] = True
    k = has_type.sum(axis=0)
    expressing = int((k > 0).sum())
    summary = {
        "cells": n,
        "pairs": len(pairs),
        "pairs_defined": len(values),
        "mecr": float(np.mean(values)) if values else None,
        "median_pair_mecr": float(np.median(values)) if values else None,
        "cells_with_markers": expressing,
        "fraction_coexpressing": float((k >= 2).sum() / expressing) if expressing else None,
        "markers_missing": missing,
    }
    return summary, pairs


# --- the step: all stages of a sample ---------------------------------------------------------------------------------
def purity_step(
    stages: Sequence[str],
    cgefs: Sequence,
    labels: Sequence,
    out_dir,
    expression=None,
    truth=None,
    truth_types=None,
    markers=None,
    mixed_fraction: float = MIXED_FRACTION,
    origin=None,
    sample: str = "",
) -> dict:
    """MECR (with markers) and the truth-based purity (with truth) of each stage of one sample, written to
    ``out_dir``: ``summary.json`` (per stage), ``mecr_pairs.csv`` (one row per stage and marker pair; only the
    header without markers) and ``cells.csv`` (one row per stage and cell, ``stage`` + ``CELL_COLUMNS``; only the
    header without truth). Returns the summary."""
    import pandas as pd

    from segrefine.io import write_text_atomic

    if not (len(stages) == len(cgefs) == len(labels)):
        raise SegRefineError(
            f"{len(stages)} stages, {len(cgefs)} cgefs and {len(labels)} label images: give one of each per stage"
        )
    if len(set(stages)) != len(stages):
        raise SegRefineError(f"stages {list(stages)}: each stage once")
    if not markers and not truth:
        raise SegRefineError("nothing to measure: give marker sets (--markers) and/or the truth labels (--truth)")
    if truth and not expression:
        raise SegRefineError("the truth-based purity needs the expression matrix (--expression)")
    markers = check_markers(markers) if markers else None
    out = Path(out_dir)
    result = {
        "sample": sample,
        "mixed_fraction_threshold": float(mixed_fraction),
        "markers": markers,
        "truth": str(truth) if truth else None,
        "stages": {},
    }
    pair_rows, tables = [], []
    for stage, cgef, lab in zip(stages, cgefs, labels):
        entry: dict = {}
        if markers:
            entry["mecr"], pairs = mecr(cgef, markers)
            pair_rows += [{"sample": sample, "stage": stage, **p} for p in pairs]
        if truth:
            table, entry["truth"] = truth_purity(
                expression, lab, truth, truth_types, markers, mixed_fraction, origin, work_dir=out
            )
            tables.append(table.assign(stage=stage)[["stage", *CELL_COLUMNS]])
        result["stages"][stage] = entry
    cells = pd.concat(tables) if tables else pd.DataFrame(columns=["stage", *CELL_COLUMNS])
    write_text_atomic(out / "cells.csv", cells.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(
        out / "mecr_pairs.csv",
        pd.DataFrame(pair_rows, columns=list(PAIR_COLUMNS)).to_csv(index=False, float_format="%.6g"),
    )
    write_text_atomic(out / "summary.json", json.dumps(result, indent=2) + "\n")
    return result


def purity_table(summaries: Sequence, clusters: Sequence = ()):
    """One row per (sample, stage) of `segrefine purity`'s summaries and `segrefine cluster-check`'s JSON files:
    cells, MECR, co-expressing fraction, purity, mixed fraction, marker purity, Leiden clusters and their ARI
    against the true types (empty where not measured)."""
    import pandas as pd

    rows: Dict[Tuple[str, str], dict] = {}

    def row(sample, stage):
        return rows.setdefault((sample, stage), {"sample": sample, "stage": stage})

    for path in summaries:
        doc = json.loads(Path(path).read_text())
        for stage, e in doc["stages"].items():
            r = row(doc["sample"], stage)
            m, t = e.get("mecr", {}), e.get("truth", {})
            r.update(
                cells=m.get("cells", t.get("cells")),
                mecr=m.get("mecr"),
                fraction_coexpressing=m.get("fraction_coexpressing"),
                mean_purity=t.get("mean_purity"),
                median_purity=t.get("median_purity"),
                fraction_mixed=t.get("fraction_mixed"),
                mean_marker_purity=t.get("mean_marker_purity"),
            )
    for path in clusters:
        doc = json.loads(Path(path).read_text())
        for stage, e in doc["stages"].items():
            r = row(doc["sample"], stage)
            r.setdefault("cells", e.get("cells"))
            r.update(leiden_clusters=e.get("clusters"), ari_true_type=e.get("ari"))
    columns = [
        "sample",
        "stage",
        "cells",
        "mecr",
        "fraction_coexpressing",
        "mean_purity",
        "median_purity",
        "fraction_mixed",
        "mean_marker_purity",
        "leiden_clusters",
        "ari_true_type",
    ]
    return pd.DataFrame(list(rows.values()), columns=columns)


PLOT_METRICS = (
    ("mean_purity", "mean purity (truth)"),
    ("fraction_mixed", "fraction of mixed cells (truth)"),
    ("mean_marker_purity", "mean marker purity (truth)"),
    ("mecr", "MECR (lower is better)"),
    ("fraction_coexpressing", "cells co-expressing two types' markers"),
    ("ari_true_type", "ARI of Leiden clusters vs true types"),
)


def plot_purity_table(table, path) -> None:
    """One panel per measure, one bar per (sample, stage); measures not taken are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segrefine.io import atomic_path

    metrics = [(k, t) for k, t in PLOT_METRICS if k in table and table[k].notna().any()]
    n = max(1, len(metrics))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    names = [f"{a}\n{b}" for a, b in zip(table["sample"], table["stage"])]
    for ax, (key, title) in zip(axes.ravel(), metrics):
        values = table[key].astype(float).to_numpy()
        ax.bar(
            range(len(values)),
            np.nan_to_num(values),
            color=["#9e9e9e" if "pretrained" in n_ else "#1f77b4" for n_ in names],
        )
        for i, v in enumerate(values):
            ax.text(i, np.nan_to_num(v), "n/a" if v != v else f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(names, fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel()[len(metrics) :]:
        ax.axis("off")
    if not metrics:
        axes[0, 0].text(0.5, 0.5, "no purity measure (no markers, no truth, no clusters)", ha="center")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
