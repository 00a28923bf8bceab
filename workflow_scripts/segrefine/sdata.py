"""SpatialData output (scverse): one ``.zarr`` per sample that ``spatialdata.read_zarr`` opens.

Runs only in the spatialdata env (``envs/spatialdata.yaml``: Python 3.12, spatialdata 0.8, spatialdata-plot 0.4):
the spatialdata stack is imported inside the functions; the module itself imports on Python 3.8 so that
``segrefine.cli`` can list the step everywhere.

What the store holds (element names are fixed, so code and docs can name them):

- ``images/image``: the slide, multiscale, dims (c, y, x), the file's dtype and channels (RGB slides as
  channels r, g, b; a grayscale slide as one channel named after the stain). A slide with its own pyramid (a
  pyramidal TIFF) gives its levels as they are; a plain TIFF is downsampled by 2 (mean) per level until the longer
  side is at most ``MIN_SIDE`` px. Level 0 is read lazily through tifffile's zarr view of the TIFF, by blocks, so
  memory holds a few blocks, never the slide.
- ``labels/nuclei`` (and ``labels/cells`` when expanded cells are given): the whole-slide labels, multiscale,
  uint32, from the pyramidal OME-TIFF the stitch (cells) step writes: its own levels, read block by block.
- ``shapes/nuclei_boundaries``: each cell's outline (the stitch step's GeoJSON rings, slide pixels) as a polygon,
  the GeoDataFrame's index = the cell's id in the labels.
- ``tables/table``: the AnnData of the h5ad, every row linked to its cell in ``labels/nuclei``
  (``obs['region']`` = ``'nuclei'``, ``region_key='region'``, ``instance_key='label_id'``);
  ``obsm['spatial']`` = the cell's centre in slide pixels (the centroid of its pixels + 0.5, pixel i spanning
  [i, i+1) like the outlines and the rasters); the h5ad's own centres (cgef/GEM coordinates) move to
  ``obsm['spatial_cgef']``.
- coordinate systems: ``global`` = slide pixels (identity for every element); ``micron`` = a scale by the µm per
  pixel when it is known.
- root attributes: ``segrefine`` (what wrote the store and from which inputs): the marker by which a rerun knows the
  target is its own.

The store is built in a hidden folder beside the target and renamed onto it at the end; a target that exists and
is not ours is refused before anything is read or written, and a rerun replaces our own previous store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.sdata")

#: a generated image pyramid stops at this longer side (px); the label pyramids are the TIFF's own
MIN_SIDE = 1024
#: dask block side (px) for reading level 0 and for the zarr chunks written
BLOCK = 1024
#: the root-attribute key that marks a store as written by this module
MARKER = "segrefine"
IMAGE, NUCLEI, CELLS, BOUNDARIES, TABLE = "image", "nuclei", "cells", "nuclei_boundaries", "table"


# --- the target: ours or not ------------------------------------------------------------------------------------------
def _root_attributes(store: Path) -> Optional[dict]:
    """The root group's attributes of a zarr store (v3 ``zarr.json`` or v2 ``.zattrs``); None if it has none."""
    v3, v2 = store / "zarr.json", store / ".zattrs"
    try:
        if v3.is_file():
            return json.loads(v3.read_text()).get("attributes") or {}
        if v2.is_file():
            return json.loads(v2.read_text())
    except (OSError, ValueError, AttributeError):
        return None
    return None


def is_ours(store) -> bool:
    """Whether ``store`` is a SpatialData store written by ``write_spatialdata`` (its root attributes carry the
    ``segrefine`` marker)."""
    attrs = _root_attributes(Path(store))
    return (
        isinstance(attrs, dict)
        and isinstance(attrs.get(MARKER), dict)
        and attrs[MARKER].get("writer") == "segrefine spatialdata"
    )


