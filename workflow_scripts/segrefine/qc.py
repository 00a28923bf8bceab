"""Per-cell and per-sample QC of the cell-by-gene matrices: UMIs, genes and area per cell,
per sample and segmentation stage, and before vs after fine-tuning.

Input: the per-cell tables ``cellmap.csv`` that ``segrefine cgef`` writes beside
each cgef (one row per cell: label id, centre, area, UMIs, genes), each named by
its sample and, optionally, its stage (the workflow segments each slide with the
pretrained and the fine-tuned model, docs/expression.md). Output folder:

- ``cells.csv``: every cell of every sample and stage;
- ``summary.csv``: per sample and stage, the number of cells, empty cells, UMIs
  in cells, the quantiles (5 %, 25 %, 50 %, 75 %, 95 %), mean and maximum of UMIs,
  genes and area, and the number of cells of extreme area on either side; with
  the cgef steps' alignment reports also the matrix's UMIs, the fraction of them
  in cells, and the alignment check (the best shift of the matrix, the fraction
  in cells there, and whether the matrix looks misaligned);
- ``extreme_area.csv``: cells whose area lies more than ``k`` x max(IQR, 10 %
  of the median) outside the quartiles of their sample and stage (the
  over-merged or fragment cells a poor segmentation makes), largest first;
- ``distributions.png``: histograms of UMIs, genes and area per cell; one curve
  per sample, or, with two stages, one row per sample with both stages overlaid,
  their medians and the Mann-Whitney p-value;
- ``before_after.csv`` (two stages only): per sample and metric, the two stages'
  cell numbers, medians, means, the median ratio after / before, the two-sided
  Mann-Whitney U test (they are different cells, not pairs) and the probability
  that a cell after exceeds a cell before (ties count half).
- cells stages (``<stage>_cells``: the nuclei of a stage grown into cells,
  ``segrefine.cells``) get their rows in ``summary.csv`` beside the nuclei's,
  their curves in the plot, and, with both stages, their own before/after rows
  in ``before_after.csv`` (``pretrained_cells`` vs ``finetuned_cells``);
- ``saw_comparison.csv`` (with reference stages): SAW's own cells (stages named
  ``saw_*``: ``saw_nuclei`` from its ``cellbin.gef``, ``saw_cells`` from its
  ``adjusted.cellbin.gef``, read by ``segrefine saw-cells``) against our last
  stage (fine-tuned), per sample and metric, as ``before_after.csv`` compares
  the stages: the same columns, "before" being SAW's. Reference stages also
  get their rows in ``summary.csv`` and their curves in the plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from segrefine import SegRefineError

METRICS = (("total_counts", "UMIs per cell"), ("n_genes", "genes per cell"), ("area", "cell area (px)"))
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def table_stages(n: int, stages: Optional[Sequence[str]] = None) -> List[str]:
    """The stage of each of ``n`` cell tables: "" when none is given, one for all, or one each."""
    stages = [""] * n if not stages else list(stages)
    return stages * n if len(stages) == 1 else stages


def read_cell_tables(cellmaps: Sequence, samples: Sequence[str], stages: Optional[Sequence[str]] = None):
    """All cell tables in one frame with ``sample`` and ``stage`` columns (stage "" when not given)."""
    import pandas as pd

    if len(cellmaps) != len(samples):
        raise SegRefineError(f"{len(cellmaps)} cell tables for {len(samples)} sample names")
    stages = table_stages(len(cellmaps), stages)
    if len(stages) != len(cellmaps):
        raise SegRefineError(f"{len(cellmaps)} cell tables for {len(stages)} stage names")
    if len(set(zip(samples, stages))) != len(cellmaps):
        raise SegRefineError("two cell tables for the same sample and stage")
    frames = []
    for path, sample, stage in zip(cellmaps, samples, stages):
        path = Path(path)
        if not path.is_file():
            raise SegRefineError(f"{path}: cell table not found")
        df = pd.read_csv(path)
        missing = [c for c in ("label_id", "x", "y", "area", "total_counts", "n_genes") if c not in df.columns]
        if missing:
            raise SegRefineError(f"{path}: missing column(s) {missing}")
        df.insert(0, "sample", sample)
        df.insert(1, "stage", stage)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _groups(cells):
    """(sample, stage, rows) in the order the tables were given."""
    for (sample, stage), df in cells.groupby(["sample", "stage"], sort=False):
        yield sample, stage, df


def _area_fences(areas, k: float):
    q1, med, q3 = np.quantile(np.asarray(areas, dtype=float), [0.25, 0.5, 0.75])
    spread = max(q3 - q1, 0.1 * med)  # a floor, so near-identical areas (IQR 0) flag nothing
    return med, q1 - k * spread, q3 + k * spread


def summarize_cells(cells, k: float = 3.0, tables: Optional[Sequence[Tuple[str, str]]] = None):
    """One row per sample and stage; ``tables`` (the (sample, stage) of every cell table read) also gives a row of
    0 cells to a table without any cell."""
    import pandas as pd

    groups = list(_groups(cells))
    if tables is not None:
        have = {(sm, st): df for sm, st, df in groups}
        groups = [(sm, st, have.get((sm, st), cells.iloc[:0])) for sm, st in dict.fromkeys(map(tuple, tables))]
    rows = []
    for sample, stage, df in groups:
        row = {
            "sample": sample,
            "stage": stage,
            "cells": len(df),
            "empty_cells": int((df["total_counts"] == 0).sum()),
            "umis_in_cells": int(df["total_counts"].sum()),
        }
        for col, _ in METRICS:
            v = df[col].to_numpy(dtype=float)
            row[f"{col}_mean"] = float(v.mean()) if len(v) else float("nan")
            for q in QUANTILES:
                row[f"{col}_q{int(q * 100):02d}"] = float(np.quantile(v, q)) if len(v) else float("nan")
            row[f"{col}_max"] = float(v.max()) if len(v) else float("nan")
        if len(df):
            _, lo, hi = _area_fences(df["area"], k)
            row["extreme_large"], row["extreme_small"] = int((df["area"] > hi).sum()), int((df["area"] < lo).sum())
        else:
            row["extreme_large"] = row["extreme_small"] = 0
        rows.append(row)
    cols = ["sample", "stage", "cells", "empty_cells", "umis_in_cells"]
    cols += [f"{c}_{s}" for c, _ in METRICS for s in ["mean"] + [f"q{int(q * 100):02d}" for q in QUANTILES] + ["max"]]
    return pd.DataFrame(rows, columns=cols + ["extreme_large", "extreme_small"])


def extreme_area(cells, k: float = 3.0):
    """Cells beyond k x max(IQR, median / 10) outside the quartiles of their sample's (and stage's) areas,
    largest first within each sample and stage."""
    import pandas as pd

    out = []
    for _, _, df in _groups(cells):
        med, lo, hi = _area_fences(df["area"], k)
        sel = df[(df["area"] < lo) | (df["area"] > hi)].copy()
        sel["median_area"] = med
        sel["area_over_median"] = sel["area"] / med if med > 0 else np.nan
        sel["side"] = np.where(sel["area"] > hi, "large", "small")
        out.append(sel.sort_values("area", ascending=False, kind="stable"))
    cols = [
        "sample",
        "stage",
        "label_id",
        "x",
        "y",
        "area",
        "median_area",
        "area_over_median",
        "side",
        "total_counts",
        "n_genes",
    ]
    out = [o for o in out if len(o)]
    res = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)
    # samples alphabetically, stages in the order given (pretrained before fine-tuned), then largest first
    order = {st: i for i, st in enumerate(pd.unique(cells["stage"]))}
    res = res.assign(_stage=res["stage"].map(order))
    res = res.sort_values(["sample", "_stage", "area"], ascending=[True, True, False], ignore_index=True, kind="stable")
    return res[cols]


REFERENCE_PREFIX = "saw_"  # stages that are another pipeline's cells (SAW's), compared with ours, not segmented by us


CELLS_SUFFIX = "_cells"  # our stages' nuclei grown into cells (segrefine.cells): pretrained_cells, finetuned_cells


def is_reference(stage: str) -> bool:
    return str(stage).startswith(REFERENCE_PREFIX)


def is_cells(stage: str) -> bool:
    """A stage of our expanded cells (``<stage>_cells``), compared with the other stage's cells, not the nuclei."""
    return not is_reference(stage) and str(stage).endswith(CELLS_SUFFIX)


