"""A classical baseline: smoothing, Otsu threshold, distance-transform watershed (scikit-image).

It has no weights and no gradient training. Its "fine-tuning" is a calibration:
a grid search of its few parameters (smoothing, threshold scale, seed distance)
that maximises the mean F1 on the training patches, so it sits in the same
before/after table as the learned models. Its saved "weights" are the chosen
parameters as JSON. It is fast, so it also serves tests and benchmarks of the
whole-slide engine.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from segrefine import SegRefineError
from segrefine.models.base import Adapter, Pair

log = logging.getLogger("segrefine.classical")

DEFAULTS = {
    "sigma": 1.0,             # Gaussian smoothing (px) before thresholding
    "threshold_scale": 1.0,   # foreground = smoothed > scale x Otsu threshold
    "min_distance": 4,        # minimum distance (px) between watershed seeds (~ smallest cell radius)
    "min_size": 15,           # objects smaller than this (px) are dropped
    "invert": False,          # True for bright-field stains (H&E): nuclei are dark
}
GRID = {"sigma": [0.5, 1.0, 2.0], "threshold_scale": [0.8, 1.0, 1.2], "min_distance": [3, 4, 6, 8]}


def _gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    if img.ndim != 2:
        raise SegRefineError(f"the classical model takes 2-D grayscale or RGB images, got shape {img.shape}")
    return img.astype(np.float32)


def segment(img: np.ndarray, sigma: float, threshold_scale: float, min_distance: int, min_size: int,
            invert: bool, threshold: Optional[float] = None) -> np.ndarray:
    """Instance labels of one image; ``threshold`` (in smoothed-image units) overrides Otsu."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    g = _gray(img)
    if invert:
        g = g.max() - g
    smooth = ndimage.gaussian_filter(g, sigma) if sigma > 0 else g
    if threshold is None:
        if smooth.max() == smooth.min():
            return np.zeros(g.shape, np.uint32)
        threshold = threshold_otsu(smooth)
    fg = smooth > threshold_scale * threshold
    if not fg.any():
        return np.zeros(g.shape, np.uint32)
    dist = ndimage.distance_transform_edt(fg)
    comps, _ = ndimage.label(fg)
    peaks = peak_local_max(dist, min_distance=max(int(min_distance), 1), labels=comps, exclude_border=False)
    markers = np.zeros(g.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    if min_size > 1 and labels.max():
        sizes = np.bincount(labels.ravel())
        labels[sizes[labels] < min_size] = 0
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)[0].astype(np.uint32)


def _mean_f1(pairs: Sequence[Pair], p: dict) -> float:
    from segrefine.metrics import object_metrics

    return float(np.mean([object_metrics(np.asarray(m).astype(np.int64),
                                         segment(img, p["sigma"], p["threshold_scale"], p["min_distance"],
                                                 p["min_size"], p["invert"]).astype(np.int64))["f1"]
                          for img, m in pairs]))


class ClassicalAdapter(Adapter):
    framework = "classical"
    official_weights: Dict[str, str] = {}

    def __init__(self, params: dict):
        unknown = set(params) - set(DEFAULTS) - {"seed", "grid"}
        if unknown:
            raise SegRefineError(f"unknown classical-model parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.params = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
        self.grid = params.get("grid", GRID)

    @classmethod
    def from_pretrained(cls, weights: Optional[Path], params: dict) -> "ClassicalAdapter":
        params = dict(params or {})
        if weights is not None:
            try:
                saved = json.loads(Path(weights).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SegRefineError(f"{weights}: not a classical-model parameter file ({exc})") from exc
            if not isinstance(saved, dict) or saved.get("framework") != "classical":
                raise SegRefineError(f"{weights}: not a classical-model parameter file (no framework 'classical')")
            params = {**params, **saved["params"]}
        return cls(params)

    @classmethod
    def load(cls, card_path: Path, card: dict) -> "ClassicalAdapter":
        from segrefine.models import weights_path

        return cls.from_pretrained(weights_path(card_path, card), card.get("hyperparameters", {}))

    @property
    def device(self) -> str:
        return "cpu"

    def predict(self, image: np.ndarray) -> np.ndarray:
        p = self.params
        return segment(image, p["sigma"], p["threshold_scale"], p["min_distance"], p["min_size"], p["invert"])

    def fine_tune(self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int,
                  work_dir: Path) -> Dict[str, List[float]]:
        """Grid search of the parameters for the best mean F1 on the training patches."""
        grid = (params or {}).get("grid", self.grid)
        keys = sorted(grid)
        curve, best = [], (-1.0, None)
        for values in itertools.product(*(grid[k] for k in keys)):
            trial = dict(self.params, **dict(zip(keys, values)))
            f1 = _mean_f1(train, trial)
            curve.append(1.0 - f1)
            if f1 > best[0]:
                best = (f1, trial)
        self.params = best[1]
        log.info("classical calibration: best train F1 %.3f with %s", best[0], {k: self.params[k] for k in keys})
        val_loss = [1.0 - _mean_f1(val, self.params)] if val else []
        # "loss" here is 1 - F1 of each grid point, in search order
        return {"train_loss": curve, "val_loss": val_loss, "val_epoch": [len(curve) - 1] if val_loss else []}

    def save(self, model_dir: Path) -> Path:
        target = Path(model_dir) / "params.json"
        target.write_text(json.dumps({"framework": "classical", "params": self.params}, indent=2, sort_keys=True))
        return target

    def card_fields(self) -> dict:
        return {"preprocessing": {"grayscale": "mean of RGB channels", "threshold": "Otsu x threshold_scale"},
                "thresholds": {"threshold_scale": self.params["threshold_scale"], "min_size": self.params["min_size"]},
                "hyperparameters": {"sigma": self.params["sigma"], "min_distance": self.params["min_distance"],
                                    "invert": self.params["invert"], "grid": self.grid}}