def check_target(out) -> None:
    """A clear error, before any work, when ``out`` exists and is not a store this module wrote."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir() or out.is_symlink():
        raise SegRefineError(
            f"{out}: exists and is not a SpatialData folder written by segrefine; nothing was "
            f"written: move or delete it, or choose another output path"
        )
    if not is_ours(out):
        raise SegRefineError(
            f"{out}: exists and is not a SpatialData store written by segrefine (no '{MARKER}' "
            f"entry in its root attributes); nothing was written: move or delete it, or choose "
            f"another output path"
        )


def _leftovers(out: Path) -> List[Path]:
    """Hidden work folders of killed runs for this target (``.{name}.*.part.zarr``, ``.{name}.*.old``)."""
    from segrefine.io import temporaries

    return temporaries(out.parent, f".{out.name}.", r"\.(part\.zarr|old)")


@contextlib.contextmanager
def _published_folder(out: Path):
    """Yield a hidden folder path beside ``out`` to build the store in; on success, move our previous store (if
    any) aside, rename the new one onto ``out`` and delete the old one. On failure nothing under ``out`` changes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in _leftovers(out):
        shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part.zarr", dir=out.parent))
    os.rmdir(work)  # spatialdata creates the store itself
    aside = None
    try:
        yield work
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rmdir(aside)
            os.rename(out, aside)
        os.rename(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        if aside is not None and aside.exists():
            shutil.rmtree(aside, ignore_errors=True)


# --- rasters ----------------------------------------------------------------------------------------------------------
def _tiff_levels(path: Path, what: str):
    """(list of (y, x[, c]) dask arrays, one per pyramid level; file axes; photometric) of a TIFF's first series,
    each read lazily through tifffile's zarr view in blocks of ``BLOCK`` px (whole storage strips when the file is
    stored in strips: a block never decodes a strip twice per row of blocks)."""
    import dask.array as da
    import tifffile
    import zarr

    from segrefine.io import _check_chunks, _yx_axes

    if not path.is_file():
        raise SegRefineError(f"{path}: {what} not found")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise SegRefineError(f"{path}: not a readable TIFF {what} ({type(exc).__name__}: {exc})") from exc
    try:
        series = tif.series[0]
        size = path.stat().st_size
        out = []
        for i, level in enumerate(series.levels):
            _check_chunks(path, level, i, size)
            axes, shape = level.axes, tuple(int(n) for n in level.shape)
            y, x, c = _yx_axes(axes, shape)
            others = [(a, n) for k, (a, n) in enumerate(zip(axes, shape)) if k not in (y, x, c) and n > 1]
            if others:
                raise SegRefineError(
                    f"{path}: the {what} holds more than one image (axes {axes}, shape {shape}); "
                    f"a SpatialData image/labels element is one 2-D plane"
                )
            z = zarr.open(tif.aszarr(series=0, level=i), mode="r")
            key = level.keyframe
            strips = not key.is_tiled
            rows = BLOCK if not strips else max(BLOCK, int(key.rowsperstrip or 1))
            chunks = tuple(
                rows if k == y else (shape[k] if (k == x and strips) else BLOCK) if k in (y, x) else shape[k]
                for k in range(len(shape))
            )
            arr = da.from_array(z, chunks=chunks, lock=True, name=f"{what}-{path.name}-{i}-{size}")
            index = tuple(slice(None) if k in (y, x, c) else 0 for k in range(len(shape)))
            arr = arr[index]
            kept = [k for k in range(len(shape)) if k in (y, x, c)]
            order = [kept.index(y), kept.index(x)] + ([kept.index(c)] if c is not None else [])
            out.append(arr.transpose(order))
        return out, series.levels[0].axes, getattr(series.levels[0].keyframe.photometric, "name", ""), tif
    except SegRefineError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise SegRefineError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from exc


def _n_halvings(shape, min_side: int) -> int:
    n, side = 0, max(shape)
    while side > min_side:
        side = (side + 1) // 2
        n += 1
    return n


def _multiscale(levels, dims: Tuple[str, ...], model, transformations: dict, c_coords=None, min_side: int = MIN_SIDE):
    """A validated multiscale element (DataTree) of ``levels`` (dask arrays in ``dims`` order, full size first);
    a single level larger than ``min_side`` is downsampled by 2 per level by the model's own lazy method (images:
    block mean; labels: nearest) until its longer side is at most ``min_side``. Always a DataTree (one level for a
    small image), so readers meet one structure."""
    from spatialdata.transformations import set_transformation
    from xarray import DataArray, Dataset, DataTree

    levels = [lv.rechunk(tuple(BLOCK if d in ("y", "x") else -1 for d in dims)) for lv in levels]
    n = _n_halvings(levels[0].shape[-2:], min_side) if len(levels) == 1 else 0
    if n:
        kwargs = {"c_coords": c_coords} if c_coords is not None else {}
        return model.parse(levels[0], dims=dims, scale_factors=[2] * n, transformations=transformations, **kwargs)
    coords = {"c": list(c_coords)} if c_coords is not None else {}
    tree = DataTree.from_dict(
        {f"scale{i}": Dataset({"image": DataArray(lv, dims=list(dims), coords=coords)}) for i, lv in enumerate(levels)}
    )
    set_transformation(tree, transformations, set_all=True)
    model.validate(tree)
    return tree


def _image_element(slide: Path, transformations: dict, stain: Optional[str], min_side: int):
    from spatialdata.models import Image2DModel

    levels, axes, photometric, tif = _tiff_levels(slide, "slide image")
    shape = tuple(levels[0].shape[:2])
    if levels[0].ndim == 2:
        levels = [lv[None] for lv in levels]
        names = [stain or "intensity"]
    else:
        levels = [lv.transpose(2, 0, 1) for lv in levels]
        nc = int(levels[0].shape[0])
        if photometric.upper() in ("RGB", "YCBCR") and nc in (3, 4):
            names = ["r", "g", "b", "a"][:nc]
        else:
            names = [f"channel_{k}" for k in range(nc)]
    return _multiscale(levels, ("c", "y", "x"), Image2DModel, transformations, names, min_side), shape, tif


def _labels_element(path: Path, what: str, transformations: dict, shape):
    from spatialdata.models import Labels2DModel

    levels, _, _, tif = _tiff_levels(path, what)
    if levels[0].ndim != 2:
        tif.close()
        raise SegRefineError(f"{path}: the {what} has {levels[0].shape[2]} channels; labels are one 2-D plane")
    if tuple(levels[0].shape) != tuple(shape):
        tif.close()
        raise SegRefineError(
            f"{path}: the {what} are {levels[0].shape[1]}x{levels[0].shape[0]} px but the slide is "
            f"{shape[1]}x{shape[0]} px; they must be the slide's labels (same height and width)"
        )
    if levels[0].dtype.kind not in "ui":
        tif.close()
        raise SegRefineError(f"{path}: the {what} have {levels[0].dtype} pixels, not integer labels")
    return _multiscale(levels, ("y", "x"), Labels2DModel, transformations), tif


# --- shapes -----------------------------------------------------------------------------------------------------------
def read_outlines(path) -> Tuple[np.ndarray, list]:
    """(cell ids, shapely polygons) of a GeoJSON FeatureCollection of cell outlines (the stitch step's
    ``cells.geojson``: one Polygon per cell, its id in ``properties.measurements.cell_id``). Our own file (one
    feature per line) is read line by line; any other layout is parsed whole."""
    import shapely

    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: cell outlines (GeoJSON) not found")
    ids, rings = [], []

    def add(feature, where):
        try:
            cid = int(feature["properties"]["measurements"]["cell_id"])
            geom = feature["geometry"]
            if geom["type"] != "Polygon":
                raise ValueError(f"geometry type {geom['type']}")
            ring = np.asarray(geom["coordinates"][0], np.float64)
            if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 4:
                raise ValueError("its outer ring is not a list of at least 4 [x, y] points")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SegRefineError(
                f"{path}: {where} is not a cell outline (a Polygon feature with properties.measurements.cell_id): {exc}"
            ) from None
        ids.append(cid)
        rings.append(ring)

    with open(path) as fh:
        first = fh.readline()
        if first.strip() == '{"type": "FeatureCollection", "features": [':
            for lineno, line in enumerate(fh, 2):
                text = line.strip().rstrip(",")
                if not text or text == "]}":
                    continue
                try:
                    add(json.loads(text), f"line {lineno}")
                except ValueError as exc:
                    raise SegRefineError(
                        f"{path}: line {lineno} is not valid JSON ({exc}); the file is damaged or truncated"
                    ) from None
        else:
            fh.seek(0)
            try:
                doc = json.load(fh)
            except ValueError as exc:
                raise SegRefineError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("features"), list):
                raise SegRefineError(f"{path}: not a GeoJSON FeatureCollection")
            for k, feature in enumerate(doc["features"]):
                add(feature, f"feature {k}")
    ids = np.asarray(ids, np.int64)
    if len(np.unique(ids)) != len(ids):
        dup = ids[np.unique(ids, return_counts=True)[1].argmax()] if len(ids) else None
        raise SegRefineError(f"{path}: cell id {dup} has more than one outline")
    return ids, [shapely.Polygon(r) for r in rings]


