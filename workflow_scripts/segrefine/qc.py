"""Per-cell and per-sample QC of the cell-by-gene matrices: UMIs, genes and area per cell.

Input: the per-cell tables ``cellmap.csv`` that ``segrefine cgef`` writes beside
each cgef (one row per cell: label id, centre, area, UMIs, genes). Output folder:

- ``cells.csv``: every cell of every sample;
- ``summary.csv``: per sample, the number of cells, empty cells and the
  quantiles (5 %, 25 %, 50 %, 75 %, 95 %) and mean of UMIs, genes and area;
- ``extreme_area.csv``: cells whose area lies more than ``k`` x max(IQR, 10 %
  of the median) outside the quartiles of their sample (the over-merged or
  fragment cells a poor segmentation makes), largest first;
- ``distributions.png``: histograms of UMIs, genes and area per cell, one
  curve per sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np

from segrefine import SegRefineError

METRICS = (("total_counts", "UMIs per cell"), ("n_genes", "genes per cell"), ("area", "cell area (px)"))
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def read_cell_tables(cellmaps: Sequence, samples: Sequence[str]):
    import pandas as pd

    if len(cellmaps) != len(samples):
        raise SegRefineError(f"{len(cellmaps)} cell tables for {len(samples)} sample names")
    frames = []
    for path, sample in zip(cellmaps, samples):
        path = Path(path)
        if not path.is_file():
            raise SegRefineError(f"{path}: cell table not found")
        df = pd.read_csv(path)
        missing = [c for c in ("label_id", "x", "y", "area", "total_counts", "n_genes") if c not in df.columns]
        if missing:
            raise SegRefineError(f"{path}: missing column(s) {missing}")
        df.insert(0, "sample", sample)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summarize_cells(cells):
    import pandas as pd

    rows = []
    for sample, df in cells.groupby("sample", sort=False):
        row = {"sample": sample, "cells": len(df), "empty_cells": int((df["total_counts"] == 0).sum()),
               "umis_in_cells": int(df["total_counts"].sum())}
        for col, _ in METRICS:
            v = df[col].to_numpy(dtype=float)
            row[f"{col}_mean"] = float(v.mean()) if len(v) else float("nan")
            for q in QUANTILES:
                row[f"{col}_q{int(q * 100):02d}"] = float(np.quantile(v, q)) if len(v) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def extreme_area(cells, k: float = 3.0):
    """Cells beyond k x max(IQR, median / 10) outside the quartiles of their sample's areas, largest first."""
    import pandas as pd

    out = []
    for sample, df in cells.groupby("sample", sort=False):
        q1, med, q3 = np.quantile(df["area"].to_numpy(dtype=float), [0.25, 0.5, 0.75])
        spread = max(q3 - q1, 0.1 * med)  # a floor, so near-identical areas (IQR 0) flag nothing
        lo, hi = q1 - k * spread, q3 + k * spread
        sel = df[(df["area"] < lo) | (df["area"] > hi)].copy()
        sel["median_area"] = med
        sel["area_over_median"] = sel["area"] / med if med > 0 else np.nan
        sel["side"] = np.where(sel["area"] > hi, "large", "small")
        out.append(sel)
    cols = ["sample", "label_id", "x", "y", "area", "median_area", "area_over_median", "side", "total_counts",
            "n_genes"]
    res = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)
    return res[cols].sort_values(["sample", "area"], ascending=[True, False], ignore_index=True)


def plot_distributions(cells, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segrefine.io import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (col, title) in zip(axes, METRICS):
        values = cells[col].to_numpy(dtype=float)
        hi = float(np.quantile(values, 0.995)) if len(values) else 1.0
        # integer-valued counts: one bin per value while that gives few bins, else 40 even bins
        bins = np.arange(0, int(hi) + 2) - 0.5 if hi <= 60 else np.linspace(0, hi, 41)
        for sample, df in cells.groupby("sample", sort=False):
            v = df[col].to_numpy(dtype=float)
            ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, histtype="step", linewidth=1.5,
                    label=f"{sample} (n={len(v)}, median {np.median(v):.0f})")
        ax.set_xlabel(title)
        ax.set_ylabel("cells")
        ax.legend(fontsize=7)
    fig.suptitle("per-cell QC (values above the 99.5th percentile in the last bin)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def expression_qc(cellmaps: List, samples: List[str], out_dir, k: float = 3.0) -> None:
    from segrefine.io import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = read_cell_tables(cellmaps, samples)
    for name, df in (("cells.csv", cells), ("summary.csv", summarize_cells(cells)),
                     ("extreme_area.csv", extreme_area(cells, k))):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    plot_distributions(cells, out / "distributions.png")
