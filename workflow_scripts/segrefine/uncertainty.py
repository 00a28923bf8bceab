"""Per-cell uncertainty from the models themselves, and its per-patch aggregate.

For every cell of a label image, ``cell_uncertainty`` gives

- ``probability``: the mean over the cell's pixels of the model's own per-pixel probability
  (``Adapter.predict_with_probability``: Cellpose / cpsam sigmoid of the cell probability output, StarDist the
  object probability of its polygon, U-Net the foreground probability); NaN for a framework that gives none
  (the classical model);
- ``tta_agreement``: test-time augmentation. The model predicts the image again under flips and 90-degree
  rotations (``TRANSFORMS``; 8 = the dihedral group, 4 = identity, left-right flip, up-down flip, 180-degree
  rotation, which keep the image's shape), each prediction is mapped back to the image's orientation, and the
  cell's agreement is the mean over those predictions of its best IoU with any of their cells: 1 = the model
  finds the same cell whichever way the image lies; 0 = never. When the labels are the model's own prediction
  (``labels=None``) the identity is left out (it would agree by construction); when other labels are given, the
  identity prediction counts as one of the augmentations. NaN when ``tta`` is 0;
- ``other_iou`` (only when ``other`` labels are given, e.g. the other stage's prediction: pretrained vs
  fine-tuned): the cell's best IoU with any cell of ``other``; NaN otherwise;
- ``uncertainty`` in [0, 1]: one minus the mean of the confidences available for the cell, where the
  probability counts as its margin from the 0.5 decision boundary, ``clip(2 p - 1, 0, 1)`` (a cell whose
  pixels sit at p = 0.5 is a coin flip, p = 1 is sure), and ``tta_agreement`` and ``other_iou`` count as they
  are; NaN terms are left out; NaN when none is available.

``patch_uncertainty`` aggregates one patch's cells for ranking where to annotate next (segrefine.annotate_next).

Only numpy is imported here: the functions run in every model framework's env.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from segrefine import SegRefineError

#: (number of counter-clockwise 90-degree rotations, then a left-right flip): the dihedral group of the square
TRANSFORMS: Tuple[Tuple[int, bool], ...] = (
    (0, False),
    (1, False),
    (2, False),
    (3, False),
    (0, True),
    (1, True),
    (2, True),
    (3, True),
)
#: the four transforms that keep an image's shape: identity, left-right flip, up-down flip (= 180 + left-right),
#: 180-degree rotation
SHAPE_PRESERVING: Tuple[Tuple[int, bool], ...] = ((0, False), (0, True), (2, True), (2, False))
FIELDS = ("probability", "tta_agreement", "other_iou", "uncertainty")


def transforms(tta: int) -> List[Tuple[int, bool]]:
    """The transforms of ``tta`` augmentations (identity included): 8, 4, or 1 (identity only) / 0 (none)."""
    if tta == 8:
        return list(TRANSFORMS)
    if tta == 4:
        return list(SHAPE_PRESERVING)
    if tta in (0, 1):
        return [(0, False)][:tta]
    raise SegRefineError(f"test-time augmentation takes 0, 4 or 8 transforms, got {tta}")


def forward(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """The image rotated ``k`` times by 90 degrees (counter-clockwise, axes 0 and 1), then flipped left-right."""
    x = np.rot90(np.asarray(image), k, axes=(0, 1))
    return np.ascontiguousarray(x[:, ::-1] if flip else x)


def inverse(labels: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``forward``'s inverse: a prediction of the transformed image mapped back to the image's orientation."""
    x = np.asarray(labels)
    x = x[:, ::-1] if flip else x
    return np.ascontiguousarray(np.rot90(x, -k, axes=(0, 1)))


def best_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per label of ``a`` (index = label, 0 unused): the best IoU of that cell with any cell of ``b``."""
    a = np.asarray(a).astype(np.int64, copy=False).ravel()
    b = np.asarray(b).astype(np.int64, copy=False).ravel()
    if a.shape != b.shape:
        raise SegRefineError(f"label images of different sizes: {a.shape} vs {b.shape}")
    na = int(a.max()) + 1 if a.size else 1
    area_a = np.bincount(a, minlength=na)
    area_b = np.bincount(b)
    best = np.zeros(na, np.float64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return best
    nb = int(b.max()) + 1
    up, inter = np.unique(a[both] * nb + b[both], return_counts=True)
    ia, ib = up // nb, up % nb
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    np.maximum.at(best, ia, iou)
    return best


def _per_cell_mean(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n)
    sums = np.bincount(flat, weights=np.asarray(values, np.float64).ravel(), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / area


def combine(probability: float, tta_agreement: float, other_iou: float = math.nan) -> float:
    """One cell's uncertainty in [0, 1] (module docstring): 1 - mean of the available confidences."""
    terms = []
    if not math.isnan(probability):
        terms.append(min(max(2.0 * probability - 1.0, 0.0), 1.0))
    for t in (tta_agreement, other_iou):
        if not math.isnan(t):
            terms.append(min(max(t, 0.0), 1.0))
    return 1.0 - float(np.mean(terms)) if terms else math.nan


