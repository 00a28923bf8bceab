"""Tissue complexity of an annotated patch: the six measures of the CSRefiner paper, so the
accuracy tables can say why a region is hard.

From the patch's true instance labels (and its image for the edge contrast):
- ``nn_distance``: mean distance from each cell's centroid to the nearest other centroid (px);
- ``compactness``: ``nn_distance`` divided by the mean equivalent diameter of the cells (low = crowded);
- ``density``: cells per 10,000 px² of patch;
- ``distribution``: coefficient of variation of the local densities (cell centroids counted in a
  ``grid`` x ``grid`` partition of the patch; 0 = even, high = clustered);
- ``shape_complexity``: mean of perimeter² / (4π area) over the cells (1 for a disc, larger for
  irregular outlines);
- ``edge_contrast``: mean Sobel gradient magnitude of the image (scaled to [0, 1] by its 1st-99.8th
  percentiles) on the cells' boundary pixels (low = faint or blurred borders).
Measures that need two cells (nn_distance, compactness) are NaN with fewer.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

COLUMNS = ["n_cells", "nn_distance", "compactness", "density", "distribution", "shape_complexity", "edge_contrast"]


def _gray01(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1) if img.shape[-1] <= 4 else img.mean(axis=0)
    lo, hi = np.percentile(img, [1, 99.8])
    return np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def patch_complexity(labels: np.ndarray, image: np.ndarray, grid: int = 4) -> Dict[str, float]:
    from scipy.spatial import cKDTree
    from skimage.filters import sobel
    from skimage.measure import regionprops
    from skimage.segmentation import find_boundaries

    from segrefine import SegRefineError

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise SegRefineError(f"labels must be 2-D, got shape {labels.shape}")
    props = regionprops(labels.astype(np.int64))
    n = len(props)
    h, w = labels.shape
    out = {"n_cells": n, "density": n / (h * w) * 1e4}
    centroids = np.array([p.centroid for p in props]).reshape(-1, 2)
    if n >= 2:
        d, _ = cKDTree(centroids).query(centroids, k=2)
        out["nn_distance"] = float(d[:, 1].mean())
        out["compactness"] = out["nn_distance"] / float(np.mean([p.equivalent_diameter_area for p in props]))
    else:
        out["nn_distance"] = out["compactness"] = float("nan")
    counts = np.zeros((grid, grid))
    for y, x in centroids:
        counts[min(int(y * grid / h), grid - 1), min(int(x * grid / w), grid - 1)] += 1
    out["distribution"] = float(counts.std() / counts.mean()) if n else float("nan")
    shapes = [p.perimeter**2 / (4 * np.pi * p.area) for p in props if p.perimeter > 0]
    out["shape_complexity"] = float(np.mean(shapes)) if shapes else float("nan")
    img = _gray01(image)
    if img.shape != labels.shape:
        raise SegRefineError(f"image {img.shape} and labels {labels.shape} differ in shape")
    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    out["edge_contrast"] = float(sobel(img)[edges].mean()) if edges.any() else float("nan")
    return {k: out[k] for k in COLUMNS}


def trainset_complexity(
    trainset_path,
    out_csv,
    long_csv=None,
    out_joined=None,
    grid: int = 4,
    accuracy_metrics: Sequence[str] = ("f1", "ap_mean"),
):
    """Complexity of every patch of the training set (with its split); optionally joined with the
    test patches' accuracy from the long evaluation table (standard mode), one row per patch,
    model and stage."""
    import pandas as pd

    from segrefine.io import atomic_path, read_tiff
    from segrefine.trainset import read_trainset

    rows = []
    for r in read_trainset(trainset_path):
        rows.append(
            {
                "image": r["patch"],
                "split": r["split"],
                **patch_complexity(read_tiff(r["mask"]), read_tiff(r["image"]), grid),
            }
        )
    table = pd.DataFrame(rows, columns=["image", "split"] + COLUMNS)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.5g")
    if long_csv and out_joined:
        long = pd.read_csv(long_csv)
        acc = long[(long["mode"] == "standard") & long["metric"].isin(accuracy_metrics)]
        acc = acc.pivot_table(
            index=["model", "stage", "image"], columns="metric", values="value", aggfunc="first"
        ).reset_index()
        joined = acc.merge(table.drop(columns=["split"]), on="image", how="left")
        with atomic_path(out_joined) as tmp:
            joined.to_csv(tmp, index=False, float_format="%.5g")
    return table