def stage_pair(cells) -> Optional[Tuple[str, str]]:
    """(before, after): our two stages of nuclei in the order given (reference and cells stages aside); None with one
    stage; more than two is an error."""
    import pandas as pd

    stages = [st for st in pd.unique(cells["stage"]) if not is_reference(st) and not is_cells(st)]
    if len(stages) > 2:
        raise SegRefineError(f"cell tables of {len(stages)} stages {stages}: the comparison takes two (before, after)")
    return (stages[0], stages[1]) if len(stages) == 2 else None


def compare_stages(cells, before: str, after: str):
    """Per sample holding both stages and per metric: medians, means and the two-sided Mann-Whitney U test of
    after vs before (different cells: an unpaired test); ``prob_after_greater`` = U / (n_before n_after)."""
    import pandas as pd
    from scipy.stats import mannwhitneyu

    rows = []
    for sample, df in cells.groupby("sample", sort=True):
        b, a = df[df["stage"] == before], df[df["stage"] == after]
        if not len(b) or not len(a):
            continue
        for col, title in METRICS:
            vb, va = b[col].to_numpy(dtype=float), a[col].to_numpy(dtype=float)
            row = {
                "sample": sample,
                "metric": col,
                "description": title,
                "before": before,
                "after": after,
                "n_before": len(vb),
                "n_after": len(va),
                "median_before": float(np.median(vb)),
                "median_after": float(np.median(va)),
                "mean_before": float(vb.mean()),
                "mean_after": float(va.mean()),
            }
            row["median_ratio"] = row["median_after"] / row["median_before"] if row["median_before"] else np.nan
            if np.ptp(np.concatenate([vb, va])) == 0:  # all values equal: no evidence either way
                u, p = len(va) * len(vb) / 2, 1.0
            else:
                res = mannwhitneyu(va, vb, alternative="two-sided")
                u, p = float(res.statistic), float(res.pvalue)
            row.update(mannwhitney_u=u, p_value=p, prob_after_greater=u / (len(va) * len(vb)))
            rows.append(row)
    cols = [
        "sample",
        "metric",
        "description",
        "before",
        "after",
        "n_before",
        "n_after",
        "median_before",
        "median_after",
        "median_ratio",
        "mean_before",
        "mean_after",
        "mannwhitney_u",
        "p_value",
        "prob_after_greater",
    ]
    return pd.DataFrame(rows, columns=cols)


