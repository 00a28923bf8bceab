"""The versioned training set: a table of (image, mask, SN, cells, split) and its content hash.

Splits are assigned per patch by a seeded hash of the patch name, not by
shuffling the whole list: adding annotations later never moves an existing
patch between train, validation and test, so a test patch is never trained on
by a later version and before/after numbers stay comparable. With a fraction
f, about f of each SN's patches land in that split (the hash is uniform), and
small sets are guaranteed at least one train, test and validation patch where
the fractions ask for them and there are enough patches.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from segrefine import SegRefineError
from segrefine.io import sha256_file

COLUMNS = ["patch", "sn", "image", "mask", "n_cells", "split", "image_sha256", "mask_sha256"]
SPLITS = ("train", "val", "test")


def split_score(patch: str, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on the patch name and the seed."""
    digest = hashlib.sha256(f"{seed}:{patch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(patches: Sequence[str], seed: int, val_fraction: float, test_fraction: float) -> Dict[str, str]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise SegRefineError(
            f"split fractions must be in [0, 1) and sum below 1: val={val_fraction}, test={test_fraction}"
        )
    score = {p: split_score(p, seed) for p in patches}
    split = {}
    for p, u in score.items():
        split[p] = "test" if u < test_fraction else ("val" if u < test_fraction + val_fraction else "train")
    # a tiny set may draw no patch for a split: take one from the largest split (train first on ties),
    # the patch whose score lies closest to the needed split's range; deterministic like the rest
    needs = [("train", 1.0)] + [(name, f) for name, f in (("test", test_fraction), ("val", val_fraction)) if f > 0]
    lower = {"test": 0.0, "val": test_fraction, "train": test_fraction + val_fraction}
    for name, _ in needs:
        if any(v == name for v in split.values()):
            continue
        counts = {s: sum(v == s for v in split.values()) for s in SPLITS}
        donor = max((s for s in ("train", "test", "val") if counts[s] > 1), key=lambda s: counts[s], default=None)
        if donor is None:
            continue
        pick = min((p for p in split if split[p] == donor), key=lambda p: abs(score[p] - lower[name]))
        split[pick] = name
    return split


def _by_patch(paths: Sequence[str], kind: str) -> Dict[str, str]:
    from segrefine.patches import parse_patch_name

    out: Dict[str, str] = {}
    for path in paths:
        try:
            name = parse_patch_name(Path(path).stem).name  # accepts {patch}, {patch}-img, {patch}-mask
        except SegRefineError as exc:
            raise SegRefineError(f"{path}: {kind} file not named after its patch: {exc}") from None
        if name in out:
            raise SegRefineError(f"two {kind}s of patch {name}: {out[name]} and {path}")
        out[name] = str(path)
    return out


def pair_by_patch(images: Sequence[str], masks: Sequence[str]) -> List[tuple]:
    """(image, mask) pairs matched by the patch name in each file name, in the order of the images; an image
    without a mask or a mask without an image is refused, naming them."""
    img, msk = _by_patch(images, "image"), _by_patch(masks, "mask")
    lonely_img = [img[n] for n in img if n not in msk]
    lonely_msk = [msk[n] for n in msk if n not in img]
    if lonely_img or lonely_msk:
        parts = []
        if lonely_img:
            parts.append(f"image(s) without a mask: {', '.join(lonely_img)}")
        if lonely_msk:
            parts.append(f"mask(s) without an image: {', '.join(lonely_msk)}")
        raise SegRefineError("patch images and masks are paired by patch name; " + "; ".join(parts))
    return [(img[n], msk[n]) for n in img]


def build_rows(
    images: Sequence[str], masks: Sequence[str], seed: int, val_fraction: float, test_fraction: float
) -> List[dict]:
    """Rows of the training-set table of patch images and their masks (paired by patch name)."""
    from segrefine.io import read_tiff
    from segrefine.patches import parse_patch_name

    if not images and not masks:
        raise SegRefineError("no annotated patches: put annotation files in each sample's annotation folder")
    pairs = pair_by_patch(images, masks)
    rows = []
    for image, mask in pairs:
        box = parse_patch_name(Path(image).stem)
        img = read_tiff(image)
        lab = read_tiff(mask)
        if img.shape[:2] != lab.shape:
            raise SegRefineError(
                f"{mask}: mask is {lab.shape[1]}x{lab.shape[0]} px but image {image} is "
                f"{img.shape[1]}x{img.shape[0]} px"
            )
        rows.append(
            {
                "patch": box.name,
                "sn": box.sn,
                "image": str(image),
                "mask": str(mask),
                "n_cells": int(len(np.unique(lab)) - (1 if (lab == 0).any() else 0)),
                "image_sha256": sha256_file(image),
                "mask_sha256": sha256_file(mask),
            }
        )
    splits = assign_splits([r["patch"] for r in rows], seed, val_fraction, test_fraction)
    for r in rows:
        r["split"] = splits[r["patch"]]
    rows.sort(key=lambda r: r["patch"])
    if sum(r["n_cells"] for r in rows if r["split"] == "train") == 0:
        raise SegRefineError("the training split holds no cells: every training mask is empty")
    return rows


def version_of(rows: Sequence[dict]) -> str:
    """Content hash of the training set: the same patches, pixels and splits give the same version."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["patch"]):
        h.update(f"{r['patch']}\t{r['image_sha256']}\t{r['mask_sha256']}\t{r['split']}\n".encode())
    return h.hexdigest()[:12]


def write_trainset(path, rows: Sequence[dict], seed: int, val_fraction: float, test_fraction: float) -> str:
    from segrefine.io import atomic_path, write_text_atomic

    version = version_of(rows)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t")
            w.writeheader()
            for r in rows:
                w.writerow({k: r[k] for k in COLUMNS})
    summary = {
        "version": version,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "patches": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "cells": {s: sum(r["n_cells"] for r in rows if r["split"] == s) for s in SPLITS},
        "by_sn": {
            sn: {s: sum(r["split"] == s for r in rows if r["sn"] == sn) for s in SPLITS}
            for sn in sorted({r["sn"] for r in rows})
        },
    }
    write_text_atomic(Path(path).with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return version


def read_trainset(path) -> List[dict]:
    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: training-set table not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise SegRefineError(f"{path}: training-set table lacks columns {missing}")
    for r in rows:
        r["n_cells"] = int(r["n_cells"])
    return rows


def load_pairs(rows: Sequence[dict], split: str):
    """(image, mask) arrays of one split; every mask must be an instance mask (2-D integer labels)."""
    from segrefine.io import read_tiff

    pairs = []
    for r in rows:
        if r["split"] != split:
            continue
        mask = read_tiff(r["mask"])
        if not np.issubdtype(mask.dtype, np.integer) or mask.ndim != 2:
            raise SegRefineError(
                f"{r['mask']}: not an instance mask (2-D integer labels), got {mask.dtype} {mask.shape}"
            )
        pairs.append((read_tiff(r["image"]), mask))
    return pairs
