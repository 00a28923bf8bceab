"""Whole-slide tiling benchmark: fidelity, memory, overhead and scaling, side by side with the whole-image approach.

    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/tiling.py                 # default sizes 4096 8192 16384
    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/tiling.py --sizes 4096 32768

Fidelity: tiled vs whole-image inference with the same model on real images
(../shared/realdata) and the synthetic demo slide: F1 at IoU 0.5, cells cut at
seams, duplicates. The shipped classical adapter twice: with the slide-level
intensity reference (tile-plan's histogram; the whole image gets the same
reference computed on the whole image), so that any difference is the
engine's; and without it (Otsu threshold of each window's own histogram: its
differences are the model's dependence on the whole image, not seams).

Memory: peak RSS (os.wait4 of each step's process) of the real step commands
(`segrefine tile-plan`, `segment-shard`, `stitch`) on synthetic slides written
as tiled BigTIFFs, beside the whole-image approach (read the slide, one
predict call, write labels) where it fits in this machine's memory.

Overhead: reading + ownership/writing tiles + stitching and writing all
outputs, over model time (classical model on CPU), in wall seconds and in CPU
seconds (user + sys of each step's process from GNU time, minus the CPU time
of the thread that ran the model), with the load average; tiles/s. With
``--out`` a run's figures are saved; ``--baseline`` prints a saved run's rows
beside this run's (e.g. the code before and after a change).

Scaling: K shard processes at once on the same slide (CPU workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
sys.path.insert(0, str(SCRIPTS))
REALDATA = REPO.parent / "shared" / "realdata"


# --- a synthetic slide of any size, written tile by tile --------------------------------------------------------------
def _stamps():
    out = {}
    for r in range(4, 9):
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        out[r] = (yy**2 + xx**2) <= r * r + 0.5
    return out


def write_synthetic_slide(
    path, size: int, seed: int = 0, tile: int = 512, spacing: int = 18, disc: float = 0.46
) -> None:
    """A size x size uint8 nuclei slide (tiled BigTIFF): a tissue disc (radius ``disc`` x the width) of jittered
    nuclei (radius 4..8 px) on a noisy background. Rendered tile by tile, so any size fits in memory."""
    import tifffile

    stamps = _stamps()
    n = size // tile

    def cells(by, bx):
        rng = np.random.default_rng([seed, by, bx])
        gy, gx = np.mgrid[
            by * tile + spacing // 2 : (by + 1) * tile : spacing, bx * tile + spacing // 2 : (bx + 1) * tile : spacing
        ]
        cy = gy.ravel() + rng.integers(-3, 4, gy.size)
        cx = gx.ravel() + rng.integers(-3, 4, gx.size)
        r = rng.integers(4, 9, gy.size)
        val = rng.integers(120, 220, gy.size)
        keep = ((cy - size / 2) ** 2 + (cx - size / 2) ** 2) <= (disc * size) ** 2
        keep &= rng.random(gy.size) < 0.85
        return cy[keep], cx[keep], r[keep], val[keep]

    def tiles():
        for by in range(n):
            for bx in range(n):
                rng = np.random.default_rng([seed, by, bx, 1])
                canvas = (12 + 6 * rng.standard_normal((tile, tile))).astype(np.float32)
                y0, x0 = by * tile, bx * tile
                for ny in range(max(0, by - 1), min(n, by + 2)):
                    for nx in range(max(0, bx - 1), min(n, bx + 2)):
                        cy, cx, rr, vv = cells(ny, nx)
                        near = (cy + 8 >= y0) & (cy - 8 < y0 + tile) & (cx + 8 >= x0) & (cx - 8 < x0 + tile)
                        for y, x, r, v in zip(cy[near] - y0, cx[near] - x0, rr[near], vv[near]):
                            s = stamps[int(r)]
                            ya, xa = max(0, y - r), max(0, x - r)
                            yb, xb = min(tile, y + r + 1), min(tile, x + r + 1)
                            if ya >= yb or xa >= xb:
                                continue
                            sub = s[ya - (y - r) : yb - (y - r), xa - (x - r) : xb - (x - r)]
                            canvas[ya:yb, xa:xb][sub] = v
                yield np.clip(canvas, 0, 255).astype(np.uint8)

    tmp = Path(str(path) + ".part")
    tifffile.imwrite(
        tmp,
        tiles(),
        shape=(n * tile, n * tile),
        dtype=np.uint8,
        tile=(tile, tile),
        bigtiff=True,
        photometric="minisblack",
        compression="zlib",
        compressionargs={"level": 1},
        metadata={"axes": "YX"},
    )
    os.replace(tmp, path)


# --- processes with their peak RSS ------------------------------------------------------------------------------------
def _timed(cmd, out: Path):
    """The command under GNU time, which writes the child's user and system CPU seconds and peak RSS (KiB) to
    ``out``. (os.wait4 would report the benchmark process's own high-water mark for a child forked from it:
    Linux keeps maxrss across exec.)"""
    return ["/usr/bin/time", "-f", "%U %S %M", "-o", str(out)] + [str(c) for c in cmd]


def _time_fields(out: Path):
    """(user + sys CPU s, peak RSS MiB) from a GNU time output file."""
    user, sys_, kib = out.read_text().split()[-3:]
    return float(user) + float(sys_), int(kib) / 1024.0


def run_measured(cmd, env=None):
    """Run a command; return (wall s, peak RSS MiB, stderr tail, CPU s = user + sys)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        t0 = time.monotonic()
        proc = subprocess.run(
            _timed(cmd, Path(rss.name)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS="1", **(env or {})),
        )
        wall = time.monotonic() - t0
        err = proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
        cpu, rss_mib = _time_fields(Path(rss.name))
        return wall, rss_mib, err, cpu