def _shapes_element(path: Path, transformations: dict):
    import geopandas as gpd
    import pandas as pd
    from spatialdata.models import ShapesModel

    ids, polygons = read_outlines(path)
    gdf = gpd.GeoDataFrame(geometry=polygons, index=pd.Index(ids, name="cell_id"))
    return ShapesModel.parse(gdf, transformations=transformations), ids


# --- table ------------------------------------------------------------------------------------------------------------
def _read_centres(cell_table: Path) -> Dict[str, np.ndarray]:
    import pandas as pd

    cols = ["cell_id", "centroid_x", "centroid_y"]
    try:
        if cell_table.suffix == ".parquet":
            df = pd.read_parquet(cell_table, columns=cols)
        else:
            df = pd.read_csv(cell_table, usecols=cols)
    except FileNotFoundError:
        raise SegRefineError(f"{cell_table}: cell table not found") from None
    except (ValueError, KeyError, OSError) as exc:
        raise SegRefineError(f"{cell_table}: not a cell table with columns {', '.join(cols)} ({exc})") from None
    try:
        return {
            "cell_id": df["cell_id"].to_numpy(np.int64),
            "centroid_x": df["centroid_x"].to_numpy(np.float64),
            "centroid_y": df["centroid_y"].to_numpy(np.float64),
        }
    except (ValueError, TypeError) as exc:
        raise SegRefineError(f"{cell_table}: cell_id, centroid_x and centroid_y must be numbers ({exc})") from None


