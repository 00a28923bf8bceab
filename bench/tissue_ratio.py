"""What the model sees per tissue pixel: the tile plan's windows and Cellpose's network blocks, beside SOPA's patches.

    PYTHONPATH=workflow_scripts $(python3 workflow_scripts/segrefine/envs.py python cellpose) \
        bench/tissue_ratio.py --sizes 8192 16384 --work /tmp/tr

For seeded synthetic nuclei slides (bench/tiling.py's: a tissue disc of radius 0.46 x the width; and
bench/chip_scale.py's: a disc of radius 0.56 x the width clipped by the chip, ~87 % tissue), written to
``--work`` if missing: ``segrefine.tiling.make_plan`` as the workflow runs it for Cellpose (1024 px tiles,
64 px halo, ``group: auto`` at the 256 px context bound), and the figures its metadata holds: the tissue
fraction the detector finds (beside the disc's true fraction), the tiles in tissue, and the pixels of the
prediction windows per pixel of the tissue (the true disc).

Then the real shard (``segrefine.tiling.run_shard``, 1 shard) with a Cellpose 3.1 adapter at rescale 1
(diameter = diam_mean = 30 px: context 230 px) whose network is replaced by a constant (the blocks the shard runs
do not depend on the network's outputs, and a CPU would need hours for the real one): the network blocks it
runs (224 px, grid step 176 px), counted by the adapter (``network_counts``), in block steps (blocks x 176² / r²
source px, r the rescale) per pixel of the true tissue: every block of every window (``skips_unneeded`` off), and
the blocks a kept cell can depend on, each once (the default: blocks no needed pixel depends on skipped, blocks
shared by two windows cached). 1.0 is what one whole-slide pass over exactly the tissue would run. ``--card``:
the card's real network instead (slow on a CPU: small slides), the shard's wall time both ways, and whether the
two runs' tiles are identical.

SOPA (``sopa.make_image_patches``: patches of ``patch_width`` px overlapping by ``patch_overlap`` px on a grid
over the whole image, kept when they touch the region of interest, each segmented on its own and the overlaps
resolved afterwards, so not tile-exact) is computed with its own grid formula (``sopa/patches/_patches.py``,
``Patches1D``) on the same slides with the detector's mask as its region of interest: its defaults (2000 px, 50 px
overlap) and its Xenium Cellpose configuration (6000 px, 150 px); each patch costs the blocks cellpose 3.1's
``eval`` runs on it (the patch resized by r, then ``transforms.make_tiles``: max(2, ceil(1.2 L r / 224)) blocks
of 224 px per side at its default ``tile_overlap`` 0.1), in the same block steps. SOPA is not installed for
this: the figures are the patch geometry and cellpose's block count, which is all that decides what its model is
given.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
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


def sopa_blocks(mask: np.ndarray, f: float, shape, width: int, overlap: int, r: float = 1.0) -> int:
    """Network blocks SOPA's Cellpose runs: its patch grid over the image (Patches1D: count = ceil((W - overlap) /
    (width - overlap)), patch i = [i (width - overlap), + width), read clipped to the image), patches touching
    the region of interest (the tissue mask) kept, each resized by the rescale ``r`` and run by cellpose 3.1's
    ``eval`` in max(2, ceil(1.2 L r / 224)) blocks per side of length L."""
    H, W = shape

    def grid(n):
        count = 1 if width >= n else math.ceil((n - overlap) / (width - overlap))
        return [(i * (width - overlap), min(n, i * (width - overlap) + width)) for i in range(count)]

    def per_side(n):
        return max(2, math.ceil(1.2 * n * r / 224))

    blocks = 0
    for y0, y1 in grid(H):
        for x0, x1 in grid(W):
            m = mask[int(y0 // f) : int(math.ceil(y1 / f)), int(x0 // f) : int(math.ceil(x1 / f))]
            if m.any():
                blocks += per_side(y1 - y0) * per_side(x1 - x0)
    return blocks


def dry_cellpose():
    """A Cellpose 3.1 adapter at rescale 1 whose network returns background (no flow, logit -20) for every block:
    the shard runs exactly the blocks it would run with a trained model."""
    from segrefine.models.cellpose_adapter import CellposeAdapter

    m = CellposeAdapter.from_pretrained(None, {"diam_mean": 30.0, "diameter": 30.0})

    def forward(blocks):
        out = np.zeros((len(blocks), 3) + blocks.shape[2:], np.float32)
        out[:, 2] = m.BACKGROUND_LOGIT
        return out

    m._forward = forward
    return m


def shard_blocks(path: Path, plan_dir: Path, skip: bool, card=None) -> dict:
    """The real shard over the plan in ``plan_dir`` with ``dry_cellpose`` (or the model of ``card``): its JSON
    (network counts included); its tiles stay in ``plan_dir``/tiles-skip or tiles-all."""
    from segrefine.models import load_model
    from segrefine.tiling import run_shard

    m = dry_cellpose() if card is None else load_model(card)[0]
    m.skips_unneeded = skip
    tiles = plan_dir / f"tiles-{'skip' if skip else 'all'}"
    if tiles.exists():
        shutil.rmtree(tiles)
    if card is None:
        card = plan_dir / "card.json"
        card.write_text("{}\n")  # identifies the model in the tile fingerprints only
    return run_shard(plan_dir / "tiles.tsv", 0, card, path, tiles, plan_dir / "s.json", model=m)


def same_tiles(plan_dir: Path) -> tuple:
    """(tiles whose owned labels are identical in tiles-all and tiles-skip, tiles, cells in tiles-all)."""
    from segrefine.tiling import read_plan, read_tile, tile_file

    plan, _ = read_plan(plan_dir / "tiles.tsv")
    same = n = cells = 0
    for t in plan[plan["in_tissue"]]:
        a, ma, _ = read_tile(tile_file(plan_dir / "tiles-all", t.tile_id))
        b, mb, _ = read_tile(tile_file(plan_dir / "tiles-skip", t.tile_id))
        n += 1
        cells += int(a.max()) if a.size else 0
        same += a.shape == b.shape and ma["origin"] == mb["origin"] and bool((a == b).all())
    return same, n, cells


def main():
    from segrefine.io import Slide
    from segrefine.tiling import make_plan, slide_tissue, write_plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--tile-sizes", type=int, nargs="+", default=[1024])
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--context-bound", type=int, default=256, help="the model's context bound (Cellpose: 256 px)")
    ap.add_argument("--kinds", nargs="+", default=list(SLIDES), choices=list(SLIDES))
    ap.add_argument("--work", default="/tmp/segrefine-tissue-ratio")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument(
        "--card",
        help="a Cellpose model card: run its real network instead of the constant one, and print the shard's wall "
        "time with every block and with the needed blocks, and whether their tiles are identical",
    )
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        "| slide | true tissue | detected tissue | tile | tiles in tissue | group | windows: px / tissue px | "
        "network, every block of every window: block steps / tissue px | network, needed blocks once | "
        "blocks computed / reused / skipped | SOPA 2000/50: block steps / tissue px | SOPA 6000/150 | shard s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                plan, meta = make_plan(path, tile, a.halo, shards=1, group="auto", context_bound_px=a.context_bound)
                plan_dir = work / f"{path.stem}_t{tile}"
                plan_dir.mkdir(exist_ok=True)
                write_plan(plan, meta, plan_dir / "tiles.tsv", plan_dir / "tiles.json")
                t0 = time.monotonic()
                every = shard_blocks(path, plan_dir, False, a.card)
                t1 = time.monotonic()
                needed = shard_blocks(path, plan_dir, True, a.card)
                shard_s = time.monotonic() - t0
                if a.card:
                    same, n_tiles, cells = same_tiles(plan_dir)
                    print(
                        f"({path.name}, {a.card}: shard with every block {t1 - t0:.0f} s wall "
                        f"({every['predict_s']:.0f} s predicting), with the needed blocks "
                        f"{time.monotonic() - t1:.0f} s ({needed['predict_s']:.0f} s); {same}/{n_tiles} tiles "
                        f"identical, {cells} cells)",
                        flush=True,
                    )
                for d in ("tiles-all", "tiles-skip"):
                    shutil.rmtree(plan_dir / d)
                px_per_block = needed["network"]["input_px"] / max(needed["network"]["computed"], 1)  # 176² / r²
                rescale = 176 / px_per_block**0.5
                sopa = {w: sopa_blocks(mask, f, (size, size), w, o, rescale) for w, o in ((2000, 50), (6000, 150))}
                row = {
                    "size": size,
                    "slide": kind,
                    "tile": tile,
                    "true_tissue_fraction": true / size**2,
                    "detected_tissue_fraction": meta["tissue"]["tissue_fraction"],
                    "tiles_in_tissue": meta["tiles_in_tissue"],
                    "tiles": meta["tiles"],
                    "group": meta["group_tiles"],
                    "windows_px": needed["pixels_seen"],
                    "windows_per_true_tissue": needed["pixels_seen"] / true,
                    "model_context_px": needed["model_context_px"],
                    "every_block": every["network"],
                    "needed_blocks": needed["network"],
                    "every_block_per_true_tissue": every["network"]["input_px"] / true,
                    "needed_blocks_per_true_tissue": needed["network"]["input_px"] / true,
                    "needed_blocks_per_detected_tissue": needed["model_input_per_tissue_px"],
                    "sopa_2000_per_true_tissue": sopa[2000] * px_per_block / true,
                    "sopa_6000_per_true_tissue": sopa[6000] * px_per_block / true,
                    "shard_s": shard_s,
                }
                rows.append(row)
                n = row["needed_blocks"]
                print(
                    f"| {size}² {kind} | {row['true_tissue_fraction']:.3f} | {row['detected_tissue_fraction']:.3f} "
                    f"| {tile} | {row['tiles_in_tissue']}/{row['tiles']} | {row['group']}x{row['group']} "
                    f"| {row['windows_per_true_tissue']:.3f} | {row['every_block_per_true_tissue']:.3f} "
                    f"| {row['needed_blocks_per_true_tissue']:.3f} | {n['computed']} / {n['reused']} / {n['skipped']} "
                    f"| {row['sopa_2000_per_true_tissue']:.3f} | {row['sopa_6000_per_true_tissue']:.3f} "
                    f"| {shard_s:.0f} |",
                    flush=True,
                )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