def classical_card(py, work: Path) -> Path:
    """The classical model's card in ``work/classical`` (made once by `segrefine pretrained-card`)."""
    card = work / "classical" / "card.json"
    if not card.is_file():
        run_measured(
            [
                py,
                "-m",
                "segrefine",
                "pretrained-card",
                "--framework",
                "classical",
                "--name",
                "classical",
                "--source",
                "none",
                "--out-dir",
                card.parent,
            ]
        )
    return card


def run_parallel_measured(cmds, pin: bool = False):
    """Start all commands at once; return (wall s, [peak RSS MiB], [CPU s]). ``pin``: command k runs on CPU core k only
    (a worker = one core, whatever else the process's threads want)."""
    import tempfile

    cores = sorted(os.sched_getaffinity(0))
    outs = [Path(tempfile.mkstemp(suffix=".rss")[1]) for _ in cmds]
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            (["taskset", "-c", str(cores[k % len(cores)])] if pin else []) + _timed(cmd, o),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=str(SCRIPTS), OMP_NUM_THREADS="1"),
        )
        for k, (cmd, o) in enumerate(zip(cmds, outs))
    ]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"a shard failed: {p.args}")
    wall = time.monotonic() - t0
    fields = [_time_fields(o) for o in outs]
    for o in outs:
        o.unlink()
    return wall, [f[1] for f in fields], [f[0] for f in fields]


WHOLE = """
import sys, numpy as np
from segrefine.segment import segment_whole, cell_table
from segrefine.io import write_tiff
labels = segment_whole(sys.argv[1], sys.argv[2])
write_tiff(sys.argv[3], labels, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
cell_table(labels).to_csv(sys.argv[4], index=False)
"""


def tiled_steps(
    py, slide, card, work: Path, tile: int, halo: int, shards: int, parallel: bool = False, pin: bool = False
):
    seg = ["-m", "segrefine"]
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    plan = run_measured(
        [
            py,
            *seg,
            "tile-plan",
            "--slide",
            slide,
            "--out",
            work / "tiles.tsv",
            "--out-json",
            work / "tiles.json",
            "--tile-size",
            tile,
            "--halo",
            halo,
            "--shards",
            shards,
        ]
    )
    res["plan"] = plan[:2]
    shard_cmds = [
        [
            py,
            *seg,
            "segment-shard",
            "--plan",
            work / "tiles.tsv",
            "--shard",
            k,
            "--card",
            card,
            "--slide",
            slide,
            "--tiles-dir",
            work / "tiles",
            "--out",
            work / f"shard{k}.json",
        ]
        for k in range(shards)
    ]
    if parallel:
        wall, rss, shard_cpu = run_parallel_measured(shard_cmds, pin=pin)
        res["shards"] = (wall, max(rss))
    else:
        runs = [run_measured(c) for c in shard_cmds]
        res["shards"] = (sum(r[0] for r in runs), max(r[1] for r in runs))
        shard_cpu = [r[3] for r in runs]
    stitch = run_measured(
        [
            py,
            *seg,
            "stitch",
            "--plan",
            work / "tiles.tsv",
            "--tiles-dir",
            work / "tiles",
            "--shards",
            *[work / f"shard{k}.json" for k in range(shards)],
            "--slide",
            slide,
            "--labels",
            work / "labels.tif",
            "--cells",
            work / "cells.csv",
            "--parquet",
            work / "cells.parquet",
            "--geojson",
            work / "cells.geojson",
            "--overlay",
            work / "overlay.png",
            "--report",
            work / "report.json",
        ]
    )
    res["stitch"] = stitch[:2]
    res["cpu"] = {"plan": plan[3], "shards": sum(shard_cpu), "stitch": stitch[3]}  # user + sys CPU s per step
    res["shard_stats"] = [json.loads((work / f"shard{k}.json").read_text()) for k in range(shards)]
    res["report"] = json.loads((work / "report.json").read_text())
    return res


