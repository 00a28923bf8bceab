"""Cellpose-SAM (cpsam, cellpose 4) behind the adapter contract.

Training is cellpose 4's own ``train.train_seg`` (AdamW); the defaults are the
official fine-tuning recommendation the paper follows: batch size 1, learning
rate 1e-5, weight decay 0.1, 100 epochs. The network is a 305 M parameter ViT-L:
fine-tuning is for GPUs (one step takes ~40 s and 7-11 GB on a 2-core CPU).
Runs on the GPU when torch sees one, on the CPU otherwise, and says which.

Weights: the official ``cpsam`` file (resolved through the model cache), a local
cellpose 4 weights file, or ``None`` = from scratch (a seeded random ViT-L; for
offline tests, since no model hub is reachable there).

Note that train_seg warms the learning rate up linearly from 0 over the first 10
epochs, so epoch 0 never moves the weights: train at least 2 epochs.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from segrefine import SegRefineError
from segrefine.models.base import Adapter, Pair
from segrefine.models.cellpose_common import seed_everything, sigmoid, torch_device

log = logging.getLogger("segrefine.cpsam")

BSIZE = 256  # cpsam's position embeddings are fixed to 256 x 256 tiles
DEFAULTS = {
    "n_epochs": 100,
    "learning_rate": 1e-5,
    "weight_decay": 0.1,
    "batch_size": 1,
    "min_train_masks": 1,
    "scale_range": 0.5,
    "nimg_per_epoch": None,
    "flow_threshold": 0.4,
    "cellprob_threshold": 0.0,
    "min_size": 15,
    "diameter": None,
    # cellpose 4's train_seg always rotates and flips training crops (no switch upstream);
    # the switches are kept so a config asking to turn them off is refused, not ignored
    "augment_rotate": True,
    "augment_flip": True,
    # float32 by default: exact weights, deterministic; True = cellpose 4's bfloat16 inference
    # (faster on a GPU). Training always runs in float32 and the model stays float32 afterwards.
    "use_bfloat16": False,
    "eval_batch_size": 8,
}
HYPER_KEYS = (
    "n_epochs",
    "learning_rate",
    "weight_decay",
    "batch_size",
    "min_train_masks",
    "scale_range",
    "nimg_per_epoch",
    "augment_rotate",
    "augment_flip",
    "use_bfloat16",
    "eval_batch_size",
    "diameter",
)
THRESHOLD_KEYS = ("flow_threshold", "cellprob_threshold", "min_size")


def _cellpose_models():
    """cellpose.models, without cellpose 4's import-time advice to install dinov3 for the
    CPDINO backbone (only the SAM backbone is used here)."""
    logging.getLogger("cellpose.vit").setLevel(logging.ERROR)
    from cellpose import models

    return models


def _check_params(p: dict) -> None:
    if not p["augment_rotate"] or not p["augment_flip"]:
        raise SegRefineError(
            "cpsam: cellpose 4's train_seg always rotates and flips training crops; "
            "augment_rotate/augment_flip cannot be turned off for this framework "
            "(scale_range sets the resize augmentation)"
        )
    if p.get("bsize") not in (None, BSIZE):
        raise SegRefineError(f"cpsam: bsize must be {BSIZE} (cpsam's tile size is fixed), got {p['bsize']}")
    if int(p["batch_size"]) < 1 or int(p["n_epochs"]) < 1:
        raise SegRefineError(f"cpsam: batch_size and n_epochs must be >= 1, got {p['batch_size']}, {p['n_epochs']}")


def _as_chw(img: np.ndarray) -> np.ndarray:
    """(3, h, w) float32, the layout cellpose 4 trains on: grayscale goes in the
    first channel, the other two are zero (what cellpose itself does)."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] in (1, 3, 4):
        img = np.moveaxis(img[..., :3], -1, 0)
    elif img.ndim != 2:
        raise SegRefineError(f"cpsam takes 2-D grayscale or (h, w, 1|3|4) images, got shape {img.shape}")
    if img.ndim == 2:
        img = img[None]
    out = np.zeros((3,) + img.shape[1:], np.float32)
    out[: img.shape[0]] = img
    return out


