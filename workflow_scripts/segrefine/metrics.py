"""Segmentation metrics: one-to-one object matching by IoU, and pixel Jaccard/Dice.

Three modes; every output row says which one produced it (column ``mode``):

``standard`` (default; the definitions of stardist.matching and cellpose.metrics)
    - binary masks are split into objects by 4-connectivity (with a warning);
    - predicted and true objects are matched one-to-one by optimal assignment;
      a pair counts when IoU >= threshold (0.5 by default);
    - precision = TP / predicted objects, recall = TP / true objects, F1 their harmonic mean;
    - "ap" (cellpose's name, stardist's "accuracy") = TP / (TP + FP + FN) -- NOT the
      area under a precision-recall curve; ``ap_50`` ... ``ap_95`` at IoU 0.50 ... 0.95
      and ``ap_mean`` their mean;
    - panoptic quality ``pq`` = sum of matched IoUs / (TP + FP/2 + FN/2);
    - jaccard and dice are pixel-level over the foreground of the whole image, as the
      paper's evaluator (STOmics cs-benchmark) defines them; both are 1 when both
      masks are empty.

``partial`` (sparsely annotated ground truth)
    only annotated cells are scored, each by its best-matching prediction (highest
    IoU); predictions that match no annotated cell are not penalized (FP = 0). Pixel
    Jaccard/Dice are restricted to the annotated cells and their best matches.

``paper`` (reproduces the CSRefiner paper's evaluator, STOmics cs-benchmark/DeepCell)
    both masks are relabelled by 8-connectivity; optimal one-to-one assignment with
    cost 1 - IoU per pair and 0.55 per unmatched object, so a pair matches when
    IoU > 0.45; unmatched objects are grouped DeepCell's way into merges, splits and
    "catastrophes" (many-to-many), and each catastrophe group counts as one correct
    detection. Without the evaluator's two defects: labels >= 256 are kept (it wraps
    them around in uint8) and PQ uses the right matched pairs (it reads them off by one).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.metrics")

MODES = ("standard", "partial", "paper")
AP_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # 0.50 ... 0.95
PAPER_COST_UNMATCHED = 0.55  # cs-benchmark's cutoff1: pairs match when IoU > 1 - 0.55
PAPER_EVENT_IOU = 0.1  # DeepCell's cutoff2: overlap that links unmatched objects in the error graph


def _check(truth: np.ndarray, pred: np.ndarray) -> None:
    if truth.shape != pred.shape:
        raise SegRefineError(f"ground truth {truth.shape} and prediction {pred.shape} differ in shape")
    for name, a in (("ground truth", truth), ("prediction", pred)):
        if not np.issubdtype(a.dtype, np.integer):
            raise SegRefineError(f"{name} must be an integer label image, got {a.dtype}")


def _where(source: Optional[str], what: str) -> str:
    return f"{source}: {what}" if source else what


def to_instances(
    arr, what: str = "mask", source: Optional[str] = None, connectivity: int = 1
) -> Tuple[np.ndarray, Optional[str]]:
    """A validated int64 instance label image, and a note when the input was changed.

    Refuses (SegRefineError naming ``source``) empty arrays, images that are not 2-D,
    NaNs, non-integer and negative values. A binary mask (one foreground value, several
    separate objects) is labelled by connectivity (1: 4-connectivity, 2: 8-connectivity)
    with a warning, since scoring it as one object would be meaningless.
    """
    from skimage.measure import label

    a = np.asarray(arr)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.size == 0:
        raise SegRefineError(_where(source, f"{what} is empty (shape {a.shape})"))
    if a.ndim != 2:
        raise SegRefineError(_where(source, f"{what} must be a 2-D label image, got shape {a.shape}"))
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise SegRefineError(_where(source, f"{what} contains {int(np.isnan(a).sum())} NaN pixels"))
    if not np.issubdtype(a.dtype, np.integer):
        raise SegRefineError(_where(source, f"{what} must be an integer label image, got {a.dtype}"))
    if a.min() < 0:
        raise SegRefineError(_where(source, f"{what} has negative labels (min {a.min()})"))
    a = a.astype(np.int64, copy=False)
    values = np.unique(a)
    values = values[values != 0]
    if len(values) == 1:
        labelled, n = label(a > 0, connectivity=connectivity, return_num=True)
        if n > 1:
            note = (
                f"{what} looks binary (one foreground value, {n} separate objects): "
                f"labelled by {4 if connectivity == 1 else 8}-connectivity"
            )
            log.warning("%s", _where(source, note))
            return labelled.astype(np.int64), note
    return a, None


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects smaller than ``min_size`` pixels set to background."""
    if min_size <= 1:
        return labels
    area = np.bincount(labels.ravel())
    small = np.flatnonzero(area < min_size)
    small = small[small != 0]
    if len(small) == 0:
        return labels
    out = labels.copy()
    out[np.isin(labels, small)] = 0
    return out