# --- fidelity ---------------------------------------------------------------------------------------------------------
class PerWindowClassical:
    """The shipped classical adapter without the slide's intensity reference: Otsu's threshold of each
    window's own histogram (what every tiled run did before the reference existed)."""

    device = "cpu"

    def __init__(self, invert=False):
        from segrefine.models.classical_adapter import ClassicalAdapter

        self.m = ClassicalAdapter({"invert": invert})

    def predict(self, img):
        return self.m.predict(img)


def fidelity_case(name, img, model, card, work: Path, tile: int, halo: int):
    import tifffile

    from segrefine.metrics import object_metrics
    from segrefine.stitch import seam_report, stitch
    from segrefine.tiling import make_plan, run_shard, write_plan

    work.mkdir(parents=True, exist_ok=True)
    slide = work / "slide.tif"
    tifffile.imwrite(slide, img, tile=(128, 128), photometric="rgb" if img.ndim == 3 else "minisblack")
    plan, meta = make_plan(slide, tile, halo, shards=2, tissue=False)
    write_plan(plan, meta, work / "tiles.tsv", work / "tiles.json")
    for k in range(2):
        run_shard(work / "tiles.tsv", k, card, slide, work / "tiles", work / f"s{k}.json", model=model)
    rep = stitch(
        work / "tiles.tsv",
        work / "tiles",
        [work / "s0.json", work / "s1.json"],
        slide,
        work / "labels.tif",
        work / "cells.csv",
    )
    tiled = tifffile.imread(work / "labels.tif")
    if hasattr(model, "set_intensity_reference"):  # the whole image gets the same (whole-image) reference
        from segrefine.intensity import intensity_reference

        model.set_intensity_reference(intensity_reference(img))
    whole = model.predict(img)
    m = object_metrics(whole.astype(np.int64), tiled.astype(np.int64))
    s = seam_report(whole, tiled, tile, near=halo)
    return {
        "image": name,
        "size": f"{img.shape[1]}x{img.shape[0]}",
        "tiles": int(meta["tiles"]),
        "tile": tile,
        "halo": halo,
        "cells_whole": int(m["n_true"]),
        "cells_tiled": int(m["n_pred"]),
        "f1": m["f1"],
        "seam_cells": s["seam_cells"],
        "cut_at_seams": s["cut_at_seams"],
        "duplicates": s["duplicates"],
        "ids_unique": s["ids_unique_and_dense"],
        "conflicts_resolved": rep["duplicates_resolved"],
    }


def fidelity(card, work: Path):
    import tifffile

    from segrefine.demo import make_slide

    cases = []
    for stain in ("ssDNA", "DAPI", "mIF"):
        f = REALDATA / "cellbindb-demo" / f"{stain}_img.tif"
        if f.is_file():
            cases.append((f"CellBinDB {stain}", tifffile.imread(f), False, 96, 24))
    f = REALDATA / "cellbindb-demo" / "HE_img.tif"
    if f.is_file():
        cases.append(("CellBinDB H&E", tifffile.imread(f), True, 96, 24))
    f = REALDATA / "stardist-dsb2018" / "img2d_512.tif"
    if f.is_file():
        cases.append(("DSB2018 512", tifffile.imread(f), False, 128, 32))
    f = REALDATA / "he-omeTiff-qupath" / "OS-1-detail.ome.tif"
    if f.is_file():
        cases.append(("OpenSlide H&E OME-TIFF", tifffile.imread(f), True, 256, 32))
    img, _, _ = make_slide(2048, seed=7)
    cases.append(("synthetic demo 2048", img, False, 512, 32))
    rows = []
    for name, img, invert, tile, halo in cases:
        if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
            img = np.moveaxis(img, 0, -1)
        from segrefine.models.classical_adapter import ClassicalAdapter

        for label, model in (
            ("slide reference", ClassicalAdapter({"invert": invert})),
            ("per-window statistics", PerWindowClassical(invert)),
        ):
            key = f"{name}-{label}".replace(" ", "_").replace("&", "")
            row = fidelity_case(name, img, model, card, work / key, tile, halo)
            row["model"] = label
            rows.append(row)
            shutil.rmtree(work / key, ignore_errors=True)
    return rows


