"""Evaluation of a model on the held-out patches of the training set, and the tables people read.

Per image, model, stage (pretrained / finetuned) and mode (``standard``, ``partial``,
``paper``: see segrefine.metrics), one row of every metric; then a summary (mean per
model, stage and mode), a long-format table (model, stage, image, mode, metric, value)
as CSV and .xlsx with a sheet of definitions.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("segrefine.evaluate")

STAGES = ["pretrained", "finetuned"]  # report order: before, then after fine-tuning
METRICS = ["precision", "recall", "f1", "jaccard", "dice", "ap", "ap_mean", "mean_matched_iou", "pq"]
ID_COLUMNS = ["model", "stage", "framework", "trainset_version", "image", "mode", "iou_threshold", "min_size"]

DEFINITIONS = [
    (
        "mode",
        "standard: stardist.matching / cellpose.metrics definitions (binary masks split by 4-connectivity, "
        "optimal one-to-one matching, IoU >= threshold); partial: only annotated cells scored, each by its "
        "best-matching prediction, unmatched predictions not penalized; paper: the CSRefiner paper's evaluator "
        "(STOmics cs-benchmark / DeepCell): 8-connectivity relabel, IoU > 0.45, a many-to-many "
        "'catastrophe' group counts as one correct detection",
    ),
    ("precision", "correct detections / predicted objects"),
    ("recall", "correct detections / true objects"),
    ("f1", "harmonic mean of precision and recall"),
    ("jaccard", "pixel level: |truth foreground & prediction foreground| / |union| (1 when both are empty)"),
    ("dice", "pixel level: 2 |intersection| / (|truth foreground| + |prediction foreground|)"),
    (
        "ap",
        "TP / (TP + FP + FN) at the IoU threshold: the Cellpose/StarDist 'AP' (stardist's 'accuracy'), "
        "NOT the area under a precision-recall curve",
    ),
    ("ap_50 ... ap_95", "the same at IoU 0.50, 0.55, ..., 0.95 (standard and partial modes)"),
    ("ap_mean", "mean of ap_50 ... ap_95"),
    ("mean_matched_iou", "mean IoU of the matched pairs"),
    ("pq", "panoptic quality: sum of matched IoUs / (TP + FP/2 + FN/2)"),
    ("mean_best_iou", "partial mode: mean IoU of each annotated cell with its best-matching prediction"),
    ("merges, splits, catastrophes", "paper mode: DeepCell's error groups among the unmatched objects"),
]


def evaluate_model(
    card_path,
    trainset_path,
    split: str,
    out_csv,
    predictions_npz=None,
    iou_threshold: float = 0.5,
    modes: Sequence[str] = ("standard",),
    min_size: int = 0,
) -> None:
    """Predict every patch of ``split`` ("all": every annotated patch) with the model of ``card_path``
    and score it in each mode.

    The predictions go to ``predictions_npz`` (one array per patch), so overlays and
    later analyses need not run the model again.
    """
    import pandas as pd

    from segrefine import SegRefineError
    from segrefine.io import atomic_path, read_tiff
    from segrefine.metrics import MODES, evaluate_pair
    from segrefine.models import load_model
    from segrefine.trainset import read_trainset

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SegRefineError(f"unknown evaluation modes {bad} (each one of {list(MODES)})")
    model, card = load_model(card_path)
    rows = [r for r in read_trainset(trainset_path) if split == "all" or r["split"] == split]
    if not rows:
        raise SegRefineError(f"{trainset_path}: no patch in the {split!r} split to evaluate on")
    out, preds = [], {}
    for r in rows:
        pred = np.asarray(model.predict(read_tiff(r["image"])))
        truth = read_tiff(r["mask"])
        preds[r["patch"]] = pred.astype(np.uint32)
        for mode in modes:
            m = evaluate_pair(
                truth,
                pred,
                iou_threshold,
                mode=mode,
                min_size=min_size,
                source=f"{r['mask']} vs the prediction of {card['name']} ({card['stage']})",
            )
            out.append(
                {
                    "model": card["name"],
                    "stage": card["stage"],
                    "framework": card["framework"],
                    "trainset_version": card.get("trainset_version") or "",
                    "image": r["patch"],
                    "iou_threshold": iou_threshold,
                    "min_size": min_size,
                    **m,
                }
            )
            log.info("%s %s %s [%s]: F1 %.3f", card["name"], card["stage"], r["patch"], mode, m["f1"])
    if predictions_npz:
        with atomic_path(predictions_npz, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **preds)
    with atomic_path(out_csv) as tmp:
        pd.DataFrame(out).to_csv(tmp, index=False)


def _read_per_image(csvs: Sequence[str]):
    import pandas as pd

    from segrefine import SegRefineError

    frames = []
    for c in csvs:
        df = pd.read_csv(c)
        missing = [k for k in ("model", "stage", "image") if k not in df]
        if missing:
            raise SegRefineError(f"{c}: not a per-image evaluation table (no column {missing})")
        if "mode" not in df:
            df["mode"] = "standard"  # tables written before modes existed
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def long_table(per_image):
    """(model, stage, image, mode, metric, value), one row per number; metrics a mode does not define are left out."""
    metric_cols = [
        c
        for c in per_image.columns
        if c not in ID_COLUMNS and c != "notes" and np.issubdtype(per_image[c].dtype, np.number)
    ]
    long = per_image.melt(
        id_vars=["model", "stage", "image", "mode"], value_vars=metric_cols, var_name="metric", value_name="value"
    )
    return long.dropna(subset=["value"]).reset_index(drop=True)


def summarize(csvs: Sequence[str], out_csv, long_csv: Optional[str] = None, xlsx: Optional[str] = None):
    """Mean of every metric per model, stage and mode (a DataFrame, also written to ``out_csv``);
    optionally the long table as CSV and an .xlsx (summary, per-image long table, definitions)."""
    import pandas as pd

    from segrefine.io import atomic_path

    per_image = _read_per_image(csvs)
    per_image["stage"] = pd.Categorical(per_image["stage"], STAGES, ordered=True)
    grouped = per_image.groupby(["model", "stage", "mode"], sort=True, observed=True)
    metrics = [m for m in METRICS if m in per_image]
    summary = grouped[metrics].mean().reset_index()
    summary.insert(3, "n_images", grouped.size().values)
    summary["stage"] = summary["stage"].astype(str)
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.4f")
    per_image["stage"] = per_image["stage"].astype(str)
    long = long_table(per_image)
    if long_csv:
        with atomic_path(long_csv) as tmp:
            long.to_csv(tmp, index=False)
    if xlsx:
        with atomic_path(xlsx, suffix=".xlsx") as tmp:
            with pd.ExcelWriter(tmp, engine="openpyxl") as xw:
                summary.to_excel(xw, sheet_name="summary", index=False)
                long.to_excel(xw, sheet_name="per_image", index=False)
                pd.DataFrame(DEFINITIONS, columns=["term", "definition"]).to_excel(
                    xw, sheet_name="definitions", index=False
                )
    return summary


def rank_candidates(csvs: Sequence[str], out_csv, metric: str = "f1", mode: str = "standard"):
    """Zero-shot screening: pretrained candidates ranked by their mean ``metric`` over the annotated
    patches (``mode``), best first, with their other mean metrics beside."""
    from segrefine import SegRefineError
    from segrefine.io import atomic_path

    per_image = _read_per_image(csvs)
    d = per_image[per_image["mode"] == mode]
    if d.empty:
        raise SegRefineError(f"no {mode}-mode values in {list(map(str, csvs))}")
    if metric not in d:
        raise SegRefineError(f"no metric {metric!r} in {list(map(str, csvs))}")
    metrics = [m for m in METRICS if m in d]
    grouped = d.groupby(["model", "framework"], sort=True) if "framework" in d else d.groupby(["model"], sort=True)
    ranking = grouped[metrics].mean()
    ranking.insert(0, "n_images", grouped.size())
    ranking = ranking.reset_index().sort_values([metric, "model"], ascending=[False, True], kind="mergesort")
    ranking.insert(0, "rank", range(1, len(ranking) + 1))
    ranking.insert(len(ranking.columns), "mode", mode)
    with atomic_path(out_csv) as tmp:
        ranking.to_csv(tmp, index=False, float_format="%.4f")
    return ranking


def threshold_sweep(
    card_path,
    trainset_path,
    split: str,
    out_csv,
    grid: Optional[dict] = None,
    iou_threshold: float = 0.5,
    min_size: int = 0,
):
    """Mean precision, recall, F1 and AP (standard mode) of a model on the ``split`` patches for
    every combination of its inference thresholds; the best F1 (first in grid order on ties) is
    marked ``best``, the model's own thresholds ``current``. ``grid`` {threshold: [values]} defaults to the
    framework's grid in the registry (``segrefine.models.FRAMEWORKS``)."""
    import itertools

    import pandas as pd

    from segrefine import SegRefineError
    from segrefine.io import atomic_path, read_tiff
    from segrefine.metrics import evaluate_pair
    from segrefine.models import load_model, threshold_grid
    from segrefine.trainset import read_trainset

    model, card = load_model(card_path)
    if not model.SWEEPABLE_THRESHOLDS:
        raise SegRefineError(f"{card_path}: {card['framework']} models have no inference thresholds to sweep")
    grid = grid or threshold_grid(card["framework"])
    keys = sorted(grid)
    rows = [r for r in read_trainset(trainset_path) if r["split"] == split]
    if not rows:
        raise SegRefineError(f"{trainset_path}: no patch in the {split!r} split to sweep thresholds on")
    pairs = [(r["mask"], read_tiff(r["image"]), read_tiff(r["mask"])) for r in rows]
    current = {k: card.get("thresholds", {}).get(k) for k in keys}
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = dict(zip(keys, map(float, values)))
        model.set_thresholds(**setting)
        ms = [
            evaluate_pair(truth, model.predict(image), iou_threshold, min_size=min_size, source=mask)
            for mask, image, truth in pairs
        ]
        out.append(
            {
                "model": card["name"],
                "stage": card["stage"],
                "framework": card["framework"],
                "split": split,
                "n_images": len(pairs),
                **setting,
                **{m: float(np.mean([x[m] for x in ms])) for m in ("precision", "recall", "f1", "ap_mean")},
                "current": all(current[k] is not None and abs(current[k] - setting[k]) < 1e-9 for k in keys),
            }
        )
        log.info("%s %s: F1 %.3f", card["name"], setting, out[-1]["f1"])
    table = pd.DataFrame(out)
    table["best"] = False
    table.loc[int(table["f1"].to_numpy().argmax()), "best"] = True
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    return table