def overlaps(truth: np.ndarray, pred: np.ndarray):
    """(overlap, area_true, area_pred) of objects relabelled 1..N (background dropped)."""
    from skimage.segmentation import relabel_sequential

    t = relabel_sequential(np.asarray(truth).astype(np.int64, copy=False))[0]
    p = relabel_sequential(np.asarray(pred).astype(np.int64, copy=False))[0]
    nt, npred = int(t.max()), int(p.max())
    overlap = np.zeros((nt + 1, npred + 1), dtype=np.int64)
    np.add.at(overlap, (t.ravel(), p.ravel()), 1)
    area_t = overlap.sum(axis=1)
    area_p = overlap.sum(axis=0)
    return overlap[1:, 1:], area_t[1:], area_p[1:]


def _iou(overlap, area_t, area_p):
    union = area_t[:, None] + area_p[None, :] - overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, overlap / np.maximum(union, 1), 0.0)


def iou_matrix(truth: np.ndarray, pred: np.ndarray):
    """IoU of every (true, predicted) pair; dense (n_true, n_pred) array.

    Labels are relabelled 1..N first, so the sizes depend only on object counts.
    """
    return _iou(*overlaps(truth, pred))


def match_pairs(iou: np.ndarray, threshold: float = 0.5):
    """(rows, cols) of the optimal one-to-one matching at IoU >= ``threshold``.

    The assignment first maximises the number of pairs with IoU >= threshold, then
    their summed IoU (the tie-break stardist uses).
    """
    from scipy.optimize import linear_sum_assignment

    nt, npred = iou.shape
    if nt == 0 or npred == 0:
        return np.zeros(0, int), np.zeros(0, int)
    ok = iou >= threshold
    n_min = min(nt, npred)
    cost = -(ok.astype(float)) - iou / (2 * n_min)
    rows, cols = linear_sum_assignment(cost)
    keep = ok[rows, cols]
    return rows[keep], cols[keep]


def match_counts(iou: np.ndarray, threshold: float = 0.5):
    """(TP, matched IoUs) of the optimal one-to-one matching at ``threshold``."""
    rows, cols = match_pairs(iou, threshold)
    return len(rows), iou[rows, cols]


