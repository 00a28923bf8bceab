"""What the model sees per tissue pixel: the tile plan's tissue mask and prediction windows, beside SOPA's patches.

    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/tissue_ratio.py --sizes 8192 16384 --work /tmp/tr

For seeded synthetic nuclei slides (bench/tiling.py's: a tissue disc of radius 0.46 x the width; and
bench/chip_scale.py's: a disc of radius 0.56 x the width clipped by the chip, ~87 % tissue), written to
``--work`` if missing: ``segrefine.tiling.make_plan`` as the workflow runs it for Cellpose (1024 px tiles,
64 px halo, ``group: auto`` at the 256 px context bound), and the figures its metadata holds: the tissue
fraction the detector finds (beside the disc's true fraction), the tiles in tissue, and the pixels the model
sees (``seen_at_context_bound``) per pixel of the in-tissue cores and per pixel of the tissue (the detector's
mask, and the true disc). ``--tile-sizes`` adds other core sizes.

SOPA (``sopa.make_image_patches``: patches of ``patch_width`` px overlapping by ``patch_overlap`` px on a grid
over the whole image, kept when they touch the region of interest, each segmented on its own and the overlaps
resolved afterwards, so not tile-exact) is computed with its own grid formula (``sopa/patches/_patches.py``,
``Patches1D``) on the same slides with the detector's mask as its region of interest: its defaults (2000 px, 50 px
overlap) and its Xenium Cellpose configuration (6000 px, 150 px). SOPA is not installed for this: the figure is
the patch geometry, which is all that decides the pixels its model sees.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))
sys.path.insert(0, str(REPO / "bench"))

SLIDES = {"disc 0.46": 0.46, "chip disc 0.56": 0.56}


def write_slide(kind: str, size: int, path: Path) -> None:
    if kind == "disc 0.46":
        from tiling import write_synthetic_slide  # bench/tiling.py

        write_synthetic_slide(path, size)
    else:
        from chip_scale import write_slide as write_chip  # bench/chip_scale.py

        write_chip(path, size, 0)


def disc_fraction(size: int, radius: float, n: int = 4096) -> float:
    """Fraction of the size x size slide inside the centred disc of radius ``radius`` x size (numerically)."""
    c = (np.arange(n) + 0.5) / n - 0.5
    return float(((c[:, None] ** 2 + c[None, :] ** 2) <= radius**2).mean())


def sopa_seen(mask: np.ndarray, f: float, shape, width: int, overlap: int) -> int:
    """Pixels SOPA's Cellpose sees: its patch grid over the image (Patches1D: count = ceil((W - overlap) /
    (width - overlap)), patch i = [i (width - overlap), + width), read clipped to the image), patches touching
    the region of interest (the tissue mask) kept."""
    H, W = shape

    def grid(n):
        count = 1 if width >= n else math.ceil((n - overlap) / (width - overlap))
        return [(i * (width - overlap), min(n, i * (width - overlap) + width)) for i in range(count)]

    seen = 0
    for y0, y1 in grid(H):
        for x0, x1 in grid(W):
            m = mask[int(y0 // f) : int(math.ceil(y1 / f)), int(x0 // f) : int(math.ceil(x1 / f))]
            if m.any():
                seen += (y1 - y0) * (x1 - x0)
    return seen


def main():
    from segrefine.io import Slide
    from segrefine.tiling import make_plan, slide_tissue

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--tile-sizes", type=int, nargs="+", default=[1024])
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--context-bound", type=int, default=256, help="the model's context bound (Cellpose: 256 px)")
    ap.add_argument("--kinds", nargs="+", default=list(SLIDES), choices=list(SLIDES))
    ap.add_argument("--work", default="/tmp/segrefine-tissue-ratio")
    ap.add_argument("--out", help="write the rows as JSON here")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        "| slide | true tissue | detected tissue | tile | tiles in tissue | group | seen / core px | "
        "seen / detected tissue px | seen / true tissue px | SOPA 2000/50: seen / tissue px | "
        "SOPA 6000/150 |\n|---|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for size in a.sizes:
        for kind in a.kinds:
            path = work / f"{kind.replace(' ', '_')}_{size}.tif"
            if not path.is_file():
                t0 = time.monotonic()
                write_slide(kind, size, path.with_suffix(".part.tif"))
                path.with_suffix(".part.tif").rename(path)
                print(f"(wrote {path} in {time.monotonic() - t0:.0f} s)", flush=True)
            true = disc_fraction(size, SLIDES[kind]) * size * size
            with Slide(path) as slide:
                mask, _, f = slide_tissue(slide)
            for tile in a.tile_sizes:
                _, meta = make_plan(path, tile, a.halo, shards=1, group="auto", context_bound_px=a.context_bound)
                px = meta["pixels"]
                seen = px["seen_at_context_bound"]
                sopa = {w: sopa_seen(mask, f, (size, size), w, o) for w, o in ((2000, 50), (6000, 150))}
                row = {
                    "size": size,
                    "slide": kind,
                    "tile": tile,
                    "true_tissue_fraction": true / size**2,
                    "detected_tissue_fraction": meta["tissue"]["tissue_fraction"],
                    "tiles_in_tissue": meta["tiles_in_tissue"],
                    "tiles": meta["tiles"],
                    "group": meta["group_tiles"],
                    "seen": seen,
                    "cores": px["cores_in_tissue"],
                    "tissue_px": px["tissue"],
                    "seen_per_core": seen / px["cores_in_tissue"],
                    "seen_per_tissue": seen / px["tissue"],
                    "seen_per_true_tissue": seen / true,
                    "sopa_2000_per_tissue": sopa[2000] / px["tissue"],
                    "sopa_6000_per_tissue": sopa[6000] / px["tissue"],
                }
                rows.append(row)
                print(
                    f"| {size}² {kind} | {row['true_tissue_fraction']:.3f} | {row['detected_tissue_fraction']:.3f} "
                    f"| {tile} | {row['tiles_in_tissue']}/{row['tiles']} | {row['group']}x{row['group']} "
                    f"| {row['seen_per_core']:.3f} | {row['seen_per_tissue']:.3f} "
                    f"| {row['seen_per_true_tissue']:.3f} "
                    f"| {row['sopa_2000_per_tissue']:.3f} | {row['sopa_6000_per_tissue']:.3f} |",
                    flush=True,
                )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
