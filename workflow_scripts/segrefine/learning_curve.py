"""Learning curve: accuracy versus the number of annotated cells (the paper's Fig. 3).

The training split is ordered once by a seeded hash of the patch names
(trainset.split_score), and each subset is the shortest prefix of that order
that reaches its size, so the subsets are nested (each holds the previous one)
and deterministic, and adding a size never changes the others. A size is a
label: ``f0.25`` (a fraction of the training patches, at least one patch) or
``c300`` (the fewest patches holding at least 300 annotated cells; all of them
when the split holds fewer). Validation and test rows are kept unchanged, so
every subset model is scored on the same test patches.

Each subset is a training-set table of its own (with its .json version), fine-
tuned from the ORIGINAL pretrained card by the ordinary ``finetune`` step and
scored by the ordinary ``evaluate`` step; ``learning_curve_table`` gathers the
per-image tables into one row per (model, subset, mode).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.learning_curve")

METRICS = ["f1", "precision", "recall"]


def subset_labels(fractions: Sequence[float] = (), cells: Sequence[int] = ()) -> List[str]:
    """The subset labels of configured fractions and cell counts (``f0.25``, ``c300``)."""
    labels = []
    for f in fractions:
        if not 0 < float(f) <= 1:
            raise SegRefineError(f"learning-curve fraction {f} is not in (0, 1]")
        labels.append(f"f{float(f):g}")
    for c in cells:
        if int(c) < 1:
            raise SegRefineError(f"learning-curve cell count {c} is below 1")
        labels.append(f"c{int(c)}")
    return labels


def parse_label(label: str):
    """(``"fraction"``, float) or (``"cells"``, int) of a subset label."""
    try:
        if label.startswith("f"):
            value = float(label[1:])
            if 0 < value <= 1:
                return "fraction", value
        elif label.startswith("c"):
            value = int(label[1:])
            if value >= 1:
                return "cells", value
    except ValueError:
        pass
    raise SegRefineError(f"learning-curve subset {label!r}: expected f<fraction in (0, 1]> or c<cell count >= 1>")


def train_order(rows: Sequence[dict], seed: int) -> List[dict]:
    """The training rows in the seeded order every subset is a prefix of."""
    from segrefine.trainset import split_score

    train = [r for r in rows if r["split"] == "train"]
    return sorted(train, key=lambda r: (split_score(r["patch"], seed), r["patch"]))


def select_subset(rows: Sequence[dict], label: str, seed: int) -> List[dict]:
    """The training rows of subset ``label`` (a prefix of train_order)."""
    kind, value = parse_label(label)
    order = train_order(rows, seed)
    if not order:
        raise SegRefineError("the training set has no training patches to take a learning-curve subset from")
    if kind == "fraction":
        n = max(1, int(round(value * len(order))))
    else:
        cum = np.cumsum([r["n_cells"] for r in order])
        reached = np.nonzero(cum >= value)[0]
        n = int(reached[0]) + 1 if len(reached) else len(order)
    return order[:n]


def write_subset(trainset_path, label: str, seed: int, out) -> dict:
    """The training-set table of subset ``label``: its training rows, and every val/test row unchanged.
    Returns the summary (patches, cells, version) also written beside it as .json."""
    from segrefine.trainset import read_trainset, write_trainset

    rows = read_trainset(trainset_path)
    meta = json.loads(Path(trainset_path).with_suffix(".json").read_text())
    chosen = {r["patch"] for r in select_subset(rows, label, seed)}
    keep = [r for r in rows if r["split"] != "train" or r["patch"] in chosen]
    if sum(r["n_cells"] for r in keep if r["split"] == "train") == 0:
        raise SegRefineError(
            f"{trainset_path}: learning-curve subset {label} holds no annotated cells "
            "(choose a larger fraction or cell count)"
        )
    write_trainset(out, keep, meta["seed"], meta["val_fraction"], meta["test_fraction"])
    summary = json.loads(Path(out).with_suffix(".json").read_text())
    log.info("subset %s: %d training patches, %d cells", label, summary["patches"]["train"], summary["cells"]["train"])
    return summary


def learning_curve_table(
    evaluations: Sequence[str],
    subsets: Sequence[str],
    out_csv,
    png: Optional[str] = None,
    pretrained: Sequence[str] = (),
):
    """One row per (model, subset, mode): n_patches, n_cells of the subset's training split and the mean
    F1 / precision / recall over the test patches. ``evaluations[i]`` is the per-image table of the model
    fine-tuned on ``subsets[i]`` (a subset table); ``pretrained`` per-image tables are added at 0 cells."""
    import pandas as pd

    from segrefine.evaluate import _read_per_image
    from segrefine.io import atomic_path

    if len(evaluations) != len(subsets):
        raise SegRefineError(f"{len(evaluations)} evaluation tables but {len(subsets)} subset tables")
    out = []

    def add(csv, n_patches, n_cells, subset):
        if not Path(csv).is_file():
            raise SegRefineError(f"{csv}: evaluation table not found")
        df = _read_per_image([csv])
        for (model, mode), g in df.groupby(["model", "mode"], sort=True):
            out.append(
                {
                    "model": model,
                    "subset": subset,
                    "n_patches": n_patches,
                    "n_cells": n_cells,
                    "n_test_images": len(g),
                    **{m: float(g[m].mean()) for m in METRICS},
                    "mode": mode,
                }
            )

    for csv in pretrained:
        add(csv, 0, 0, "pretrained")
    for csv, sub in zip(evaluations, subsets):
        summary = Path(sub).with_suffix(".json")
        if not summary.is_file():
            raise SegRefineError(f"{summary}: summary of learning-curve subset {sub} not found")
        s = json.loads(summary.read_text())
        add(csv, s["patches"]["train"], s["cells"]["train"], Path(sub).stem)
    if not out:
        raise SegRefineError("no evaluation tables for the learning curve")
    table = pd.DataFrame(out).sort_values(["model", "mode", "n_cells", "subset"], kind="mergesort")
    table = table.reset_index(drop=True)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    if png:
        plot_learning_curve(table, png)
    return table


def plot_learning_curve(table, path, mode: str = "standard") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segrefine.io import atomic_path

    d = table[table["mode"] == mode]
    if d.empty:
        d, mode = table[table["mode"] == table["mode"].iloc[0]], table["mode"].iloc[0]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for model, g in d.groupby("model", sort=True):
        ax.plot(g["n_cells"], g["f1"], "o-", label=model)
    ax.axvline(300, color="grey", lw=0.8, ls="--")
    ax.text(300, 0.02, " ~300 cells", color="grey", fontsize=7)
    ax.set_xlabel("annotated training cells")
    ax.set_ylabel(f"F1 on the test patches ({mode})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