def object_metrics(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
    """Standard-mode object counts and scores of two integer label images (no relabelling)."""
    _check(truth, pred)
    iou = iou_matrix(truth, pred)
    return _standard(iou, threshold)


def _scores(n_true, n_pred, tp, matched):
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else (1.0 if n_true == 0 else 0.0)
    recall = tp / n_true if n_true else (1.0 if n_pred == 0 else 0.0)
    f1 = 2 * tp / (n_pred + n_true) if (n_pred + n_true) else 1.0
    denom = tp + fp + fn
    pq_denom = tp + fp / 2 + fn / 2
    return {
        "n_true": n_true,
        "n_pred": n_pred,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "ap": tp / denom if denom else 1.0,
        "mean_matched_iou": float(np.mean(matched)) if tp else 0.0,
        "pq": float(np.sum(matched)) / pq_denom if pq_denom else 1.0,
    }


def _standard(iou, threshold):
    n_true, n_pred = iou.shape
    rows, cols = match_pairs(iou, threshold)
    return _scores(n_true, n_pred, len(rows), iou[rows, cols])


def _ap_sweep(tp_at) -> Dict[str, float]:
    """ap_50 ... ap_95 and their mean, tp_at(threshold) giving (tp, fp, fn)."""
    out = {}
    for th in AP_THRESHOLDS:
        tp, fp, fn = tp_at(th)
        out[f"ap_{int(round(th * 100))}"] = tp / (tp + fp + fn) if (tp + fp + fn) else 1.0
    out["ap_mean"] = float(np.mean(list(out.values())))
    return out


def _partial(overlap, area_t, area_p, threshold):
    """Each annotated cell scored by its best-matching prediction; other predictions ignored."""
    iou = _iou(overlap, area_t, area_p)
    n_true = iou.shape[0]
    if iou.shape[1]:
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(n_true), best]
    else:
        best, best_iou = np.zeros(n_true, int), np.zeros(n_true)
    matched = best_iou[best_iou >= threshold]
    tp = len(matched)
    out = _scores(n_true, tp, tp, matched)  # predictions counted = the matched ones: FP = 0 by definition
    out["mean_best_iou"] = float(best_iou.mean()) if n_true else 0.0

    def at(th):
        k = int((best_iou >= th).sum())
        return k, 0, n_true - k

    out.update(_ap_sweep(at))
    return out, best[best_iou > 0] if iou.shape[1] else np.zeros(0, int)


def paper_match(iou: np.ndarray):
    """(rows, cols) of the paper evaluator's assignment: cost 1 - IoU per pair, 0.55 per
    unmatched object, i.e. the matching that maximises the summed (IoU - 0.45) over pairs
    with IoU > 0.45."""
    from scipy.optimize import linear_sum_assignment

    if 0 in iou.shape:
        return np.zeros(0, int), np.zeros(0, int)
    floor = 1 - PAPER_COST_UNMATCHED
    gain = np.where(iou > floor, iou - floor, 0.0)
    rows, cols = linear_sum_assignment(-gain)
    keep = iou[rows, cols] > floor
    return rows[keep], cols[keep]


