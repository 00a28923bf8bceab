"""Where to annotate next: candidate patches of a slide ranked by how unsure the models are.

Candidates are the patches of a grid (``size`` px every ``step`` px) that do not overlap an
already annotated patch and hold tissue (the fraction of pixels above the slide's Otsu
threshold, computed over all grid patches, is at least ``min_tissue``; bright-field slides are
inverted first). Each configured model card predicts every candidate (``predict_candidates``,
run in that model's env); ``rank_candidates`` then scores each candidate by

- ``disagreement``: mean over all pairs of predictions of 1 - F1 (standard mode, IoU 0.5) between
  the two label images (two empty predictions agree; one empty and one not disagree fully), e.g.
  the pretrained and the fine-tuned segmentation model, or two different models;
- ``complexity``: the mean percentile rank among the candidates of the tissue-complexity measures
  (segrefine.complexity, on the first prediction) that make a patch hard: density, distribution,
  shape complexity, low compactness and low edge contrast;
- ``uncertainty``: the models' own per-cell uncertainty (segrefine.uncertainty: cell probability and
  agreement under test-time flips/rotations), averaged over the patch's cells (``patch_uncertainty``,
  stored by ``predict_candidates``) and over the predictions;

``score = (1 - w - u) * disagreement + w * complexity + u * uncertainty`` (``w`` = ``complexity_weight``,
``u`` = ``uncertainty_weight``), best first;
the top N go out as a QuPath-importable GeoJSON of rectangles (annotation objects named
``{SN}-x{X}_y{Y}_w{W}_h{H}`` in slide pixel coordinates) and as ``{name}-img.tif`` patches, so
an annotation saved under the patch name is picked up by the workflow as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from segrefine import SegRefineError

log = logging.getLogger("segrefine.annotate_next")

HARD = {"density": 1, "distribution": 1, "shape_complexity": 1, "compactness": -1, "edge_contrast": -1}
#: the key of a candidate-predictions .npz that holds the per-patch uncertainty (JSON), not a patch's labels
UNCERTAINTY_KEY = "_patch_uncertainty"


def _gray(img: np.ndarray, bright_field: bool) -> np.ndarray:
    g = np.asarray(img, dtype=np.float64)
    if g.ndim == 3:
        g = g[..., :3].mean(axis=-1)
    if bright_field:
        g = g.max() - g if g.size else g
    return g


def candidate_boxes(
    slide_path,
    sn: str,
    size: int,
    step: int,
    annotated: Sequence[str] = (),
    min_tissue: float = 0.02,
    bright_field: bool = False,
    channel: Optional[int] = None,
):
    """Grid boxes of the slide that overlap no annotated patch and hold tissue: [(box, image)]."""
    from skimage.filters import threshold_otsu

    from segrefine.io import Slide
    from segrefine.patches import grid_boxes, parse_patch_name

    if size < 1 or step < 1:
        raise SegRefineError(f"candidate size and step must be positive (size={size}, step={step})")
    taken = [parse_patch_name(n) for n in annotated]
    taken = [b for b in taken if b.sn == sn]
    with Slide(slide_path, channel=channel) as slide:
        boxes = [
            b
            for b in grid_boxes(sn, slide.shape, size, step)
            if not any(b.x < t.x + t.w and t.x < b.x + b.w and b.y < t.y + t.h and t.y < b.y + b.h for t in taken)
        ]
        if not boxes:
            raise SegRefineError(f"{slide_path}: no {size} px grid patch left that overlaps no annotated patch")
        images = [slide.read(b.x, b.y, b.w, b.h) for b in boxes]
    grays = [_gray(i, bright_field) for i in images]
    pooled = np.concatenate([g[::4, ::4].ravel() for g in grays])
    level = threshold_otsu(pooled) if np.ptp(pooled) > 0 else np.inf
    keep = [(b, i) for b, i, g in zip(boxes, images, grays) if float((g > level).mean()) >= min_tissue]
    log.info("%s: %d grid patches clear of annotations, %d with tissue", slide_path, len(boxes), len(keep))
    if not keep:
        raise SegRefineError(f"{slide_path}: no candidate patch holds tissue (min_tissue={min_tissue})")
    return keep


def predict_candidates(
    card_path,
    slide_path,
    sn: str,
    size: int,
    step: int,
    annotated: Sequence[str],
    out_npz,
    min_tissue: float = 0.02,
    bright_field: bool = False,
    channel: Optional[int] = None,
    tta: int = 0,
) -> int:
    """The model's labels of every candidate patch, one array per patch name (.npz), and under the key
    ``UNCERTAINTY_KEY`` the JSON of each patch's ``segrefine.uncertainty.patch_uncertainty`` (cell probability
    and, with ``tta`` 4 or 8, test-time augmentation: ``tta`` - 1 more predictions per patch)."""
    from segrefine.io import atomic_path
    from segrefine.models import load_model
    from segrefine.uncertainty import patch_uncertainty, predict_with_uncertainty

    model, card = load_model(card_path)
    preds, unc = {}, {}
    for b, img in candidate_boxes(slide_path, sn, size, step, annotated, min_tissue, bright_field, channel):
        labels, cells = predict_with_uncertainty(model, img, tta=tta)
        preds[b.name] = np.asarray(labels).astype(np.uint32)
        unc[b.name] = patch_uncertainty(cells)
    with atomic_path(out_npz, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **preds, **{UNCERTAINTY_KEY: np.array(json.dumps(unc))})
    log.info("%s (%s): %d candidate patches predicted", card["name"], card["stage"], len(preds))
    return len(preds)


def agreement_f1(a: np.ndarray, b: np.ndarray) -> float:
    """F1 (standard mode, IoU 0.5) of two label images of one patch; 1 when both hold no cell."""
    from segrefine.metrics import evaluate_pair

    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    return float(evaluate_pair(a, b, 0.5, mode="standard")["f1"])


def score_candidates(
    predictions: Dict[str, Dict[str, np.ndarray]],
    images: Optional[Dict[str, np.ndarray]] = None,
    complexity_weight: float = 0.25,
    uncertainty: Optional[Dict[str, float]] = None,
    uncertainty_weight: float = 0.0,
):
    """A DataFrame of candidates (patch, disagreement, complexity, uncertainty, score and the complexity
    measures), best first. ``predictions`` maps a prediction's name (model/stage) to {patch: labels};
    ``uncertainty``: {patch: the models' uncertainty in [0, 1]} (NaN or missing: counted as 0 in the score)."""
    import pandas as pd

    from segrefine.complexity import patch_complexity

    if not 0 <= complexity_weight <= 1:
        raise SegRefineError(f"complexity_weight {complexity_weight} is not in [0, 1]")
    if not 0 <= uncertainty_weight <= 1 - complexity_weight:
        raise SegRefineError(
            f"uncertainty_weight {uncertainty_weight} is not in [0, 1 - complexity_weight ({1 - complexity_weight:g})]"
        )
    names = list(predictions)
    if len(names) < 2:
        raise SegRefineError(f"disagreement needs at least two predictions, got {names}")
    patches = sorted(predictions[names[0]])
    for n in names[1:]:
        if sorted(predictions[n]) != patches:
            raise SegRefineError(f"predictions {names[0]} and {n} cover different candidate patches")
    rows = []
    for p in patches:
        f1s = [agreement_f1(predictions[a][p], predictions[b][p]) for i, a in enumerate(names) for b in names[i + 1 :]]
        first = predictions[names[0]][p]
        img = images[p] if images is not None else first.astype(np.float64)
        cx = patch_complexity(first, img) if first.any() else {}
        rows.append(
            {
                "patch": p,
                "disagreement": float(np.mean([1 - f for f in f1s])),
                **{k: cx.get(k, np.nan) for k in ["n_cells", *HARD]},
            }
        )
    table = pd.DataFrame(rows)
    ranks = [table[k].rank(pct=True, ascending=sign > 0).fillna(0.0) for k, sign in HARD.items()]
    table["complexity"] = np.mean(ranks, axis=0) if len(table) > 1 else 0.0
    table["uncertainty"] = [float((uncertainty or {}).get(p, np.nan)) for p in table["patch"]]
    table["score"] = (
        (1 - complexity_weight - uncertainty_weight) * table["disagreement"]
        + complexity_weight * table["complexity"]
        + uncertainty_weight * table["uncertainty"].fillna(0.0)
    )
    table = table.sort_values(["score", "patch"], ascending=[False, True], kind="mergesort").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def regions_geojson(patch_names: Sequence[str], scores: Optional[Sequence[float]] = None) -> dict:
    """QuPath-importable rectangles (annotation objects) named after their patches, slide pixel coordinates."""
    from segrefine.patches import parse_patch_name

    feats = []
    for k, name in enumerate(patch_names):
        b = parse_patch_name(name)
        ring = [[b.x, b.y], [b.x + b.w, b.y], [b.x + b.w, b.y + b.h], [b.x, b.y + b.h], [b.x, b.y]]
        props = {
            "objectType": "annotation",
            "name": b.name,
            "classification": {"name": "Region", "color": [255, 200, 0]},
            "isLocked": False,
        }
        if scores is not None:
            props["measurements"] = {"rank": k + 1, "score": round(float(scores[k]), 4)}
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props})
    return {"type": "FeatureCollection", "features": feats}


