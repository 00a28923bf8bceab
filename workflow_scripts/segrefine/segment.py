"""Whole-slide segmentation with a saved model, and the cell table.

This first version predicts the whole slide in one call of the model (Cellpose
tiles internally and stitches flows before computing masks, so no cell is cut);
the tiling engine replaces it for slides that do not fit in memory.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("segrefine.segment")

CELL_COLUMNS = ["cell_id", "centroid_x", "centroid_y", "area_px", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]


def cell_table(labels: np.ndarray):
    """One row per cell: id (its value in the label image), centroid (x, y), area, bbox [x0, x1) x [y0, y1)."""
    import pandas as pd
    from skimage.measure import regionprops_table

    props = regionprops_table(labels, properties=("label", "centroid", "area", "bbox"))
    return pd.DataFrame({
        "cell_id": props["label"].astype(np.int64),
        "centroid_x": props["centroid-1"], "centroid_y": props["centroid-0"],
        "area_px": props["area"].astype(np.int64),
        "bbox_x0": props["bbox-1"], "bbox_y0": props["bbox-0"], "bbox_x1": props["bbox-3"], "bbox_y1": props["bbox-2"],
    }, columns=CELL_COLUMNS)


def segment_slide(card_path, slide_path, labels_out, cells_out) -> int:
    from segrefine.io import Slide, atomic_path, write_tiff
    from segrefine.models import load_model

    model, card = load_model(card_path)
    with Slide(slide_path) as slide:
        log.info("segmenting %s (%dx%d px) with %s [%s] on %s", slide_path, slide.shape[1], slide.shape[0],
                 card["name"], card["stage"], model.device)
        image = slide.read_all()
    labels = model.predict(image).astype(np.uint32)
    write_tiff(labels_out, labels, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    with atomic_path(cells_out) as tmp:
        cell_table(labels).to_csv(tmp, index=False)
    n = int(len(np.unique(labels)) - 1)
    log.info("%d cells -> %s", n, labels_out)
    return n
