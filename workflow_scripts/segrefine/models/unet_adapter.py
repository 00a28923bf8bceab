"""The BCDU-Net D3 U-Net used by CellBin, behind the adapter contract (TensorFlow 2 / Keras 3, tensorflow env).

The network is CellBin's cell-segmentation U-Net (Azad et al.'s BCDU-Net with
three densely connected bottleneck blocks, "D3", and a bidirectional-style
ConvLSTM unit at every decoder level that fuses the skip connection with the
upsampled features), rebuilt layer by layer in Keras 3 with the layer NAMES
that tf.keras 2 gave CellBin's model (``conv2d`` ... ``conv2d_19``,
``conv2d_transpose``, ``batch_normalization``, ``conv_lst_m2d`` ...). So
CellBin's published Keras-2 ``.hdf5`` files load by layer name:

- ``cellseg_bcdu_SHDI_221008_tf.hdf5``: ssDNA / DAPI (1 input channel),
- ``cellseg_bcdu_H_240823_tf.hdf5``: H&E (3 input channels).

Keras 3 cannot read every Keras-2 HDF5 file through ``load_weights`` (its legacy
reader matches layers by position only, and a full saved model keeps the weights
under ``model_weights``), so this module reads and writes that legacy layout
itself with h5py (root attribute ``layer_names``; one group per layer holding
``weight_names`` and the arrays) and assigns weights by layer name and order,
checking every shape. The adapter saves its own weights in the same layout.

The output is a foreground probability; instances come from thresholding it
(``prob_thresh``) and a distance-transform watershed (seeds ``min_distance``
apart, objects under ``min_size`` px dropped). Training: Adam, binary
cross-entropy, ReduceLROnPlateau, early stopping on the validation loss
(patience 30), the validation loss recorded after every epoch, and the weights
of the best validation epoch kept. Images of any size are predicted tile by
tile (the network's input is ``patch_size`` square, 256 for CellBin) with
overlapping tiles blended.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from segrefine import SegRefineError
from segrefine.models.base import Adapter, Pair
from segrefine.models.tensorflow_common import seed_tensorflow, tensorflow_device

log = logging.getLogger("segrefine.unet")

DEFAULTS = {
    # training (CellBin / CSRefiner's v3 fine-tuning: Adam 1e-4, BCE, ReduceLROnPlateau x0.1 after 10, patience 30)
    "n_epochs": 200,
    "steps_per_epoch": None,
    "batch_size": 4,
    "learning_rate": 1e-4,
    "patience": 30,
    "min_delta": 1e-4,
    "reduce_lr_factor": 0.1,
    "reduce_lr_patience": 10,
    "augment": True,
    "separate_touching": True,
    # validation: every patch_size tile of the validation patches, or at most this many (evenly spread)
    "max_val_tiles": None,
    # network input: square patches of this size (CellBin: 256); any multiple of 8 from 16 works
    "patch_size": 256,
    "stain": "fluorescence",
    # preprocessing
    "norm_percentiles": [1.0, 99.8],
    "clahe_kernel": 128,
    "clahe_clip": 0.01,
    # probability -> instances
    "prob_thresh": 0.5,
    "min_distance": 3,
    "min_size": 15,
    "tile_overlap": 32,
}
STAINS = {"fluorescence": 1, "he": 3}  # stain -> input channels
CARD_INFO = {"architecture": "BCDU-Net D3 (CellBin)", "optimizer": "Adam", "loss": "binary_crossentropy"}
WEIGHTS = "weights.hdf5"


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------
class _Keras2Names:
    """Layer names as tf.keras 2 auto-named them in a fresh session ("conv2d", "conv2d_1", ...)."""

    def __init__(self):
        self.count: Dict[str, int] = {}

    def __call__(self, base: str) -> str:
        k = self.count.get(base, 0)
        self.count[base] = k + 1
        return base if k == 0 else f"{base}_{k}"


def build_bcdu_net_d3(size: int = 256, channels: int = 1):
    """CellBin's BCDU-Net D3 for ``size`` x ``size`` x ``channels`` input, sigmoid foreground output."""
    if size < 16 or size % 8:
        raise SegRefineError(
            f"BCDU-Net takes square patches whose side is a multiple of 8 (three 2x poolings), "
            f"at least 16 px; patch_size {size} is not"
        )
    import keras
    from keras import layers as L

    name = _Keras2Names()

    def conv(x, filters, kernel=3, activation="relu"):
        init = "he_normal" if kernel == 3 else "glorot_uniform"
        return L.Conv2D(
            filters, kernel, activation=activation, padding="same", kernel_initializer=init, name=name("conv2d")
        )(x)

    def up(x, filters):
        x = L.Conv2DTranspose(
            filters,
            kernel_size=2,
            strides=2,
            padding="same",
            kernel_initializer="he_normal",
            name=name("conv2d_transpose"),
        )(x)
        x = L.BatchNormalization(axis=3, name=name("batch_normalization"))(x)
        return L.Activation("relu", name=name("activation"))(x)

    def lstm_fuse(skip, upsampled, side, depth, filters):
        """Skip and upsampled features as a 2-step sequence into a ConvLSTM (read backwards)."""
        a = L.Reshape((1, side, side, depth), name=name("reshape"))(skip)
        b = L.Reshape((1, side, side, depth), name=name("reshape"))(upsampled)
        seq = L.Concatenate(axis=1, name=name("concatenate"))([a, b])
        return L.ConvLSTM2D(
            filters=filters,
            kernel_size=(3, 3),
            padding="same",
            return_sequences=False,
            go_backwards=True,
            kernel_initializer="he_normal",
            name=name("conv_lst_m2d"),
        )(seq)

    inputs = keras.Input((size, size, channels), name="input_1")
    conv1 = conv(conv(inputs, 64), 64)
    pool1 = L.MaxPooling2D((2, 2), name=name("max_pooling2d"))(conv1)
    conv2 = conv(conv(pool1, 128), 128)
    pool2 = L.MaxPooling2D((2, 2), name=name("max_pooling2d"))(conv2)
    conv3 = conv(conv(pool2, 256), 256)
    drop3 = L.Dropout(0.5, name=name("dropout"))(conv3)
    pool3 = L.MaxPooling2D((2, 2), name=name("max_pooling2d"))(conv3)
    # three densely connected bottleneck blocks (D1, D2, D3)
    conv4_1 = conv(conv(pool3, 512), 512)
    drop4_1 = L.Dropout(0.5, name=name("dropout"))(conv4_1)
    conv4_2 = conv(conv(drop4_1, 512), 512)
    drop4_2 = L.Dropout(0.5, name=name("dropout"))(conv4_2)
    dense = L.Concatenate(axis=3, name=name("concatenate"))([drop4_2, drop4_1])
    conv4_3 = conv(conv(dense, 512), 512)
    drop4_3 = L.Dropout(0.5, name=name("dropout"))(conv4_3)
    # decoder: upsample, fuse with the skip connection through a ConvLSTM, two convolutions
    x = lstm_fuse(drop3, up(drop4_3, 256), size // 4, 256, 128)
    x = conv(conv(x, 256), 256)
    x = lstm_fuse(conv2, up(x, 128), size // 2, 128, 64)
    x = conv(conv(x, 128), 128)
    x = lstm_fuse(conv1, up(x, 64), size, 64, 32)
    x = conv(conv(conv(x, 64), 64), 2)
    out = conv(x, 1, kernel=1, activation="sigmoid")
    return keras.Model(inputs, out, name="bcdu_net_d3")


# --------------------------------------------------------------------------------------------------------------------
# Keras-2 HDF5 weights (the layout of tf.keras `save_weights('x.hdf5')` / `model.save('x.hdf5')`)
# --------------------------------------------------------------------------------------------------------------------
def _text(v) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def read_keras2_weights(path) -> Tuple[List[str], Dict[str, List[np.ndarray]], Dict[str, List[str]]]:
    """Layer names (file order), arrays per layer and weight names per layer of a Keras-2 HDF5 file.

    Accepts a weights file (``layer_names`` at the root) and a whole saved model (under ``model_weights``).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: U-Net weights file not found")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise SegRefineError(
            f"{path}: not an HDF5 file, so not Keras BCDU-Net weights (is it the weights file of "
            f"another framework, e.g. a Cellpose/PyTorch model?) ({exc})"
        ) from exc
    with fh:
        group = fh["model_weights"] if "model_weights" in fh and "layer_names" not in fh.attrs else fh
        if "layer_names" not in group.attrs:
            raise SegRefineError(
                f"{path}: an HDF5 file without Keras-2 'layer_names', so not a Keras-2 .hdf5 weights "
                f"file or saved model (top-level entries: {sorted(fh.keys())[:8]})"
            )
        names = [_text(n) for n in group.attrs["layer_names"]]
        arrays: Dict[str, List[np.ndarray]] = {}
        wnames: Dict[str, List[str]] = {}
        for n in names:
            g = group[n]
            ws = [_text(w) for w in g.attrs.get("weight_names", [])]
            if ws:
                arrays[n] = [np.asarray(g[w]) for w in ws]
                wnames[n] = ws
    return names, arrays, wnames


def write_keras2_weights(model, path) -> Path:
    """Write ``model``'s weights in the Keras-2 HDF5 layout (layer_names, a group per layer, weight_names)."""
    import h5py
    import keras

    path = Path(path)
    with h5py.File(path, "w") as fh:
        fh.attrs["layer_names"] = np.array([lay.name.encode("utf8") for lay in model.layers])
        fh.attrs["backend"] = b"tensorflow"
        fh.attrs["keras_version"] = keras.__version__.encode("utf8")
        for lay in model.layers:
            g = fh.create_group(lay.name)
            names = [f"{lay.name}/{w.name}:0" for w in lay.weights]
            g.attrs["weight_names"] = np.array([n.encode("utf8") for n in names])
            for n, w in zip(names, lay.weights):
                g.create_dataset(n, data=np.asarray(w.numpy()))
    return path


def load_keras2_weights(model, path) -> str:
    """Assign a Keras-2 HDF5 file's weights to ``model`` by layer name (weights in order), shapes checked.

    Returns how the layers were matched ("name"). A file whose weighted layers do not all match is refused
    with the differences named; nothing is assigned then.
    """
    names, arrays, _ = read_keras2_weights(path)
    targets = [lay for lay in model.layers if lay.weights]
    missing = [lay.name for lay in targets if lay.name not in arrays]
    extra = sorted(set(arrays) - {lay.name for lay in targets})
    if missing or extra:
        raise SegRefineError(
            f"{path}: its layers are not those of CellBin's BCDU-Net D3 (is it the weights of another framework or "
            f"model, e.g. a StarDist .h5?): missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}"
        )
    plan = []
    for lay in targets:
        got, want = arrays[lay.name], [tuple(w.shape) for w in lay.weights]
        if [a.shape for a in got] != want:
            raise SegRefineError(
                f"{path}: layer {lay.name!r} holds weights of shapes {[a.shape for a in got]} but "
                f"this BCDU-Net needs {want} (input channels or architecture differ)"
            )
        plan.append((lay, got))
    for lay, got in plan:
        lay.set_weights(got)
    return "name"


def input_channels_of(path) -> int:
    """Input channels of a BCDU-Net weights file (from its first convolution kernel)."""
    _, arrays, _ = read_keras2_weights(path)
    if "conv2d" not in arrays or arrays["conv2d"][0].ndim != 4:
        raise SegRefineError(
            f"{path}: no first convolution 'conv2d' with a 4-D kernel, so not BCDU-Net weights "
            f"(layers with weights: {sorted(arrays)[:6]})"
        )
    return int(arrays["conv2d"][0].shape[2])


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing, targets, tiles
# --------------------------------------------------------------------------------------------------------------------
def preprocess(
    img: np.ndarray,
    stain: str,
    percentiles=(1.0, 99.8),
    clahe_kernel: int = 128,
    clahe_clip: float = 0.01,
    ref: Optional[dict] = None,
) -> np.ndarray:
    """Network input (h, w, c) float32 in [0, 1].

    fluorescence (ssDNA/DAPI): grayscale, percentile normalization, adaptive histogram equalization;
    he: colour normalization (per-channel percentile stretch) then CLAHE on the brightness.
    ``ref``: a slide intensity reference; the percentile stretch then uses the slide's percentiles. Only that
    step is slide-level: CLAHE (and the final min-max rescale of the gray input) stay per image.
    """
    from segrefine.intensity import percentile
    from skimage.exposure import equalize_adapthist

    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        raise SegRefineError(f"the U-Net takes 2-D grayscale or RGB images, got shape {img.shape}")
    lo_p, hi_p = percentiles
    kernel = max(8, min(int(clahe_kernel), max(img.shape[:2])))
    if stain == "he":
        if img.ndim != 3:
            raise SegRefineError(
                f"this U-Net is an H&E model (3 input channels) but got a grayscale image of shape {img.shape}"
            )
        rgb = img[..., :3].astype(np.float32)
        if ref is not None:
            lo = np.array(percentile(ref, lo_p)[:3], np.float32)
            hi = np.array(percentile(ref, hi_p)[:3], np.float32)
        else:
            lo = np.percentile(rgb, lo_p, axis=(0, 1))
            hi = np.percentile(rgb, hi_p, axis=(0, 1))
        rgb = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
        out = equalize_adapthist(rgb, kernel_size=kernel, clip_limit=clahe_clip)
        return out.astype(np.float32)
    gray = img[..., :3].astype(np.float32).mean(axis=-1) if img.ndim == 3 else img.astype(np.float32)
    if ref is not None:
        lo, hi = percentile(ref, lo_p, "gray"), percentile(ref, hi_p, "gray")
    else:
        lo, hi = np.percentile(gray, [lo_p, hi_p])
    if hi <= lo:
        return np.zeros(gray.shape + (1,), np.float32)
    gray = np.clip((gray - lo) / (hi - lo), 0, 1)
    out = equalize_adapthist(gray, kernel_size=kernel, clip_limit=clahe_clip)
    out = out - out.min()
    return (out / max(float(out.max()), 1e-6)).astype(np.float32)[..., None]


def foreground_target(mask: np.ndarray, separate_touching: bool) -> np.ndarray:
    """Binary training target; with ``separate_touching``, pixels where two cells touch are background
    so the watershed can split them again."""
    from scipy import ndimage

    mask = np.asarray(mask)
    fg = mask > 0
    if separate_touching and fg.any():
        m = mask.astype(np.int64)
        big = int(m.max()) + 1  # stands for background in the minimum filter
        hi = ndimage.maximum_filter(m, size=3)
        lo = ndimage.minimum_filter(np.where(fg, m, big), size=3)
        fg &= (hi == m) & (lo == m)
    return fg.astype(np.float32)


def check_pairs(pairs: Sequence[Pair], size: int, what: str = "training") -> None:
    """Refuse, before any training, patches the network cannot take and masks that are not instance masks."""
    from scipy import ndimage

    if not pairs:
        raise SegRefineError(f"no {what} patches")
    n_cells = 0
    for k, (img, mask) in enumerate(pairs):
        img, mask = np.asarray(img), np.asarray(mask)
        if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
            raise SegRefineError(
                f"{what} patch {k}: mask is not an instance mask (2-D integer labels), got {mask.dtype} {mask.shape}"
            )
        if img.shape[:2] != mask.shape:
            raise SegRefineError(f"{what} patch {k}: image {img.shape[:2]} and mask {mask.shape} differ in size")
        if min(mask.shape) < size:
            raise SegRefineError(
                f"{what} patch {k} is {mask.shape[1]}x{mask.shape[0]} px, smaller than this U-Net's "
                f"input patch_size {size}: reflection-pad the patches (patches.pad_to: {size}) or "
                "set a smaller patch_size (a multiple of 8)"
            )
        labels = np.unique(mask[mask > 0])
        if len(labels) == 1 and ndimage.label(mask > 0)[1] > 1:
            raise SegRefineError(
                f"{what} patch {k}: mask is binary/semantic (one label {labels[0]} over "
                f"{ndimage.label(mask > 0)[1]} separate objects), not an instance mask: convert it "
                "with `segrefine convert-annotation`"
            )
        n_cells += len(labels)
    if n_cells == 0:
        raise SegRefineError(f"the {what} patches hold no cells: every mask is empty")


def tile_starts(length: int, size: int, overlap: int) -> List[int]:
    """Tile origins covering [0, length) with tiles of ``size`` overlapping by at least ``overlap``."""
    if length <= size:
        return [0]
    step = max(size - overlap, 1)
    starts = list(range(0, length - size, step))
    return starts + [length - size]


def _blend_window(size: int, overlap: int) -> np.ndarray:
    """Weights that fall off linearly over the overlap, so seams between tiles are smooth."""
    ramp = np.ones(size, np.float32)
    if overlap > 0:
        edge = np.linspace(0.05, 1.0, overlap, dtype=np.float32)
        ramp[:overlap] = edge
        ramp[-overlap:] = np.minimum(ramp[-overlap:], edge[::-1])
    return np.outer(ramp, ramp)


def _augment(x: np.ndarray, y: np.ndarray, rng) -> Tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(4))
    x, y = np.rot90(x, k, axes=(0, 1)), np.rot90(y, k, axes=(0, 1))
    if rng.random() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    return x, y


# --------------------------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------------------------
class UNetAdapter(Adapter):
    framework = "unet"
    official_weights = {
        "cellseg_bcdu_SHDI_221008_tf": "cellseg_bcdu_SHDI_221008_tf.hdf5",  # ssDNA / DAPI
        "cellseg_bcdu_H_240823_tf": "cellseg_bcdu_H_240823_tf.hdf5",  # H&E
    }

    def __init__(self, model, params: dict):
        self.model = model
        self.params = params

    @classmethod
    def _params(cls, params: Optional[dict]) -> dict:
        # descriptive card entries (architecture, optimizer, loss) come back with the card's hyperparameters
        params = {k: v for k, v in (params or {}).items() if k not in CARD_INFO}
        unknown = set(params) - set(DEFAULTS) - {"seed"}
        if unknown:
            raise SegRefineError(f"unknown U-Net parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        p = {**DEFAULTS, **params}
        if p["stain"] not in STAINS:
            raise SegRefineError(f"U-Net stain must be one of {sorted(STAINS)}, got {p['stain']!r}")
        return p

    @classmethod
    def download_official(cls, name: str, dest: Path) -> Path:
        raise SegRefineError(
            f"CellBin publishes its Keras weights ({cls.official_weights.get(name, name)}) only on a share link "
            "(https://bgipan.genomics.cn/#/link/2AZUv6JJfC4KqL74Rrn0, password 8eGM, per STOmics/CSRefiner), "
            "not at a stable URL: download it by hand and put it in the model cache"
        )

    @classmethod
    def from_pretrained(cls, weights: Optional[Path], params: dict) -> "UNetAdapter":
        p = cls._params(params)
        if weights is not None:
            weights = Path(weights)
            channels = input_channels_of(weights)  # also refuses files of other frameworks, before building
            stain = {1: "fluorescence", 3: "he"}.get(channels)
            if stain is None:
                raise SegRefineError(
                    f"{weights}: a BCDU-Net with {channels} input channels; 1 (ssDNA/DAPI) or 3 (H&E) expected"
                )
            if "stain" in (params or {}) and params["stain"] != stain:
                raise SegRefineError(
                    f"{weights}: these weights take {channels}-channel input ({stain}), but the "
                    f"model is configured with stain {params['stain']!r}"
                )
            p["stain"] = stain
        seed_tensorflow(int(p.get("seed", 0)))
        model = build_bcdu_net_d3(int(p["patch_size"]), STAINS[p["stain"]])
        if weights is not None:
            load_keras2_weights(model, weights)
        return cls(model, p)

    @classmethod
    def load(cls, card_path: Path, card: dict) -> "UNetAdapter":
        from segrefine.models import weights_path

        params = {**card.get("hyperparameters", {}), **card.get("thresholds", {})}
        pre = card.get("preprocessing", {})
        params.update({k: pre[k] for k in ("stain", "norm_percentiles", "clahe_kernel", "clahe_clip") if k in pre})
        return cls.from_pretrained(weights_path(card_path, card), params)

    @property
    def device(self) -> str:
        return tensorflow_device()

    @property
    def size(self) -> int:
        return int(self.params["patch_size"])

    def _input(self, img: np.ndarray) -> np.ndarray:
        p = self.params
        return preprocess(img, p["stain"], p["norm_percentiles"], p["clahe_kernel"], p["clahe_clip"])

    # -- training ---------------------------------------------------------------------------------------------------
    def _val_tiles(self, pairs: Sequence[Pair]) -> Tuple[np.ndarray, np.ndarray]:
        xs, ys, s = [], [], self.size
        for img, mask in pairs:
            x, y = self._input(img), foreground_target(mask, self.params["separate_touching"])
            for r in tile_starts(y.shape[0], s, 0):
                for c in tile_starts(y.shape[1], s, 0):
                    xs.append(x[r : r + s, c : c + s])
                    ys.append(y[r : r + s, c : c + s, None])
        cap = self.params["max_val_tiles"]
        if cap is not None and len(xs) > int(cap):
            keep = np.unique(np.linspace(0, len(xs) - 1, max(int(cap), 1)).round().astype(int))
            xs, ys = [xs[k] for k in keep], [ys[k] for k in keep]
        return np.stack(xs), np.stack(ys)

    def fine_tune(
        self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int, work_dir: Path
    ) -> Dict[str, List[float]]:
        import keras

        p = self._params({**self.params, **(params or {})})
        if int(p["patch_size"]) != self.size:
            raise SegRefineError(
                f"patch_size {p['patch_size']} differs from the network's input size {self.size}: "
                "set it when the model is made (pretrained card), not at fine-tuning"
            )
        self.params = p
        check_pairs(train, self.size, "training")
        if val:
            check_pairs(val, self.size, "validation")
        else:
            log.warning("no validation patches: validating (and early-stopping) on the training patches")
            val = train
        seed_tensorflow(seed)
        xs = [self._input(img) for img, _ in train]
        ys = [foreground_target(m, p["separate_touching"])[..., None] for _, m in train]
        xv, yv = self._val_tiles(val)
        batch = int(p["batch_size"])
        steps = int(p["steps_per_epoch"] or max(1, math.ceil(len(xs) / batch)))
        data = _Crops(xs, ys, self.size, batch, steps, bool(p["augment"]), seed)
        self.model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=float(p["learning_rate"])), loss="binary_crossentropy"
        )
        callbacks = [
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=float(p["reduce_lr_factor"]),
                patience=int(p["reduce_lr_patience"]),
                min_delta=float(p["min_delta"]),
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=int(p["patience"]),
                min_delta=float(p["min_delta"]),
                restore_best_weights=True,
            ),
        ]
        log.info(
            "U-Net (BCDU-Net D3) fine-tuning on %s: %d train / %d val patches (%d val tiles), up to %d epochs of "
            "%d steps x %d crops of %d px",
            self.device,
            len(xs),
            len(val),
            len(xv),
            p["n_epochs"],
            steps,
            batch,
            self.size,
        )
        hist = self.model.fit(
            data,
            validation_data=(xv, yv),
            validation_batch_size=batch,
            epochs=int(p["n_epochs"]),
            callbacks=callbacks,
            verbose=2,
        )
        train_loss = [float(x) for x in hist.history["loss"]]
        val_loss = [float(x) for x in hist.history["val_loss"]]
        best = int(np.argmin(val_loss))
        log.info(
            "U-Net trained %d epochs; best validation loss %.4f at epoch %d (weights kept)",
            len(val_loss),
            val_loss[best],
            best,
        )
        return {"train_loss": train_loss, "val_loss": val_loss, "val_epoch": list(range(len(val_loss)))}

    def save(self, model_dir: Path) -> Path:
        from segrefine.io import atomic_path

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(model_dir / WEIGHTS, suffix=".hdf5") as tmp:
            write_keras2_weights(self.model, tmp)
        return model_dir / WEIGHTS

    # -- inference --------------------------------------------------------------------------------------------------
    def set_intensity_reference(self, ref: Optional[dict]) -> bool:
        """Percentile stretch with the slide's percentiles (``norm_percentiles``) instead of each image's. Only
        that step becomes slide-level: CLAHE works on local tiles of the (window) image, so its output still
        depends on the window, and tiled inference stays approximate for this model."""
        return self._keep_percentile_reference(ref)

    def probability(self, image: np.ndarray) -> np.ndarray:
        """Foreground probability (h, w) of an image of any size: reflection-padded, overlapping tiles blended."""
        ref = getattr(self, "_reference", None)
        if ref is not None:
            p = self.params
            x = preprocess(image, p["stain"], p["norm_percentiles"], p["clahe_kernel"], p["clahe_clip"], ref)
        else:
            x = self._input(image)
        h, w = x.shape[:2]
        s = self.size
        overlap = min(int(self.params["tile_overlap"]), s // 2)
        ph, pw = max(s - h, 0), max(s - w, 0)
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
        rows, cols = tile_starts(x.shape[0], s, overlap), tile_starts(x.shape[1], s, overlap)
        window = _blend_window(s, overlap)
        acc = np.zeros(x.shape[:2], np.float32)
        norm = np.zeros(x.shape[:2], np.float32)
        origins = [(r, c) for r in rows for c in cols]
        batch = max(int(self.params["batch_size"]), 1)
        chunk_len = batch * 8  # tiles held in memory at once
        for k in range(0, len(origins), chunk_len):
            chunk = origins[k : k + chunk_len]
            tiles = np.stack([x[r : r + s, c : c + s] for r, c in chunk])
            prob = self.model.predict(tiles, batch_size=batch, verbose=0)[..., 0]
            for (r, c), pr in zip(chunk, prob):
                acc[r : r + s, c : c + s] += pr * window
                norm[r : r + s, c : c + s] += window
        return (acc / norm)[:h, :w]

    SWEEPABLE_THRESHOLDS = ("prob_thresh", "min_distance")

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_with_probability(image)[0]

    def predict_with_probability(self, image: np.ndarray):
        """(labels, the foreground probability ``probability(image)`` they were segmented from, float32)."""
        from segrefine.models.classical_adapter import segment

        p = self.params
        prob = np.asarray(self.probability(image), np.float32)
        labels = segment(
            prob,
            sigma=0.0,
            threshold_scale=1.0,
            min_distance=int(p["min_distance"]),
            min_size=int(p["min_size"]),
            invert=False,
            threshold=float(p["prob_thresh"]),
        )
        return labels, prob

    def card_fields(self) -> dict:
        p = self.params
        pre = {
            "stain": p["stain"],
            "input_channels": STAINS[p["stain"]],
            "norm_percentiles": list(p["norm_percentiles"]),
            "clahe_kernel": int(p["clahe_kernel"]),
            "clahe_clip": float(p["clahe_clip"]),
        }
        pre["steps"] = (
            "RGB per-channel percentile stretch (colour normalization), CLAHE "
            "(skimage equalize_adapthist), scaled to [0, 1]"
            if p["stain"] == "he"
            else "grayscale, percentile normalization, adaptive histogram equalization "
            "(skimage equalize_adapthist), scaled to [0, 1]"
        )
        return {
            "preprocessing": pre,
            "thresholds": {
                "prob_thresh": float(p["prob_thresh"]),
                "min_distance": int(p["min_distance"]),
                "min_size": int(p["min_size"]),
            },
            "hyperparameters": dict(
                {
                    k: p[k]
                    for k in (
                        "n_epochs",
                        "steps_per_epoch",
                        "batch_size",
                        "learning_rate",
                        "patience",
                        "min_delta",
                        "reduce_lr_factor",
                        "reduce_lr_patience",
                        "augment",
                        "separate_touching",
                        "max_val_tiles",
                        "patch_size",
                        "tile_overlap",
                    )
                },
                **CARD_INFO,
            ),
        }


def _crop_sampler(size: int):
    def crop(x, y, rng):
        r = int(rng.integers(x.shape[0] - size + 1))
        c = int(rng.integers(x.shape[1] - size + 1))
        return x[r : r + size, c : c + size], y[r : r + size, c : c + size]

    return crop


def _make_crops_class():
    import keras

    class Crops(keras.utils.PyDataset):
        """Seeded random crops (with flips/rotations) of the training patches; batch k of epoch e is always
        drawn from the generator seeded with (seed, e, k), whatever order Keras asks for batches in."""

        def __init__(self, xs, ys, size, batch, steps, augment, seed):
            super().__init__(workers=1, use_multiprocessing=False)
            self.xs, self.ys, self.batch, self.steps, self.augment, self.seed = xs, ys, batch, steps, augment, seed
            self.crop = _crop_sampler(size)
            self.epoch = 0

        def __len__(self):
            return self.steps

        def __getitem__(self, k):
            rng = np.random.default_rng([self.seed, self.epoch, k])
            bx, by = [], []
            for _ in range(self.batch):
                i = int(rng.integers(len(self.xs)))
                x, y = self.crop(self.xs[i], self.ys[i], rng)
                if self.augment:
                    x, y = _augment(x, y, rng)
                bx.append(x)
                by.append(y)
            return np.ascontiguousarray(np.stack(bx)), np.ascontiguousarray(np.stack(by))

        def on_epoch_end(self):
            self.epoch += 1

    return Crops


def _Crops(*args):
    return _make_crops_class()(*args)
