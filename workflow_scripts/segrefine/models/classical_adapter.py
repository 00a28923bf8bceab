"""A classical baseline: smoothing, Otsu threshold, distance-transform watershed (scikit-image).

It has no weights and no gradient training. Its "fine-tuning" is a calibration:
a grid search of its few parameters (smoothing, threshold scale, seed distance)
that maximises the mean F1 on the training patches, so it sits in the same
before/after table as the learned models. Its saved "weights" are the chosen
parameters as JSON. It is fast, so it also serves tests and benchmarks of the
whole-slide engine.

Its threshold is ``threshold_scale`` x Otsu's threshold of the gray-level
histogram of the image it is given, or, once ``set_intensity_reference`` has
been called, of the whole slide (``segrefine.intensity``): then every tile
window is thresholded like the whole slide. Calibration treats each training
patch as its own slide (the patch's own histogram), the same rule.
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
    "sigma": 1.0,  # Gaussian smoothing (px) before thresholding
    "threshold_scale": 1.0,  # foreground = smoothed > scale x Otsu threshold
    "min_distance": 4,  # minimum distance (px) between watershed seeds (~ smallest cell radius)
    "min_size": 15,  # objects smaller than this (px) are dropped
    "invert": False,  # True for bright-field stains (H&E): nuclei are dark
}
GRID = {"sigma": [0.5, 1.0, 2.0], "threshold_scale": [0.8, 1.0, 1.2], "min_distance": [3, 4, 6, 8]}


def _gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    if img.ndim != 2:
        raise SegRefineError(f"the classical model takes 2-D grayscale or RGB images, got shape {img.shape}")
    return img.astype(np.float32)


def segment(
    img: np.ndarray,
    sigma: float,
    threshold_scale: float,
    min_distance: int,
    min_size: int,
    invert: bool,
    threshold: Optional[float] = None,
    gray_max: Optional[float] = None,
) -> np.ndarray:
    """Instance labels of one image; ``threshold`` (in smoothed-image units) overrides Otsu of the smoothed image;
    ``gray_max``: the gray maximum that ``invert`` subtracts from (default: the image's)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    g = _gray(img)
    if invert:
        g = (np.float32(gray_max) if gray_max is not None else g.max()) - g
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


def reference_threshold(ref: dict, invert: bool):
    """(threshold, gray_max) of the model for images described by the intensity reference ``ref``:
    Otsu's threshold of the reference's gray histogram (mirrored about the gray maximum for ``invert``)."""
    from segrefine.intensity import check_reference

    gray = check_reference(ref)["gray"]
    if invert:
        return float(gray["max"]) - float(gray["otsu"]), float(gray["max"])
    return float(gray["otsu"]), None


def _predict(img: np.ndarray, p: dict, ref: Optional[dict] = None) -> np.ndarray:
    from segrefine.intensity import intensity_reference

    if ref is None:
        ref = intensity_reference(np.asarray(img))
    gray = ref["gray"]
    if float(gray["max"]) == float(gray["min"]):
        return np.zeros(np.asarray(img).shape[:2], np.uint32)
    threshold, gray_max = reference_threshold(ref, p["invert"])
    return segment(
        img,
        p["sigma"],
        p["threshold_scale"],
        p["min_distance"],
        p["min_size"],
        p["invert"],
        threshold=threshold,
        gray_max=gray_max,
    )


def _mean_f1(pairs: Sequence[Pair], p: dict) -> float:
    from segrefine.metrics import object_metrics

    return float(
        np.mean(
            [
                object_metrics(np.asarray(m).astype(np.int64), _predict(img, p).astype(np.int64))["f1"]
                for img, m in pairs
            ]
        )
    )


class ClassicalAdapter(Adapter):
    framework = "classical"
    official_weights: Dict[str, str] = {}

    def __init__(self, params: dict):
        unknown = set(params) - set(DEFAULTS) - {"seed", "grid"}
        if unknown:
            raise SegRefineError(f"unknown classical-model parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.params = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
        self.grid = params.get("grid", GRID)
        self.reference: Optional[dict] = None

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

    def set_intensity_reference(self, ref: Optional[dict]) -> bool:
        """Threshold every image with the slide's Otsu threshold (``ref``), not the image's own; None undoes it."""
        if ref is not None:
            reference_threshold(ref, self.params["invert"])  # a clear error now, not at the first tile
        self.reference = ref
        return True

    def predict(self, image: np.ndarray) -> np.ndarray:
        return _predict(image, self.params, self.reference)

    def fine_tune(
        self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int, work_dir: Path
    ) -> Dict[str, List[float]]:
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
        return {
            "preprocessing": {
                "grayscale": "mean of RGB channels",
                "threshold": "Otsu of the gray histogram (slide-level with an intensity reference) x threshold_scale",
            },
            "thresholds": {"threshold_scale": self.params["threshold_scale"], "min_size": self.params["min_size"]},
            "hyperparameters": {
                "sigma": self.params["sigma"],
                "min_distance": self.params["min_distance"],
                "invert": self.params["invert"],
                "grid": self.grid,
            },
        }
