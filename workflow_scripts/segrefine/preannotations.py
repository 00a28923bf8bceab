"""Pre-annotations: the best model's cells of a patch as QuPath annotation objects to correct, not draw.

For every patch ``annotate_next`` suggests (its top N) and every patch listed in the config
(``evaluation.annotate_next.preannotate``), the segmentation model at its fine-tuned stage predicts the patch and
each predicted cell becomes one QuPath **annotation** object (annotations are editable in QuPath; detections are
not) in ``{patch}.geojson``, in the patch's pixel frame, beside the patch image ``{patch}-img.tif``. Each object
is written as QuPath 0.4-0.7 writes one (``qupath-core`` ``qupath/lib/io/QuPathTypeAdapters.java``,
``PathObjectTypeAdapter.write`` and ``MeasurementListTypeAdapter.write``; ``GsonTools.PathClassTypeAdapter``):

- ``"id"``: a UUID, stable: ``uuid5(NAMESPACE, "{patch}/{label}/{card sha256}")``, so a rerun of the same model on
  the same patch gives the same ids and a corrected file can be compared with its pre-annotation object by object
  (``segrefine.corrections``);
- ``"geometry"``: the cell's exact pixel-edge outline (a Polygon, or a MultiPolygon for a cell in pieces), integer
  coordinates: painting it by pixel centres gives back the model's pixels;
- ``"properties"``: ``objectType`` ``"annotation"``, ``classification`` ``{"name": "Cell", "color": [r, g, b]}``
  and ``measurements`` as a ``{name: value}`` object (non-finite values as the strings ``"NaN"``,
  ``"Infinity"``, as QuPath writes them), which QuPath shows in its measurement table:

  ``probability``, ``tta_agreement``, ``other_iou`` and ``uncertainty`` of ``segrefine.uncertainty.cell_uncertainty``
  (the model's mean cell probability, NaN for a framework that gives none; the cell's agreement under test-time
  flips/rotations; its best IoU with a cell of the **pretrained** stage of the same model; one uncertainty in
  [0, 1] combining them: sort by it in QuPath's measurement table to look at the unsure cells first) and
  ``area_px``, the cell's area in pixels.

The FeatureCollection also carries a foreign member ``"segrefine"`` (RFC 7946, 6.1; QuPath reads only
``"features"``) with the patch, the model, its card's SHA-256 and its test F1 when the evaluation summary is given.
``slide_frame/{patch}.geojson`` holds the same objects (same ids) in slide pixel coordinates, to import onto the
whole slide instead of the patch image. Every patch-frame file written is also kept in an archive folder,
``{archive}/{patch}/{card sha256[:12]}.geojson``, that no later round overwrites or removes: the record
``segrefine.corrections`` compares a corrected file with.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import shutil
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.preannotations")

# the namespace of the cells' uuid5 ids (a fixed random UUID: ids are stable across runs and machines)
NAMESPACE = uuid.UUID("5b0f4a52-7c1e-4c8e-9d51-2b6a3f0e8c17")
# the sub-folder of the same pre-annotations in slide coordinates (to import onto the whole slide in QuPath)
SLIDE_FRAME = "slide_frame"
CELL_CLASS = "Cell"
CELL_COLOR = [0, 200, 255]
MEASUREMENTS = {
    "probability": "the model's mean probability over the cell's pixels (NaN: the framework gives none)",
    "tta_agreement": "mean best IoU of the cell with the model's predictions of the flipped/rotated patch",
    "other_iou": "best IoU of the cell with a cell of the pretrained stage (1: both stages agree)",
    "uncertainty": "1 - mean of the confidences above (probability as 2p - 1), in [0, 1]: high = look here",
    "area_px": "the cell's area (pixels)",
}


def card_sha256(card_path) -> str:
    """SHA-256 of the model card file (it names the weights by their own SHA-256): the model version."""
    return hashlib.sha256(Path(card_path).read_bytes()).hexdigest()


def cell_uuid(patch: str, label: int, card_sha: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{patch}/{int(label)}/{card_sha}"))


def _qupath_number(v: float):
    """A measurement value as QuPath writes it: a number, or "NaN" / "Infinity" / "-Infinity"."""
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return round(v, 4)


def preannotation_geojson(
    patch: str,
    labels: np.ndarray,
    card_sha: str,
    measurements: Optional[Dict[int, Dict[str, float]]] = None,
    meta: Optional[dict] = None,
    offset=(0, 0),
) -> dict:
    """The QuPath FeatureCollection of the cells of ``labels`` (one annotation object per label, see the module);
    ``offset``: added to every coordinate ((x, y) of the patch in the slide: the slide-frame copy)."""
    import shapely.geometry

    from segrefine.annotations import label_outlines

    features = []
    for lab, geom in label_outlines(np.asarray(labels), offset):
        props = {"objectType": "annotation", "classification": {"name": CELL_CLASS, "color": list(CELL_COLOR)}}
        m = (measurements or {}).get(int(lab))
        if m:
            props["measurements"] = {k: _qupath_number(v) for k, v in m.items()}
        features.append(
            {
                "type": "Feature",
                "id": cell_uuid(patch, lab, card_sha),
                "geometry": shapely.geometry.mapping(geom),
                "properties": props,
            }
        )
    doc = {"type": "FeatureCollection", "features": features}
    doc["segrefine"] = {
        "patch": patch,
        "card_sha256": card_sha,
        "n_cells": len(features),
        "measurements": MEASUREMENTS,
        **(meta or {}),
    }
    return doc


def model_f1(summary_csv, model: str) -> Dict[str, float]:
    """{"f1_pretrained", "f1_finetuned"}: the model's mean test F1 (standard mode) in the evaluation summary."""
    import pandas as pd

    s = pd.read_csv(summary_csv)
    s = s[(s["model"] == model) & (s["mode"] == "standard")]
    out = {}
    for stage in ("pretrained", "finetuned"):
        row = s[s["stage"] == stage]
        if len(row):
            out[f"f1_{stage}"] = round(float(row["f1"].iloc[0]), 4)
    return out


