"""Patches of a whole slide: names that carry their coordinates, extraction, padding.

A patch is named ``{SN}-x{X}_y{Y}_w{W}_h{H}``; its image file adds ``-img.tif``
and its instance mask ``-mask.tif``. The name alone says where the patch lies
on the slide, so an annotation file names the patch it belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from segrefine import SegRefineError

_NAME = re.compile(r"^(?P<sn>.+)-x(?P<x>\d+)_y(?P<y>\d+)_w(?P<w>\d+)_h(?P<h>\d+)(?:-(?:img|mask))?$")


@dataclass(frozen=True)
class PatchBox:
    sn: str
    x: int
    y: int
    w: int
    h: int

    @property
    def name(self) -> str:
        return f"{self.sn}-x{self.x}_y{self.y}_w{self.w}_h{self.h}"


def parse_patch_name(stem: str) -> PatchBox:
    """``SN-x512_y768_w256_h256[-img|-mask]`` -> PatchBox; a clear error otherwise."""
    m = _NAME.match(stem)
    if not m:
        raise SegRefineError(
            f"{stem!r} is not a patch name: expected '{{SN}}-x{{X}}_y{{Y}}_w{{W}}_h{{H}}' "
            "(optionally ending in -img or -mask)"
        )
    box = PatchBox(m["sn"], int(m["x"]), int(m["y"]), int(m["w"]), int(m["h"]))
    if box.w == 0 or box.h == 0:
        raise SegRefineError(f"{stem!r}: patch width and height must be positive")
    return box


def grid_boxes(sn: str, slide_shape: Tuple[int, int], size: int, step: int) -> List[PatchBox]:
    """Patches of ``size`` px every ``step`` px that lie wholly inside the slide."""
    H, W = slide_shape
    return [PatchBox(sn, x, y, size, size) for y in range(0, H - size + 1, step) for x in range(0, W - size + 1, step)]


def reflect_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Pad a patch to ``size`` x ``size`` by reflection at its bottom/right edges.

    Reflection keeps intensities and cell shapes of the original pixels
    unchanged (they are copied, never resampled), which models that need a
    fixed input size (e.g. StarDist H&E at 512) require. Cropping the result
    to the original extent gives back the original exactly.
    """
    h, w = img.shape[:2]
    if h > size or w > size:
        raise SegRefineError(f"patch of {w}x{h} px is larger than the padded size {size}")
    pad = [(0, size - h), (0, size - w)] + [(0, 0)] * (img.ndim - 2)
    while any(p[1] > 0 for p in pad[:2]):
        # one reflection can add at most (n - 1) pixels; repeat for tiny patches
        cur = [(0, min(p[1], max(n - 1, 0))) for p, n in zip(pad[:2], img.shape[:2])]
        if all(c[1] == 0 for c in cur):
            raise SegRefineError("cannot reflect-pad a patch of one pixel")
        img = np.pad(img, cur + [(0, 0)] * (img.ndim - 2), mode="symmetric")
        pad = [(0, p[1] - c[1]) for p, c in zip(pad[:2], cur)] + pad[2:]
    return img


def reflect_pad_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Reflection-pad an instance mask like its image (``reflect_pad``), giving every
    mirrored copy of a cell its own id so that no id covers two separate cells."""
    from skimage.segmentation import relabel_sequential

    h, w = labels.shape
    padded = reflect_pad(labels, size).astype(np.int64)
    rows, cols = np.indices(padded.shape)
    block = (rows // h) * (size // w + 2) + (cols // w)  # which mirrored copy a pixel belongs to (0 = original)
    key = np.where(padded > 0, block * (int(labels.max()) + 1) + padded, 0)
    out = relabel_sequential(key)[0]
    return out.astype(np.uint16 if out.max() < 2**16 else np.uint32)


def boxes_from_table(path, sn: str) -> List[PatchBox]:
    """Patches listed in a TSV/CSV with columns x, y, w, h (top-left corner and size in px);
    with a ``sample`` column, only the rows of chip ``sn``."""
    import csv
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise SegRefineError(f"{path}: patch coordinate table not found")
    with open(path, newline="") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        rows = list(csv.DictReader(fh, delimiter="\t" if "\t" in sample else ","))
    boxes = []
    for i, r in enumerate(rows, 2):
        if r.get("sample") not in (None, "", sn):
            continue
        try:
            boxes.append(PatchBox(sn, int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise SegRefineError(f"{path}:{i}: need integer columns x, y, w, h ({exc})") from exc
    return boxes