def _predict_with_probability(model, image: np.ndarray):
    f = getattr(model, "predict_with_probability", None)
    labels, prob = f(image) if f is not None else (model.predict(image), None)  # duck-typed models: predict only
    return np.asarray(labels), (None if prob is None else np.asarray(prob, np.float32))


def cell_uncertainty(
    model, image: np.ndarray, labels: Optional[np.ndarray] = None, other: Optional[np.ndarray] = None, tta: int = 8
) -> Dict[int, Dict[str, float]]:
    """{label: {"probability", "tta_agreement", "other_iou", "uncertainty"}} for every cell of ``labels``
    (default: the model's own prediction of ``image``), as the module docstring defines them. ``other``: a second
    label image of the same patch (e.g. the other stage's prediction) for ``other_iou``; ``tta``: 8, 4 or 0
    augmentations (0: no test-time augmentation, ``tta_agreement`` NaN). Costs ``tta`` predictions (``tta`` - 1
    when ``labels`` is None)."""
    return predict_with_uncertainty(model, image, labels, other, tta)[1]


def predict_with_uncertainty(
    model, image: np.ndarray, labels: Optional[np.ndarray] = None, other: Optional[np.ndarray] = None, tta: int = 8
):
    """(the model's labels of ``image``, exactly ``predict``'s; ``cell_uncertainty`` of the same call)."""
    image = np.asarray(image)
    pred, prob = _predict_with_probability(model, image)
    if pred.shape != image.shape[:2]:
        raise SegRefineError(
            f"model {type(model).__name__} returned labels of shape {pred.shape} for an image of "
            f"shape {image.shape[:2]}"
        )
    ref = pred if labels is None else np.asarray(labels)
    if ref.shape != image.shape[:2]:
        raise SegRefineError(f"labels of shape {ref.shape} do not match the image's {image.shape[:2]}")
    if ref.size and ref.min() < 0:
        raise SegRefineError("labels hold negative values")
    ref = ref.astype(np.int64, copy=False)
    ids = np.unique(ref)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return pred, {}
    n = int(ids.max()) + 1
    p_cell = _per_cell_mean(ref, prob, n) if prob is not None else np.full(n, np.nan)
    steps = [t for t in transforms(tta) if labels is not None or t != (0, False)]
    if steps:
        agree = np.zeros(n, np.float64)
        for k, flip in steps:
            if (k, flip) == (0, False):
                aug = pred
            else:
                aug = inverse(np.asarray(model.predict(forward(image, k, flip))), k, flip)
                if aug.shape != ref.shape:
                    raise SegRefineError(
                        f"model {type(model).__name__} returned labels of shape {aug.shape} for "
                        f"a transformed image; expected {ref.shape}"
                    )
            agree += best_iou(ref, aug)[:n]
        agree /= len(steps)
    else:
        agree = np.full(n, np.nan)
    if other is not None:
        other = np.asarray(other)
        if other.shape != ref.shape:
            raise SegRefineError(f"other labels of shape {other.shape} do not match the image's {ref.shape}")
        o_iou = best_iou(ref, other)[:n]
    else:
        o_iou = np.full(n, np.nan)
    out = {}
    for i in ids.tolist():
        p, a, o = float(p_cell[i]), float(agree[i]), float(o_iou[i])
        out[int(i)] = {"probability": p, "tta_agreement": a, "other_iou": o, "uncertainty": combine(p, a, o)}
    return pred, out


def patch_uncertainty(cells: Dict[int, Dict[str, float]]) -> Dict[str, float]:
    """One patch's aggregate of ``cell_uncertainty``: ``n_cells``, the mean of each field over the cells that
    have it (NaN when none has), and ``unsure_cells``, the cells with uncertainty above 0.5. A patch without cells
    has ``uncertainty`` 0 (no cell to be unsure about; cells the model misses are the disagreement term's
    business in annotate_next)."""
    out: Dict[str, float] = {"n_cells": float(len(cells))}
    for f in FIELDS:
        v = np.array([c[f] for c in cells.values()], np.float64)
        v = v[~np.isnan(v)]
        out[f] = float(v.mean()) if len(v) else math.nan
    if not cells:
        out["uncertainty"] = 0.0
    out["unsure_cells"] = float(sum(1 for c in cells.values() if c["uncertainty"] > 0.5))
    return out


def cell_probability(labels: np.ndarray, prob: Optional[np.ndarray], n: Optional[int] = None) -> np.ndarray:
    """Mean probability of cells 1..n of ``labels`` (index k - 1 = cell k; float64; NaN for a cell without pixels
    or when ``prob`` is None): the whole-slide cell table's ``probability`` column."""
    labels = np.asarray(labels)
    n = (int(labels.max()) if labels.size else 0) if n is None else int(n)
    if prob is None or n == 0:
        return np.full(n, np.nan)
    prob = np.asarray(prob)
    if prob.shape != labels.shape:
        raise SegRefineError(f"probability map of shape {prob.shape} does not match the labels' {labels.shape}")
    return _per_cell_mean(labels.astype(np.intp, copy=False), prob, n + 1)[1 : n + 1]
