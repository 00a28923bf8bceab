"""Annotations -> instance masks, and instance masks -> QuPath GeoJSON.

Accepted annotation files, one per patch, named after the patch:
- QuPath GeoJSON (``.geojson``/``.json``): Polygon and MultiPolygon features
  (holes kept) of annotation, detection or cell objects, in the patch's pixel
  frame (QuPath's convention: (0, 0) is the top-left corner of the first pixel,
  so pixel (row r, col c) is inside a polygon when its centre (c+0.5, r+0.5) is).
  A self-intersecting outline is repaired keeping all of its area (shapely's
  ``make_valid``, "structure" method); NaN/infinite coordinates and features
  that are not JSON objects are refused; an unclassified rectangle annotation
  covering (almost) the whole patch is a region of interest (QuPath exports
  the rectangle drawn around the patch as an annotation with no class) and is
  ignored with a warning; any other object covering more than half of its
  patch (a classified region, a detection rectangle) is a region, not a cell,
  and is refused naming it, as a mask region that large is. Ids (QuPath's UUIDs), classes and measurements (a
  ``{name: value}`` object as QuPath 0.4+ writes it, or the older list of
  ``{name, value}``) are read with the geometry (``read_cell_objects``), so the
  workflow's pre-annotations (``segrefine.preannotations``) come back as they
  are. Detections and cells are used like annotations, with a warning naming
  the file; a file drawn on the whole slide (every object inside the patch's
  box in slide coordinates) is moved into the patch frame; an object reaching
  outside its patch is clipped when at least half of it is inside, refused
  (naming the object) otherwise.
- Masks (``.tif``/``.tiff``/``.png``): told apart by their structure
  (``mask_kind``): binary (one value), semantic (a few values, each in many
  separate pieces: classes, anti-aliased edges of a binary mask) are split into
  cells by 4-connected components of the foreground; instance masks (one
  connected piece per value, labels 1..N) are kept as they are; a mask that
  is neither is refused.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from segrefine import SegRefineError

CELL_OBJECT_TYPES = ("annotation", "detection", "cell")
# how far (px) a vertex may stray outside the patch before we call it an error:
# QuPath's brush can leave sub-pixel overshoot at the border
OUTSIDE_TOLERANCE_PX = 1.0
# an unclassified rectangle annotation covering at least this fraction of its patch is a region of interest
ROI_PATCH_FRACTION = 0.9
# masks: (separate pieces of equal value) / (distinct nonzero values): an instance mask has one piece per label
INSTANCE_MAX_PIECES_PER_VALUE = 1.5
SEMANTIC_MIN_PIECES_PER_VALUE = 2.0
# a mask region larger than this fraction of its patch is a class or tissue region, not a cell
MAX_CELL_PATCH_FRACTION = 0.5

log = logging.getLogger("segrefine.annotations")


def _features(doc, path: Path) -> List[dict]:
    if isinstance(doc, list):
        feats = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features") or []
        if not isinstance(feats, list):
            raise SegRefineError(f"{path}: 'features' must be a list, got {type(feats).__name__}")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    else:
        raise SegRefineError(f"{path}: not a GeoJSON Feature, FeatureCollection or list of features")
    for i, feat in enumerate(feats):
        if not isinstance(feat, dict):
            raise SegRefineError(
                f"{path}: feature {i} is not a GeoJSON object but {type(feat).__name__} {_short(feat)}"
            )
        for key in ("properties", "geometry", "nucleusGeometry"):
            if feat.get(key) is not None and not isinstance(feat[key], dict):
                raise SegRefineError(
                    f"{path}: feature {i}{_feature_name(feat)}: '{key}' is not an object but "
                    f"{type(feat[key]).__name__} {_short(feat[key])}"
                )
    return feats


def _short(value, n: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _feature_name(feat: dict) -> str:
    """' (id ..., name ...)' of a feature, for messages."""
    props = feat.get("properties") if isinstance(feat.get("properties"), dict) else {}
    bits = [f"id {feat['id']!r}"] if feat.get("id") is not None else []
    if props.get("name"):
        bits.append(f"name {props['name']!r}")
    return f" ({', '.join(bits)})" if bits else ""


def _check_coordinates(coords, path: Path, i: int, feat: dict) -> None:
    """A clear error for a coordinate that is not a finite number (JSON NaN, Infinity, null, strings)."""
    stack = [coords]
    while stack:
        c = stack.pop()
        if isinstance(c, (list, tuple)):
            stack.extend(c)
        elif isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise SegRefineError(
                f"{path}: feature {i}{_feature_name(feat)} has an invalid coordinate {c!r}: "
                f"every vertex must be a pair of finite numbers"
            )


def _polygonal_members(geom: dict, path: Path, i: int, feat: dict) -> Optional[dict]:
    """A GeometryCollection's polygons as one MultiPolygon (every part kept; point and line members left out with a
    warning), or None when it has no polygon."""
    members = geom.get("geometries")
    if not isinstance(members, list):
        raise SegRefineError(
            f"{path}: feature {i}{_feature_name(feat)}: a GeometryCollection's 'geometries' must be "
            f"a list, got {type(members).__name__} {_short(members)}"
        )
    polys = [g for g in members if isinstance(g, dict) and g.get("type") in ("Polygon", "MultiPolygon")]
    if not polys:
        return None
    if len(polys) < len(members):
        log.warning(
            "%s: feature %d%s: %d of the %d members of its GeometryCollection are not polygons: left out",
            path,
            i,
            _feature_name(feat),
            len(members) - len(polys),
            len(members),
        )
    coords = []
    for g in polys:
        c = g.get("coordinates")
        coords.extend([c] if g["type"] == "Polygon" else (c if isinstance(c, list) else [c]))
    return {"type": "MultiPolygon", "coordinates": coords}


def _is_roi(props: dict, geom, shape: Tuple[int, int]) -> bool:
    """An unclassified annotation rectangle covering (almost) the whole patch: a region of interest, not a cell."""
    import shapely

    if _object_type_and_id({}, props)[0] != "annotation" or _class_name(props) is not None:
        return False
    env = geom.envelope
    if env.area <= 0 or geom.area < 0.98 * env.area:  # not a rectangle
        return False
    h, w = shape
    return geom.intersection(shapely.box(0, 0, w, h)).area >= ROI_PATCH_FRACTION * w * h


def _class_name(props: dict) -> Optional[str]:
    """The class of an object: {"name": ...}, or a derived class {"names": [...]} (QuPath 0.4+) as QuPath names
    it ("Tumor: Positive"), or a plain string."""
    cls = props.get("classification")
    if isinstance(cls, dict):
        names = cls.get("names")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(names)
        return cls.get("name")
    return cls if isinstance(cls, str) else None


# QuPath 0.2 wrote the object's Java class as its "id" (QuPathTypeAdapters.LEGACY_TYPE_IDS), 0.3 the type as
# "object_type", 0.4 and later as "objectType" with a UUID "id"
LEGACY_TYPE_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}


def _object_type_and_id(feat: dict, props: dict) -> Tuple[str, Optional[str]]:
    fid = feat.get("id")
    fid = str(fid) if fid is not None else None
    otype = props.get("objectType") or props.get("object_type")
    if fid in LEGACY_TYPE_IDS:
        otype, fid = otype or LEGACY_TYPE_IDS[fid], None
    return (otype if isinstance(otype, str) else "annotation"), fid


class CellObject(NamedTuple):
    """One cell object of a QuPath GeoJSON file: its feature index, QuPath id (a UUID string, or None), object type,
    class name, measurements ({name: float}) and geometry (shapely, in the patch's pixel frame)."""

    index: int
    id: Optional[str]
    object_type: str
    class_name: Optional[str]
    measurements: Dict[str, float]
    geometry: object


def read_measurements(value, where: str = "") -> Dict[str, float]:
    """QuPath's measurements of an object as {name: float}: a JSON object {name: value} (QuPath 0.4 and later) or a
    list of {"name", "value"} (before 0.4); "NaN", "Infinity", "-Infinity" strings (what QuPath writes for them) and
    null become floats. Anything else is left out with a warning: measurements never change the cells."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for m in value:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                items.append((m["name"], m.get("value")))
            else:
                log.warning("%s: measurement %s is not a {name, value} object: ignored", where, _short(m))
    else:
        log.warning("%s: measurements are neither an object nor a list but %s: ignored", where, _short(value))
        return {}
    out = {}
    for name, v in items:
        if v is None:
            out[str(name)] = math.nan
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(name)] = float(v)
        elif isinstance(v, str):
            try:
                out[str(name)] = float({"inf": "Infinity", "-inf": "-Infinity"}.get(v.lower(), v))
            except ValueError:
                log.warning("%s: measurement %r = %s is not a number: ignored", where, name, _short(v))
        else:
            log.warning("%s: measurement %r = %s is not a number: ignored", where, name, _short(v))
    return out


def _outside(geom, w: int, h: int, dx: float = 0.0, dy: float = 0.0) -> bool:
    minx, miny, maxx, maxy = geom.bounds
    t = OUTSIDE_TOLERANCE_PX
    return minx - dx < -t or miny - dy < -t or maxx - dx > w + t or maxy - dy > h + t


def read_cell_objects(
    path,
    exclude_classes: Sequence[str] = ("Region",),
    use_nucleus: bool = False,
    shape: Optional[Tuple[int, int]] = None,
    origin: Optional[Tuple[int, int]] = None,
) -> List[CellObject]:
    """The cell objects of a QuPath GeoJSON file (``CellObject``), in file order.

    ``shape``: the patch's (height, width). With it, an unclassified rectangle annotation covering (almost) all of
    the patch is a region of interest and is left out with a warning, and objects that stray outside the patch are
    handled: a file whose objects all lie inside the patch's box in slide coordinates (``origin``, the patch's
    top-left slide pixel: the objects were drawn on the whole slide) is moved into the patch frame with a warning;
    an object with at least half of its area inside the patch is clipped to it with a warning naming the object;
    an object mostly outside is refused, naming the object. Detections and cells (objects QuPath's cell detection
    makes, which QuPath cannot edit) are used like annotations, with one warning naming the file and the objects;
    an id used by two objects is named in a warning (the geometry of both is used)."""
    import shapely
    import shapely.geometry

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SegRefineError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise SegRefineError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    objects = []
    for i, feat in enumerate(_features(doc, path)):
        props = feat.get("properties") or {}
        otype, fid = _object_type_and_id(feat, props)
        if otype not in CELL_OBJECT_TYPES or _class_name(props) in exclude_classes:
            continue
        geom = feat.get("nucleusGeometry") if (use_nucleus and feat.get("nucleusGeometry")) else feat.get("geometry")
        if geom and geom.get("type") == "GeometryCollection":
            geom = _polygonal_members(geom, path, i, feat)
        if not geom or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points, lines: not cells
        _check_coordinates(geom.get("coordinates"), path, i, feat)
        try:
            cell = shapely.geometry.shape(geom)
        except Exception as exc:
            raise SegRefineError(
                f"{path}: feature {i}{_feature_name(feat)} has a malformed {geom.get('type')} ({exc})"
            ) from exc
        if not cell.is_valid:  # self-intersecting or self-touching outlines drawn by hand: keep every lobe
            reason = shapely.is_valid_reason(cell)
            fixed = shapely.make_valid(cell, method="structure", keep_collapsed=False)
            parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in ("Polygon", "MultiPolygon")]
            fixed = shapely.union_all(parts) if parts else shapely.Polygon()
            log.warning(
                "%s: feature %d%s: invalid outline (%s) repaired keeping all its area: %.1f px^2 in %d part(s)",
                path,
                i,
                _feature_name(feat),
                reason,
                fixed.area,
                len(getattr(fixed, "geoms", [fixed])),
            )
            cell = fixed
        if cell.is_empty:
            continue
        if shape is not None and _is_roi(props, cell, shape):
            log.warning(
                "%s: feature %d%s: an unclassified rectangle covering %.0f%% of the %dx%d px patch is a "
                "region of interest, not a cell: ignored",
                path,
                i,
                _feature_name(feat),
                100.0 * cell.area / (shape[0] * shape[1]),
                shape[1],
                shape[0],
            )
            continue
        objects.append(
            CellObject(
                i,
                fid,
                otype,
                _class_name(props),
                read_measurements(props.get("measurements"), f"{path}: feature {i}"),
                cell,
            )
        )
    if shape is not None:
        objects = _into_patch(objects, path, shape, origin)
    _warn_detections(objects, path)
    ids = [o.id for o in objects if o.id is not None]
    dups = sorted({x for x in ids if ids.count(x) > 1})
    if dups:
        log.warning(
            "%s: %d id(s) used by more than one object (e.g. %s: objects imported twice into QuPath?); every "
            "object's outline is used",
            path,
            len(dups),
            dups[0],
        )
    return objects


def _into_patch(
    objects: List[CellObject], path: Path, shape: Tuple[int, int], origin: Optional[Tuple[int, int]]
) -> List[CellObject]:
    """Objects in the patch frame: a whole file in slide coordinates moved, objects mostly inside clipped."""
    import shapely
    import shapely.affinity

    h, w = shape
    if not any(_outside(o.geometry, w, h) for o in objects):
        return objects
    if (
        origin is not None
        and (origin[0] or origin[1])
        and not any(_outside(o.geometry, w, h, origin[0], origin[1]) for o in objects)
    ):
        log.warning(
            "%s: all %d objects lie inside the patch's box in slide coordinates (x %d..%d, y %d..%d): moved "
            "into the patch frame",
            path,
            len(objects),
            origin[0],
            origin[0] + w,
            origin[1],
            origin[1] + h,
        )
        return [o._replace(geometry=shapely.affinity.translate(o.geometry, -origin[0], -origin[1])) for o in objects]
    box = shapely.box(0, 0, w, h)
    out = []
    for o in objects:
        if not _outside(o.geometry, w, h):
            out.append(o)
            continue
        minx, miny, maxx, maxy = o.geometry.bounds
        inside = o.geometry.intersection(box)
        name = f"feature {o.index}" + (f" (id {o.id!r})" if o.id else "")
        if inside.area < 0.5 * o.geometry.area:
            slide = (
                f" (or, for a file drawn on the whole slide, every object inside the patch's box x {origin[0]}.."
                f"{origin[0] + w}, y {origin[1]}..{origin[1] + h}: export only this patch's objects)"
                if origin is not None and (origin[0] or origin[1])
                else ""
            )
            raise SegRefineError(
                f"{path}: {name} (bounds x {minx:.1f}..{maxx:.1f}, y {miny:.1f}..{maxy:.1f}) lies outside its {w}x{h} "
                f"px patch; coordinates must be in the patch's pixel frame{slide}"
            )
        log.warning(
            "%s: %s (bounds x %.1f..%.1f, y %.1f..%.1f) reaches outside its %dx%d px patch: clipped to the "
            "patch (%.0f%% of its area kept)",
            path,
            name,
            minx,
            maxx,
            miny,
            maxy,
            w,
            h,
            100.0 * inside.area / o.geometry.area,
        )
        out.append(o._replace(geometry=inside))
    return out


def _warn_detections(objects: List[CellObject], path: Path) -> None:
    det = [o for o in objects if o.object_type != "annotation"]
    if det:
        first = det[0]
        log.warning(
            "%s: %d of %d cell objects are QuPath %ss, not annotations (e.g. feature %d%s): used as cells; "
            "QuPath cannot edit detections, so correct pre-annotations as annotation objects (docs/annotation"
            ".md)",
            path,
            len(det),
            len(objects),
            first.object_type,
            first.index,
            f" id {first.id!r}" if first.id else "",
        )


def cell_polygons(
    path,
    exclude_classes: Sequence[str] = ("Region",),
    use_nucleus: bool = False,
    shape: Optional[Tuple[int, int]] = None,
    origin: Optional[Tuple[int, int]] = None,
):
    """The cell geometries of a QuPath GeoJSON file as (feature index, shapely (Multi)Polygon)
    (``read_cell_objects``, which says how ``shape`` and ``origin`` are used)."""
    return [(o.index, o.geometry) for o in read_cell_objects(path, exclude_classes, use_nucleus, shape, origin)]


def rasterize_polygons(geoms, shape: Tuple[int, int], source: str = "annotation") -> np.ndarray:
    """Paint polygons into an instance mask by pixel centres; later features win overlaps."""
    import shapely

    h, w = shape
    labels = np.zeros((h, w), dtype=np.uint32)
    n = 0
    for i, geom in geoms:
        minx, miny, maxx, maxy = geom.bounds
        if (
            minx < -OUTSIDE_TOLERANCE_PX
            or miny < -OUTSIDE_TOLERANCE_PX
            or maxx > w + OUTSIDE_TOLERANCE_PX
            or maxy > h + OUTSIDE_TOLERANCE_PX
        ):
            raise SegRefineError(
                f"{source}: feature {i} (bounds x {minx:.1f}..{maxx:.1f}, y {miny:.1f}..{maxy:.1f}) lies outside "
                f"its {w}x{h} px patch; coordinates must be in the patch's pixel frame"
            )
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


def mask_kind(mask: np.ndarray) -> Tuple[str, str]:
    """("binary" | "semantic" | "instance" | "ambiguous", why) of a 2-D mask of whole numbers >= 0, by its structure.

    A piece is a connected (8-neighbour) set of pixels of one value. In an
    instance mask each label is one piece, so there are about as many pieces
    as values; in a semantic mask (classes 0/1/2, or a binary mask with
    anti-aliased edges: 0/128/255) a few values each form many separate pieces.
    """
    from skimage.measure import label

    values = np.unique(mask)
    values = values[values != 0]
    n_values = len(values)
    if n_values == 0:
        return "binary", "no foreground"
    if n_values == 1:
        return "binary", f"one foreground value ({values[0]})"
    pieces_img = label(mask, background=0, connectivity=2)  # neighbours of equal value connect
    pieces = int(pieces_img.max())
    ratio = pieces / n_values
    why = f"{n_values} foreground values in {pieces} separate pieces ({ratio:.2f} pieces per value)"
    if ratio <= INSTANCE_MAX_PIECES_PER_VALUE:
        return "instance", why
    if ratio >= SEMANTIC_MIN_PIECES_PER_VALUE:
        return "semantic", why
    return "ambiguous", why


def mask_to_instances(mask: np.ndarray, source: str = "mask") -> np.ndarray:
    """Binary/semantic masks -> 4-connected components of the foreground; instance masks kept as they are
    (``mask_kind`` tells them apart, and the decision is logged); an ambiguous mask is refused."""
    from skimage.measure import label

    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        if not (np.all(mask[..., 0] == mask[..., 1]) and np.all(mask[..., 0] == mask[..., 2])):
            raise SegRefineError(f"{source}: an RGB mask must be gray (equal channels); got a colour image")
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise SegRefineError(f"{source}: a mask must be 2-D, got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise SegRefineError(f"{source}: a mask must hold whole numbers (labels or 0/1/255)")
    if mask.min() < 0:
        raise SegRefineError(f"{source}: a mask cannot hold negative labels")
    kind, why = mask_kind(mask)
    if kind == "ambiguous":
        raise SegRefineError(
            f"{source}: cannot tell whether this is an instance mask or a semantic mask: {why}; an instance mask "
            f"has one connected piece per label (labels 1..N), a binary or semantic mask a few values in many "
            f"pieces: save it as one or the other (e.g. 0/255 for a binary mask)"
        )
    if kind == "instance":
        log.info("%s: instance mask (%s): labels kept", source, why)
        cells = relabel_sequential(mask.astype(np.int64))
    else:
        cells = relabel_sequential(label(mask > 0, connectivity=1))
        (log.warning if kind == "semantic" else log.info)(
            "%s: %s mask (%s): split into %d cells by 4-connected components of the foreground (nonzero) pixels",
            source,
            kind,
            why,
            int(cells.max()),
        )
    areas = np.bincount(cells.ravel())[1:]
    if areas.size and areas.max() > MAX_CELL_PATCH_FRACTION * cells.size:
        h, w = cells.shape
        raise SegRefineError(
            f"{source}: read as {'an' if kind == 'instance' else 'a'} {kind} mask ({why}), one cell covers "
            f"{100.0 * areas.max() / cells.size:.0f}% of "
            f"the {w}x{h} px patch: a class or tissue region, not a cell; save the cells as a binary (0/255) or "
            f"instance mask (labels 1..N)"
        )
    return cells


def _refuse_regions(
    objects: List[CellObject], path: Path, shape: Tuple[int, int], exclude_classes: Sequence[str]
) -> None:
    """An object covering more than ``MAX_CELL_PATCH_FRACTION`` of its patch is a region (tissue, a classified or
    detection region of interest), not a cell: refused naming it, as a mask region that large is
    (``mask_to_instances``), rather than trained on as one giant cell."""
    import shapely

    h, w = shape
    box = shapely.box(0, 0, w, h)
    for o in objects:
        cover = o.geometry.intersection(box).area / float(w * h)
        if cover > MAX_CELL_PATCH_FRACTION:
            what = ", ".join(
                [f"id {o.id!r}"] * bool(o.id)
                + [o.object_type, f"class {o.class_name!r}" if o.class_name else "no class"]
            )
            raise SegRefineError(
                f"{path}: feature {o.index} ({what}) covers {100.0 * cover:.0f}% of the {w}x{h} px patch: a region, "
                f"not a cell; delete it or give it a class in annotations.exclude_classes (now "
                f"{list(exclude_classes)})"
            )


def convert_annotation(
    path,
    shape: Tuple[int, int],
    exclude_classes: Sequence[str] = ("Region",),
    use_nucleus: bool = False,
    origin: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
    """Any accepted annotation file -> instance mask of ``shape``; errors name the file. ``origin``: the patch's
    top-left slide pixel, to recognise a GeoJSON drawn on the whole slide (``read_cell_objects``)."""
    from segrefine.io import read_tiff

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        objects = read_cell_objects(path, exclude_classes, use_nucleus, shape=shape, origin=origin)
        if not objects:
            raise SegRefineError(
                f"{path}: no cell polygons found (empty annotation, or only points/lines/"
                f"excluded classes {list(exclude_classes)}/a region-of-interest rectangle)"
            )
        _refuse_regions(objects, path, shape, exclude_classes)
        labels = rasterize_polygons([(o.index, o.geometry) for o in objects], shape, source=str(path))
    elif suffix in (".tif", ".tiff", ".png"):
        if suffix == ".png":
            import skimage.io

            try:
                mask = skimage.io.imread(path)
            except Exception as exc:
                raise SegRefineError(f"{path}: not a readable PNG ({exc})") from exc
        else:
            mask = read_tiff(path)
        mask = np.asarray(mask)
        while mask.ndim > 2 and mask.shape[0] == 1:  # a single plane saved with a leading axis of 1
            mask = mask[0]
        if mask.ndim > 3 or (mask.ndim == 3 and mask.shape[-1] not in (3, 4)):
            raise SegRefineError(
                f"{path}: a mask must be one 2-D image (or gray RGB), got an array of shape "
                f"{mask.shape} (a stack of {mask.shape[0]} images?): save this patch's mask alone"
            )
        if mask.shape[:2] != tuple(shape):
            raise SegRefineError(
                f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its patch is {shape[1]}x{shape[0]} px"
            )
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


def labels_to_geojson(
    labels: np.ndarray,
    object_type: str = "annotation",
    class_name: str = "Nucleus",
    offset: Tuple[float, float] = (0.0, 0.0),
) -> dict:
    """A QuPath-importable FeatureCollection of the label image's cells."""
    import shapely.geometry

    features = []
    for lab, geom in label_outlines(labels, offset):
        features.append(
            {
                "type": "Feature",
                "id": f"cell-{lab}",
                "geometry": shapely.geometry.mapping(geom),
                "properties": {
                    "objectType": object_type,
                    "classification": {"name": class_name, "color": [255, 0, 0]},
                    "label": int(lab),
                },
            }
        )
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
