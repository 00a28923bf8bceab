"""The whole chain at the size of a real Stereo-seq chip: time, CPU and peak memory per step, beside gefpy.

    $(python3 workflow_scripts/segrefine/envs.py python gef) bench/chip_scale.py --size 20000
    $(python3 workflow_scripts/segrefine/envs.py python gef) bench/chip_scale.py --size 4096 --records 8e6

A seeded synthetic chip, written in bounded memory:

- the registered image: ``size`` x ``size`` px uint8 (a tiled BigTIFF, no
  pyramid, as SAW's ``*_regist.tif``), tissue over most of it (a disc of radius
  0.56 x the width, clipped by the chip: ~87 %), nuclei (radius 4..8 px) on a
  jittered 18 px grid, 85 % of grid nodes occupied;
- the expression matrix: a bin GEF (bgef) in gefpy's layout with ``records``
  (DNB, gene) records over 20,000 genes (Zipf-like gene sizes), 70 % of each
  gene's UMIs around nuclei centres (a Gaussian of sigma = radius / 2), 30 %
  uniform over the chip; written gene by gene (the bgef's order).

Both are pure functions of the seed (nuclei positions come from an integer hash
of their grid node), so the image and the matrix agree without holding either.

Then the workflow's own steps, each as its own process exactly as the rules run
them: ``tile-plan`` -> ``segment-shard`` (classical model, 1 shard) -> ``stitch``
-> ``cgef`` (the exact streaming writer) -> ``h5ad`` (stereopy); and gefpy's own
C++ ``generate_cgef`` on the same bgef with the same cells (a mask of our labels
with touching cells cut apart, as gefpy needs; the mask is made beforehand and
not timed). Wall time, CPU time (user + sys) and peak RSS of each process come
from GNU time. The paper's Table 2 whole-slide figures (21-60 GB of host memory)
are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
sys.path.insert(0, str(SCRIPTS))

from segrefine.envs import env_python  # noqa: E402

SPACING = 18  # px between nuclei grid nodes
DISC = 0.56  # tissue disc radius / chip width
N_GENES = 20000
IN_NUCLEI = 0.7
TILE = 512


# --- nuclei: a pure function of (seed, grid node) ---------------------------------------------------------------------
def _hash(seed: int, i: np.ndarray, j: np.ndarray, k: int) -> np.ndarray:
    """A uint64 hash of (seed, i, j, k) (splitmix64 finaliser), vectorised."""
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
            + i.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            + j.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
            + np.uint64(k) * np.uint64(0xD6E8FEB86659FD93)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def nuclei(seed: int, size: int, i: np.ndarray, j: np.ndarray):
    """Centre (y, x), radius, brightness and presence of the nuclei at grid nodes (i, j)."""

    def u(k, n):
        return (_hash(seed, i, j, k) % np.uint64(n)).astype(np.int64)

    cy = i * SPACING + SPACING // 2 + u(1, 7) - 3
    cx = j * SPACING + SPACING // 2 + u(2, 7) - 3
    r = 4 + u(3, 5)
    val = 120 + u(4, 100)
    present = (u(5, 100) < 85) & (((cy - size / 2) ** 2 + (cx - size / 2) ** 2) <= (DISC * size) ** 2)
    present &= (cy >= 0) & (cx >= 0) & (cy < size) & (cx < size)
    return cy, cx, r, val, present


def write_slide(path: Path, size: int, seed: int) -> None:
    """The registered image, rendered tile by tile (tiled BigTIFF, no pyramid)."""
    import tifffile

    yy, xx = np.mgrid[-8:9, -8:9]
    r2 = yy**2 + xx**2
    n = -(-size // TILE)

    def tiles():
        for by in range(n):
            for bx in range(n):
                y0, x0 = by * TILE, bx * TILE
                rng = np.random.default_rng([seed, by, bx])
                canvas = (12 + 6 * rng.standard_normal((TILE + 16, TILE + 16))).astype(np.float32)
                gi, gj = np.mgrid[
                    max(0, (y0 - 12) // SPACING) : (y0 + TILE + 12) // SPACING + 1,
                    max(0, (x0 - 12) // SPACING) : (x0 + TILE + 12) // SPACING + 1,
                ]
                cy, cx, r, val, ok = nuclei(seed, size, gi.ravel(), gj.ravel())
                for y, x, rr, v in zip(cy[ok], cx[ok], r[ok], val[ok]):
                    ly, lx = y - y0 + 8, x - x0 + 8  # canvas has an 8 px margin on every side
                    if -8 <= ly < TILE + 8 and -8 <= lx < TILE + 8:
                        a0, b0 = ly - 8, lx - 8
                        sy = slice(max(0, a0), min(TILE + 16, a0 + 17))
                        sx = slice(max(0, b0), min(TILE + 16, b0 + 17))
                        stamp = (r2 <= rr * rr + 0.5)[sy.start - a0 : sy.stop - a0, sx.start - b0 : sx.stop - b0]
                        canvas[sy, sx][stamp] = v
                yield np.clip(canvas[8 : 8 + TILE, 8 : 8 + TILE], 0, 255).astype(np.uint8)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size),
        dtype=np.uint8,
        tile=(TILE, TILE),
        bigtiff=True,
        compression="zlib",
        compressionargs={"level": 1},
        photometric="minisblack",
    )


def gene_sizes(records: int, seed: int) -> np.ndarray:
    """Records per gene: Zipf-like (1 / rank^0.9), shuffled, summing to ``records``."""
    w = 1.0 / np.arange(1, N_GENES + 1) ** 0.9
    n = np.floor(w / w.sum() * records).astype(np.int64)
    n[: records - int(n.sum())] += 1
    return np.random.default_rng([seed, 99]).permutation(n)


def write_bgef(path: Path, size: int, records: int, seed: int) -> int:
    """A bin1 bgef in gefpy's layout, gene by gene; returns the number of records written (after merging
    records of one gene on one DNB)."""
    import h5py

    exp_dtype = np.dtype([("x", "<i4"), ("y", "<i4"), ("count", "<u4")])  # as gefpy 1.3.3 writes them
    gene_dtype = np.dtype([("gene", "S64"), ("offset", "<u8"), ("count", "<u8")])
    nodes = size // SPACING + 1
    sizes = gene_sizes(records, seed)
    genes = np.zeros(N_GENES, gene_dtype)
    with h5py.File(path, "w") as f:
        f.attrs["bin_type"] = np.array([b"Bin"], "S32")
        f.attrs["geftool_ver"] = np.array([1, 3, 3], np.uint32)
        f.attrs["omics"] = np.array([b"Transcriptomics"], "S32")
        f.attrs["version"] = np.array([2], np.uint32)
        exp = f.create_dataset(
            "geneExp/bin1/expression", shape=(0,), maxshape=(None,), dtype=exp_dtype, chunks=(1 << 18,)
        )
        total, max_count = 0, 0
        lo = np.array([size, size])
        hi = np.array([-1, -1])
        for g in range(N_GENES):
            rng = np.random.default_rng([seed, g])
            n = int(sizes[g])
            k = rng.binomial(n, IN_NUCLEI)
            i, j = rng.integers(0, nodes, k), rng.integers(0, nodes, k)
            cy, cx, r, _, ok = nuclei(seed, size, i, j)
            y = np.round(cy + rng.standard_normal(k) * r / 2).astype(np.int64)[ok]
            x = np.round(cx + rng.standard_normal(k) * r / 2).astype(np.int64)[ok]
            y = np.concatenate([y, rng.integers(0, size, n - k)])
            x = np.concatenate([x, rng.integers(0, size, n - k)])
            inside = (x >= 0) & (y >= 0) & (x < size) & (y < size)
            key, count = np.unique(y[inside] * size + x[inside], return_counts=True)
            rec = np.zeros(len(key), exp_dtype)
            rec["y"], rec["x"], rec["count"] = key // size, key % size, count
            exp.resize((total + len(rec),))
            exp[total:] = rec
            genes[g] = (f"G{g:05d}".encode(), total, len(rec))
            total += len(rec)
            if len(rec):
                max_count = max(max_count, int(count.max()))
                lo = np.minimum(lo, [rec["x"].min(), rec["y"].min()])
                hi = np.maximum(hi, [rec["x"].max(), rec["y"].max()])
        for k_, v in (("minX", lo[0]), ("minY", lo[1]), ("maxX", hi[0]), ("maxY", hi[1])):
            exp.attrs[k_] = np.array([v], np.int32)
        exp.attrs["maxExp"] = np.array([max_count], np.uint32)
        exp.attrs["resolution"] = np.array([500], np.uint32)
        f.create_dataset("geneExp/bin1/gene", data=genes)
    return total


# --- measured steps -------------------------------------------------------------------------------------------------
def run(name, argv, env_name, rows, cwd=None):
    """Run one step as its own process under GNU time; record wall, CPU and peak RSS."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %U %S %M", str(env_python(env_name)), *map(str, argv)]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS="2")
    )
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    m = re.findall(r"TIME ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", proc.stderr)[-1]
    row = {"step": name, "wall_s": float(m[0]), "cpu_s": float(m[1]) + float(m[2]), "peak_gib": int(m[3]) / 2**20}
    rows.append(row)
    print(
        f"  {name:34} {row['wall_s']:9.1f} s wall {row['cpu_s']:9.1f} s CPU {row['peak_gib']:7.2f} GiB peak",
        f"({time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    return proc


GEFPY_CGEF = """
import sys
from gefpy.cgef_writer_cy import generate_cgef
generate_cgef(sys.argv[1], sys.argv[2], sys.argv[3], [256, 256])
"""

GEFPY_MASK = """
import sys
sys.path.insert(0, sys.argv[4])
import h5py, numpy as np, tifffile
from segrefine.expression import LabelImage, _mask_strips
# gefpy wants a uint8 0/255 mask of the bgef's extent 0..maxX x 0..maxY with no two cells touching: made by strips
# exactly as `segrefine cgef --writer gefpy` makes it
with h5py.File(sys.argv[2], 'r') as f:
    a = f['geneExp/bin1/expression'].attrs
    W, H = int(a['maxX'][0]) + 1, int(a['maxY'][0]) + 1
lab = LabelImage(sys.argv[1])
strips = (data for _, data in _mask_strips(lab, (0, 0), H, W, 256))
tifffile.imwrite(sys.argv[3], data=strips, shape=(H, W), dtype=np.uint8, rowsperstrip=256, compression='zlib')
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="chip side in px (= DNB at bin1)")
    ap.add_argument(
        "--records",
        type=float,
        default=2.45e8,
        help="(DNB, gene) records to draw; records of one gene on one DNB merge (2.45e8 drawn give ~2.0e8)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/segrefine-chip", help="work folder (needs ~3 GB per 1e8 records)")
    ap.add_argument("--tile-size", type=int, default=1024, help="tile-plan --tile-size (the workflow's default)")
    ap.add_argument("--skip-gefpy", action="store_true", help="do not run gefpy's cgef writer")
    ap.add_argument("--skip-h5ad", action="store_true", help="do not run the h5ad step")
    a = ap.parse_args()
    out = Path(a.out) / f"chip{a.size}"
    out.mkdir(parents=True, exist_ok=True)
    slide, bgef = out / "chip_ssDNA_regist.tif", out / "chip.raw.gef"
    rows = []
    print(
        f"# chip {a.size} x {a.size} px, {a.records:.3g} records drawn, seed {a.seed}; {os.cpu_count()} CPUs",
        flush=True,
    )
    if not slide.is_file():
        t0 = time.monotonic()
        write_slide(slide, a.size, a.seed)
        print(f"  slide written in {time.monotonic() - t0:.0f} s", flush=True)
    if not bgef.is_file():
        t0 = time.monotonic()
        n = write_bgef(bgef.with_suffix(".part"), a.size, int(a.records), a.seed)
        bgef.with_suffix(".part").rename(bgef)
        print(f"  bgef written in {time.monotonic() - t0:.0f} s: {n} records", flush=True)
    py = ["-m", "segrefine"]
    card = out / "classical" / "card.json"
    if not card.is_file():
        run(
            "pretrained-card",
            [
                *py,
                "pretrained-card",
                "--framework",
                "classical",
                "--name",
                "classical",
                "--source",
                "none",
                "--out-dir",
                card.parent,
            ],
            "core",
            [],
        )
    import shutil

    seg, expr = out / "seg", out / "expr"  # every step from scratch; the chip's image and bgef are kept
    for d in (seg, expr):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    print("\n## steps (each its own process; GNU time)\n")
    run(
        "tile-plan",
        [
            *py,
            "tile-plan",
            "--slide",
            slide,
            "--out",
            seg / "tiles.tsv",
            "--out-json",
            seg / "tiles.json",
            "--tile-size",
            a.tile_size,
            "--halo",
            64,
            "--shards",
            1,
            "--pixel-size-um",
            0.5,
        ],
        "core",
        rows,
    )
    run(
        "segment-shard (classical)",
        [
            *py,
            "segment-shard",
            "--plan",
            seg / "tiles.tsv",
            "--shard",
            0,
            "--card",
            card,
            "--slide",
            slide,
            "--tiles-dir",
            seg / "tiles",
            "--out",
            seg / "shard0.json",
        ],
        "core",
        rows,
    )
    run(
        "stitch",
        [
            *py,
            "stitch",
            "--plan",
            seg / "tiles.tsv",
            "--tiles-dir",
            seg / "tiles",
            "--shards",
            seg / "shard0.json",
            "--slide",
            slide,
            "--labels",
            seg / "labels.tif",
            "--cells",
            seg / "cells.csv",
            "--parquet",
            seg / "cells.parquet",
            "--geojson",
            seg / "cells.geojson",
            "--overlay",
            seg / "overlay.png",
            "--report",
            seg / "segmentation.json",
            "--pixel-size-um",
            0.5,
        ],
        "core",
        rows,
    )
    run(
        "cgef (exact, streaming)",
        [
            *py,
            "cgef",
            "--gem",
            bgef,
            "--labels",
            seg / "labels.tif",
            "--cgef",
            expr / "cells.cgef",
            "--cellmap",
            expr / "cellmap.csv",
            "--origin",
            "0,0",
            "--threads",
            1,
        ],
        "gef",
        rows,
    )
    if not a.skip_h5ad:
        run(
            "h5ad (stereopy)",
            [
                *py,
                "h5ad",
                "--cgef",
                expr / "cells.cgef",
                "--cellmap",
                expr / "cellmap.csv",
                "--out",
                expr / "cells.h5ad",
            ],
            "stereopy",
            rows,
        )
    if not a.skip_gefpy:
        mask = expr / "gefpy_mask.tif"
        run("(gefpy mask, not counted)", ["-c", GEFPY_MASK, seg / "labels.tif", bgef, mask, SCRIPTS], "gef", [])
        run("gefpy generate_cgef (C++)", ["-c", GEFPY_CGEF, expr / "gefpy.cgef", bgef, mask], "gef", rows)
    seg_json = json.loads((seg / "segmentation.json").read_text())
    shard = json.loads((seg / "shard0.json").read_text())
    plan = json.loads((seg / "tiles.json").read_text())
    summary = {
        "size": a.size,
        "records_drawn": a.records,
        "cells": seg_json.get("cells"),
        "steps": rows,
        "model_pixels_over_tissue": shard.get("seen_ratio"),
        "tile_size": plan.get("tile_size"),
        "tissue_fraction": plan.get("tissue", {}).get("tissue_fraction"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\n## chip {a.size}^2: {summary['cells']} cells, tile size {summary['tile_size']}, tissue "
        f"{summary['tissue_fraction']}, the model saw {summary['model_pixels_over_tissue']} x the pixels of the "
        "tiles it predicted\n"
    )
    print("| step | wall s | CPU s | peak RSS GiB |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['step']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_gib']:.2f} |")
    ours = sum(r["wall_s"] for r in rows if r["step"].startswith("cgef"))
    gef = sum(r["wall_s"] for r in rows if r["step"].startswith("gefpy"))
    if gef:
        print(f"\ncgef: the streaming exact writer {ours:.1f} s vs gefpy's C++ writer {gef:.1f} s: {gef / ours:.2f}x")
    print(
        "\nThe paper (CSRefiner, Table 2): whole-slide inference and cgef with the whole slide in memory, "
        "21-60 GB of host memory."
    )


if __name__ == "__main__":
    main()