def _table_element(h5ad: Path, cell_table: Path, known_ids: np.ndarray):
    import anndata
    import pandas as pd
    from spatialdata.models import TableModel

    if not h5ad.is_file():
        raise SegRefineError(f"{h5ad}: AnnData (.h5ad) not found")
    try:
        adata = anndata.read_h5ad(h5ad)
    except Exception as exc:
        raise SegRefineError(f"{h5ad}: not a readable AnnData file ({type(exc).__name__}: {exc})") from exc
    if "label_id" not in adata.obs:
        raise SegRefineError(
            f"{h5ad}: obs has no 'label_id' column (the cell's id in the labels; written by `segrefine h5ad`)"
        )
    label = adata.obs["label_id"].to_numpy().astype(np.int64)
    centres = _read_centres(cell_table)
    order = np.argsort(centres["cell_id"], kind="stable")
    sorted_ids = centres["cell_id"][order]
    pos = np.searchsorted(sorted_ids, label)
    found = (
        (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, max(len(sorted_ids) - 1, 0))] == label)
        if len(sorted_ids)
        else np.zeros(len(label), bool)
    )
    if not found.all():
        raise SegRefineError(
            f"{h5ad}: {int((~found).sum())} row(s) have a label_id that is not a cell of "
            f"{cell_table} (e.g. {int(label[~found][0])}): the AnnData and the labels come from "
            f"different segmentations"
        )
    missing = np.setdiff1d(label, known_ids)
    if len(missing):
        raise SegRefineError(
            f"{h5ad}: {len(missing)} row(s) have a label_id with no outline in the GeoJSON "
            f"(e.g. {int(missing[0])}): the AnnData and the outlines come from different runs"
        )
    if len(np.unique(label)) != len(label):
        raise SegRefineError(f"{h5ad}: label_id repeats: one labels cell must be one row")
    idx = order[pos]
    if "spatial" in adata.obsm:
        adata.obsm["spatial_cgef"] = np.asarray(adata.obsm["spatial"])
    adata.obsm["spatial"] = (
        np.column_stack([centres["centroid_x"][idx], centres["centroid_y"][idx]]).astype(np.float64) + 0.5
    )
    adata.obs["label_id"] = label
    adata.obs["region"] = pd.Categorical([NUCLEI] * adata.n_obs, categories=[NUCLEI])
    return TableModel.parse(adata, region=NUCLEI, region_key="region", instance_key="label_id")


