"""Cellpose 3.1 cyto family (cyto, cyto2, cyto3, nuclei) behind the adapter contract.

Training is cellpose's own ``train.train_seg``; the defaults are the paper's
(SGD, initial learning rate 0.2, weight decay 1e-5). Runs on the GPU when torch
sees one, on the CPU otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from segrefine import SegRefineError
from segrefine.models.base import Adapter, Pair

log = logging.getLogger("segrefine.cellpose")

DEFAULTS = {
    "n_epochs": 100, "learning_rate": 0.2, "weight_decay": 1e-5, "SGD": True, "batch_size": 8,
    "bsize": 224, "min_train_masks": 1, "diam_mean": 30.0,
    "flow_threshold": 0.4, "cellprob_threshold": 0.0, "min_size": 15, "diameter": None,
    # augmentation switches: cellpose always rotates and flips training crops; the
    # CSRefiner 004 study found random rotation hurt Cellpose, so both can be turned off
    "augment_rotate": True, "augment_flip": True,
}


@contextlib.contextmanager
def _augmentation(rotate: bool, flip: bool):
    """cellpose 3.1's train_seg has no augmentation switch: pass ours to its transform."""
    from cellpose import transforms

    original = transforms.random_rotate_and_resize
    transforms.random_rotate_and_resize = functools.partial(original, rotate=rotate, do_flip=flip)
    try:
        yield
    finally:
        transforms.random_rotate_and_resize = original


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _as_input(img: np.ndarray) -> np.ndarray:
    """Cellpose takes (h, w) grayscale or (h, w, 3) colour; anything else is refused here."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim not in (2, 3):
        raise SegRefineError(f"cellpose takes 2-D grayscale or RGB images, got shape {img.shape}")
    return img.astype(np.float32)


def _channels(img: np.ndarray):
    return [0, 0] if img.ndim == 2 else [2, 3]  # grayscale, or cytoplasm=green + nuclei=blue


def _slide_lowhigh(ref: dict):
    """(gray, rgb) lowhigh arrays for cellpose's two model channels from a slide intensity reference.

    cellpose 3.1 normalises after ``convert_image``: a grayscale image becomes
    (gray, zeros) and an RGB one with channels [2, 3] becomes (green, blue), and
    ``normalize_img`` takes ``lowhigh`` of shape (2 channels, 2). The zero
    channel keeps [0, 1] so that it stays zero, as with per-image normalisation
    (which skips a flat channel)."""
    from segrefine.intensity import check_reference, lowhigh

    check_reference(ref)
    C = int(ref["channels"])
    if C == 1:
        lh = lowhigh(ref, 1.0, 99.0)
        gray = np.array([lh[0], [0.0, 1.0]])
        rgb = None
    elif C >= 3:
        gray = None
        rgb = lowhigh(ref, 1.0, 99.0, channels=[1, 2])
    else:
        raise SegRefineError(f"cellpose takes grayscale or RGB slides; the intensity reference has {C} channels")
    for lh in (gray, rgb):
        if lh is not None:
            flat = lh[:, 1] - lh[:, 0] <= 1e-3  # a flat channel: no division by zero
            lh[flat, 1] = lh[flat, 0] + 1.0
    return {False: gray, True: rgb}


def _normalize_default() -> dict:
    from cellpose.models import normalize_default

    return dict(normalize_default)


class CellposeAdapter(Adapter):
    framework = "cellpose"
    official_weights = {"cyto": "cytotorch_0", "cyto2": "cyto2torch_0", "cyto3": "cyto3", "nuclei": "nucleitorch_0"}

    def __init__(self, model, params: dict):
        self.model = model
        self.params = {**DEFAULTS, **(params or {})}

    @classmethod
    def download_official(cls, name: str, dest: Path) -> Path:
        """Fetch official weights with cellpose's own downloader into ``dest`` (network needed)."""
        import os

        os.environ["CELLPOSE_LOCAL_MODELS_PATH"] = str(dest)  # read when cellpose.models is imported
        from cellpose import models

        return Path(models.model_path(name))

    # -- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def _torch_device():
        import torch

        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    @classmethod
    def from_pretrained(cls, weights: Optional[Path], params: dict) -> "CellposeAdapter":
        from cellpose import models

        params = {**DEFAULTS, **(params or {})}
        _seed_everything(int(params.get("seed", 0)))
        # MKLDNN weights (cellpose's CPU inference default) cannot be trained: keep plain tensors
        device = cls._torch_device()
        if weights is None:
            model = models.CellposeModel(device=device, pretrained_model=False, diam_mean=float(params["diam_mean"]),
                                         mkldnn=False)
        else:
            weights = Path(weights)
            if not weights.is_file():
                # cellpose itself would fall back to downloading cyto3: never let it
                raise SegRefineError(f"{weights}: Cellpose weights file not found")
            try:
                model = models.CellposeModel(device=device, pretrained_model=str(weights), mkldnn=False)
            except Exception as exc:
                raise SegRefineError(f"{weights}: not a Cellpose 3 weights file ({type(exc).__name__}: {exc}); "
                                     "is it the weights of another framework?") from exc
        return cls(model, params)

    @classmethod
    def load(cls, card_path: Path, card: dict) -> "CellposeAdapter":
        from segrefine.models import weights_path

        params = {**card.get("hyperparameters", {}), **card.get("thresholds", {})}
        return cls.from_pretrained(weights_path(card_path, card), params)

    @property
    def device(self) -> str:
        return str(self.model.device)

    # -- training -----------------------------------------------------------------------------------------------
    def fine_tune(self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int,
                  work_dir: Path) -> Dict[str, List[float]]:
        from cellpose import train as cp_train

        p = {**self.params, **(params or {})}
        self.params = p
        _seed_everything(seed)
        imgs = [_as_input(i) for i, _ in train]
        lbls = [np.asarray(m).astype(np.int32) for _, m in train]
        chans = _channels(imgs[0])
        val_imgs = [_as_input(i) for i, _ in val] or None
        val_lbls = [np.asarray(m).astype(np.int32) for _, m in val] or None
        work_dir = Path(work_dir)
        (work_dir / "models").mkdir(parents=True, exist_ok=True)
        log.info("cellpose fine-tuning on %s: %d train / %d val images, %d epochs",
                 self.device, len(imgs), len(val) if val else 0, p["n_epochs"])
        with _augmentation(bool(p["augment_rotate"]), bool(p["augment_flip"])):
            path, train_losses, test_losses = cp_train.train_seg(
                self.model.net, train_data=imgs, train_labels=lbls, test_data=val_imgs, test_labels=val_lbls,
                channels=chans, normalize=True, learning_rate=float(p["learning_rate"]),
                weight_decay=float(p["weight_decay"]), SGD=bool(p["SGD"]), n_epochs=int(p["n_epochs"]),
                batch_size=int(p["batch_size"]), bsize=int(p["bsize"]), min_train_masks=int(p["min_train_masks"]),
                save_path=str(work_dir), model_name="cellpose_finetune", save_every=10**9)
        self.model.diam_labels = float(self.model.net.diam_labels.data.cpu().numpy()[0])
        test_losses = np.asarray(test_losses, dtype=float)
        val_epoch = [int(e) for e in np.nonzero(test_losses)[0]] if val_imgs else []
        return {"train_loss": [float(x) for x in train_losses],
                "val_loss": [float(test_losses[e]) for e in val_epoch], "val_epoch": val_epoch}

    def save(self, model_dir: Path) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        target = model_dir / "weights.cellpose"
        self.model.net.save_model(str(target))
        return target

    # -- inference ----------------------------------------------------------------------------------------------
    def diameter(self) -> float:
        d = self.params.get("diameter")
        if d:
            return float(d)
        return float(getattr(self.model, "diam_labels", 0) or self.model.diam_mean)

    SWEEPABLE_THRESHOLDS = ("flow_threshold", "cellprob_threshold")

    def set_intensity_reference(self, ref: Optional[dict]) -> bool:
        """Normalise with the slide's 1st/99th percentiles (cellpose's defaults) instead of each image's."""
        self._lowhigh = None if ref is None else _slide_lowhigh(ref)
        return True

    def _normalize(self, img: np.ndarray):
        """cellpose's ``normalize`` argument: per image (True) or the slide's lowhigh for the image's model channels."""
        lowhigh = getattr(self, "_lowhigh", None)
        if lowhigh is None:
            return True
        if lowhigh[img.ndim == 3] is None:
            raise SegRefineError(f"image of shape {img.shape} does not match the slide's intensity reference "
                                 f"({'grayscale' if lowhigh[False] is not None else 'RGB'})")
        return {**_normalize_default(), "normalize": True, "lowhigh": lowhigh[img.ndim == 3]}

    def predict(self, image: np.ndarray) -> np.ndarray:
        img = _as_input(image)
        masks = self.model.eval(img, channels=_channels(img), diameter=self.diameter(), normalize=self._normalize(img),
                                flow_threshold=float(self.params["flow_threshold"]),
                                cellprob_threshold=float(self.params["cellprob_threshold"]),
                                min_size=int(self.params["min_size"]))[0]
        return np.asarray(masks).astype(np.uint32)

    def card_fields(self) -> dict:
        p = self.params
        return {
            "preprocessing": {"normalize": "percentile 1-99 per image (cellpose default), or of the whole slide "
                                           "when segmenting a slide (intensity reference)",
                              "channels": "grayscale [0, 0]; RGB [2, 3]", "diameter_px": self.diameter(),
                              "diam_mean": float(self.model.diam_mean)},
            "thresholds": {k: p[k] for k in ("flow_threshold", "cellprob_threshold", "min_size")},
            "hyperparameters": {k: p[k] for k in ("n_epochs", "learning_rate", "weight_decay", "SGD", "batch_size",
                                                  "bsize", "min_train_masks", "diam_mean", "augment_rotate",
                                                  "augment_flip")},
        }
