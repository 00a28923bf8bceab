"""Benchmark: every CPU-feasible model family before and after fine-tuning on REAL crops.

Data: the CellBinDB Stereo-seq/10x fluorescence crops in ../shared/realdata
(ssDNA, DAPI, mIF, 10x DAPI; 256x256 with manual masks), each cut into four
128x128 tiles; the training-set step splits the 16 tiles into train / val /
test by its seeded hash. Every family runs through the same step commands the
workflow runs, in its own env, and the script prints one table side by side:
F1 / precision / recall on the test tiles before and after fine-tuning,
training time and peak memory of the fine-tuning step.

    python bench/finetune_families.py [--cellpose-epochs 150] [--stardist-epochs 30] [--unet-epochs 30]
        [--unet-weights cellseg_bcdu_SHDI_221008_tf.hdf5] [--cpsam-epochs 1] [--cpsam-weights cpsam]
        [--families cellpose stardist unet classical cpsam] [--out DIR]

"Before" means: Cellpose = the workflow's offline base model (trained from
scratch on generic synthetic nuclei, as in the demo: no model hub here);
StarDist = a fresh network (no pretrained weights offline); U-Net = CellBin's
BCDU-Net D3 from CellBin's published weights when --unet-weights gives the
file, else a fresh network (trained on 64-px crops so it fits a CPU run);
classical = its default parameters; Cellpose-SAM (cpsam, env `cpsam`, only
when named in --families: ~40 s and ~11 GB per optimizer step on a CPU) = the
official `cpsam` weights when --cpsam-weights gives the file, else a freshly
initialised ViT-L (seeded), so on a CPU without the weights its row measures
training time and memory, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchlib import REPO, step

STAINS = ["ssDNA", "DAPI", "mIF", "10xDAPI"]


def make_tiles(realdata: Path, out: Path):
    import numpy as np
    import tifffile

    from segrefine.annotations import mask_to_instances

    images, masks = [], []
    for k, stain in enumerate(STAINS):
        img = tifffile.imread(realdata / "cellbindb-demo" / f"{stain}_img.tif")
        mask = mask_to_instances(tifffile.imread(realdata / "cellbindb-demo" / f"{stain}_mask.tif"))
        for y in (0, 128):
            for x in (0, 128):
                name = f"CB{k}{stain.replace('x', 'X')}-x{x}_y{y}_w128_h128"
                tifffile.imwrite(out / f"{name}-img.tif", img[y : y + 128, x : x + 128])
                m = mask_to_instances(np.ascontiguousarray(mask[y : y + 128, x : x + 128]))
                tifffile.imwrite(out / f"{name}-mask.tif", m)
                images.append(out / f"{name}-img.tif")
                masks.append(out / f"{name}-mask.tif")
    return images, masks


def mean_metrics(csv):
    import pandas as pd

    d = pd.read_csv(csv)
    return {k: float(d[k].mean()) for k in ("f1", "precision", "recall")}, len(d)


def pretrain_and_finetune(fw: str, env: str, weights, params: dict, d: Path, ts, name: str) -> Path:
    """``segrefine pretrained-card`` of framework ``fw`` (its ``weights``, or none) into ``d/pretrained``, then
    ``segrefine finetune`` of that card on the training set ``ts`` (seed 0) into ``d/finetuned``, named ``name``,
    both with ``params``; returns the fine-tuned card."""
    args = ["--weights", weights] if weights else []
    step(
        env,
        "pretrained-card",
        "--framework",
        fw,
        "--name",
        fw,
        "--source",
        weights or "none",
        "--params",
        json.dumps(params),
        "--out-dir",
        d / "pretrained",
        *args,
    )
    step(
        env,
        "finetune",
        "--pretrained-card",
        d / "pretrained" / "card.json",
        "--trainset",
        ts,
        "--name",
        name,
        "--params",
        json.dumps(params),
        "--seed",
        0,
        "--out-dir",
        d / "finetuned",
    )
    return d / "finetuned" / "card.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--realdata", default=str(REPO.parent / "shared" / "realdata"))
    ap.add_argument("--cellpose-epochs", type=int, default=150)
    ap.add_argument("--stardist-epochs", type=int, default=30)
    ap.add_argument("--unet-epochs", type=int, default=30)
    ap.add_argument("--unet-weights", help="CellBin's cellseg_bcdu_SHDI_221008_tf.hdf5 (default: a fresh network)")
    ap.add_argument("--cpsam-epochs", type=int, default=1)
    ap.add_argument("--cpsam-weights", help="the official cpsam weights file (default: a fresh network)")
    ap.add_argument(
        "--families",
        nargs="+",
        default=["cellpose", "stardist", "unet", "classical"],
        choices=["cellpose", "stardist", "unet", "classical", "cpsam"],
        help="which families to run (default: all but cpsam, which is for GPUs)",
    )
    ap.add_argument("--out", help="keep the work here (default: a temporary folder)")
    a = ap.parse_args()
    work = Path(a.out or tempfile.mkdtemp(prefix="segrefine-bench-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    images, masks = make_tiles(Path(a.realdata), work / "data")
    ts = work / "trainset.tsv"
    step(
        "core",
        "trainset",
        "--images",
        *images,
        "--masks",
        *masks,
        "--out",
        ts,
        "--seed",
        0,
        "--val-fraction",
        0.15,
        "--test-fraction",
        0.25,
    )
    split = json.loads(ts.with_suffix(".json").read_text())
    print(f"real CellBinDB tiles: {split['patches']} patches, {split['cells']} cells (train/val/test)")

    t0 = time.time()
    if "cellpose" in a.families:
        step(
            "cellpose",
            "train-base",
            "--framework",
            "cellpose",
            "--name",
            "generic_nuclei",
            "--n-images",
            16,
            "--size",
            256,
            "--seed",
            0,
            "--params",
            json.dumps({"n_epochs": 30, "diam_mean": 17.0, "bsize": 128}),
            "--out-dir",
            work / "base",
        )
        print(f"cellpose offline base model trained in {time.time() - t0:.0f} s")
    families = {
        "cellpose": (
            "cellpose",
            str(work / "base" / "card.json"),
            {"n_epochs": a.cellpose_epochs, "bsize": 128, "augment_rotate": False},
        ),
        "stardist": (
            "tensorflow",
            None,
            {
                "n_epochs": a.stardist_epochs,
                "steps_per_epoch": 20,
                "patch_size": 128,
                "batch_size": 4,
                "learning_rate": 1e-3,
            },
        ),
        # CellBin's network takes 256-px input; a from-scratch CPU run uses 64-px crops, its official weights 128
        "unet": (
            "tensorflow",
            a.unet_weights,
            {
                "n_epochs": a.unet_epochs,
                "steps_per_epoch": 6,
                "batch_size": 2,
                "tile_overlap": 16,
                "patch_size": 128 if a.unet_weights else 64,
                "learning_rate": 1e-4 if a.unet_weights else 1e-3,
            },
        ),
        "classical": ("core", None, {}),
        # batch 1, lr 1e-5: the official recommendation the paper follows (the adapter's defaults)
        "cpsam": ("cpsam", a.cpsam_weights, {"n_epochs": a.cpsam_epochs, "seed": 0}),
    }
    rows = []
    for fw, (env, weights, params) in families.items():
        if fw not in a.families:
            continue
        d = work / fw
        pretrain_and_finetune(fw, env, weights, params, d, ts, fw)
        res = {}
        for stage in ("pretrained", "finetuned"):
            step(
                env,
                "evaluate",
                "--card",
                d / stage / "card.json",
                "--trainset",
                ts,
                "--split",
                "test",
                "--out",
                d / f"{stage}.csv",
            )
            res[stage], n = mean_metrics(d / f"{stage}.csv")
        card = json.loads((d / "finetuned" / "card.json").read_text())
        rows.append((fw, res, card["metrics"], n))

    print()
    print(
        f"{'family':10} {'F1 before':>9} {'F1 after':>9} {'P before':>9} {'P after':>8} {'R before':>9} "
        f"{'R after':>8} {'train s':>8} {'peak MB':>8}"
    )
    for fw, res, m, _n in rows:
        b, f = res["pretrained"], res["finetuned"]
        print(
            f"{fw:10} {b['f1']:9.3f} {f['f1']:9.3f} {b['precision']:9.3f} {f['precision']:8.3f} "
            f"{b['recall']:9.3f} {f['recall']:8.3f} {m['train_seconds']:8.1f} {m['peak_rss_mb']:8.0f}"
        )
    print(f"\n(mean over {rows[0][3]} held-out test tiles; F1/precision/recall at IoU >= 0.5; work in {work})")


if __name__ == "__main__":
    main()
