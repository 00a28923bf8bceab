"""StarDist 2D behind the adapter contract (TensorFlow 2 / Keras 3, tensorflow env).

A StarDist model is a folder: ``config.json``, ``thresholds.json`` and
``weights_best.h5``. The adapter always works on a private copy of that folder,
so training never writes into the model cache or into a saved model.

Fine-tuning trains epoch by epoch with the validation loss recorded after each
epoch, keeps the best weights (StarDist's checkpoint), stops early when the
validation loss has not improved for ``patience`` epochs (30, the paper's), and
then optimizes the probability and NMS thresholds on the validation patches.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from segrefine import SegRefineError
from segrefine.models.base import Adapter, Pair
from segrefine.models.tensorflow_common import quiet_tensorflow, seed_tensorflow, tensorflow_device

log = logging.getLogger("segrefine.stardist")

DEFAULTS = {
    "n_epochs": 200,
    "steps_per_epoch": 100,
    "patience": 30,
    "learning_rate": 3e-4,
    "batch_size": 4,
    "patch_size": 256,
    "n_rays": 32,
    "grid": 2,
    "n_channel_in": 1,
    "augment": True,
    "optimize_thresholds": True,
    "norm_percentiles": [1.0, 99.8],
    "prob_thresh": None,
    "nms_thresh": None,
}
MODEL_FILES = ("config.json", "thresholds.json")
WEIGHTS = "weights_best.h5"


def _scratch_dir() -> Path:
    """A private working folder for one model, removed when the process exits."""
    work = Path(tempfile.mkdtemp(prefix="segrefine-stardist-"))
    atexit.register(shutil.rmtree, work, True)
    return work


def _private_copy(weights: Path) -> Path:
    """Copy a model folder (config, thresholds, the given weights as weights_best.h5) to a temp dir."""
    src = weights.parent
    if not (src / "config.json").is_file():
        raise SegRefineError(
            f"{weights}: not a StarDist model (no config.json beside the weights; is it the "
            "weights file of another framework?)"
        )
    folder = _scratch_dir() / "model"
    folder.mkdir()
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    shutil.copyfile(weights, folder / WEIGHTS)
    return folder


class StarDistAdapter(Adapter):
    framework = "stardist"
    official_weights = {
        name: f"{name}/{WEIGHTS}" for name in ("2D_versatile_fluo", "2D_paper_dsb2018", "2D_versatile_he")
    }

    def __init__(self, model, params: dict):
        self.model = model
        self.params = {**DEFAULTS, **(params or {})}

    @classmethod
    def download_official(cls, name: str, dest: Path) -> Path:
        """StarDist's own downloader (keras cache), then the model files copied into ``dest``."""
        quiet_tensorflow()
        from stardist.models import StarDist2D

        model = StarDist2D.from_pretrained(name)
        if model is None:
            raise SegRefineError(f"StarDist has no pretrained model {name!r}")
        for f in MODEL_FILES + (WEIGHTS,):
            shutil.copyfile(Path(model.logdir) / f, Path(dest) / f)
        return Path(dest) / WEIGHTS

    @classmethod
    def from_pretrained(cls, weights: Optional[Path], params: dict) -> "StarDistAdapter":
        quiet_tensorflow()
        params = {**DEFAULTS, **(params or {})}
        seed_tensorflow(int(params.get("seed", 0)))
        from stardist.models import Config2D, StarDist2D

        if weights is None:
            grid = int(params["grid"])
            conf = Config2D(
                n_rays=int(params["n_rays"]),
                grid=(grid, grid),
                n_channel_in=int(params["n_channel_in"]),
                train_patch_size=(int(params["patch_size"]),) * 2,
                train_batch_size=int(params["batch_size"]),
                train_learning_rate=float(params["learning_rate"]),
                train_tensorboard=False,
            )
            return cls(StarDist2D(conf, name="model", basedir=str(_scratch_dir())), params)
        weights = Path(weights)
        if not weights.is_file():
            raise SegRefineError(f"{weights}: StarDist weights file not found")
        folder = _private_copy(weights)
        try:
            model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
        except Exception as exc:
            raise SegRefineError(
                f"{weights}: not loadable as a StarDist 2D model ({type(exc).__name__}: {exc})"
            ) from exc
        return cls(model, params)

    @classmethod
    def load(cls, card_path: Path, card: dict) -> "StarDistAdapter":
        from segrefine.models import weights_path

        params = {**card.get("hyperparameters", {}), **card.get("thresholds", {})}
        params["norm_percentiles"] = card.get("preprocessing", {}).get("norm_percentiles", DEFAULTS["norm_percentiles"])
        return cls.from_pretrained(weights_path(card_path, card), params)

    @property
    def device(self) -> str:
        return tensorflow_device()

    # -- data -------------------------------------------------------------------------------------------------------
    def _normalize(self, img: np.ndarray, ref: Optional[dict] = None) -> np.ndarray:
        """Percentile normalisation of the image by its own percentiles, or by the slide's (``ref``)."""
        from csbdeep.utils import normalize

        img = np.asarray(img)
        lo, hi = self.params["norm_percentiles"]
        n_in = int(self.model.config.n_channel_in)
        if ref is not None:
            return self._normalize_slide(img, ref, lo, hi, n_in)
        if img.ndim == 2 and n_in == 1:
            return normalize(img, lo, hi).astype(np.float32)
        if img.ndim == 3 and img.shape[-1] >= n_in and n_in == 3:
            return normalize(img[..., :3], lo, hi, axis=(0, 1)).astype(np.float32)  # per channel (H&E)
        if img.ndim == 3 and n_in == 1:
            return normalize(img[..., :3].mean(axis=-1), lo, hi).astype(np.float32)
        raise SegRefineError(f"this StarDist model takes {n_in}-channel images, got an image of shape {img.shape}")

    def _normalize_slide(self, img: np.ndarray, ref: dict, lo: float, hi: float, n_in: int) -> np.ndarray:
        """csbdeep's normalize_mi_ma with the slide's lo/hi percentiles (the same channel handling as per image)."""
        from csbdeep.utils import normalize_mi_ma

        from segrefine.intensity import percentile

        if img.ndim == 2 and n_in == 1:
            mi, ma = percentile(ref, lo, 0), percentile(ref, hi, 0)
            return normalize_mi_ma(img, mi, ma).astype(np.float32)
        if img.ndim == 3 and img.shape[-1] >= n_in and n_in == 3:
            mi = np.array(percentile(ref, lo)[:3], np.float32)
            ma = np.array(percentile(ref, hi)[:3], np.float32)
            return normalize_mi_ma(img[..., :3], mi, ma).astype(np.float32)
        if img.ndim == 3 and n_in == 1:
            mi, ma = percentile(ref, lo, "gray"), percentile(ref, hi, "gray")
            return normalize_mi_ma(img[..., :3].mean(axis=-1), mi, ma).astype(np.float32)
        raise SegRefineError(f"this StarDist model takes {n_in}-channel images, got an image of shape {img.shape}")

    def set_intensity_reference(self, ref: Optional[dict]) -> bool:
        """Normalise predictions with the slide's percentiles (``norm_percentiles``) instead of each image's."""
        return self._keep_percentile_reference(ref)

    def _check_sizes(self, pairs: Sequence[Pair]) -> None:
        size = int(self.model.config.train_patch_size[0])
        for img, _ in pairs:
            if min(np.asarray(img).shape[:2]) < size:
                raise SegRefineError(
                    f"patches of {img.shape[1]}x{img.shape[0]} px are smaller than this StarDist model's training "
                    f"patch size {size}: reflection-pad them (patches.pad_to: {size}) or set patch_size"
                )

    # -- training ---------------------------------------------------------------------------------------------------
    def fine_tune(
        self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int, work_dir: Path
    ) -> Dict[str, List[float]]:
        from tensorflow.keras.callbacks import EarlyStopping

        p = {**self.params, **(params or {})}
        self.params = p
        seed_tensorflow(seed)
        conf = self.model.config
        conf.train_learning_rate = float(p["learning_rate"])
        conf.train_batch_size = int(p["batch_size"])
        conf.train_patch_size = (int(p["patch_size"]),) * 2
        conf.train_tensorboard = False
        self._check_sizes(train)
        X = [self._normalize(i) for i, _ in train]
        Y = [np.asarray(m).astype(np.int32) for _, m in train]
        if val:
            Xv, Yv = [self._normalize(i) for i, _ in val], [np.asarray(m).astype(np.int32) for _, m in val]
        else:
            log.warning("no validation patches: validating (and early-stopping) on the training patches")
            Xv, Yv = X, Y
        self.model.prepare_for_training()
        self.model.callbacks.append(EarlyStopping(monitor="val_loss", patience=int(p["patience"])))
        log.info(
            "stardist fine-tuning on %s: %d train / %d val patches, up to %d epochs",
            self.device,
            len(X),
            len(Xv),
            p["n_epochs"],
        )
        augmenter = _flip_rotate if p["augment"] else None
        hist = self.model.train(
            X,
            Y,
            validation_data=(Xv, Yv),
            augmenter=augmenter,
            seed=seed,
            epochs=int(p["n_epochs"]),
            steps_per_epoch=int(p["steps_per_epoch"]),
        )
        if p["optimize_thresholds"]:
            thr = self.model.optimize_thresholds(Xv, Yv, save_to_json=True)
            p["prob_thresh"], p["nms_thresh"] = float(thr["prob"]), float(thr["nms"])
        train_loss = [float(x) for x in hist.history["loss"]]
        val_loss = [float(x) for x in hist.history["val_loss"]]
        return {"train_loss": train_loss, "val_loss": val_loss, "val_epoch": list(range(len(val_loss)))}

    def save(self, model_dir: Path) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        src = Path(self.model.logdir)
        shutil.copyfile(src / "config.json", model_dir / "config.json")  # StarDist wrote it when the model was made
        fields = self.card_fields()["thresholds"]
        thr = {"prob": fields["prob_thresh"], "nms": fields["nms_thresh"]}
        (model_dir / "thresholds.json").write_text(json.dumps(thr))
        if (src / WEIGHTS).is_file():
            shutil.copyfile(src / WEIGHTS, model_dir / WEIGHTS)
        else:  # never trained here: write the weights it holds
            self.model.keras_model.save_weights(str(model_dir / WEIGHTS))
        return model_dir / WEIGHTS

    # -- inference --------------------------------------------------------------------------------------------------
    SWEEPABLE_THRESHOLDS = ("prob_thresh", "nms_thresh")

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_with_probability(image)[0]

    def predict_with_probability(self, image: np.ndarray):
        """(labels, object probability map): every pixel of label k gets ``details["prob"][k - 1]``, the object
        probability StarDist gives polygon k (stardist's ``polygons_to_label`` draws polygon i as label i + 1, in
        increasing probability); background pixels get 0. One ``predict_instances`` call gives both."""
        img = self._normalize(image, getattr(self, "_reference", None))
        kw = {k: float(self.params[k]) for k in ("prob_thresh", "nms_thresh") if self.params.get(k) is not None}
        labels, details = self.model.predict_instances(img, show_tile_progress=False, verbose=False, **kw)
        labels = np.asarray(labels).astype(np.uint32)
        probs = np.asarray(details["prob"], np.float32).ravel()
        if labels.size and int(labels.max()) > len(probs):
            raise SegRefineError(
                f"StarDist returned label {int(labels.max())} but only {len(probs)} object probabilities"
            )
        lut = np.concatenate([np.zeros(1, np.float32), probs])
        return labels, lut[labels]

    def card_fields(self) -> dict:
        p = self.params
        thr = self.model.thresholds
        return {
            "preprocessing": {
                "normalize": "percentile (csbdeep.utils.normalize), per channel for RGB; of the "
                "whole slide when segmenting a slide (intensity reference)",
                "norm_percentiles": list(p["norm_percentiles"]),
                "n_channel_in": int(self.model.config.n_channel_in),
            },
            "thresholds": {
                "prob_thresh": float(p["prob_thresh"] if p.get("prob_thresh") is not None else thr.prob),
                "nms_thresh": float(p["nms_thresh"] if p.get("nms_thresh") is not None else thr.nms),
            },
            "hyperparameters": dict(
                {
                    k: p[k]
                    for k in (
                        "n_epochs",
                        "steps_per_epoch",
                        "patience",
                        "learning_rate",
                        "batch_size",
                        "patch_size",
                        "augment",
                        "optimize_thresholds",
                    )
                },
                n_rays=int(self.model.config.n_rays),
                grid=int(self.model.config.grid[0]),
                n_channel_in=int(self.model.config.n_channel_in),
            ),
        }


def _flip_rotate(x, y):
    """Random flips and 90-degree rotations (shapes of cells unchanged)."""
    k = np.random.randint(4)
    x, y = np.rot90(x, k, axes=(0, 1)), np.rot90(y, k, axes=(0, 1))
    if np.random.rand() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)