# --- the store --------------------------------------------------------------------------------------------------------
def write_spatialdata(
    slide,
    labels,
    outlines,
    h5ad,
    cell_table,
    out_zarr,
    cells_labels=None,
    pixel_size_um: Optional[float] = None,
    stain: Optional[str] = None,
    sample: Optional[str] = None,
    min_side: int = MIN_SIDE,
) -> dict:
    """Write one sample's SpatialData store (see the module docstring); returns a summary dict.

    ``slide``: the slide TIFF; ``labels``: the nuclei labels (pyramidal OME-TIFF, the stitch's labels.tif);
    ``outlines``: the stitch's cells.geojson; ``h5ad``: the AnnData (obs ``label_id``); ``cell_table``: the
    stitch's cells.parquet or cells.csv (centres); ``cells_labels``: expanded cells (optional, same frame);
    ``pixel_size_um``: µm per slide pixel (adds the ``micron`` coordinate system); ``min_side``: a slide without
    its own pyramid is downsampled until its longer side is at most this (px)."""
    out = Path(out_zarr)
    check_target(out)  # before the (slow) imports and any read
    if int(min_side) < 1:
        raise SegRefineError(f"min_side {min_side}: must be a positive number of pixels")
    import dask
    from spatialdata import SpatialData
    from spatialdata.transformations import Identity, Scale

    t0 = time.monotonic()
    if pixel_size_um is not None and not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise SegRefineError(f"pixel size {pixel_size_um!r} µm: must be a positive number")
    transformations = {"global": Identity()}
    if pixel_size_um:
        transformations["micron"] = Scale([float(pixel_size_um)] * 2, axes=("y", "x"))
    files = []
    try:
        image, shape, tif = _image_element(Path(slide), transformations, stain, min_side)
        files.append(tif)
        nuclei, tif = _labels_element(Path(labels), "nuclei labels", transformations, shape)
        files.append(tif)
        label_elements = {NUCLEI: nuclei}
        if cells_labels:
            cells, tif = _labels_element(Path(cells_labels), "cell labels", transformations, shape)
            files.append(tif)
            label_elements[CELLS] = cells
        shapes, ids = _shapes_element(Path(outlines), transformations)
        table = _table_element(Path(h5ad), Path(cell_table), ids)
        attrs = {
            MARKER: {
                "writer": "segrefine spatialdata",
                "sample": sample,
                "inputs": {
                    "slide": str(slide),
                    "labels": str(labels),
                    "cells_labels": str(cells_labels) if cells_labels else None,
                    "outlines": str(outlines),
                    "h5ad": str(h5ad),
                    "cell_table": str(cell_table),
                },
                "pixel_size_um": pixel_size_um,
                "coordinate_systems": sorted(transformations),
            }
        }
        sdata = SpatialData(
            images={IMAGE: image},
            labels=label_elements,
            shapes={BOUNDARIES: shapes},
            tables={TABLE: table},
            attrs=attrs,
        )
        with _published_folder(out) as work, dask.config.set(scheduler="threads", num_workers=2):
            sdata.write(work, overwrite=False)
    finally:
        for f in files:
            f.close()
    summary = {
        "zarr": str(out),
        "shape": list(shape),
        "image_levels": _n_levels(image),
        "label_levels": {k: _n_levels(v) for k, v in label_elements.items()},
        "outlines": int(len(ids)),
        "table_rows": int(table.n_obs),
        "genes": int(table.n_vars),
        "coordinate_systems": sorted(transformations),
        "seconds": round(time.monotonic() - t0, 2),
    }
    log.info("%s", json.dumps(summary))
    return summary


