"""Corrections counted: each corrected annotation file against the pre-annotation it came from.

A corrected file (a QuPath GeoJSON in a sample's annotation folder, named after its patch) is compared with the
pre-annotations the workflow wrote for that patch (``segrefine.preannotations``; every version is kept in the
archive folder ``{archive}/{patch}/{card sha[:12]}.geojson``). The version compared with is the one sharing the most
object ids with the file (ties: the newest); cells are read the way the intake reads them
(``annotations.read_cell_objects``: same classes left out, clipping, slide-frame files moved). Per cell:

1. by id: an object of the file whose id is a pre-annotated cell's is that cell, **accepted** when the two
   outlines have IoU >= ``ACCEPT_IOU`` (0.99), **edited** otherwise; an id used again by a later object of the
   file (objects imported twice) matches nothing and goes to step 2 (a warning names the file and the id);
2. by IoU: the objects left (no id, an unknown id: QuPath gives new ids when "Update IDs" is answered yes on
   import, or to duplicated and merged objects) are matched greedily, best IoU first, to the pre-annotated cells
   left, at IoU >= ``MATCH_IOU`` (0.5): accepted or edited as in step 1;
3. the objects still left are **added**, the pre-annotated cells still left **deleted**.

A file whose patch has no pre-annotation is a new annotation drawn from scratch: all its cells count as added and
the table says so (the file is used for training like any other).

Minutes (the model, stated in docs/annotation.md): drawing a 256 x 256 px patch from scratch takes
``scratch_minutes`` (15: the paper's users spent ~15 min per 256^2 patch in QuPath), scaled by the patch's area; a
cell drawn costs that time divided by the patch's cells (of the corrected file); an added cell costs a drawing,
an edited cell ``edit_fraction`` of one (0.5), a deleted cell ``delete_fraction`` (0.05: one click), an accepted
cell ``review_fraction`` (0.05: a look). Saved = scratch - correcting.

Rounds: the pre-annotations of one model version (its card's SHA-256) form a round, numbered in the order they were
first written. Accuracy per round: the test F1 of the model that pre-annotated (recorded in its files when the
evaluation summary was given) and of the next model: the next round's, or the current fine-tuned model's
(the evaluation summary) for the last round; the held-out patches can differ between rounds (docs/annotation.md).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from segrefine import SegRefineError

log = logging.getLogger("segrefine.corrections")

ACCEPT_IOU = 0.99
MATCH_IOU = 0.5
SCRATCH_MINUTES = 15.0
EDIT_FRACTION = 0.5
DELETE_FRACTION = 0.05
REVIEW_FRACTION = 0.05
STATUSES = ("accepted", "edited", "deleted", "added")
NO_PREANNOTATION = "no pre-annotation for this patch: a new annotation drawn from scratch (used for training)"


def _iou(a, b) -> float:
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def diff_cells(pre: Sequence, post: Sequence, source: str = "") -> List[dict]:
    """Per cell: {"status", "match" (id/iou/""), "iou", "pre_id", "post_id", "pre_index", "post_index",
    "pre_area", "post_area", and the pre-annotation's measurements} (see the module for the rules)."""
    pre_by_id = {o.id: o for o in pre if o.id is not None}
    claimed, seen, rows, left = set(), set(), [], []
    for o in post:
        if o.id is not None and o.id in seen:
            log.warning(
                "%s: feature %d: id %r is used by an earlier object too: compared by IoU only", source, o.index, o.id
            )
        if o.id in pre_by_id and o.id not in claimed:
            p = pre_by_id[o.id]
            claimed.add(o.id)
            rows.append(_row(p, o, "id"))
        else:
            left.append(o)
        seen.add(o.id)
    pre_left = [p for p in pre if p.id is None or p.id not in claimed]
    pairs = []
    for j, o in enumerate(left):
        for k, p in enumerate(pre_left):
            if o.geometry.intersects(p.geometry):
                iou = _iou(p.geometry, o.geometry)
                if iou >= MATCH_IOU:
                    pairs.append((iou, j, k))
    used_post, used_pre = set(), set()
    for _, j, k in sorted(pairs, key=lambda t: (-t[0], t[1], t[2])):
        if j in used_post or k in used_pre:
            continue
        used_post.add(j)
        used_pre.add(k)
        rows.append(_row(pre_left[k], left[j], "iou"))
    rows += [_row(None, o, "") for j, o in enumerate(left) if j not in used_post]
    rows += [_row(p, None, "") for k, p in enumerate(pre_left) if k not in used_pre]
    return rows


def _row(p, o, match: str) -> dict:
    if p is not None and o is not None:
        iou = _iou(p.geometry, o.geometry)
        status = "accepted" if iou >= ACCEPT_IOU else "edited"
    else:
        iou, status = math.nan, ("added" if p is None else "deleted")
    row = {
        "status": status,
        "match": match,
        "iou": iou,
        "pre_id": p.id if p is not None else "",
        "post_id": (o.id or "") if o is not None else "",
        "pre_index": p.index if p is not None else -1,
        "post_index": o.index if o is not None else -1,
        "pre_area": p.geometry.area if p is not None else math.nan,
        "post_area": o.geometry.area if o is not None else math.nan,
    }
    for k, v in (p.measurements if p is not None else {}).items():
        row[f"pre_{k}"] = v
    return row


def minutes(
    counts: Dict[str, int],
    patch_area_px: int,
    scratch_minutes: float = SCRATCH_MINUTES,
    edit_fraction: float = EDIT_FRACTION,
    delete_fraction: float = DELETE_FRACTION,
    review_fraction: float = REVIEW_FRACTION,
) -> Tuple[float, float, float]:
    """(minutes from scratch, minutes correcting, minutes saved) of one patch (the module's model)."""
    scratch = scratch_minutes * patch_area_px / (256 * 256)
    n_cells = counts["accepted"] + counts["edited"] + counts["added"] or counts["deleted"]
    per_cell = scratch / max(n_cells, 1)
    correcting = per_cell * (
        counts["added"]
        + edit_fraction * counts["edited"]
        + delete_fraction * counts["deleted"]
        + review_fraction * counts["accepted"]
    )
    return scratch, correcting, scratch - correcting


def _versions(archive_dir, patch: str) -> List[dict]:
    from segrefine.preannotations import read_preannotation

    folder = Path(archive_dir) / patch
    return [read_preannotation(f) for f in sorted(folder.glob("*.geojson"))] if folder.is_dir() else []


def _pick(versions: List[dict], post_ids: set, shape, origin, exclude, use_nucleus) -> Tuple[dict, list]:
    from segrefine.annotations import read_cell_objects

    best = None
    for v in versions:
        cells = read_cell_objects(v["path"], exclude, use_nucleus, shape, origin)
        shared = len(post_ids & {c.id for c in cells})
        key = (shared, v.get("written", ""))
        if best is None or key > best[0]:
            best = (key, v, cells)
    return best[1], best[2]


def count_corrections(
    annotation_files: Sequence[str],
    archive_dir,
    exclude_classes: Sequence[str] = ("Region",),
    use_nucleus: bool = False,
    **time_model,
):
    """(per-cell DataFrame, per-patch DataFrame) of the corrected GeoJSON files against their pre-annotations."""
    import pandas as pd

    from segrefine.annotations import read_cell_objects
    from segrefine.patches import parse_patch_name

    cell_rows, patch_rows = [], []
    for f in annotation_files:
        f = Path(f)
        box = parse_patch_name(f.stem)
        shape, origin = (box.h, box.w), (box.x, box.y)
        post = read_cell_objects(f, exclude_classes, use_nucleus, shape, origin)
        versions = _versions(archive_dir, box.name)
        note = ""
        if versions:
            version, pre = _pick(versions, {o.id for o in post if o.id}, shape, origin, exclude_classes, use_nucleus)
            if not {o.id for o in post if o.id} & {c.id for c in pre}:
                note = "no object id in common with the pre-annotation (ids renewed in QuPath?): matched by IoU only"
        else:
            version, pre, note = {}, [], NO_PREANNOTATION
        cells = diff_cells(pre, post, str(f))
        counts = {s: sum(r["status"] == s for r in cells) for s in STATUSES}
        scratch, correcting, saved = minutes(counts, box.w * box.h, **time_model)
        sha = version.get("card_sha256", "")
        for r in cells:
            cell_rows.append({"patch": box.name, "model_sha": sha[:12], **r})
        patch_rows.append(
            {
                "sample": box.sn,
                "patch": box.name,
                "annotation": str(f),
                "preannotation": version.get("path", ""),
                "model": version.get("model", ""),
                "model_sha": sha[:12],
                "written": version.get("written", ""),
                "f1_model": version.get("f1_finetuned", math.nan),
                "n_pre": len(pre),
                "n_post": len(post),
                **counts,
                "touched": counts["edited"] + counts["deleted"] + counts["added"],
                "minutes_scratch": round(scratch, 2),
                "minutes_correcting": round(correcting, 2),
                "minutes_saved": round(saved, 2),
                "note": note,
            }
        )
        log.info("%s: %s", f, ", ".join(f"{counts[s]} {s}" for s in STATUSES) + (f" ({note})" if note else ""))
    return pd.DataFrame(cell_rows), pd.DataFrame(patch_rows)


def round_table(per_patch, archive_dir, current_f1: Optional[float] = None):
    """Per round (model version): patches, cells, touched, minutes, the F1 of the model that pre-annotated and of
    the next model (the next round's, or ``current_f1`` for the last round), and the gain."""
    import pandas as pd

    from segrefine.preannotations import read_preannotation

    # every model version in the archive, in the order its pre-annotations were first written
    first = {}
    files = sorted(Path(archive_dir).glob("*/*.geojson")) if Path(archive_dir).is_dir() else []
    for f in files:
        rec = read_preannotation(f)
        sha = rec["card_sha256"][:12]
        if sha not in first or rec.get("written", "") < first[sha]["written"]:
            first[sha] = {"written": rec.get("written", ""), "f1": rec.get("f1_finetuned", math.nan)}
    order = sorted(first, key=lambda s: (first[s]["written"], s))
    number = {s: i + 1 for i, s in enumerate(order)}
    rows = []
    groups = per_patch.groupby("model_sha", sort=False) if len(per_patch) else []
    for sha, g in groups:
        k = number.get(sha, 0)
        nxt = order[k] if 0 < k < len(order) else None
        f1_before = first[sha]["f1"] if sha in first else math.nan
        f1_after = first[nxt]["f1"] if nxt else (current_f1 if current_f1 is not None and k else math.nan)
        n_cells = int(g["n_pre"].sum())
        rows.append(
            {
                "round": k,
                "model_sha": sha,
                "model": g["model"].iloc[0],
                "patches": len(g),
                "cells_pre": n_cells,
                **{s: int(g[s].sum()) for s in STATUSES},
                "touched": int(g["touched"].sum()),
                "touched_fraction": round(float(g["touched"].sum()) / n_cells, 4) if n_cells else math.nan,
                "minutes_scratch": round(float(g["minutes_scratch"].sum()), 2),
                "minutes_correcting": round(float(g["minutes_correcting"].sum()), 2),
                "minutes_saved": round(float(g["minutes_saved"].sum()), 2),
                "f1_before": f1_before,
                "f1_after": f1_after,
                "f1_gain": (f1_after - f1_before) if not (math.isnan(f1_before) or math.isnan(f1_after)) else math.nan,
            }
        )
    cols = [
        "round",
        "model_sha",
        "model",
        "patches",
        "cells_pre",
        *STATUSES,
        "touched",
        "touched_fraction",
        "minutes_scratch",
        "minutes_correcting",
        "minutes_saved",
        "f1_before",
        "f1_after",
        "f1_gain",
    ]
    return pd.DataFrame(rows, columns=cols).sort_values("round", kind="mergesort").reset_index(drop=True)


def plot_corrections(per_patch, per_round, out_png) -> None:
    """Per patch: cells accepted / edited / deleted / added (stacked bars); per round: minutes from scratch
    against minutes correcting, with the F1 before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from segrefine.io import atomic_path

    colours = {"accepted": "#4caf50", "edited": "#ffb300", "deleted": "#e53935", "added": "#1e88e5"}
    n = max(len(per_patch), 1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.28 * n + 1.5)), gridspec_kw={"width_ratios": [3, 2]})
    left = np.zeros(len(per_patch))
    for s in STATUSES:
        v = per_patch[s].to_numpy(dtype=float) if len(per_patch) else np.zeros(0)
        ax.barh(np.arange(len(per_patch)), v, left=left, color=colours[s], label=s)
        left += v
    ax.set_yticks(np.arange(len(per_patch)))
    ax.set_yticklabels(list(per_patch["patch"]) if len(per_patch) else [], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("cells")
    ax.set_title("cells per corrected patch")
    ax.legend(fontsize=7, loc="lower right")
    x = np.arange(len(per_round))
    bx.bar(x - 0.2, per_round["minutes_scratch"], 0.4, color="0.6", label="drawing from scratch")
    bx.bar(x + 0.2, per_round["minutes_correcting"], 0.4, color="#1e88e5", label="correcting")
    labels = []
    for _, r in per_round.iterrows():
        lab = f"round {r['round']}" if r["round"] else "no pre-annotation"
        if not (math.isnan(r["f1_before"]) or math.isnan(r["f1_after"])):
            lab += f"\nF1 {r['f1_before']:.3f} -> {r['f1_after']:.3f}"
        labels.append(lab)
    bx.set_xticks(x)
    bx.set_xticklabels(labels, fontsize=7)
    bx.set_ylabel("estimated minutes")
    bx.set_title("annotation time per round")
    bx.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def corrections(
    annotation_files: Sequence[str],
    archive_dir,
    out_dir,
    summary_csv=None,
    model: Optional[str] = None,
    exclude_classes: Sequence[str] = ("Region",),
    use_nucleus: bool = False,
    **time_model,
):
    """Write per_cell.csv, per_patch.csv, per_round.csv and corrections.png into ``out_dir``; returns per_round."""
    from segrefine.io import atomic_path

    files = [f for f in annotation_files if Path(f).suffix.lower() in (".geojson", ".json")]
    if not files:
        raise SegRefineError(
            f"no GeoJSON annotation files among {list(map(str, annotation_files))}: nothing to "
            f"compare with the pre-annotations"
        )
    for k, v in time_model.items():
        if v is None or not math.isfinite(v) or v < 0:
            raise SegRefineError(f"{k} must be a number >= 0, got {v}")
    per_cell, per_patch = count_corrections(files, archive_dir, exclude_classes, use_nucleus, **time_model)
    current = None
    if summary_csv and model:
        from segrefine.preannotations import model_f1

        current = model_f1(summary_csv, model).get("f1_finetuned")
    per_round = round_table(per_patch, archive_dir, current)
    out_dir = Path(out_dir)
    for name, table in (("per_cell.csv", per_cell), ("per_patch.csv", per_patch), ("per_round.csv", per_round)):
        with atomic_path(out_dir / name) as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")
    plot_corrections(per_patch, per_round, out_dir / "corrections.png")
    return per_round
