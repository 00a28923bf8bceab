"""Cellpose 3.1 cyto family (cyto, cyto2, cyto3, nuclei) behind the adapter contract.

Training is cellpose's own ``train.train_seg``; the defaults are the paper's
(SGD, initial learning rate 0.2, weight decay 1e-5). Runs on the GPU when torch
sees one, on the CPU otherwise.

Inference (``predict_window``; ``predict`` is its call at the origin) runs
cellpose's network and dynamics on a resampling grid and a block grid anchored
at the slide's origin, not at the image's, so that a tile window with a margin
of ``context_px()`` beyond the halo predicts the same cells as the whole slide.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from segrefine import SegRefineError
from segrefine.models.base import Adapter, Pair
from segrefine.models.cellpose_common import seed_everything, sigmoid, torch_device

log = logging.getLogger("segrefine.cellpose")

DEFAULTS = {
    "n_epochs": 100,
    "learning_rate": 0.2,
    "weight_decay": 1e-5,
    "SGD": True,
    "batch_size": 8,
    "bsize": 224,
    "min_train_masks": 1,
    "diam_mean": 30.0,
    "flow_threshold": 0.4,
    "cellprob_threshold": 0.0,
    "min_size": 15,
    "diameter": None,
    # augmentation switches: cellpose always rotates and flips training crops; the
    # CSRefiner 004 study found random rotation hurt Cellpose, so both can be turned off
    "augment_rotate": True,
    "augment_flip": True,
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


def _taper(bsize: int) -> np.ndarray:
    """cellpose's tile taper (``transforms._taper_mask``: a sigmoid 20 px inside each edge, sigma 7.5 px at 224 px)
    with its distances scaled to ``bsize``; equal to cellpose's for 224."""
    k = bsize / 224.0
    d = np.abs(np.arange(bsize) - (bsize - 1) / 2)
    m = 1 / (1 + np.exp((d - (bsize / 2 - 20 * k)) / (7.5 * k)))
    return (m[:, None] * m[None, :]).astype(np.float32)


def _scaled_range(origin: int, n: int, r: float):
    """[X0, X1): the rescaled slide pixels of an image axis of ``n`` source px starting at slide pixel ``origin``
    (``_scaled_grid``)."""
    return int(np.floor((origin + 0.5) * r - 0.5)), int(np.floor((origin + n - 0.5) * r - 0.5)) + 2


def _scaled_grid(origin: int, n: int, r: float):
    """Rescaled pixels of an image axis of ``n`` source px starting at slide pixel ``origin``: (i0, i1) local source
    indices and weights w (value = (1 - w) * src[i0] + w * src[i1]) for rescaled slide pixels [X0, X0 + len).

    Rescaled slide pixel X is source coordinate (X + 0.5) / r - 0.5, computed in slide coordinates so that every
    window gives the same indices and weights as the whole slide; coordinates beyond the image repeat its edge
    pixel. The range covers both rescaled neighbours of every source pixel (see ``_source_grid``)."""
    X0, X1 = _scaled_range(origin, n, r)
    v = (np.arange(X0, X1, dtype=np.float64) + 0.5) / r - 0.5
    f = np.floor(v)
    w = (v - f).astype(np.float32)
    f = f.astype(np.int64) - origin
    return (np.clip(f, 0, n - 1), np.clip(f + 1, 0, n - 1)), w, X0


def _source_grid(origin: int, n: int, r: float, X0: int, m: int):
    """Source pixels [origin, origin + n) of an axis in the rescaled pixels [X0, X0 + m): indices and weights as
    ``_scaled_grid``; source pixel x is rescaled coordinate (x + 0.5) * r - 0.5."""
    v = (np.arange(origin, origin + n, dtype=np.float64) + 0.5) * r - 0.5
    f = np.floor(v)
    w = (v - f).astype(np.float32)
    f = f.astype(np.int64) - X0
    return (np.clip(f, 0, m - 1), np.clip(f + 1, 0, m - 1)), w