def _n_levels(element) -> int:
    return len(element.children) if hasattr(element, "children") else 1


# --- the picture ------------------------------------------------------------------------------------------------------
def _close_up_box(sdata, side: int) -> Tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a ``side`` px square around the median cell centre (the whole slide if smaller)."""
    img = sdata.images[IMAGE]
    level0 = img["scale0"]["image"] if hasattr(img, "children") else img
    H, W = int(level0.sizes["y"]), int(level0.sizes["x"])
    xy = np.asarray(sdata.tables[TABLE].obsm["spatial"]) if sdata.tables[TABLE].n_obs else np.array([[W / 2, H / 2]])
    cx, cy = np.median(xy[:, 0]), np.median(xy[:, 1])
    half = min(side, W, H) / 2
    x0 = min(max(0.0, cx - half), W - 2 * half)
    y0 = min(max(0.0, cy - half), H - 2 * half)
    return x0, y0, x0 + 2 * half, y0 + 2 * half


def render_png(zarr_path, png, close_up: int = 256, title: Optional[str] = None) -> dict:
    """Read the store back with ``spatialdata.read_zarr`` and render it with spatialdata-plot into ``png``: the whole
    slide (image + nuclei labels) and a close-up (``close_up`` px around the median cell: image, labels and the
    outlines as shapes). Returns what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    from segrefine.io import atomic_path

    logging.getLogger("ome_zarr").setLevel(logging.ERROR)  # one INFO line per array read, "no parent" warnings
    sdata = spatialdata.read_zarr(zarr_path)
    x0, y0, x1, y1 = _close_up_box(sdata, close_up)
    crop = spatialdata.bounding_box_query(
        sdata,
        axes=("x", "y"),
        min_coordinate=[x0, y0],
        max_coordinate=[x1, y1],
        target_coordinate_system="global",
        filter_table=True,
    )
    img = sdata.images[IMAGE]
    channels = list((img["scale0"]["image"] if hasattr(img, "children") else img).coords["c"].values)
    style = {"cmap": "gray"} if len(channels) == 1 else {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    (
        sdata.pl.render_images(IMAGE, **style)
        .pl.render_labels(NUCLEI, fill_alpha=0.35, outline_alpha=0.0)
        .pl.show(
            ax=axes[0],
            coordinate_systems="global",
            title=f"{title or 'slide'}: image + labels '{NUCLEI}'",
            colorbar=False,
        )
    )
    axes[0].add_patch(
        matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2)
    )
    # the close-up fills the cells when there are any, else the nuclei; the nuclei's outlines are the shapes
    # (spatialdata-plot 0.4.3 draws label contours (outline_alpha > 0) only on part of each label's border)
    with_cells = CELLS in crop.labels
    drawn = crop.pl.render_images(IMAGE, **style).pl.render_labels(
        CELLS if with_cells else NUCLEI, fill_alpha=0.3, outline_alpha=0.0
    )
    n_shapes = len(crop.shapes[BOUNDARIES]) if BOUNDARIES in crop.shapes else 0
    if n_shapes:
        drawn = drawn.pl.render_shapes(
            BOUNDARIES, fill_alpha=0.0, outline_alpha=1.0, outline_color="yellow", outline_width=1.0
        )
    drawn.pl.show(
        ax=axes[1],
        coordinate_systems="global",
        colorbar=False,
        title=f"close-up (x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} px): image + labels "
        f"'{CELLS if with_cells else NUCLEI}'\n+ shapes '{BOUNDARIES}' (yellow)",
    )
    axes[1].set_xlim(x0, x1)
    axes[1].set_ylim(y1, y0)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return {"png": str(png), "close_up": [float(v) for v in (x0, y0, x1, y1)], "shapes_in_close_up": int(n_shapes)}
