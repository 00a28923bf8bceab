"""The embedded demo: a seeded synthetic Stereo-seq chip, and a generic nuclei set.

``make_demo`` writes, for one chip:
- ``{SN}.tif``: a grayscale ssDNA-like whole slide (uint8) with sparse nuclei
  in tissue and a dense, blurred, hippocampus-like band where touching nuclei
  are hard to separate;
- ``{SN}-truth.tif``: its ground-truth instance labels (uint32);
- ``{SN}-truth-types.csv``: the type of every true cell (``label,type``):
  ``dentate`` (cells in the dense band, expressing ``BAND_MARKERS``) or ``glia``
  (elsewhere, ``SPARSE_MARKERS``), the truth of ``segrefine.purity``;
- ``{SN}.gem.gz``: a bin1 GEM aligned with the slide (1 px = 1 DNB), with
  marker genes of two cell types, housekeeping genes and background transcripts;
- ``annotations/{SN}-x.._y.._w.._h...geojson``: annotated patches, exported as
  QuPath exports them (pixel-edge polygons in the patch frame), most of them in
  the dense band where a stock model fails.

``generic_nuclei`` makes a different data set (sparse, sharp, isolated nuclei)
that the workflow trains its offline base model on, so that "before and after
fine-tuning" means something without a model hub.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

BAND_MARKERS = ["Prox1", "Neurod1", "C1ql2", "Calb2", "Dsp"]  # dentate-gyrus-like type
SPARSE_MARKERS = ["Mbp", "Plp1", "Gfap", "Aqp4", "Olig2"]  # glia-like type
HOUSEKEEPING = ["Actb", "Gapdh", "Malat1", "Rpl13", "Rps3", "Tubb5", "Eef1a1", "Ppia", "Hsp90ab1", "Ubb"]
GENES = BAND_MARKERS + SPARSE_MARKERS + HOUSEKEEPING
DEMO_TYPES = {"dentate": BAND_MARKERS, "glia": SPARSE_MARKERS}  # type -> its markers (config expression.markers)


def _paint_nuclei(
    labels: np.ndarray, centers: np.ndarray, rng: np.random.Generator, radius: Tuple[float, float], start: int
) -> int:
    """Paint ellipses at ``centers`` where no cell is yet; returns the next free label."""
    H, W = labels.shape
    lab = start
    for cy, cx in centers:
        a = rng.uniform(*radius)
        b = a * rng.uniform(0.65, 1.0)
        t = rng.uniform(0, np.pi)
        r = int(np.ceil(a)) + 1
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, H)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, W)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
        u = (dx * np.cos(t) + dy * np.sin(t)) / a
        v = (-dx * np.sin(t) + dy * np.cos(t)) / b
        inside = (u * u + v * v <= 1.0) & (labels[y0:y1, x0:x1] == 0)
        if inside.sum() >= 12:  # drop slivers squeezed out by neighbours
            labels[y0:y1, x0:x1][inside] = lab
            lab += 1
    return lab


def _poisson_disc(rng: np.random.Generator, n_try: int, min_dist: float, accept) -> np.ndarray:
    """Dart throwing: up to ``n_try`` candidate points kept when ``accept`` and far enough apart."""
    from scipy.spatial import cKDTree

    pts: List[Tuple[float, float]] = []
    cand = accept(rng, n_try)
    tree_pts = np.empty((0, 2))
    for p in cand:
        if len(tree_pts) and cKDTree(tree_pts).query(p, k=1)[0] < min_dist:
            continue
        pts.append(tuple(p))
        tree_pts = np.asarray(pts)
    return np.asarray(pts).reshape(-1, 2)


def _render(
    labels: np.ndarray, rng: np.random.Generator, tissue: np.ndarray, blur_map: np.ndarray, contrast: np.ndarray
) -> np.ndarray:
    """ssDNA-like rendering: textured bright nuclei on dim tissue, spatially varying blur, noise."""
    from scipy import ndimage

    n = int(labels.max())
    brightness = np.concatenate([[0.0], rng.uniform(0.55, 1.0, n)])
    img = brightness[labels].astype(np.float32)
    img *= 1.0 + 0.25 * ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 1.0)
    img = img * contrast + 0.12 * tissue
    sharp = ndimage.gaussian_filter(img, 0.8)
    blurred = ndimage.gaussian_filter(img, 2.6)
    img = (1 - blur_map) * sharp + blur_map * blurred
    img += 0.035 * rng.standard_normal(img.shape).astype(np.float32) + 0.03
    return np.clip(img * 230, 0, 255).astype(np.uint8)


def _tissue(H: int, W: int) -> np.ndarray:
    """The tissue section: an ellipse covering most of the chip."""
    yy, xx = np.mgrid[0:H, 0:W]
    return (((yy - H / 2) / (0.46 * H)) ** 2 + ((xx - W / 2) / (0.46 * W)) ** 2) <= 1.0


def make_slide(size: int, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8, truth labels uint32, band mask bool) of a ``size`` x ``size`` chip."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    H = W = size
    yy, xx = np.mgrid[0:H, 0:W]
    tissue = _tissue(H, W)
    band_center = H * 0.5 + 0.16 * H * np.sin(2 * np.pi * xx / W * 0.9 + 0.4)
    band = (np.abs(yy - band_center) < max(0.04 * H, 24)) & tissue

    def in_region(region):
        def sample(r, n):
            p = r.uniform(0, 1, (n, 2)) * [H, W]
            keep = region[p[:, 0].astype(int), p[:, 1].astype(int)]
            return p[keep]

        return sample

    labels = np.zeros((H, W), np.uint32)
    dense = _poisson_disc(rng, int(band.sum() / 8), 10.0, in_region(band))
    nxt = _paint_nuclei(labels, dense, rng, (6.0, 8.0), 1)
    sparse_region = tissue & ~ndimage.binary_dilation(band, iterations=8)
    sparse = _poisson_disc(rng, int(sparse_region.sum() / 260), 22.0, in_region(sparse_region))
    _paint_nuclei(labels, sparse, rng, (5.0, 8.5), nxt)
    blur_map = ndimage.gaussian_filter(band.astype(np.float32), 12)
    contrast = 1.0 - 0.45 * blur_map
    img = _render(labels, rng, tissue.astype(np.float32), blur_map, contrast)
    return img, labels, band


def make_gem(labels: np.ndarray, band: np.ndarray, tissue_px: np.ndarray, seed: int) -> Dict[str, np.ndarray]:
    """Synthetic bin1 transcripts: per cell ~0.35 UMI/px of its type's markers and housekeeping
    genes, uniform inside the cell; plus background transcripts over tissue."""
    from scipy import ndimage

    rng = np.random.default_rng(seed + 1)
    n = int(labels.max())
    objects = ndimage.find_objects(labels)
    gx, gy, gg = [], [], []
    p_band = np.array([0.12] * 5 + [0.01] * 5 + [0.034] * 10)
    p_sparse = np.array([0.01] * 5 + [0.12] * 5 + [0.034] * 10)
    for lab in range(1, n + 1):
        sl = objects[lab - 1]
        if sl is None:
            continue
        rr, cc = np.nonzero(labels[sl] == lab)
        rr = rr + sl[0].start
        cc = cc + sl[1].start
        total = rng.poisson(0.35 * len(rr))
        if total == 0:
            continue
        is_band = band[rr[0], cc[0]]
        p = p_band if is_band else p_sparse
        genes = rng.choice(len(GENES), size=total, p=p / p.sum())
        where = rng.integers(0, len(rr), total)
        gx.append(cc[where])
        gy.append(rr[where])
        gg.append(genes)
    ty, tx = np.nonzero(tissue_px)
    nbg = int(0.004 * len(ty))
    pick = rng.integers(0, len(ty), nbg)
    gx.append(tx[pick])
    gy.append(ty[pick])
    gg.append(rng.integers(len(BAND_MARKERS) * 2, len(GENES), nbg))
    x = np.concatenate(gx)
    y = np.concatenate(gy)
    g = np.concatenate(gg)
    key = (g.astype(np.int64) * labels.shape[0] + y) * labels.shape[1] + x
    uniq, counts = np.unique(key, return_counts=True)
    x = uniq % labels.shape[1]
    y = (uniq // labels.shape[1]) % labels.shape[0]
    g = uniq // (labels.shape[0] * labels.shape[1])
    return {"gene": g, "x": x, "y": y, "count": counts}


def truth_types(labels: np.ndarray, band: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(label ids, type names) of every cell of ``labels``, by ``make_gem``'s rule: a cell whose first pixel
    (row-major) lies in the dense band is ``dentate`` (band markers), any other ``glia`` (sparse markers)."""
    from scipy import ndimage

    ids, types = [], []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        rr, cc = np.nonzero(labels[sl] == lab)
        ids.append(lab)
        types.append("dentate" if band[rr[0] + sl[0].start, cc[0] + sl[1].start] else "glia")
    return np.asarray(ids, np.int64), np.asarray(types, dtype=str)


