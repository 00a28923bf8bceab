"""Evaluation of a model on the held-out patches of the training set, and the summary table."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger("segrefine.evaluate")

STAGES = ["pretrained", "finetuned"]  # report order: before, then after fine-tuning
METRICS = ["precision", "recall", "f1", "jaccard", "dice", "ap", "mean_matched_iou"]


def evaluate_model(card_path, trainset_path, split: str, out_csv, iou_threshold: float = 0.5) -> None:
    import pandas as pd

    from segrefine import SegRefineError
    from segrefine.io import atomic_path, read_tiff
    from segrefine.metrics import evaluate_pair
    from segrefine.models import load_model
    from segrefine.trainset import read_trainset

    model, card = load_model(card_path)
    rows = [r for r in read_trainset(trainset_path) if r["split"] == split]
    if not rows:
        raise SegRefineError(f"{trainset_path}: no patch in the {split!r} split to evaluate on")
    out = []
    for r in rows:
        pred = model.predict(read_tiff(r["image"]))
        m = evaluate_pair(read_tiff(r["mask"]).astype(np.int64), pred.astype(np.int64), iou_threshold)
        out.append({"model": card["name"], "stage": card["stage"], "framework": card["framework"],
                    "trainset_version": card.get("trainset_version") or "", "image": r["patch"],
                    "iou_threshold": iou_threshold, **m})
        log.info("%s %s %s: F1 %.3f", card["name"], card["stage"], r["patch"], m["f1"])
    with atomic_path(out_csv) as tmp:
        pd.DataFrame(out).to_csv(tmp, index=False)


def summarize(csvs: Sequence[str], out_csv):
    """Mean of every metric per model and stage (a DataFrame, also written to ``out_csv``)."""
    import pandas as pd

    from segrefine.io import atomic_path

    per_image = pd.concat([pd.read_csv(c) for c in csvs], ignore_index=True)
    per_image["stage"] = pd.Categorical(per_image["stage"], STAGES, ordered=True)
    grouped = per_image.groupby(["model", "stage"], sort=True, observed=True)
    summary = grouped[METRICS].mean().reset_index()
    summary.insert(2, "n_images", grouped.size().values)
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.4f")
    return summary