def _check_weights(weights: Path) -> None:
    """Refuse a file that is not cellpose 4 SAM weights before the 305 M parameter net is built."""
    import pickle
    import zipfile

    import torch

    if not weights.is_file():
        # cellpose itself would fall back to downloading cpsam_v2: never let it
        raise SegRefineError(f"{weights}: Cellpose-SAM weights file not found")
    try:
        state = torch.load(str(weights), map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise SegRefineError(
            f"{weights}: not a Cellpose-SAM (cellpose 4) weights file, torch cannot read it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "is it the weights of another framework?"
        ) from exc
    keys = set(state) if isinstance(state, dict) else set()
    if "W2" not in keys or "encoder.patch_embed.proj.weight" not in keys:
        kind = "a Cellpose 3 (cyto/nuclei) model" if "output.2.weight" in keys else "not a cellpose 4 model"
        raise SegRefineError(
            f"{weights}: not a Cellpose-SAM (cellpose 4) weights file ({kind}); is it the weights of another framework?"
        )
    if "encoder.cls_token" in keys:
        raise SegRefineError(f"{weights}: a Cellpose-DINO (cpdino) model; only the SAM backbone (cpsam) is supported")


class CpsamAdapter(Adapter):
    framework = "cpsam"
    official_weights = {"cpsam": "cpsam"}

    def __init__(self, model, params: dict):
        self.model = model
        self.params = {**DEFAULTS, **(params or {})}

    @classmethod
    def download_official(cls, name: str, dest: Path) -> Path:
        """Fetch official weights with cellpose 4's own downloader into ``dest`` (network needed)."""
        models = _cellpose_models()

        models.MODEL_DIR = Path(dest)  # read by cache_model_path at call time
        return Path(models.cache_model_path(cls.official_weights[name]))

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, weights: Optional[Path], params: dict) -> "CpsamAdapter":
        params = {**DEFAULTS, **(params or {})}
        _check_params(params)  # before the slow imports
        import torch

        models = _cellpose_models()
        from cellpose.vit import CPSAM

        device = torch_device()
        bf16 = bool(params["use_bfloat16"])
        seed_everything(int(params.get("seed", 0)))
        if weights is not None:
            weights = Path(weights)
            _check_weights(weights)
            model = models.CellposeModel(device=device, pretrained_model=str(weights), use_bfloat16=bf16)
            return cls(model, params)
        # from scratch: a seeded random ViT-L, passed through a weights file so cellpose 4
        # builds its model object the one way it supports
        net = CPSAM(dtype=torch.float32)
        with tempfile.TemporaryDirectory(prefix="segrefine-cpsam-") as tmp:
            init = Path(tmp) / "init.cpsam"
            net.save_model(str(init))
            del net
            model = models.CellposeModel(device=device, pretrained_model=str(init), use_bfloat16=bf16)
        model.pretrained_model = None
        return cls(model, params)

    @property
    def device(self) -> str:
        return str(self.model.device)

    # -- training -----------------------------------------------------------------------------------------------
    def fine_tune(
        self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int, work_dir: Path
    ) -> Dict[str, List[float]]:
        import torch
        from cellpose import train as cp_train

        p = {**self.params, **(params or {})}
        _check_params(p)
        self.params = p
        seed_everything(seed)
        imgs = [_as_chw(i) for i, _ in train]
        lbls = [np.asarray(m).astype(np.int32) for _, m in train]
        val_imgs = [_as_chw(i) for i, _ in val] or None
        val_lbls = [np.asarray(m).astype(np.int32) for _, m in val] or None
        work_dir = Path(work_dir)
        (work_dir / "models").mkdir(parents=True, exist_ok=True)
        if self.model.net.dtype != torch.float32:
            # train_seg would train in float32 and hand back a bfloat16 net, whose saved weights
            # would be rounded: convert once here, so the fine-tuned weights stay exact
            self.model.net.dtype = torch.float32
        log.info(
            "cpsam fine-tuning on %s: %d train / %d val images, %d epochs, batch size %d, lr %g",
            self.device,
            len(imgs),
            len(val) if val else 0,
            p["n_epochs"],
            p["batch_size"],
            p["learning_rate"],
        )
        # on the CPU, torch's default kernels accumulate the gradients of SAM's relative position
        # embeddings in a varying order (measured: bitwise different weights from the same seed);
        # its deterministic algorithms make same inputs + seed -> same weights, at no measured cost
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.model.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            path, train_losses, test_losses = cp_train.train_seg(
                self.model.net,
                train_data=imgs,
                train_labels=lbls,
                test_data=val_imgs,
                test_labels=val_lbls,
                channel_axis=0,
                normalize=True,
                learning_rate=float(p["learning_rate"]),
                weight_decay=float(p["weight_decay"]),
                n_epochs=int(p["n_epochs"]),
                batch_size=int(p["batch_size"]),
                bsize=BSIZE,
                min_train_masks=int(p["min_train_masks"]),
                scale_range=float(p["scale_range"]),
                nimg_per_epoch=int(p["nimg_per_epoch"]) if p["nimg_per_epoch"] else None,
                save_path=str(work_dir),
                model_name="cpsam_finetune",
                save_every=10**9,
            )
        finally:
            torch.use_deterministic_algorithms(deterministic)
        test_losses = np.asarray(test_losses, dtype=float)
        val_epoch = [int(e) for e in np.nonzero(test_losses)[0]] if val_imgs else []
        return {
            "train_loss": [float(x) for x in train_losses],
            "val_loss": [float(test_losses[e]) for e in val_epoch],
            "val_epoch": val_epoch,
        }

    def save(self, model_dir: Path) -> Path:
        import torch

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        target = model_dir / "weights.cpsam"
        # cellpose 4's weights files are float32 (a bfloat16 inference net is saved through a copy)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.model.net.state_dict().items()}
        torch.save(state, str(target))
        return target

    # -- inference ----------------------------------------------------------------------------------------------
    SWEEPABLE_THRESHOLDS = ("flow_threshold", "cellprob_threshold")

    def set_intensity_reference(self, ref: Optional[dict]) -> bool:
        """Normalise with the slide's 1st/99th percentiles per channel (cellpose 4's ``normalize={"lowhigh": …}``,
        shape (3, 2) after its channels-last conversion) instead of each image's; the zero channels of a grayscale
        slide keep [0, 1] so that they stay zero."""
        if ref is None:
            self._lowhigh = None
            return True
        from segrefine.intensity import check_reference, lowhigh

        C = int(check_reference(ref)["channels"])
        if C not in (1, 3, 4):
            raise SegRefineError(f"cpsam takes grayscale or RGB slides; the intensity reference has {C} channels")
        lh = lowhigh(ref, 1.0, 99.0, channels=range(min(C, 3)))
        lh = np.concatenate([lh, np.tile([[0.0, 1.0]], (3 - len(lh), 1))]) if len(lh) < 3 else lh
        flat = lh[:, 1] - lh[:, 0] <= 1e-3  # a flat channel: no division by zero
        lh[flat, 1] = lh[flat, 0] + 1.0
        self._lowhigh = lh
        return True

    def _normalize(self):
        lh = getattr(self, "_lowhigh", None)
        if lh is None:
            return True
        from cellpose.models import normalize_default

        return {**normalize_default, "normalize": True, "lowhigh": lh}

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_with_probability(image)[0]

    def predict_with_probability(self, image: np.ndarray):
        """(labels, sigmoid of cellpose 4's cell probability output ``flows[2]``, resampled by ``eval`` to the
        image's pixels, (h, w) float32): one ``eval`` call gives both, so the labels are ``predict``'s."""
        p = self.params
        img = _as_chw(image)
        diameter = float(p["diameter"]) if p.get("diameter") else None
        masks, flows, _ = self.model.eval(
            img,
            channel_axis=0,
            diameter=diameter,
            normalize=self._normalize(),
            batch_size=int(p["eval_batch_size"]),
            flow_threshold=float(p["flow_threshold"]),
            cellprob_threshold=float(p["cellprob_threshold"]),
            min_size=int(p["min_size"]),
        )
        cellprob = np.asarray(flows[2], np.float32).reshape(np.asarray(masks).shape)
        return np.asarray(masks).astype(np.uint32), sigmoid(cellprob)

    def card_fields(self) -> dict:
        p = self.params
        return {
            "preprocessing": {
                "normalize": "percentile 1-99 per image and channel (cellpose default), or of the "
                "whole slide when segmenting a slide (intensity reference)",
                "channels": "(3, h, w): grayscale in channel 0, others zero; RGB as is",
                "tile_px": BSIZE,
                "diameter_px": p.get("diameter"),
                "dtype": str(self.model.net.dtype).replace("torch.", ""),
            },
            "thresholds": {k: p[k] for k in THRESHOLD_KEYS},
            "hyperparameters": {k: p[k] for k in HYPER_KEYS},
        }
