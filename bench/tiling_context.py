"""What the model sees for a model that declares a context (Cellpose: ~225 px): one window per 1024 px tile vs
grouped prediction windows (``segmentation.tiling.group``), side by side.

    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/tiling_context.py --sizes 8192 16384 --work /tmp/tc

Geometry (no model run): for chip-sized slides (full tissue, and the benchmark's tissue disc of radius 0.46 x
the width), the pixels the model sees per pixel of the in-tissue cores (and per tissue pixel of the disc), with
one window per tile (grown by halo + the model's context) and with the groups ``group: auto`` chooses. Computed
with the shard's own ``prediction_windows``.

Measured (``--sizes``): the real steps on synthetic nuclei slides (bench/tiling.py's), the classical model given
Cellpose's context (``context_px`` = 225 px: the geometry of the shipped Cellpose model, with a model that runs at
chip scale on a CPU): tile-plan (``--group 1`` before, ``--group auto --context-bound 256`` after, as the workflow
passes it for Cellpose), one shard, stitch; wall seconds, peak RSS of each step (GNU time), the shard's
``seen_ratio``, the overhead (read, own, write, plan, stitch) over model time, and whether the cell tables of the
two runs are identical.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))
sys.path.insert(0, str(REPO / "bench"))

from tiling import classical_card, run_measured, write_synthetic_slide  # noqa: E402  (bench/tiling.py)

SHARD = """
import logging, sys
from segrefine.models import load_model
from segrefine.tiling import run_shard
logging.basicConfig(level=logging.INFO, format="%(message)s")
plan, card, slide, tiles, out, ctx = sys.argv[1:7]
model, _ = load_model(card)
model.context_px = lambda: int(ctx)  # the classical model, given Cellpose's context
run_shard(plan, 0, card, slide, tiles, out, model=model)
"""


def geometry(sizes, tile: int, halo: int, context: int, bound: int):
    from segrefine.tiling import auto_group, core_pixels, grid_tiles, prediction_windows, seen_pixels

    rows = []
    g_auto = auto_group(tile, halo + bound)
    for size in sizes:
        plan = grid_tiles((size, size), tile, halo)
        for tissue in ("full", "disc"):
            if tissue == "disc":  # cores meeting the disc (radius 0.46 x width, centred) are in tissue
                cx = np.clip(size / 2, plan["x0"], plan["x1"] - 1)
                cy = np.clip(size / 2, plan["y0"], plan["y1"] - 1)
                inside = (cx - size / 2) ** 2 + (cy - size / 2) ** 2 <= (0.46 * size) ** 2
                tiles = plan[inside]
                tissue_px = np.pi * (0.46 * size) ** 2
            else:
                tiles, tissue_px = plan, float(size * size)
            cores = core_pixels(tiles)
            row = {"size": size, "tissue": tissue, "cores_mpx": cores / 1e6, "tissue_mpx": tissue_px / 1e6}
            for name, g in (("before", 1), ("after", g_auto)):
                win = prediction_windows(tiles, g, context, (size, size))
                seen = seen_pixels(win)
                row[name] = {
                    "group": g,
                    "windows": len(win),
                    "seen_per_core": seen / cores,
                    "seen_per_tissue": seen / tissue_px,
                    "max_window": max(max(b[2] - b[0], b[3] - b[1]) for _, b in win),
                }
            rows.append(row)
    return rows


def measured(py, size: int, work: Path, card: Path, tile: int, halo: int, context: int, bound: int):
    slide = work / f"synthetic_{size}.tif"
    if not slide.is_file():
        write_synthetic_slide(slide, size)
    seg = [py, "-m", "segrefine"]
    out = []
    for name, group in (("before", ["--group", "1"]), ("after", ["--group", "auto"])):
        d = work / f"{name}_{size}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        load0 = os.getloadavg()[0]
        plan = run_measured(
            [
                *seg,
                "tile-plan",
                "--slide",
                slide,
                "--out",
                d / "tiles.tsv",
                "--out-json",
                d / "tiles.json",
                "--tile-size",
                tile,
                "--halo",
                halo,
                "--shards",
                1,
                "--context-bound",
                bound,
                *group,
            ]
        )
        shard = run_measured([py, "-c", SHARD, d / "tiles.tsv", card, slide, d / "tiles", d / "shard0.json", context])
        stitch = run_measured(
            [
                *seg,
                "stitch",
                "--plan",
                d / "tiles.tsv",
                "--tiles-dir",
                d / "tiles",
                "--shards",
                d / "shard0.json",
                "--slide",
                slide,
                "--labels",
                d / "labels.tif",
                "--cells",
                d / "cells.csv",
                "--parquet",
                d / "cells.parquet",
                "--geojson",
                d / "cells.geojson",
                "--overlay",
                d / "overlay.png",
                "--report",
                d / "report.json",
            ]
        )
        st = json.loads((d / "shard0.json").read_text())
        meta = json.loads((d / "tiles.json").read_text())
        rep = json.loads((d / "report.json").read_text())
        p = st["predict_s"]
        row = {
            "size": size,
            "run": name,
            "group": meta["group_tiles"],
            "windows": st["windows"],
            "max_window": st["max_window_px"],
            "seen_ratio": st["seen_ratio"],
            "plan_estimate": meta["seen_ratio_at_context_bound"],
            "cells": rep["cells"],
            "plan_s": plan[0],
            "shard_s": shard[0],
            "stitch_s": stitch[0],
            "predict_s": p,
            "predict_cpu_s": st["predict_cpu_s"],
            "overhead": (plan[0] + shard[0] - p + stitch[0]) / p,
            "plan_rss": plan[1],
            "shard_rss": shard[1],
            "stitch_rss": stitch[1],
            "load": [load0, os.getloadavg()[0]],
        }
        shutil.rmtree(d / "tiles", ignore_errors=True)
        print(json.dumps(row), flush=True)
        out.append(row)
    out[1]["same_cells_csv"] = filecmp.cmp(
        work / f"before_{size}" / "cells.csv", work / f"after_{size}" / "cells.csv", shallow=False
    )
    out[1]["cells_differing"] = cells_differing(
        work / f"before_{size}" / "cells.csv", work / f"after_{size}" / "cells.csv"
    )
    return out


def cells_differing(a_csv, b_csv) -> int:
    """Cells of table a without a cell of the same centroid and area in table b."""
    import pandas as pd

    def keys(path):
        t = pd.read_csv(path)
        return set(map(tuple, t[["centroid_x", "centroid_y", "area_px"]].round(6).values.tolist()))

    return len(keys(a_csv) - keys(b_csv))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 16384], help="slides to run (measured)")
    ap.add_argument("--geometry-sizes", type=int, nargs="*", default=[8192, 16384, 32768, 49152, 65536])
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--context", type=int, default=225, help="the model's context (Cellpose: ceil(226 / r) + 2)")
    ap.add_argument("--bound", type=int, default=256, help="the plan's context bound (FRAMEWORK_CONTEXT_BOUND_PX)")
    ap.add_argument("--work", default="/tmp/segrefine-bench-tiling-context")
    ap.add_argument("--out", help="write all figures as JSON here")
    a = ap.parse_args()
    from segrefine.envs import env_python

    geo = geometry(a.geometry_sizes, a.tile, a.halo, a.context, a.bound)
    print(
        f"\n## Pixels the model sees per pixel of the slide (tile {a.tile} px, halo {a.halo} px, model context "
        f"{a.context} px; groups sized for a context bound of {a.bound} px)\n"
    )
    print(
        "| slide | tissue | in-tissue cores Mpx | before: windows, per core px, per tissue px "
        "| after: group, windows, largest window px, per core px, per tissue px |"
    )
    print("|---|---|---|---|---|")
    for r in geo:
        b, f = r["before"], r["after"]
        print(
            f"| {r['size']}² | {r['tissue']} | {r['cores_mpx']:.0f} | {b['windows']}, {b['seen_per_core']:.3f}, "
            f"{b['seen_per_tissue']:.3f} | {f['group']}x{f['group']}, {f['windows']}, {f['max_window']}, "
            f"{f['seen_per_core']:.3f}, {f['seen_per_tissue']:.3f} |"
        )
    results = {"geometry": geo, "measured": [], "machine": f"{os.cpu_count()} CPU cores"}
    if a.sizes:
        py = env_python("core")
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
        card = classical_card(py, work)
        for size in a.sizes:
            results["measured"] += measured(py, size, work, card, a.tile, a.halo, a.context, a.bound)
        print(f"\n## Measured: classical model with a {a.context} px context, 1 shard\n")
        print(
            "| slide | run | group | windows (largest px) | seen / core px (plan's estimate) "
            "| predict s wall / CPU | tile-plan / shard / stitch s | overhead "
            "| peak RSS MiB tile-plan / shard / stitch | cells | cells.csv identical (cells differing) | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["measured"]:
            same = {True: "yes", False: f"no ({r.get('cells_differing')})"}.get(r.get("same_cells_csv"), "-")
            print(
                f"| {r['size']}² | {r['run']} | {r['group']}x{r['group']} | {r['windows']} "
                f"({max(r['max_window'])}) | {r['seen_ratio']:.3f} ({r['plan_estimate']:.3f}) | "
                f"{r['predict_s']:.1f} / {r['predict_cpu_s']:.1f} | "
                f"{r['plan_s']:.1f} / {r['shard_s']:.1f} / {r['stitch_s']:.1f} | "
                f"{100 * r['overhead']:.1f} % | {r['plan_rss']:.0f} / {r['shard_rss']:.0f} / {r['stitch_rss']:.0f} | "
                f"{r['cells']} | {same} | {r['load'][0]:.1f}/{r['load'][1]:.1f} |"
            )
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
