"""Annotations -> instance masks, and instance masks -> QuPath GeoJSON.

Accepted annotation files, one per patch, named after the patch:
- QuPath GeoJSON (``.geojson``/``.json``): Polygon and MultiPolygon features
  (holes kept) of annotation, detection or cell objects, in the patch's pixel
  frame (QuPath's convention: (0, 0) is the top-left corner of the first pixel,
  so pixel (row r, col c) is inside a polygon when its centre (c+0.5, r+0.5) is).
- Masks (``.tif``/``.tiff``/``.png``): binary or semantic masks (0/1, 0/255:
  foreground split into cells by 4-connected components) or instance masks
  (labels 1..N, kept as they are).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from segrefine import SegRefineError

CELL_OBJECT_TYPES = ("annotation", "detection", "cell")
# how far (px) a vertex may stray outside the patch before we call it an error:
# QuPath's brush can leave sub-pixel overshoot at the border
OUTSIDE_TOLERANCE_PX = 1.0


def _features(doc, path: Path) -> List[dict]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        if doc.get("type") == "FeatureCollection":
            return list(doc.get("features") or [])
        if doc.get("type") == "Feature":
            return [doc]
    raise SegRefineError(f"{path}: not a GeoJSON Feature, FeatureCollection or list of features")


def _class_name(props: dict) -> Optional[str]:
    cls = props.get("classification")
    if isinstance(cls, dict):
        return cls.get("name")
    return cls if isinstance(cls, str) else None


def cell_polygons(path, exclude_classes: Sequence[str] = ("Region",), use_nucleus: bool = False):
    """The cell geometries of a QuPath GeoJSON file as shapely (Multi)Polygons."""
    import shapely.geometry

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SegRefineError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise SegRefineError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    geoms = []
    for i, feat in enumerate(_features(doc, path)):
        props = feat.get("properties") or {}
        otype = props.get("objectType", "annotation")
        if otype not in CELL_OBJECT_TYPES or _class_name(props) in exclude_classes:
            continue
        geom = feat.get("nucleusGeometry") if (use_nucleus and feat.get("nucleusGeometry")) else feat.get("geometry")
        if not geom or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points, lines: not cells
        try:
            shape = shapely.geometry.shape(geom)
        except Exception as exc:
            raise SegRefineError(f"{path}: feature {i} has a malformed {geom.get('type')} ({exc})") from exc
        if not shape.is_valid:
            shape = shape.buffer(0)  # self-touching outlines drawn by hand
        if not shape.is_empty:
            geoms.append((i, shape))
    return geoms


def rasterize_polygons(geoms, shape: Tuple[int, int], source: str = "annotation") -> np.ndarray:
    """Paint polygons into an instance mask by pixel centres; later features win overlaps."""
    import shapely

    h, w = shape
    labels = np.zeros((h, w), dtype=np.uint32)
    n = 0
    for i, geom in geoms:
        minx, miny, maxx, maxy = geom.bounds
        if (minx < -OUTSIDE_TOLERANCE_PX or miny < -OUTSIDE_TOLERANCE_PX
                or maxx > w + OUTSIDE_TOLERANCE_PX or maxy > h + OUTSIDE_TOLERANCE_PX):
            raise SegRefineError(
                f"{source}: feature {i} (bounds x {minx:.1f}..{maxx:.1f}, y {miny:.1f}..{maxy:.1f}) lies outside "
                f"its {w}x{h} px patch; coordinates must be in the patch's pixel frame")
        c0, c1 = max(int(np.floor(minx)), 0), min(int(np.ceil(maxx)), w)
        r0, r1 = max(int(np.floor(miny)), 0), min(int(np.ceil(maxy)), h)
        if c1 <= c0 or r1 <= r0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        inside = shapely.contains_xy(geom, xx + 0.5, yy + 0.5)
        if inside.any():
            n += 1
            labels[r0:r1, c0:c1][inside] = n
    return relabel_sequential(labels)


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Labels 1..N with no gaps (objects fully painted over disappear), smallest dtype."""
    from skimage.segmentation import relabel_sequential as _relabel

    out = _relabel(labels)[0]
    n = int(out.max())
    return out.astype(np.uint16 if n < 2**16 else np.uint32)