# --- main -------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--whole-max", type=int, default=8192, help="largest size run with the whole-image approach")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--scaling-size", type=int, default=8192)
    ap.add_argument(
        "--disc",
        type=float,
        default=0.46,
        help="tissue disc radius / width of the memory slides (small: mostly background tiles)",
    )
    ap.add_argument("--work", default="/tmp/segrefine-bench-tiling")
    ap.add_argument("--out", help="write all figures as JSON here")
    ap.add_argument("--skip", nargs="*", default=[], choices=["fidelity", "memory", "scaling"])
    ap.add_argument("--label", default="", help="name of this run in the overhead table (e.g. the code version)")
    ap.add_argument(
        "--baseline", help="a previous run's --out JSON: its memory/overhead rows are printed beside this run's"
    )
    a = ap.parse_args()

    from segrefine.envs import env_python

    py = env_python("core")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    card = classical_card(py, work)
    results = {"machine": f"{os.cpu_count()} CPU cores", "tile": a.tile, "halo": a.halo}

    if "memory" not in a.skip:
        mem = []
        for size in a.sizes:
            slide = work / (f"synthetic_{size}.tif" if a.disc == 0.46 else f"synthetic_{size}_disc{a.disc}.tif")
            t0 = time.monotonic()
            if not slide.is_file():
                write_synthetic_slide(slide, size, disc=a.disc)
            gen_s = time.monotonic() - t0
            out = work / f"tiled_{size}"
            shutil.rmtree(out, ignore_errors=True)
            load_before = os.getloadavg()[0]
            r = tiled_steps(py, slide, card, out, a.tile, a.halo, 1)
            load_after = os.getloadavg()[0]
            st, rep = r["shard_stats"][0], r["report"]
            row = {
                "size": size,
                "slide_gen_s": gen_s,
                "cells": rep["cells"],
                "tiles": rep["tiles"],
                "tiles_in_tissue": rep["tiles_in_tissue"],
                "skipped": rep["tiles_skipped_background"],
                "plan_s": r["plan"][0],
                "plan_rss_mib": r["plan"][1],
                "shard_s": r["shards"][0],
                "shard_rss_mib": r["shards"][1],
                "stitch_s": r["stitch"][0],
                "stitch_rss_mib": r["stitch"][1],
                "predict_s": st["predict_s"],
                "read_s": st["read_s"],
                "wait_read_s": st["wait_read_s"],
                "own_write_s": st["own_write_s"],
                "tiles_per_s": st["tiles_per_s"],
                "stitch_timings": rep["timings_s"],
                "plan_cpu_s": r["cpu"]["plan"],
                "shard_cpu_s": r["cpu"]["shards"],
                "stitch_cpu_s": r["cpu"]["stitch"],
                "predict_cpu_s": st.get("predict_cpu_s", st["predict_s"]),
                "load": [load_before, load_after],
                "label": a.label,
            }
            if size <= a.whole_max:
                w = run_measured([py, "-c", WHOLE, card, slide, out / "whole_labels.tif", out / "whole_cells.csv"])
                row.update(whole_s=w[0], whole_rss_mib=w[1])
            mem.append(row)
            shutil.rmtree(out / "tiles", ignore_errors=True)
            print(json.dumps(row), flush=True)
        results["memory"] = mem
        base = mem[0]
        print(
            "\n## Memory: peak RSS (MiB) of each step's process, classical model, "
            f"tile {a.tile} px, halo {a.halo} px, 1 shard\n"
        )
        print(
            "| slide | cells | tiles (in tissue) | tile-plan | segment-shard | stitch | tiled peak | vs smallest "
            "| whole-image peak | whole-image time | tiled time (shard + stitch) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in mem:
            peak = max(r["plan_rss_mib"], r["shard_rss_mib"], r["stitch_rss_mib"])
            bpeak = max(base["plan_rss_mib"], base["shard_rss_mib"], base["stitch_rss_mib"])
            whole = (
                (f"{r['whole_rss_mib']:.0f}", f"{r['whole_s']:.0f} s")
                if "whole_rss_mib" in r
                else ("not run (does not fit)", "-")
            )
            print(
                f"| {r['size']}² | {r['cells']} | {r['tiles']} ({r['tiles_in_tissue']}) | {r['plan_rss_mib']:.0f} | "
                f"{r['shard_rss_mib']:.0f} | {r['stitch_rss_mib']:.0f} | {peak:.0f} | {peak / bpeak:.2f}x | "
                f"{whole[0]} | {whole[1]} | {r['shard_s'] + r['stitch_s']:.0f} s |"
            )
        print("\n## Overhead vs model time (classical model on CPU, 1 shard)\n")
        print(
            "Wall: seconds the run takes beyond predicting (tile-plan + shard wall - predict + stitch), over predict "
            "wall. CPU: user + sys seconds of the three processes (GNU time) minus the model's (CPU time of the "
            "predicting thread), over the model's: reading, ownership + outlines + writing tiles (threads "
            "overlapped with the model), tile-plan and stitching, process start included. Load: 1-min load "
            "average before / after the step chain (2 cores).\n"
        )
        print(
            "| run | slide | load | predict s wall / CPU | tile-plan s wall / CPU | shard - predict s wall / CPU "
            "| stitch s wall / CPU | stitch parts s: paste / table / pyramid / GeoJSON / overlay "
            "| overhead wall | overhead CPU | tiles/s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        rows = list(mem)
        if a.baseline:
            prev = json.loads(Path(a.baseline).read_text()).get("memory", [])
            rows = [
                r
                for size in a.sizes
                for r in [p for p in prev if p["size"] == size] + [m for m in mem if m["size"] == size]
            ]
        for r in rows:
            t = r["stitch_timings"]
            p, pc = r["predict_s"], r.get("predict_cpu_s", r["predict_s"])
            wall_all = (r["shard_s"] - p) + r["plan_s"] + r["stitch_s"]
            if "plan_cpu_s" in r:
                cpu_all = r["plan_cpu_s"] + (r["shard_cpu_s"] - pc) + r["stitch_cpu_s"]
                cpus = (
                    f"{r['plan_cpu_s']:.1f}",
                    f"{r['shard_cpu_s'] - pc:.1f}",
                    f"{r['stitch_cpu_s']:.1f}",
                    f"{100 * cpu_all / pc:.1f}%",
                    f"{pc:.1f}",
                )
            else:
                cpus = ("-",) * 4 + ("-",)
            load = "/".join(f"{x:.1f}" for x in r["load"]) if "load" in r else "-"
            parts = " / ".join(
                f"{t.get(k, 0.0):.1f}" for k in ("paste", "cell_table", "pyramid_write", "geojson", "overlay")
            )
            print(
                f"| {r.get('label') or '-'} | {r['size']}² | {load} | {p:.1f} / {cpus[4]} | {r['plan_s']:.1f} / "
                f"{cpus[0]} | {r['shard_s'] - p:.1f} / {cpus[1]} | {r['stitch_s']:.1f} / {cpus[2]} | {parts} | "
                f"{100 * wall_all / p:.1f}% | {cpus[3]} | {r['tiles_per_s']:.2f} |"
            )

    if "scaling" not in a.skip:
        slide = work / f"synthetic_{a.scaling_size}.tif"
        if not slide.is_file():
            write_synthetic_slide(slide, a.scaling_size)
        rows = []
        for k in (1, 2):
            out = work / f"scaling_{k}"
            shutil.rmtree(out, ignore_errors=True)
            r = tiled_steps(py, slide, card, out, a.tile, a.halo, k, parallel=True, pin=True)
            rows.append(
                {
                    "shards": k,
                    "shards_wall_s": r["shards"][0],
                    "cells": r["report"]["cells"],
                    "tiles": r["report"]["tiles_in_tissue"],
                }
            )
            shutil.rmtree(out, ignore_errors=True)
        results["scaling"] = rows
        print(
            f"\n## Scaling: K shard processes at once, shard k pinned to CPU core k ({a.scaling_size}² slide, "
            f"{os.cpu_count()} cores)\n"
        )
        print("| shards | wall s | tiles/s | speed-up | cells |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['shards']} | {r['shards_wall_s']:.1f} | {r['tiles'] / r['shards_wall_s']:.2f} | "
                f"{rows[0]['shards_wall_s'] / r['shards_wall_s']:.2f}x | {r['cells']} |"
            )
    if "fidelity" not in a.skip:
        rows = fidelity(card, work / "fidelity")
        results["fidelity"] = rows
        print("\n## Fidelity: tiled vs whole-image inference, same model (F1 at IoU 0.5)\n")
        print(
            "| image | size | tiles (px, halo) | model | cells whole / tiled | F1 | seam cells | cut at seams "
            "| duplicates | ids unique |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['image']} | {r['size']} | {r['tiles']} ({r['tile']}, {r['halo']}) | {r['model']} | "
                f"{r['cells_whole']} / {r['cells_tiled']} | {r['f1']:.4f} | {r['seam_cells']} | "
                f"{r['cut_at_seams']} | {r['duplicates']} | {r['ids_unique']} |"
            )

    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
