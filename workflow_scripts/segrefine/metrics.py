"""Segmentation metrics: one-to-one object matching by IoU, and pixel Jaccard/Dice.

Definitions (the standard ones, as in stardist.matching and cellpose.metrics):
- predicted and true objects are matched one-to-one by optimal assignment;
  a pair counts when IoU >= threshold (0.5 by default);
- precision = TP / predicted objects, recall = TP / true objects, F1 their harmonic mean;
- "ap" (cellpose's name, stardist's "accuracy") = TP / (TP + FP + FN) -- not the
  area under a precision-recall curve;
- jaccard and dice are pixel-level over the foreground of the whole image, as the
  paper's evaluator (STOmics cs-benchmark) defines them; both are 1 when both
  masks are empty.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from segrefine import SegRefineError


def _check(truth: np.ndarray, pred: np.ndarray) -> None:
    if truth.shape != pred.shape:
        raise SegRefineError(f"ground truth {truth.shape} and prediction {pred.shape} differ in shape")
    for name, a in (("ground truth", truth), ("prediction", pred)):
        if not np.issubdtype(a.dtype, np.integer):
            raise SegRefineError(f"{name} must be an integer label image, got {a.dtype}")


def iou_matrix(truth: np.ndarray, pred: np.ndarray):
    """IoU of every (true, predicted) pair that overlaps; dense (n_true, n_pred) array.

    Labels are relabelled 1..N first, so the sizes depend only on object counts.
    """
    from skimage.segmentation import relabel_sequential

    t = relabel_sequential(np.asarray(truth).astype(np.int64, copy=False))[0]
    p = relabel_sequential(np.asarray(pred).astype(np.int64, copy=False))[0]
    nt, npred = int(t.max()), int(p.max())
    overlap = np.zeros((nt + 1, npred + 1), dtype=np.int64)
    np.add.at(overlap, (t.ravel(), p.ravel()), 1)
    area_t = overlap.sum(axis=1, keepdims=True)
    area_p = overlap.sum(axis=0, keepdims=True)
    union = area_t + area_p - overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, overlap / union, 0.0)
    return iou[1:, 1:]


def match_counts(iou: np.ndarray, threshold: float = 0.5):
    """(TP, matched IoUs) of the optimal one-to-one matching at ``threshold``.

    The assignment first maximises the number of pairs with IoU >= threshold, then
    their summed IoU (the tie-break stardist uses).
    """
    from scipy.optimize import linear_sum_assignment

    nt, npred = iou.shape
    if nt == 0 or npred == 0:
        return 0, np.zeros(0)
    ok = iou >= threshold
    n_min = min(nt, npred)
    cost = -(ok.astype(float)) - iou / (2 * n_min)
    rows, cols = linear_sum_assignment(cost)
    keep = ok[rows, cols]
    return int(keep.sum()), iou[rows, cols][keep]


def object_metrics(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
    _check(truth, pred)
    iou = iou_matrix(truth, pred)
    n_true, n_pred = iou.shape
    tp, matched = match_counts(iou, threshold)
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else (1.0 if n_true == 0 else 0.0)
    recall = tp / n_true if n_true else (1.0 if n_pred == 0 else 0.0)
    f1 = 2 * tp / (n_pred + n_true) if (n_pred + n_true) else 1.0
    denom = tp + fp + fn
    return {
        "n_true": n_true, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1,
        "ap": tp / denom if denom else 1.0,
        "mean_matched_iou": float(matched.mean()) if tp else 0.0,
    }


def pixel_metrics(truth: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    _check(truth, pred)
    t, p = truth > 0, pred > 0
    inter = int(np.logical_and(t, p).sum())
    union = int(np.logical_or(t, p).sum())
    total = int(t.sum() + p.sum())
    return {"jaccard": inter / union if union else 1.0, "dice": 2 * inter / total if total else 1.0}


def evaluate_pair(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
    out = object_metrics(truth, pred, threshold)
    out.update(pixel_metrics(truth, pred))
    return out