def mask_to_instances(mask: np.ndarray, source: str = "mask") -> np.ndarray:
    """Binary/semantic masks -> 4-connected components; instance masks kept as they are."""
    from skimage.measure import label

    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        if not (np.all(mask[..., 0] == mask[..., 1]) and np.all(mask[..., 0] == mask[..., 2])):
            raise SegRefineError(f"{source}: an RGB mask must be gray (equal channels); got a colour image")
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise SegRefineError(f"{source}: a mask must be 2-D, got shape {mask.shape}")
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise SegRefineError(f"{source}: a mask must hold whole numbers (labels or 0/1/255)")
    if mask.min() < 0:
        raise SegRefineError(f"{source}: a mask cannot hold negative labels")
    values = np.unique(mask)
    if len(values) <= 2:  # background + one value: binary or semantic
        return relabel_sequential(label(mask > 0, connectivity=1))
    return relabel_sequential(mask.astype(np.int64))


def convert_annotation(path, shape: Tuple[int, int], exclude_classes: Sequence[str] = ("Region",),
                       use_nucleus: bool = False) -> np.ndarray:
    """Any accepted annotation file -> instance mask of ``shape``; errors name the file."""
    from segrefine.io import read_tiff

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        geoms = cell_polygons(path, exclude_classes, use_nucleus)
        if not geoms:
            raise SegRefineError(f"{path}: no cell polygons found (empty annotation, or only points/lines/"
                                 f"excluded classes {list(exclude_classes)})")
        labels = rasterize_polygons(geoms, shape, source=str(path))
    elif suffix in (".tif", ".tiff", ".png"):
        if suffix == ".png":
            import skimage.io
            try:
                mask = skimage.io.imread(path)
            except Exception as exc:
                raise SegRefineError(f"{path}: not a readable PNG ({exc})") from exc
        else:
            mask = read_tiff(path)
        if mask.shape[:2] != tuple(shape):
            raise SegRefineError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its patch is "
                                 f"{shape[1]}x{shape[0]} px")
        labels = mask_to_instances(mask, source=str(path))
    else:
        raise SegRefineError(f"{path}: unknown annotation type {suffix!r} (use .geojson, .tif or .png)")
    if labels.max() == 0:
        raise SegRefineError(f"{path}: the annotation holds no cell pixels")
    return labels


def label_outlines(labels: np.ndarray, offset: Tuple[float, float] = (0.0, 0.0)):
    """One exact pixel-edge outline per label, as (label, shapely Polygon/MultiPolygon).

    The outline follows pixel edges, so rasterizing it by pixel centres gives
    back exactly the same pixels (a round trip with ``rasterize_polygons``).
    """
    import shapely
    from scipy import ndimage

    out = []
    ox, oy = offset
    for lab, sl in enumerate(ndimage.find_objects(labels), 1):
        if sl is None:
            continue
        rr, cc = np.nonzero(labels[sl] == lab)
        rr = rr + sl[0].start
        cc = cc + sl[1].start
        squares = shapely.box(cc + ox, rr + oy, cc + 1 + ox, rr + 1 + oy)
        geom = shapely.union_all(squares).simplify(0)
        out.append((lab, geom))
    return out


def labels_to_geojson(labels: np.ndarray, object_type: str = "annotation", class_name: str = "Nucleus",
                      offset: Tuple[float, float] = (0.0, 0.0)) -> dict:
    """A QuPath-importable FeatureCollection of the label image's cells."""
    import shapely.geometry

    features = []
    for lab, geom in label_outlines(labels, offset):
        features.append({
            "type": "Feature",
            "id": f"cell-{lab}",
            "geometry": shapely.geometry.mapping(geom),
            "properties": {"objectType": object_type, "classification": {"name": class_name, "color": [255, 0, 0]},
                           "label": int(lab)},
        })
    return {"type": "FeatureCollection", "features": features}


def dump_geojson(doc: dict) -> str:
    def _lists(o):
        if isinstance(o, (list, tuple)):
            return [_lists(v) for v in o]
        if isinstance(o, dict):
            return {k: _lists(v) for k, v in o.items()}
        if isinstance(o, float) and o.is_integer():
            return int(o)
        return o
    return json.dumps(_lists(doc))