def write_truth_types(path: Path, labels: np.ndarray, band: np.ndarray) -> None:
    from segrefine.io import write_text_atomic

    ids, types = truth_types(labels, band)
    write_text_atomic(path, "label,type\n" + "".join(f"{i},{t}\n" for i, t in zip(ids, types)))


def write_gem(path: Path, gem: Dict[str, np.ndarray], sn: str) -> None:
    from segrefine.io import atomic_path

    lines = [
        "#FileFormat=GEMv0.1",
        "#SortedBy=None",
        "#BinSize=1",
        "#Omics=Transcriptomics",
        f"#Stereo-seqChip={sn}",
        "#OffsetX=0",
        "#OffsetY=0",
        "geneID\tx\ty\tMIDCount",
    ]
    names = np.asarray(GENES)[gem["gene"]]
    body = "\n".join(f"{a}\t{b}\t{c}\t{d}" for a, b, c, d in zip(names, gem["x"], gem["y"], gem["count"]))
    with atomic_path(path, suffix=".gem.gz") as tmp:
        # no timestamp and no (temporary) file name in the gzip header: the same seed gives the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as fh:
            fh.write(("\n".join(lines) + "\n" + body + "\n").encode())


def choose_patches(
    band: np.ndarray, tissue: np.ndarray, n: int, size: int, seed: int, band_fraction: float = 0.6
) -> List[Tuple[int, int]]:
    """Top-left corners of ``n`` non-overlapping patches: most in the dense band, the rest in tissue."""
    rng = np.random.default_rng(seed + 2)
    H, W = band.shape
    grid = [(x, y) for y in range(0, H - size + 1, size // 2) for x in range(0, W - size + 1, size // 2)]

    def frac(m, x, y):
        return m[y : y + size, x : x + size].mean()

    in_band = [p for p in grid if frac(band, *p) > 0.25]
    elsewhere = [p for p in grid if frac(tissue, *p) > 0.9 and frac(band, *p) == 0]
    chosen: List[Tuple[int, int]] = []

    def take(pool, k):
        pool = [pool[i] for i in rng.permutation(len(pool))]
        for p in pool:
            if len(chosen) >= n or k <= 0:
                return
            if all(abs(p[0] - q[0]) >= size or abs(p[1] - q[1]) >= size for q in chosen):
                chosen.append(p)
                k -= 1

    take(in_band, int(round(n * band_fraction)))
    take(elsewhere, n - len(chosen))
    take(in_band + elsewhere, n - len(chosen))
    return sorted(chosen, key=lambda p: (p[1], p[0]))


def make_demo(
    out_dir, sn: str = "DEMO01", size: int = 2048, n_patches: int = 20, patch_size: int = 256, seed: int = 7
) -> dict:
    """Write the demo chip (slide, truth, GEM, QuPath annotations) into ``out_dir``."""
    from segrefine.annotations import dump_geojson, labels_to_geojson, relabel_sequential
    from segrefine.io import write_text_atomic, write_tiff
    from segrefine.patches import PatchBox

    out = Path(out_dir)
    img, labels, band = make_slide(size, seed)
    tissue = _tissue(*band.shape)
    write_tiff(out / f"{sn}.tif", img, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    write_tiff(out / f"{sn}-truth.tif", labels, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    write_truth_types(out / f"{sn}-truth-types.csv", labels, band)
    write_gem(out / f"{sn}.gem.gz", make_gem(labels, band, tissue, seed), sn)
    ann_dir = out / "annotations"
    corners = choose_patches(band, tissue, n_patches, patch_size, seed)
    for x, y in corners:
        box = PatchBox(sn, x, y, patch_size, patch_size)
        crop = labels[y : y + patch_size, x : x + patch_size]
        doc = labels_to_geojson(relabel_sequential(crop.astype(np.int64)))
        write_text_atomic(ann_dir / f"{box.name}.geojson", dump_geojson(doc))
    info = {
        "sn": sn,
        "size": size,
        "seed": seed,
        "cells": int(labels.max()),
        "band_cells": int(len(np.unique(labels[band])) - 1),
        "patches": len(corners),
        "patch_size": patch_size,
    }
    write_text_atomic(out / "demo.json", json.dumps(info, indent=2) + "\n")
    return info


def generic_nuclei(n_images: int, size: int, seed: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """A generic fluorescence-nuclei set unlike the demo chip: isolated, sharp, uniformly bright."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n_images):
        labels = np.zeros((size, size), np.uint32)

        def sample(r, k):
            return r.uniform(0, size, (k, 2))

        centers = _poisson_disc(rng, int(size * size / 500), 26.0, sample)
        _paint_nuclei(labels, centers, rng, (5.0, 9.0), 1)
        flat = np.ones((size, size), np.float32)
        img = _render(labels, rng, 0.3 * flat, np.zeros((size, size), np.float32), flat)
        images.append(img)
        masks.append(labels.astype(np.uint16))
    return images, masks