def _bins(values):
    hi = float(np.quantile(values, 0.995)) if len(values) else 1.0
    # integer-valued counts: one bin per value while that gives few bins, else 40 even bins
    return np.arange(0, int(hi) + 2) - 0.5 if hi <= 60 else np.linspace(0, hi, 41)


def plot_distributions(cells, path, tests=None) -> None:
    """One row of UMIs / genes / area histograms; with two stages (``tests`` from compare_stages) one row per
    sample, the stages overlaid with their medians (dashed) and the Mann-Whitney p-value in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segrefine.io import atomic_path

    pair = stage_pair(cells)
    overlay = pair is not None or any(is_reference(st) for st in cells["stage"].unique())
    if not len(cells):  # no cell in any table: a figure that says so instead of empty axes
        fig, ax = plt.subplots(figsize=(8, 2.5))
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "per-cell QC: no cell in any cell table (0 cells segmented under the expression matrix)",
            ha="center",
            va="center",
            fontsize=11,
            wrap=True,
        )
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        return
    rows = sorted(cells["sample"].unique()) if overlay else [None]
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.8 * len(rows)), squeeze=False)
    colours = {st: f"C{i}" for i, st in enumerate(cells["stage"].unique())}
    for r, sample in enumerate(rows):
        sub = cells if sample is None else cells[cells["sample"] == sample]
        for ax, (col, title) in zip(axes[r], METRICS):
            bins = _bins(sub[col].to_numpy(dtype=float))
            for sm, st, df in _groups(sub):
                v = df[col].to_numpy(dtype=float)
                name = st if overlay else (f"{sm} {st}" if st else sm)
                colour = colours[st] if overlay else None
                line = ax.hist(
                    np.clip(v, bins[0], bins[-1]),
                    bins=bins,
                    histtype="step",
                    linewidth=1.5,
                    color=colour,
                    label=f"{name} (n={len(v)}, median {np.median(v):g})",
                )[2][0]
                if overlay:
                    ax.axvline(np.median(v), color=line.get_edgecolor(), linestyle="--", linewidth=1)
            ax.set_xlabel(title)
            ax.set_ylabel("cells")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            if pair and tests is not None:
                t = tests[(tests["sample"] == sample) & (tests["metric"] == col)]
                if len(t):
                    ax.set_title(
                        f"{sample}: {pair[0]} vs {pair[1]}, Mann-Whitney p = {t['p_value'].iloc[0]:.2g}", fontsize=9
                    )
    fig.suptitle(
        "per-cell QC"
        + (f", before ({pair[0]}) vs after ({pair[1]})" if pair else "")
        + " (values above the 99.5th percentile in the last bin)"
    )
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


ALIGNMENT_COLUMNS = (
    "umis",
    "fraction_umis_in_cells",
    "alignment_best_shift",
    "alignment_fraction_at_best_shift",
    "alignment_misaligned",
)


def read_alignment(path) -> dict:
    """The summary columns of one alignment report (``segrefine cgef --report``)."""
    import json

    path = Path(path)
    try:
        r = json.loads(path.read_text())
        a = r["alignment"]
        return {
            "umis": r["umis"],
            "fraction_umis_in_cells": r["fraction_umis_in_cells"],
            "alignment_best_shift": "{:+d},{:+d}".format(*a["best_shift"]),
            "alignment_fraction_at_best_shift": a["fraction_in_cells_at_best_shift"],
            "alignment_misaligned": bool(a["misaligned"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SegRefineError(f"{path}: not an alignment report of `segrefine cgef --report` ({exc})") from None


def expression_qc(
    cellmaps: List,
    samples: List[str],
    out_dir,
    k: float = 3.0,
    stages: Optional[List[str]] = None,
    reports: Optional[List] = None,
) -> None:
    """The QC tables and plot (module docstring). ``reports``: the alignment reports of the first
    ``len(reports)`` cell tables (ours; SAW's have none): their UMIs, fraction of UMIs in cells and alignment check
    become columns of summary.csv, and a misaligned matrix is logged as a warning."""
    from segrefine.io import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import logging

    cells = read_cell_tables(cellmaps, samples, stages)
    read = list(zip(samples, table_stages(len(samples), stages)))
    # ours (even without cells): the nuclei's stages, and their expanded cells' (<stage>_cells) compared in turn
    given = [st for st in dict.fromkeys(st for _, st in read) if not is_reference(st) and not is_cells(st)]
    grown = [st for st in dict.fromkeys(st for _, st in read) if is_cells(st)]
    references = [st for st in dict.fromkeys(st for _, st in read) if is_reference(st)]
    for kind in (given, grown):
        if len(kind) > 2:
            raise SegRefineError(f"cell tables of {len(kind)} stages {kind}: the comparison takes two (before, after)")
    pair = (given[0], given[1]) if len(given) == 2 else None
    empty = [
        f"{p} ({sm}{' ' + st if st else ''})"
        for p, (sm, st) in zip(cellmaps, read)
        if not ((cells["sample"] == sm) & (cells["stage"] == st)).any()
    ]
    if empty:
        logging.getLogger(__name__).warning("no cell in %s: QC written with 0 cells there", ", ".join(empty))
    summary = summarize_cells(cells, k, read)
    if reports:
        if len(reports) > len(cellmaps):
            raise SegRefineError(f"{len(reports)} alignment reports for {len(cellmaps)} cell tables")
        extra = {key: read_alignment(path) for key, path in zip(read, reports)}
        for col in ALIGNMENT_COLUMNS:
            summary[col] = [extra.get((sm, st), {}).get(col) for sm, st in zip(summary["sample"], summary["stage"])]
        for (sm, st), e in extra.items():
            if e["alignment_misaligned"]:
                logging.getLogger(__name__).warning(
                    "%s %s: only %.1f %% of UMIs fell in cells; shifting the matrix by (%s) px would put %.1f %% of "
                    "the sampled ones in cells: check expression.origin (alignment report of the cgef step)",
                    sm,
                    st,
                    100 * e["fraction_umis_in_cells"],
                    e["alignment_best_shift"],
                    100 * e["alignment_fraction_at_best_shift"],
                )
    tables = [("cells.csv", cells), ("summary.csv", summary), ("extreme_area.csv", extreme_area(cells, k))]
    tests = compare_stages(cells, *pair) if pair else None
    if pair:
        import pandas as pd

        both = [tests] + ([compare_stages(cells, grown[0], grown[1])] if len(grown) == 2 else [])
        tables.append(("before_after.csv", pd.concat(both, ignore_index=True)))
    if references and given:
        import pandas as pd

        tables.append(
            (
                "saw_comparison.csv",
                pd.concat([compare_stages(cells, ref, given[-1]) for ref in references], ignore_index=True),
            )
        )
    for name, df in tables:
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    plot_distributions(cells, out / "distributions.png", tests)