def annotate_next(
    slide_path,
    sn: str,
    prediction_npzs: Sequence[str],
    names: Sequence[str],
    out_table,
    out_geojson,
    out_dir,
    top_n: int = 10,
    complexity_weight: float = 0.25,
    channel: Optional[int] = None,
    uncertainty_weight: float = 0.0,
):
    """Rank the candidates predicted in ``prediction_npzs`` and write the table, the GeoJSON of the
    top ``top_n`` and their ``{name}-img.tif`` patches (in ``out_dir``). Returns the table."""
    from segrefine.io import Slide, atomic_path, write_text_atomic, write_tiff
    from segrefine.patches import parse_patch_name

    if len(prediction_npzs) != len(names):
        raise SegRefineError(f"{len(prediction_npzs)} prediction files but {len(names)} names")
    if top_n < 1:
        raise SegRefineError(f"top_n must be at least 1, got {top_n}")
    predictions, unc = {}, {}
    for path, name in zip(prediction_npzs, names):
        if not Path(path).is_file():
            raise SegRefineError(f"{path}: candidate predictions not found")
        with np.load(path) as z:
            predictions[name] = {k: z[k] for k in z.files if k != UNCERTAINTY_KEY}
            if UNCERTAINTY_KEY in z.files:
                for p, u in json.loads(str(z[UNCERTAINTY_KEY])).items():
                    unc.setdefault(p, []).append(u.get("uncertainty", np.nan))
            elif uncertainty_weight > 0:
                raise SegRefineError(
                    f"{path}: no per-patch uncertainty (written by an older version); rerun annotate-next-predict"
                )
    # a patch's uncertainty: the mean over the predictions that give one (json writes NaN as NaN)
    unc = {p: float(np.nanmean(v)) if np.isfinite(v).any() else np.nan for p, v in unc.items()}
    boxes = {p: parse_patch_name(p) for p in predictions[names[0]]}
    with Slide(slide_path, channel=channel) as slide:
        images = {p: slide.read(b.x, b.y, b.w, b.h) for p, b in boxes.items()}
    table = score_candidates(predictions, images, complexity_weight, unc, uncertainty_weight)
    table.insert(2, "sn", sn)
    with atomic_path(out_table) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    top = table.head(top_n)
    write_text_atomic(out_geojson, json.dumps(regions_geojson(list(top["patch"]), list(top["score"])), indent=1) + "\n")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in top["patch"]:
        img = images[p]
        write_tiff(out_dir / f"{p}-img.tif", img, photometric="rgb" if img.ndim == 3 else "minisblack")
    log.info("%s: top %d of %d candidates -> %s", sn, len(top), len(table), out_geojson)
    return table
