"""Whole-slide segmentation with a saved model: tiled, sharded, exactly stitched.

The workflow runs the three steps as separate jobs (rules/segment.smk):
``tile-plan`` (segrefine.tiling.make_plan), one ``segment-shard`` job per shard
(segrefine.tiling.run_shard, in the model's env, `gpu=1` for GPU frameworks)
and ``stitch`` (segrefine.stitch.stitch). ``segment_slide`` runs the same
three steps in one process, for use by hand. ``segment_whole`` is the
whole-image approach (one predict call on the whole slide), kept as the
reference that the tiling benchmark compares against.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("segrefine.segment")

CELL_COLUMNS = ["cell_id", "centroid_x", "centroid_y", "area_px", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]


def cell_table(labels: np.ndarray):
    """One row per cell: id (its value in the label image), centroid (x, y), area, bbox [x0, x1) x [y0, y1)."""
    import pandas as pd
    from skimage.measure import regionprops_table

    props = regionprops_table(labels, properties=("label", "centroid", "area", "bbox"))
    return pd.DataFrame(
        {
            "cell_id": props["label"].astype(np.int64),
            "centroid_x": props["centroid-1"],
            "centroid_y": props["centroid-0"],
            "area_px": props["area"].astype(np.int64),
            "bbox_x0": props["bbox-1"],
            "bbox_y0": props["bbox-0"],
            "bbox_x1": props["bbox-3"],
            "bbox_y1": props["bbox-2"],
        },
        columns=CELL_COLUMNS,
    )


def segment_whole(
    card_path,
    slide_path,
    model=None,
    tissue: bool = False,
    tissue_level: Optional[int] = None,
    tissue_downsample: int = 16,
    bright_field: bool = False,
    channel: Optional[int] = None,
) -> np.ndarray:
    """The whole-image approach: the whole slide in memory, one predict call (the reference for benchmarks).

    The model gets the same slide-level intensity reference as the tiled run
    with the same tissue settings (computed here on the whole image: identical
    to tile-plan's), so "the same model" means the same normalisation.
    ``model``: an already loaded model; ``channel``: the slide's channel to segment (``segrefine.io.Slide``)."""
    from segrefine.intensity import intensity_reference
    from segrefine.io import Slide
    from segrefine.models import load_model
    from segrefine.tiling import slide_tissue, window_predictor

    if model is None:
        model, _ = load_model(card_path)
    tissue_mask = None  # (low-resolution mask, level-0 px per mask px), as tile-plan makes it
    with Slide(slide_path, channel=channel) as slide:
        image = slide.read_all()
        if tissue:
            mask, _, f = slide_tissue(slide, tissue_downsample, tissue_level, bright_field)
            tissue_mask = (mask, f)
    model.set_intensity_reference(intensity_reference(image, tissue=tissue_mask))
    return np.asarray(window_predictor(model)(image, (0, 0))).astype(np.uint32)


def segment_slide(
    card_path,
    slide_path,
    out_dir,
    tile_size: int = 1024,
    halo_px: int = 64,
    context_px: int = 0,
    shards: int = 1,
    tissue: bool = True,
    tissue_level: Optional[int] = None,
    tissue_downsample: int = 16,
    bright_field: bool = False,
    trainset=None,
    pixel_size_um: Optional[float] = None,
    geojson: bool = True,
    overlay: bool = True,
    model_context: bool = True,
    channel: Optional[int] = None,
) -> dict:
    """Plan, all shards one after another, and stitch, in one process; outputs in ``out_dir`` as the workflow names
    them.

    Runs in any model's env; ``cells.parquet`` is written where pyarrow is installed (the core env; the model
    envs lack it, and cells.csv holds the same table)."""
    import importlib.util

    from segrefine.stitch import stitch
    from segrefine.tiling import make_plan, run_shard, write_plan

    out = Path(out_dir)
    plan, meta = make_plan(
        slide_path,
        tile_size,
        halo_px,
        context_px,
        shards,
        tissue,
        tissue_level,
        tissue_downsample,
        bright_field,
        trainset,
        channel=channel,
    )
    write_plan(plan, meta, out / "tiles.tsv", out / "tiles.json")
    shard_jsons = [out / "shards" / f"{k}.json" for k in range(shards)]
    for k, sj in enumerate(shard_jsons):
        run_shard(out / "tiles.tsv", k, card_path, slide_path, out / "tiles", sj, model_context=model_context)
    parquet = out / "cells.parquet" if importlib.util.find_spec("pyarrow") else None
    if parquet is None:
        log.warning("pyarrow is not installed in this env: no cells.parquet (cells.csv holds the same table)")
    return stitch(
        out / "tiles.tsv",
        out / "tiles",
        shard_jsons,
        slide_path,
        out / "labels.tif",
        out / "cells.csv",
        parquet,
        out / "cells.geojson" if geojson else None,
        out / "overlay.png" if overlay else None,
        out / "segmentation.json",
        pixel_size_um,
        probability_map_out=out / "probability_map.png" if overlay else None,
    )