def _axis_blocks(origin: int, n: int, r: float, block: int, stride: int):
    """The grid blocks along one axis of an image of ``n`` source px at slide pixel ``origin`` (those whose core
    meets its rescaled pixels, as ``CellposeAdapter._run_blocks`` runs them): (k, lo, hi, clean).

    Block k spans the rescaled slide pixels [a, a + block), a = k * stride - (block - stride) // 2. [lo, hi) are the
    image's local source pixels whose output depends on it (a source pixel takes the two rescaled pixels around
    (x + 0.5) * r - 0.5; one pixel more on each side for rounding). ``clean``: its input is the whole slide's, i.e.
    the source pixels it is interpolated from lie inside the image with one pixel to spare and it lies within the
    rescaled image (no zero padding): its output is the same in every window that holds it."""
    X0, X1 = _scaled_range(origin, n, r)
    k = np.arange(X0 // stride, (X1 - 1) // stride + 1)
    a = k * stride - (block - stride) // 2
    lo = np.ceil((a - 0.5) / r - 0.5).astype(np.int64) - 1 - origin
    hi = np.ceil((a + block + 0.5) / r - 0.5).astype(np.int64) + 1 - origin
    src_lo = np.floor((a + 0.5) / r - 0.5).astype(np.int64) - origin
    src_hi = np.floor((a + block - 0.5) / r - 0.5).astype(np.int64) + 1 - origin
    clean = (src_lo >= 1) & (src_hi <= n - 2) & (a >= X0) & (a + block <= X1)
    return k, np.clip(lo, 0, n), np.clip(hi, 0, n), clean


def needed_blocks(needed: np.ndarray, origin, r: float, block: int, stride: int) -> Dict[tuple, bool]:
    """{(ky, kx): clean} of the grid blocks that some pixel of the bool mask ``needed`` (the image's pixels)
    depends on (``_axis_blocks``); numpy only, so that benchmarks can count blocks without cellpose."""
    needed = np.asarray(needed, bool)
    H, W = needed.shape
    ky, ylo, yhi, yclean = _axis_blocks(int(origin[1]), H, r, block, stride)
    kx, xlo, xhi, xclean = _axis_blocks(int(origin[0]), W, r, block, stride)
    rows = needed.any(axis=1)
    out: Dict[tuple, bool] = {}
    for i in range(len(ky)):
        if not rows[ylo[i] : yhi[i]].any():
            continue
        cols = needed[ylo[i] : yhi[i]].any(axis=0)
        for j in range(len(kx)):
            if cols[xlo[j] : xhi[j]].any():
                out[(int(ky[i]), int(kx[j]))] = bool(yclean[i] and xclean[j])
    return out


def _lerp(a: np.ndarray, idx, w: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis``: (1 - w) * a[i0] + w * a[i1]."""
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return (np.take(a, idx[0], axis=axis) * (1 - w) + np.take(a, idx[1], axis=axis) * w).astype(np.float32)


class CellposeAdapter(Adapter):
    framework = "cellpose"
    official_weights = {"cyto": "cytotorch_0", "cyto2": "cyto2torch_0", "cyto3": "cyto3", "nuclei": "nucleitorch_0"}

    def __init__(self, model, params: dict):
        self.model = model
        self.params = {**DEFAULTS, **(params or {})}
        self._lowhigh = None  # the slide's normalisation (set_intensity_reference); None: each image's own
        self._cache: Optional[Dict[tuple, np.ndarray]] = None  # network-block outputs later windows need
        self._uses: Dict[tuple, int] = {}  # windows still needing each block (cache_blocks)
        self._counts = {"computed": 0, "reused": 0, "skipped": 0}  # network blocks since loading

    @classmethod
    def download_official(cls, name: str, dest: Path) -> Path:
        """Fetch official weights with cellpose's own downloader into ``dest`` (network needed)."""
        import os

        os.environ["CELLPOSE_LOCAL_MODELS_PATH"] = str(dest)  # read when cellpose.models is imported
        from cellpose import models

        return Path(models.model_path(name))

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, weights: Optional[Path], params: dict) -> "CellposeAdapter":
        from cellpose import models

        params = {**DEFAULTS, **(params or {})}
        seed_everything(int(params.get("seed", 0)))
        # MKLDNN weights (cellpose's CPU inference default) cannot be trained: keep plain tensors
        device = torch_device()
        if weights is None:
            model = models.CellposeModel(
                device=device, pretrained_model=False, diam_mean=float(params["diam_mean"]), mkldnn=False
            )
        else:
            weights = Path(weights)
            if not weights.is_file():
                # cellpose itself would fall back to downloading cyto3: never let it
                raise SegRefineError(f"{weights}: Cellpose weights file not found")
            try:
                model = models.CellposeModel(device=device, pretrained_model=str(weights), mkldnn=False)
            except Exception as exc:
                raise SegRefineError(
                    f"{weights}: not a Cellpose 3 weights file ({type(exc).__name__}: {exc}); "
                    "is it the weights of another framework?"
                ) from exc
        return cls(model, params)

    @property
    def device(self) -> str:
        return str(self.model.device)

    # -- training -----------------------------------------------------------------------------------------------
    def fine_tune(
        self, train: Sequence[Pair], val: Sequence[Pair], params: dict, seed: int, work_dir: Path
    ) -> Dict[str, List[float]]:
        from cellpose import train as cp_train

        p = {**self.params, **(params or {})}
        self.params = p
        seed_everything(seed)
        imgs = [_as_input(i) for i, _ in train]
        lbls = [np.asarray(m).astype(np.int32) for _, m in train]
        chans = _channels(imgs[0])
        val_imgs = [_as_input(i) for i, _ in val] or None
        val_lbls = [np.asarray(m).astype(np.int32) for _, m in val] or None
        work_dir = Path(work_dir)
        (work_dir / "models").mkdir(parents=True, exist_ok=True)
        log.info(
            "cellpose fine-tuning on %s: %d train / %d val images, %d epochs",
            self.device,
            len(imgs),
            len(val) if val else 0,
            p["n_epochs"],
        )
        with _augmentation(bool(p["augment_rotate"]), bool(p["augment_flip"])):
            path, train_losses, test_losses = cp_train.train_seg(
                self.model.net,
                train_data=imgs,
                train_labels=lbls,
                test_data=val_imgs,
                test_labels=val_lbls,
                channels=chans,
                normalize=True,
                learning_rate=float(p["learning_rate"]),
                weight_decay=float(p["weight_decay"]),
                SGD=bool(p["SGD"]),
                n_epochs=int(p["n_epochs"]),
                batch_size=int(p["batch_size"]),
                bsize=int(p["bsize"]),
                min_train_masks=int(p["min_train_masks"]),
                save_path=str(work_dir),
                model_name="cellpose_finetune",
                save_every=10**9,
            )
        self.model.diam_labels = float(self.model.net.diam_labels.data.cpu().numpy()[0])
        test_losses = np.asarray(test_losses, dtype=float)
        val_epoch = [int(e) for e in np.nonzero(test_losses)[0]] if val_imgs else []
        return {
            "train_loss": [float(x) for x in train_losses],
            "val_loss": [float(test_losses[e]) for e in val_epoch],
            "val_epoch": val_epoch,
        }

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
        lowhigh = self._lowhigh
        if lowhigh is None:
            return True
        if lowhigh[img.ndim == 3] is None:
            raise SegRefineError(
                f"image of shape {img.shape} does not match the slide's intensity reference "
                f"({'grayscale' if lowhigh[False] is not None else 'RGB'})"
            )
        return {**_normalize_default(), "normalize": True, "lowhigh": lowhigh[img.ndim == 3]}

    #: the network's input block (cellpose's inference default ``bsize``), in pixels of the rescaled slide frame
    BLOCK = 224
    #: block grid step: neighbouring blocks overlap by BLOCK - STRIDE px (cellpose's tile_overlap 0.1 gives ~0.17)
    STRIDE = 176
    #: blocks per network call (cellpose's inference default)
    BATCH = 8

    def rescale(self) -> float:
        """cellpose's rescale factor ``diam_mean / diameter``: the network sees the image at this scale."""
        return float(self.model.diam_mean) / self.diameter()

    def context_px(self) -> int:
        """Margin (px, source pixels) beyond the halo that tiled inference needs to equal whole-image inference.

        A source pixel's flows and cell probability come from the network blocks that cover it (up to BLOCK - 1
        rescaled px away), their input is interpolated from source pixels one further, and its output is
        interpolated from the two neighbouring rescaled pixels: a pixel at least this far from every window edge
        that is not a slide edge gets the whole image's outputs (up to float noise), and so does a cell all of
        whose pixels are (its dynamics only use the flows of its own pixels). The shard grows every window by this
        much (``segmentation.tiling.model_context``, on by default) and crops the labels back, so that a cell smaller
        than the halo that a tile owns is predicted exactly as in the whole slide. ~BLOCK / r: 225 px for r = 1.016."""
        return int(np.ceil((self.BLOCK + 2) / self.rescale())) + 2

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Instance labels of an image: ``predict_window(image, (0, 0))`` (the one inference path)."""
        return self.predict_window(image, (0, 0))

    skips_unneeded = True
    #: the cell probability logit of a pixel that no computed block covers (``needed`` given): background
    BACKGROUND_LOGIT = -20.0
    #: at most this many bytes of network-block outputs are kept for later windows (``cache_blocks``)
    CACHE_MAX_BYTES = 1 << 30

    def network_blocks(self, needed: np.ndarray, origin=(0, 0)) -> List[tuple]:
        """The grid blocks (ky, kx) the network runs for a window at ``origin`` given its ``needed`` pixels: those
        some needed pixel depends on (``needed_blocks``)."""
        return list(needed_blocks(needed, origin, self.rescale(), self.BLOCK, self.STRIDE))

    def cache_blocks(self, uses: Optional[Dict[tuple, int]]) -> None:
        """Keep the outputs of network blocks that later windows need: ``uses`` = the number of windows (the next
        ``predict_window`` calls with ``needed``) that need each block (``network_blocks``). A block whose input
        lies inside its window (``_axis_blocks``' clean) gives the whole slide's output in every window, so its
        output is computed once and reused while windows still need it, up to ``CACHE_MAX_BYTES``. Only with the
        slide's intensity reference (with each window's own normalisation the inputs differ). None: no cache."""
        self._cache = {} if uses and self._lowhigh is not None else None
        self._uses = dict(uses or {})

    def network_counts(self) -> dict:
        """Network blocks since the model was loaded: computed, reused from the cache, skipped (no needed pixel
        depends on them), and ``input_px``: blocks computed x the source pixels of one block step (STRIDE² / r²),
        the network's input in the units in which whole-image inference of the same pixels costs 1 per pixel."""
        return dict(self._counts, input_px=self._counts["computed"] * (self.STRIDE / self.rescale()) ** 2)

    def predict_window(self, image: np.ndarray, origin=(0, 0), needed: Optional[np.ndarray] = None) -> np.ndarray:
        """Instance labels of a slide window whose top-left pixel is ``origin`` = (x, y) in slide pixels.

        cellpose 3.1's ``CellposeModel.eval`` steps with every size- and position-dependent choice anchored at
        the slide's origin instead of the image's, so that a window sees what the whole slide sees:

        1. channels (``convert_image``) and normalisation (``normalize_img``: the slide's lowhigh when an
           intensity reference is set, the image's own percentiles otherwise), as ``eval`` does;
        2. resampling by the exact rescale r = diam_mean / diameter (no rounding of sizes) on the slide's grid:
           rescaled slide pixel X is source coordinate (X + 0.5) / r - 0.5 (bilinear, edge pixels repeated
           where the image ends), so a window's rescaled pixels equal the slide's wherever the window holds
           their source pixels;
        3. the network on a fixed grid of BLOCK px blocks of the rescaled slide frame (block k spans
           [k * STRIDE - (BLOCK - STRIDE) / 2, + BLOCK), zeros outside the image), outputs averaged with a taper
           (cellpose's: ``transforms._taper_mask``, scaled to BLOCK); each block's style vector is its own, so a
           block inside the window gives exactly the whole slide's output;
        4. flows and cell probability interpolated back to the source pixels on the same grid (source pixel x is
           rescaled coordinate (x + 0.5) * r - 0.5), then cellpose's dynamics (``resize_and_compute_masks``,
           niter 200 / r, flow_threshold, cellprob_threshold, min_size as ``eval``).

        Exactness: see ``context_px``. ``needed`` (the image's pixels whose labels the caller keeps): only the
        blocks a needed pixel depends on run (``needed_blocks``), so a needed pixel gets the same outputs as
        without it; a pixel no block covers is background. Blocks already computed for an earlier window are
        taken from the cache (``cache_blocks``)."""
        return self._masks(self.network_outputs(image, origin, needed))

    def predict_with_probability(self, image: np.ndarray):
        """(labels, probability) of an image: ``predict_window_with_probability(image, (0, 0))``."""
        return self.predict_window_with_probability(image, (0, 0))

    def predict_window_with_probability(self, image: np.ndarray, origin=(0, 0), needed: Optional[np.ndarray] = None):
        """(``predict_window``'s labels, the sigmoid of the network's cell probability output at the image's
        pixels, (h, w) float32): one network pass gives both; the labels are exactly ``predict_window``'s."""
        y = self.network_outputs(image, origin, needed)
        prob = sigmoid(y[2])  # before the dynamics, which may work on y in place
        return self._masks(y), prob

    def _masks(self, y: np.ndarray) -> np.ndarray:
        """cellpose's dynamics on the network outputs ``y`` (3, h, w): instance labels (uint32)."""
        from cellpose import dynamics

        masks = dynamics.resize_and_compute_masks(
            y[:2],
            y[2],
            niter=200 / self.rescale(),
            cellprob_threshold=float(self.params["cellprob_threshold"]),
            flow_threshold=float(self.params["flow_threshold"]),
            interp=True,
            resize=None,
            min_size=int(self.params["min_size"]),
            max_size_fraction=0.4,
            device=self.model.device,
        )
        return np.asarray(masks).astype(np.uint32)

    def network_outputs(self, image: np.ndarray, origin=(0, 0), needed: Optional[np.ndarray] = None) -> np.ndarray:
        """(3, h, w) float32 at the image's pixels: Y flow, X flow, cell probability (steps 1-4 of
        ``predict_window`` before the dynamics; ``needed`` as there)."""
        from cellpose import transforms

        img = _as_input(image)
        x0, y0 = int(origin[0]), int(origin[1])
        r = self.rescale()
        x = transforms.convert_image(img, _channels(img), nchan=self.model.nchan)[np.newaxis]  # (1, H, W, C)
        norm = self._normalize(img)
        params = (
            {**_normalize_default(), **norm}
            if isinstance(norm, dict)
            else {**_normalize_default(), "normalize": bool(norm), "invert": False}
        )
        x = transforms.normalize_img(x, **params)[0]  # (H, W, C) float32
        H, W = x.shape[:2]
        ys, yw, Ya = _scaled_grid(y0, H, r)
        xs, xw, Xa = _scaled_grid(x0, W, r)
        scaled = _lerp(_lerp(x, ys, yw, axis=0), xs, xw, axis=1)  # (Hs, Ws, C) rescaled slide pixels [Ya.., Xa..)
        if needed is not None and np.shape(needed) != (H, W):
            raise SegRefineError(f"needed mask of shape {np.shape(needed)} for an image of {H} x {W} px")
        blocks = None if needed is None else needed_blocks(needed, (x0, y0), r, self.BLOCK, self.STRIDE)
        y = self._run_blocks(scaled.transpose(2, 0, 1), Ya, Xa, blocks)  # (3, Hs, Ws): flows, cell probability
        ys, yw = _source_grid(y0, H, r, Ya, y.shape[1])
        xs, xw = _source_grid(x0, W, r, Xa, y.shape[2])
        return _lerp(_lerp(y, ys, yw, axis=1), xs, xw, axis=2)  # (3, H, W)

    def _run_blocks(self, scaled: np.ndarray, Ya: int, Xa: int, blocks: Optional[Dict[tuple, bool]] = None):
        """Network outputs (3, Hs, Ws) of the rescaled image ``scaled`` (C, Hs, Ws) whose top-left pixel is
        (Xa, Ya) in the rescaled slide frame: every grid block whose core (its central STRIDE px) meets the
        image (or only those in ``blocks``, {(ky, kx): clean}), in batches of BATCH on the model's device,
        averaged with the taper mask, in grid order (a cached block is added where it falls in that order)."""
        B, S = self.BLOCK, self.STRIDE
        o = (B - S) // 2
        C, Hs, Ws = scaled.shape
        ky = np.arange(Ya // S, (Ya + Hs - 1) // S + 1)
        kx = np.arange(Xa // S, (Xa + Ws - 1) // S + 1)
        # the padded frame: [ky[0] * S - o, ky[-1] * S - o + B) in rescaled slide coordinates, zeros outside
        py, px = int(ky[0]) * S - o, int(kx[0]) * S - o
        frame = np.zeros((C, (len(ky) - 1) * S + B, (len(kx) - 1) * S + B), np.float32)
        frame[:, Ya - py : Ya - py + Hs, Xa - px : Xa - px + Ws] = scaled
        out = np.zeros((3,) + frame.shape[1:], np.float32)
        weight = np.zeros(frame.shape[1:], np.float32)
        taper = _taper(B)
        cache = self._cache if blocks is not None else None

        def add(sy, sx, yk):
            out[:, sy : sy + B, sx : sx + B] += yk * taper
            weight[sy : sy + B, sx : sx + B] += taper

        pending: list = []  # (start, key) of blocks to compute, in grid order

        def flush():
            if pending:
                yb = self._forward(np.stack([frame[:, sy : sy + B, sx : sx + B] for (sy, sx), _ in pending]))
                for ((sy, sx), key), yk in zip(pending, yb):
                    add(sy, sx, yk)
                    if cache is not None:
                        self._keep(key, yk, blocks[key])
                self._counts["computed"] += len(pending)
                pending.clear()

        for i in range(len(ky)):
            for j in range(len(kx)):
                key = (int(ky[i]), int(kx[j]))
                if blocks is not None and key not in blocks:
                    self._counts["skipped"] += 1
                    continue
                if cache is not None and key in cache:
                    flush()  # the blocks before it first: the same sums as without the cache
                    add(i * S, j * S, cache[key])
                    self._keep(key, cache[key], True)
                    self._counts["reused"] += 1
                    continue
                pending.append(((i * S, j * S), key))
                if len(pending) == self.BATCH:
                    flush()
        flush()
        covered = weight > 0
        out = np.divide(out, weight, out=out, where=covered)
        if not covered.all():  # skipped blocks' pixels: no flow, background probability
            out[:2, ~covered] = 0.0
            out[2, ~covered] = self.BACKGROUND_LOGIT
        return out[:, Ya - py : Ya - py + Hs, Xa - px : Xa - px + Ws]

    def _forward(self, blocks: np.ndarray) -> np.ndarray:
        """The network's (Y flow, X flow, cell probability) of a batch of blocks (n, C, B, B)."""
        from cellpose import core

        return core._forward(self.model.net, blocks)[0][:, :3]  # torch.no_grad, the net's device, numpy back

    def _keep(self, key: tuple, yk: np.ndarray, clean: bool) -> None:
        """One use of block ``key`` done: keep its output while later windows need it (and it is clean and the
        cache has room), drop it after its last use."""
        left = self._uses.get(key, 0) - 1
        self._uses[key] = left
        if left <= 0:
            self._cache.pop(key, None)
            self._uses.pop(key, None)
        elif clean and key not in self._cache:
            if (len(self._cache) + 1) * yk.nbytes <= self.CACHE_MAX_BYTES:
                self._cache[key] = np.array(yk, np.float32)

    def card_fields(self) -> dict:
        p = self.params
        return {
            "preprocessing": {
                "normalize": "percentile 1-99 per image (cellpose default), or of the whole slide "
                "when segmenting a slide (intensity reference)",
                "channels": "grayscale [0, 0]; RGB [2, 3]",
                "diameter_px": self.diameter(),
                "diam_mean": float(self.model.diam_mean),
            },
            "thresholds": {k: p[k] for k in ("flow_threshold", "cellprob_threshold", "min_size")},
            "hyperparameters": {
                k: p[k]
                for k in (
                    "n_epochs",
                    "learning_rate",
                    "weight_decay",
                    "SGD",
                    "batch_size",
                    "bsize",
                    "min_train_masks",
                    "diam_mean",
                    "augment_rotate",
                    "augment_flip",
                )
            },
        }