def paper_events(overlap, area_t, area_p, iou, rows, cols) -> Dict[str, int]:
    """DeepCell's error graph on the unmatched objects: merges, splits, catastrophes.

    A small object at least half inside an unmatched partner gets its IoU raised to
    0.1 so it stays linked; objects are linked where the (raised) IoU >= 0.1; a linked
    group whose most connected object has >= 2 links is a split (one true cell, several
    predictions), a merge (several true cells, one prediction) or a catastrophe (several
    of both).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nt, npred = iou.shape
    un_t = np.setdiff1d(np.arange(nt), rows)
    un_p = np.setdiff1d(np.arange(npred), cols)
    # objects in no merge/split/catastrophe group: DeepCell's "missed" (true) and "gained" (predicted)
    out = {"merges": 0, "splits": 0, "catastrophes": 0, "missed": len(un_t), "gained": len(un_p)}
    if len(un_t) == 0 or len(un_p) == 0:
        return out
    sub = iou[np.ix_(un_t, un_p)].copy()
    ov = overlap[np.ix_(un_t, un_p)]
    with np.errstate(divide="ignore", invalid="ignore"):
        contained = np.maximum(ov / area_t[un_t][:, None], ov / area_p[un_p][None, :])
    small = (sub > 0) & (sub < 1 - PAPER_COST_UNMATCHED) & (contained > 0.5)
    sub[small] = PAPER_EVENT_IOU
    ti, pj = np.nonzero(sub >= PAPER_EVENT_IOU)
    if len(ti) == 0:
        return out
    n = len(un_t) + len(un_p)
    graph = coo_matrix((np.ones(len(ti)), (ti, len(un_t) + pj)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    deg = np.bincount(ti, minlength=len(un_t)).tolist() + np.bincount(pj, minlength=len(un_p)).tolist()
    deg = np.asarray(deg)
    for c in np.unique(comp):
        members = np.flatnonzero(comp == c)
        if deg[members].max() < 2:
            continue
        k_t = int((members < len(un_t)).sum())
        k_p = len(members) - k_t
        out["missed"] -= k_t
        out["gained"] -= k_p
        if k_t == 1 and k_p > 1:
            out["splits"] += 1
        elif k_t > 1 and k_p == 1:
            out["merges"] += 1
        else:
            out["catastrophes"] += 1
    return out


def _paper(overlap, area_t, area_p):
    iou = _iou(overlap, area_t, area_p)
    n_true, n_pred = iou.shape
    rows, cols = paper_match(iou)
    events = paper_events(overlap, area_t, area_p, iou, rows, cols)
    matched = iou[rows, cols]
    correct = len(rows) + events["catastrophes"]  # the evaluator's quirk: a catastrophe counts as one correct
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision > 0 and recall > 0 else 0.0
    # the evaluator's PQ, read off the right pairs: matched pairs with IoU >= 0.5 are its TP; the
    # objects in no merge/split/catastrophe group ("gained", "missed") its FP and FN
    good = matched[matched >= 0.5]
    rq_denom = len(good) + events["gained"] / 2 + events["missed"] / 2
    pq = (float(good.mean()) if len(good) else 0.0) * (len(good) / rq_denom if rq_denom else 0.0)
    return {
        "n_true": n_true,
        "n_pred": n_pred,
        "tp": correct,
        "fp": n_pred - correct,
        "fn": n_true - correct,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_matched_iou": float(matched.mean()) if len(rows) else 0.0,
        "pq": pq,
        **events,
    }


def pixel_metrics(truth: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    _check(truth, pred)
    t, p = truth > 0, pred > 0
    inter = int(np.logical_and(t, p).sum())
    union = int(np.logical_or(t, p).sum())
    total = int(t.sum() + p.sum())
    return {"jaccard": inter / union if union else 1.0, "dice": 2 * inter / total if total else 1.0}


def evaluate_pair(
    truth: np.ndarray,
    pred: np.ndarray,
    threshold: float = 0.5,
    mode: str = "standard",
    min_size: int = 0,
    source: Optional[str] = None,
) -> Dict[str, object]:
    """Every metric of one (ground truth, prediction) pair in one mode.

    ``source`` names the pair in errors and warnings (e.g. the patch's mask file).
    The result has ``mode`` and ``notes`` (binary masks that were labelled, empty
    ground truth) besides the numbers.
    """
    if mode not in MODES:
        raise SegRefineError(f"unknown evaluation mode {mode!r} (one of {list(MODES)})")
    connectivity = 2 if mode == "paper" else 1
    t, t_note = to_instances(truth, "ground truth", source, connectivity)
    p, p_note = to_instances(pred, "prediction", source, connectivity)
    if t.shape != p.shape:
        raise SegRefineError(_where(source, f"ground truth {t.shape} and prediction {p.shape} differ in shape"))
    if mode == "paper":
        from skimage.measure import label

        t, p = label(t, connectivity=2, background=0), label(p, connectivity=2, background=0)
    t, p = remove_small(t, min_size), remove_small(p, min_size)
    notes: List[str] = [n for n in (t_note, p_note) if n]
    if not t.any():
        notes.append("ground truth has no cell")
        log.warning("%s", _where(source, "ground truth has no cell"))
    overlap, area_t, area_p = overlaps(t, p)
    if mode == "standard":
        iou = _iou(overlap, area_t, area_p)
        out: Dict[str, object] = dict(_standard(iou, threshold))

        def at(th):
            k = len(match_pairs(iou, th)[0])
            return k, iou.shape[1] - k, iou.shape[0] - k

        out.update(_ap_sweep(at))
        out.update(pixel_metrics(t, p))
    elif mode == "partial":
        from skimage.segmentation import relabel_sequential

        part, best = _partial(overlap, area_t, area_p, threshold)
        out = dict(part)
        p_seq = relabel_sequential(p)[0]
        out.update(pixel_metrics(t, np.where(np.isin(p_seq, best + 1), p_seq, 0)))
    else:
        out = dict(_paper(overlap, area_t, area_p))
        out.update(pixel_metrics(t, p))
    out["mode"] = mode
    out["notes"] = "; ".join(notes)
    return out
