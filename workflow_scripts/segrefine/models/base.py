"""The adapter contract every model framework implements.

An adapter wraps one framework's model object and offers five things:
``from_pretrained`` (official weights resolved to a local file, a local path,
or ``None`` = from scratch), ``fine_tune`` on (image, instance mask) pairs,
``save`` into a model folder, ``load`` from a model card, and ``predict``
instance labels for an image. The step code (segrefine.finetune, .segment,
.evaluate) only ever talks to this contract.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Pair = Tuple[np.ndarray, np.ndarray]


class Adapter(abc.ABC):
    framework: str = ""
    #: official pretrained names -> file name in the model cache (``{cache}/{framework}/{file}``)
    official_weights: Dict[str, str] = {}

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, weights: Optional[Path], params: dict) -> "Adapter":
        """A model initialised from a local weights file, or from scratch when ``weights`` is None."""

    @classmethod
    def load(cls, card_path: Path, card: dict) -> "Adapter":
        """A saved model, from its card: ``from_pretrained`` of its weights with the card's hyperparameters and
        thresholds as parameters. An adapter whose card keeps other settings (preprocessing) overrides it."""
        from segrefine.models import weights_path

        params = {**card.get("hyperparameters", {}), **card.get("thresholds", {})}
        return cls.from_pretrained(weights_path(card_path, card), params)

    @classmethod
    def download_official(cls, name: str, dest: Path) -> Path:
        """Download the official weights ``name`` into folder ``dest`` (network needed); returns the file."""
        from segrefine import SegRefineError

        raise SegRefineError(f"{cls.framework} publishes no official weights; give a local weights file")

    @abc.abstractmethod
    def fine_tune(
        self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int, work_dir: Path
    ) -> Dict[str, List[float]]:
        """Train in place; returns loss curves {"train_loss": [...], "val_loss": [...], "val_epoch": [...]}."""

    @abc.abstractmethod
    def save(self, model_dir: Path) -> Path:
        """Write the weights into ``model_dir``; returns the weights file."""

    @abc.abstractmethod
    def predict(self, image: np.ndarray) -> np.ndarray:
        """Instance labels (uint32, 0 = background) for a (h, w) or (h, w, c) image of any size."""

    def predict_with_probability(self, image: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(labels, probability): the labels ``predict(image)`` returns and the model's own per-pixel probability
        that a pixel belongs to a cell, (h, w) float32 in [0, 1], or ``None`` when the framework gives none.

        What the probability is depends on the framework (docs/models.md, "Per-cell uncertainty"): Cellpose's and
        cpsam's sigmoid of the cell probability output, StarDist's object probability of the polygon a pixel lies
        in (0 outside every polygon), the U-Net's foreground probability. Default: ``(predict(image), None)``. An
        adapter that overrides it returns exactly the labels of ``predict``."""
        return self.predict(image), None

    def predict_window_with_probability(
        self, image: np.ndarray, origin: Tuple[int, int], needed: Optional[np.ndarray] = None
    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``predict_with_probability`` of a slide window whose top-left pixel is ``origin`` (see
        ``predict_window``, and ``needed`` there); the labels are exactly ``predict_window``'s. Default:
        ``predict_with_probability(image)`` (the origin does not matter); an adapter with a slide-anchored grid
        overrides both."""
        return self.predict_with_probability(image)

    #: True when ``predict_window`` uses ``needed`` to skip work (Cellpose: the network blocks no needed pixel
    #: depends on); the shard then computes each window's needed pixels
    skips_unneeded: bool = False

    def predict_window(
        self, image: np.ndarray, origin: Tuple[int, int], needed: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Instance labels of a slide window whose top-left pixel is ``origin`` = (x, y) in slide pixels.

        Tiled inference calls this for every window and whole-image inference with origin (0, 0). An adapter
        whose prediction depends on where the image sits (a resampling or block grid anchored at the slide's
        origin, so that a window sees the same grid as the whole slide) overrides it, and its ``predict(image)``
        is ``predict_window(image, (0, 0))``. Default: ``predict(image)``: the origin does not matter.

        ``needed``: None, or an (h, w) bool mask of the image's pixels whose labels the caller keeps (the shard:
        the tiles' cores and halo within the tissue grown by the halo). An adapter with ``skips_unneeded`` may then
        skip the work no needed pixel depends on: the labels of the cells lying in ``needed`` are unchanged, the
        others may be missing or differ. Default: ignored."""
        return self.predict(image)

    def context_px(self) -> int:
        """The margin (px) beyond a tile window that this model must see so that its prediction of the window
        equals its whole-slide prediction there (its receptive field, or the blocks it predicts in). The shard
        grows every window by this much and crops the labels back (``segmentation.tiling.model_context``).
        Default 0: the window's own pixels (and the halo the plan gives every window) suffice."""
        return 0

    #: inference thresholds the evaluation's threshold sweep may set (keys of ``self.params``); none by default
    SWEEPABLE_THRESHOLDS: Tuple[str, ...] = ()

    def set_thresholds(self, **values: float) -> None:
        """Inference thresholds for the next predictions (the evaluation's threshold sweep)."""
        from segrefine import SegRefineError

        unknown = sorted(set(values) - set(self.SWEEPABLE_THRESHOLDS))
        if unknown:
            raise SegRefineError(
                f"{self.framework} has no inference thresholds {unknown} (sweepable: {list(self.SWEEPABLE_THRESHOLDS)})"
            )
        self.params.update({k: float(v) for k, v in values.items()})

    def set_intensity_reference(self, ref: Optional[dict]) -> bool:
        """Normalise (or threshold) every later ``predict`` with the whole slide's intensity statistics ``ref``
        (``segrefine.intensity.intensity_reference``) instead of each image's own, so that a tile window is
        normalised exactly as the whole slide would be; ``None`` goes back to per-image statistics. Returns True
        when the adapter applies it. Default: not supported (False), each window keeps its own statistics."""
        return False

    def _keep_percentile_reference(self, ref: Optional[dict]) -> bool:
        """``set_intensity_reference`` of an adapter that stretches images between the ``norm_percentiles`` of
        its ``params``: ``ref`` is checked to hold those percentiles (a clear error now, not at the first tile)
        and kept as ``self._reference`` for the later predictions; ``None`` goes back to each image's own.
        Returns True."""
        if ref is not None:
            from segrefine.intensity import check_reference

            check_reference(ref, self.params["norm_percentiles"])
        self._reference = ref
        return True

    @abc.abstractmethod
    def card_fields(self) -> dict:
        """``preprocessing``, ``thresholds`` and ``hyperparameters`` entries of the model card."""

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where the model runs ("cuda:0", "cpu"), for logs and the card."""
