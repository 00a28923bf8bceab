"""Slide-level intensity reference: the whole image's statistics, computed once, region by region.

Models that normalise or threshold an image by its own statistics (percentile
normalisation in Cellpose, StarDist and the U-Net; Otsu's threshold in the
classical model) see a different image in every tile window, so their tiled
result drifts from their whole-image result. ``tile-plan`` computes these
statistics once for the whole slide (``intensity_reference``), stores them in
``tiles.json``, and every shard hands them to its model
(``Adapter.set_intensity_reference``) before predicting: each window is then
normalised exactly as the whole image would be.

For integer images (uint8, uint16) the reference comes from an EXACT histogram
of level 0 per channel, accumulated block by block (memory: one block), and the
percentiles are the ones ``np.percentile`` (linear interpolation between order
statistics) gives on the whole image, recovered from the cumulative histogram.
The gray image (mean of the channels) is histogrammed exactly too (as the sum
of the channels), for Otsu's threshold. For float images the reference comes
from a seeded sample of pixels (up to ``max_sample`` in all).

A slide is read through ``segrefine.io.Slide``, so the reference describes
exactly the image every model window gets: alpha dropped, the chosen channel
of a multi-channel slide, finite values only.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from segrefine import SegRefineError

#: percentiles stored in the reference (those the adapters use, and the usual neighbours)
PERCENTILES = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 50.0, 97.0, 98.0, 99.0, 99.5, 99.8, 99.9, 100.0)
EXACT_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


def histogram_percentile(hist: np.ndarray, q: float, offset: float = 0.0, scale: float = 1.0) -> float:
    """``np.percentile(x, q)`` of the values whose histogram is ``hist`` (bin k = value offset + k*scale), exactly.

    The k-th order statistic (0-based) is the first bin whose cumulative count
    exceeds k; numpy's linear method interpolates between order statistics
    floor(i) and floor(i)+1 at virtual index i = q/100 (n - 1), with numpy's own
    lerp formula."""
    cum = np.cumsum(np.asarray(hist, np.int64))
    n = int(cum[-1]) if cum.size else 0
    if n == 0:
        raise SegRefineError("percentile of an empty histogram")
    vi = (n - 1) * (float(q) / 100.0)
    lo = int(np.floor(vi))
    hi = min(lo + 1, n - 1)
    t = vi - lo
    a = offset + scale * float(np.searchsorted(cum, lo, side="right"))
    b = offset + scale * float(np.searchsorted(cum, hi, side="right"))
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t


def otsu_from_histogram(hist: np.ndarray, centers: np.ndarray) -> float:
    """Otsu's threshold of a histogram: the split maximising the between-class variance (scikit-image's
    computation), placed midway between the last occupied bin of the lower class and the first of the upper one
    (so that a two-valued image is split in the middle, not at its lower value)."""
    hist = np.asarray(hist, np.float64)
    keep = hist > 0
    hist, centers = hist[keep], np.asarray(centers, np.float64)[keep]
    if hist.size < 2:
        return float(centers[0]) if hist.size else 0.0
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centers) / w1
    m2 = (np.cumsum((hist * centers)[::-1]) / w2[::-1])[::-1]
    var = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    i = int(np.argmax(var))
    return float((centers[i] + centers[i + 1]) / 2)


def _blocks(shape, block: int) -> Iterable:
    H, W = shape
    for y in range(0, H, block):
        for x in range(0, W, block):
            yield x, y, min(block, W - x), min(block, H - y)


def _as_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        return img[..., None]
    if img.ndim == 3:
        return img
    raise SegRefineError(f"intensity reference: expected a (h, w) or (h, w, c) image, got shape {img.shape}")


def tissue_pixels(tissue, x: int, y: int, w: int, h: int) -> np.ndarray:
    """(h, w) bool: which level-0 pixels of the region [y, y+h) x [x, x+w) are tissue, for ``tissue`` =
    (low-resolution mask, level-0 px per mask px): pixel (y, x) takes the mask pixel (floor(y/f), floor(x/f)),
    clipped to the mask (a block-mean view drops the slide's last partial block: it takes the last mask pixel)."""
    mask, f = tissue
    mask = np.asarray(mask, bool)
    return mask[
        np.ix_(_mask_index(np.arange(y, y + h), f, mask.shape[0]), _mask_index(np.arange(x, x + w), f, mask.shape[1]))
    ]


def tissue_at(tissue, x, y) -> np.ndarray:
    """bool per level-0 pixel (x[i], y[i]): whether it is tissue, by ``tissue_pixels``' rule."""
    mask, f = tissue
    mask = np.asarray(mask, bool)
    return mask[_mask_index(np.asarray(y), f, mask.shape[0]), _mask_index(np.asarray(x), f, mask.shape[1])]


def _mask_index(coords: np.ndarray, f: float, n: int) -> np.ndarray:
    """The mask pixel of level-0 coordinates: floor(c / f), clipped to [0, n)."""
    return np.clip((np.asarray(coords, np.float64) / float(f)).astype(np.int64), 0, n - 1)


def intensity_reference(source, block: int = 2048, max_sample: int = 2**22, seed: int = 0, tissue=None) -> dict:
    """The whole image's intensity statistics; ``source`` is an array or a ``segrefine.io.Slide`` (read by blocks).

    ``tissue``: (low-resolution tissue mask, level-0 px per mask px), from the
    tile plan's tissue detection: the statistics are then those of the tissue
    pixels only (``tissue_pixels``), and blocks without tissue are not read. On
    a chip image that is mostly background, the background's noise would
    otherwise set the percentiles and Otsu's threshold. A mask with no tissue
    falls back to all pixels. ``pixels`` in the result says which.

    Returns a JSON-able dict: ``method`` ("exact histogram" or "sample"),
    ``dtype``, ``channels``, ``pixels`` ("tissue" or "all"), ``n_pixels`` (the
    pixels counted), ``percentiles`` {q: [per channel]}, ``min``/``max`` per
    channel and ``gray`` (the mean of the channels: ``percentiles``, ``min``,
    ``max``, ``otsu``)."""
    if isinstance(source, np.ndarray):
        arr = _as_hwc(source)
        shape, dtype, C = arr.shape[:2], arr.dtype, arr.shape[2]

        def read(x, y, w, h):
            return arr[y : y + h, x : x + w]
    else:
        shape, dtype, C = tuple(source.shape), np.dtype(source.dtype), int(source.channels)

        def read(x, y, w, h):
            return _as_hwc(source.read(x, y, w, h))

    n_all = int(shape[0]) * int(shape[1])
    if n_all == 0:
        raise SegRefineError("intensity reference of an empty image")
    if tissue is not None and not np.asarray(tissue[0]).any():
        tissue = None  # no tissue detected: the whole image (no tile is predicted anyway)

    def regions():
        """[the block's pixels of channel c (1-D)] for every block, tissue pixels only when a mask is given."""
        for x, y, w, h in _blocks(shape, block):
            m = None if tissue is None else tissue_pixels(tissue, x, y, w, h)
            if m is not None and not m.any():
                continue  # no tissue: not even read
            region = read(x, y, w, h)
            if m is not None and m.all():
                m = None
            yield [region[..., c].ravel() if m is None else region[..., c][m] for c in range(C)]

    n = 0
    exact = np.dtype(dtype) in EXACT_DTYPES
    if exact:
        nv = 256 if np.dtype(dtype) == np.uint8 else 65536
        hists = np.zeros((C, nv), np.int64)
        gray = np.zeros(C * (nv - 1) + 1, np.int64)  # histogram of the channel sum
        for chans in regions():
            n += len(chans[0])
            for c in range(C):
                hists[c] += np.bincount(chans[c], minlength=nv)
            if C > 1:
                gray += np.bincount(np.sum(chans, axis=0, dtype=np.uint32), minlength=gray.size)
        if C == 1:
            gray = hists[0]  # the gray image is the channel
        pct = {_key(q): [histogram_percentile(hists[c], q) for c in range(C)] for q in PERCENTILES}
        gpct = {_key(q): histogram_percentile(gray, q, 0.0, 1.0 / C) for q in PERCENTILES}
        centers = np.arange(gray.size, dtype=np.float64) / C
        otsu = otsu_from_histogram(gray, centers)
        method = "exact histogram"
    else:
        rng = np.random.default_rng(seed)
        total = n_all if tissue is None else sum(int(tissue_pixels(tissue, *b).sum()) for b in _blocks(shape, block))
        frac = min(1.0, max_sample / max(total, 1))
        samples = []
        for chans in regions():
            region = np.stack(chans, axis=-1).astype(np.float64)
            n += len(region)
            if frac < 1.0:
                region = region[rng.random(region.shape[0]) < frac]
            samples.append(region)
        s = np.concatenate(samples) if samples else np.zeros((0, C))
        if not s.size:
            raise SegRefineError("intensity reference: the sample is empty")
        g = s.mean(axis=1)
        pct = {_key(q): [float(np.percentile(s[:, c], q)) for c in range(C)] for q in PERCENTILES}
        gpct = {_key(q): float(np.percentile(g, q)) for q in PERCENTILES}
        counts, edges = np.histogram(g, bins=256)
        otsu = otsu_from_histogram(counts, (edges[:-1] + edges[1:]) / 2) if g.max() > g.min() else float(g.min())
        method = f"sample of {len(s)} pixels (seed {seed})"
    return {
        "method": method,
        "dtype": str(np.dtype(dtype)),
        "channels": int(C),
        "n_pixels": int(n),
        "pixels": "all" if tissue is None else "tissue",
        "percentiles": pct,
        "min": pct[_key(0.0)],
        "max": pct[_key(100.0)],
        "gray": {"percentiles": gpct, "min": gpct[_key(0.0)], "max": gpct[_key(100.0)], "otsu": otsu},
    }


def _key(q: float) -> str:
    return repr(float(q))


def percentile(ref: dict, q: float, channel: Optional[int] = None):
    """The reference's ``q``-th percentile: a list over channels, or one channel's, or the gray image's
    (channel="gray")."""
    table = ref["gray"]["percentiles"] if channel == "gray" else ref["percentiles"]
    try:
        v = table[_key(q)]
    except KeyError:
        raise SegRefineError(
            f"the intensity reference has no {q}th percentile (it has {sorted(map(float, table))}: "
            f"use one of these, or add it to segrefine.intensity.PERCENTILES and rerun "
            f"tile-plan)"
        ) from None
    return v if channel in (None, "gray") else v[int(channel)]


def check_reference(ref, percentiles: Sequence[float] = ()) -> dict:
    """``ref`` if it looks like an intensity reference holding ``percentiles``, else a clear error."""
    if not isinstance(ref, dict) or not {"percentiles", "gray", "channels"} <= set(ref):
        raise SegRefineError(f"not an intensity reference (keys {sorted(ref) if isinstance(ref, dict) else ref!r})")
    for q in percentiles:
        percentile(ref, q)  # a clear error now if the reference lacks it
    return ref


def lowhigh(ref: dict, lo_q: float, hi_q: float, channels: Optional[Sequence[int]] = None) -> np.ndarray:
    """(channels, 2) array of the reference's [lo_q, hi_q] percentiles per channel (all channels by default)."""
    lo, hi = percentile(ref, lo_q), percentile(ref, hi_q)
    idx = range(len(lo)) if channels is None else channels
    return np.array([[lo[c], hi[c]] for c in idx], np.float64)