def patches_to_preannotate(sn: str, ranking_csv=None, top_n: int = 0, listed: Sequence[str] = ()) -> List[str]:
    """The top ``top_n`` patches of the ranking, then the listed patches of chip ``sn``, each once, in that order."""
    import pandas as pd

    from segrefine.patches import parse_patch_name

    names = []
    if ranking_csv is not None and top_n > 0:
        names += list(pd.read_csv(ranking_csv)["patch"].head(top_n))
    for name in listed:
        box = parse_patch_name(name)
        if box.sn == sn:
            names.append(box.name)
    return list(dict.fromkeys(names))


def cell_measurements(model, image: np.ndarray, pretrained_labels: Optional[np.ndarray] = None, tta: int = 4):
    """(the model's labels of ``image``, {label: the measurements of MEASUREMENTS}): ``cell_uncertainty``'s fields
    (``other_iou`` against ``pretrained_labels``) and the area."""
    from segrefine.uncertainty import predict_with_uncertainty

    labels, cells = predict_with_uncertainty(model, image, None, pretrained_labels, tta)
    labels = np.asarray(labels).astype(np.uint32)
    area = np.bincount(labels.ravel().astype(np.int64))
    return labels, {lab: {**m, "area_px": float(area[lab])} for lab, m in cells.items()}


def write_preannotations(
    card_path,
    pretrained_card_path,
    slide_path,
    sn: str,
    patches: Sequence[str],
    out_dir,
    archive_dir,
    summary_csv=None,
    channel: Optional[int] = None,
    tta: int = 4,
) -> List[str]:
    """Predict each patch with the model of ``card_path`` (and of ``pretrained_card_path``, for ``other_iou``;
    ``tta``: test-time augmentations for ``tta_agreement``, 8, 4 or 0) and write ``{patch}.geojson`` +
    ``{patch}-img.tif`` into ``out_dir`` (published whole with a rename; ``slide_frame/{patch}.geojson``: the same
    objects in slide coordinates) and the patch-frame GeoJSON into
    ``{archive_dir}/{patch}/{sha[:12]}.geojson`` (kept when it exists). Returns the patch names."""
    from segrefine.annotations import dump_geojson
    from segrefine.io import Slide, new_work_dir, write_text_atomic, write_tiff
    from segrefine.models import load_model
    from segrefine.patches import parse_patch_name

    boxes = [parse_patch_name(p) for p in patches]
    for b in boxes:
        if b.sn != sn:
            raise SegRefineError(f"patch {b.name} names chip {b.sn!r}, not {sn!r}")
    model, card = load_model(card_path)
    pre_model, _ = load_model(pretrained_card_path) if pretrained_card_path else (None, None)
    sha = card_sha256(card_path)
    meta = {
        "model": card["name"],
        "stage": card.get("stage"),
        "framework": card.get("framework"),
        "tta": tta,
        "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if summary_csv:
        meta.update(model_f1(summary_csv, card["name"]))
    out_dir = Path(out_dir)
    work = new_work_dir(out_dir.parent, f".{out_dir.name}.")  # after removing the work folders of killed runs
    try:
        with Slide(slide_path, channel=channel) as slide:
            for b in boxes:
                img = slide.read(b.x, b.y, b.w, b.h)
                pre = np.asarray(pre_model.predict(img)).astype(np.uint32) if pre_model is not None else None
                labels, measurements = cell_measurements(model, img, pre, tta)
                doc = preannotation_geojson(b.name, labels, sha, measurements, meta)
                text = dump_geojson(doc) + "\n"
                write_text_atomic(work / f"{b.name}.geojson", text)
                slide_doc = preannotation_geojson(
                    b.name, labels, sha, measurements, {**meta, "frame": "slide"}, offset=(b.x, b.y)
                )
                write_text_atomic(work / SLIDE_FRAME / f"{b.name}.geojson", dump_geojson(slide_doc) + "\n")
                write_tiff(work / f"{b.name}-img.tif", img, photometric="rgb" if img.ndim == 3 else "minisblack")
                kept = Path(archive_dir) / b.name / f"{sha[:12]}.geojson"
                if not kept.exists():
                    write_text_atomic(kept, text)
                log.info("%s: %d cells pre-annotated by %s (%s)", b.name, len(doc["features"]), card["name"], sha[:12])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return [b.name for b in boxes]


def read_preannotation(path) -> dict:
    """A pre-annotation file's ``"segrefine"`` record (patch, card_sha256, written, f1_*), with ``path``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SegRefineError(f"{path}: not a readable pre-annotation ({exc})") from exc
    rec = doc.get("segrefine") if isinstance(doc, dict) else None
    if not isinstance(rec, dict) or "card_sha256" not in rec:
        raise SegRefineError(f"{path}: not a pre-annotation written by segrefine (no 'segrefine' record)")
    return {**rec, "path": str(path)}
