"""Tiling fidelity with trained deep models: tiled vs whole-image inference, same Cellpose / StarDist model.

    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/tiling_trained.py --out /tmp/tt/fidelity.json
    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/tiling_trained.py \
        --cellpose-card results/models/cyto_demo/finetuned/card.json --stardist-card DIR/card.json
    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/tiling_trained.py --models cellpose \
        --cellpose-card DIR/card.json --model-context off   # windows = the plan's (halo) only

Models: with no ``--cellpose-card`` / ``--stardist-card`` the script trains
them through the project's CLI exactly as bench/finetune_families.py does
(its ``make_tiles`` and ``step``): the real CellBinDB fluorescence crops
(ssDNA, DAPI, mIF, 10x DAPI) cut into 128 px tiles, ``segrefine trainset``,
then Cellpose 3.1 = the offline base model (``train-base``, synthetic nuclei)
fine-tuned with ``finetune`` in the ``cellpose`` env, StarDist = a fresh
network fine-tuned in the ``tensorflow`` env (short runs: a few minutes each
on a CPU).

Fidelity: for every model and image (CellBinDB ssDNA / DAPI / mIF crops,
DSB2018 512, the synthetic demo slide), in the model's own env (a subprocess
of that env's python, PYTHONPATH=workflow_scripts): tiled inference with
``segrefine.segment.segment_slide`` (tile-plan with its slide intensity
reference, one shard, stitch; small tiles so that most cells lie near a seam;
plan margin = the image's halo + ``--context`` px; the shard grows each window
by the model's own ``context_px()`` unless ``--model-context off``) and
whole-image inference with ``segrefine.segment.segment_whole`` (one
predict_window call at origin (0, 0), the same reference computed on the whole
image). Scored here in the core env with the measures of bench/tiling.py: F1
at IoU 0.5 of tiled vs whole (``segrefine.metrics.object_metrics``) and
``segrefine.stitch.seam_report`` (seam cells, cut at seams, duplicates, ids
unique and dense). ``--images`` keeps only some images; ``--synthetic-size``
sets the synthetic slide's size (tiles of 256 px).

Cellpose runs through the shipped ``CellposeAdapter.predict_window`` (its
slide-anchored resampling and block grid). ``--variants`` adds diagnostic
runs of the same model with changed inference settings (see VARIANTS; with
no name: all of them), to find where tiled and whole differ.
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
sys.path.insert(0, str(REPO / "bench"))
REALDATA = REPO.parent / "shared" / "realdata"

FRAMEWORK_ENV = {"cellpose": "cellpose", "stardist": "tensorflow"}

# diagnostic variants: name -> (framework, card hyperparameter/threshold overrides applied in the worker)
VARIANTS = {
    # the network at its own scale (diameter = diam_mean, rescale 1): no resampling at all
    "cellpose, no rescale": ("cellpose", {"rescale_1": True}),
    # the previous adapter: cellpose's own CellposeModel.eval on each window (rescale rounded per image size,
    # padding centred to a multiple of 16, internal tiles placed over the image by np.linspace)
    "cellpose, stock eval (before)": ("cellpose", {"stock_eval": True}),
}


def stock_predict_window(self, image, origin=(0, 0), needed=None):
    """The previous CellposeAdapter.predict: ``CellposeModel.eval`` on the image, the origin and ``needed``
    ignored."""
    from segrefine.models.cellpose_adapter import _as_input, _channels

    img = _as_input(image)
    masks = self.model.eval(
        img,
        channels=_channels(img),
        diameter=self.diameter(),
        normalize=self._normalize(img),
        flow_threshold=float(self.params["flow_threshold"]),
        cellprob_threshold=float(self.params["cellprob_threshold"]),
        min_size=int(self.params["min_size"]),
    )[0]
    return np.asarray(masks).astype(np.uint32)


# --- models -----------------------------------------------------------------------------------------------------------
def train_models(work: Path, which, cellpose_epochs: int, stardist_epochs: int, base=None) -> dict:
    """Train the models missing from ``which`` through the CLI, as bench/finetune_families.py does;
    {framework: card}."""
    from finetune_families import make_tiles, step

    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    images, masks = make_tiles(REALDATA, work / "data")
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
    cards, info = {}, {}
    if "cellpose" in which:
        t0 = time.monotonic()
        if base is None or not Path(base).is_file():  # the offline base model, as finetune_families trains it
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
            base = work / "base" / "card.json"
        params = {"n_epochs": cellpose_epochs, "bsize": 128, "augment_rotate": False}
        cards["cellpose"] = _finetune("cellpose", "cellpose", str(base), params, work, ts)
        info["cellpose"] = {"train_s": time.monotonic() - t0, "params": params, "base": str(base)}
    if "stardist" in which:
        t0 = time.monotonic()
        params = {
            "n_epochs": stardist_epochs,
            "steps_per_epoch": 20,
            "patch_size": 128,
            "batch_size": 4,
            "learning_rate": 1e-3,
        }
        cards["stardist"] = _finetune("stardist", "tensorflow", None, params, work, ts)
        info["stardist"] = {"train_s": time.monotonic() - t0, "params": params, "base": "from scratch"}
    for fw, card in cards.items():  # how well each finds cells: the held-out CellBinDB test tiles
        step(
            FRAMEWORK_ENV[fw],
            "evaluate",
            "--card",
            card,
            "--trainset",
            ts,
            "--split",
            "test",
            "--out",
            work / fw / "test.csv",
        )
        import pandas as pd

        info[fw]["test_f1_vs_truth"] = float(pd.read_csv(work / fw / "test.csv")["f1"].mean())
    return cards, info


def _finetune(fw, env, weights, params, work: Path, ts: Path) -> Path:
    from finetune_families import pretrain_and_finetune

    return pretrain_and_finetune(fw, env, weights, params, work / fw, ts, f"{fw}_cellbindb")


# --- images -----------------------------------------------------------------------------------------------------------
def cases(synthetic_size: int):
    """(name, image, tile px, halo px): small tiles so that most cells lie near a seam."""
    import tifffile

    from segrefine.demo import make_slide

    out = []
    # halo: above the image's largest annotated cell (ssDNA 27 px, DAPI 30, mIF 76, DSB2018 512 39, synthetic
    # <= 20), which tile-plan's training-mask check would also require
    for stain, halo in (("ssDNA", 48), ("DAPI", 48), ("mIF", 80)):
        f = REALDATA / "cellbindb-demo" / f"{stain}_img.tif"
        if f.is_file():
            out.append((f"CellBinDB {stain}", tifffile.imread(f), 96, halo))
    f = REALDATA / "stardist-dsb2018" / "img2d_512.tif"
    if f.is_file():
        out.append(("DSB2018 512", tifffile.imread(f), 128, 48))
    if synthetic_size:
        img, _, _ = make_slide(synthetic_size, seed=7)
        out.append((f"synthetic demo {synthetic_size}", img, 256, 48))
    return out


# --- the worker, in the model's env -----------------------------------------------------------------------------------
def tiled_steps(card, slide, out: Path, tile: int, halo: int, context: int = 0, model_context: bool = True) -> dict:
    """``segrefine.segment.segment_slide`` (plan, one shard, stitch in one process), every tile predicted, no
    outlines or overlay (not scored here); returns the stitch report."""
    from segrefine.segment import segment_slide

    return segment_slide(
        card,
        slide,
        out,
        tile_size=tile,
        halo_px=halo,
        context_px=context,
        shards=1,
        tissue=False,
        geojson=False,
        overlay=False,
        model_context=model_context,
    )


def worker(spec_path: Path) -> None:
    """Tiled (segment_slide) and whole-image (segment_whole) inference of every case with one model."""
    import tifffile

    from segrefine.models import load_model, read_card
    from segrefine.segment import segment_whole

    spec = json.loads(Path(spec_path).read_text())
    card = spec["card"]
    patch = spec.get("patch") or {}
    card_used = card
    if patch.get("rescale_1"):  # the same weights run at the network's scale (diameter = diam_mean), as a card
        c = read_card(card)
        c = dict(c, thresholds=dict(c["thresholds"], diameter=float(c["preprocessing"]["diam_mean"])))
        c["weights"] = str(Path(card).parent / c["weights"])
        vdir = Path(spec["work"]) / "card"
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "card.json").write_text(json.dumps(c))
        card_used = vdir / "card.json"
    if patch.get("stock_eval"):
        from segrefine.models.cellpose_adapter import CellposeAdapter

        CellposeAdapter.predict = CellposeAdapter.predict_window = stock_predict_window
        CellposeAdapter.skips_unneeded = False
        # the shard predicts through predict_window_with_probability: the stock labels, no probability
        CellposeAdapter.predict_window_with_probability = lambda self, image, origin=(0, 0), needed=None: (
            stock_predict_window(self, image, origin),
            None,
        )
    load_model(card_used)  # warm the imports (torch / tensorflow) outside the timings
    context = int(spec.get("context") or 0)
    model_context = spec.get("model_context", True)
    results = []
    for case in spec["cases"]:
        out = Path(case["work"])
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.monotonic()
        tiled_steps(card_used, case["slide"], out, case["tile"], case["halo"], context, model_context)
        tiled_s = time.monotonic() - t0
        t0 = time.monotonic()
        whole = segment_whole(card_used, case["slide"])
        whole_s = time.monotonic() - t0
        tifffile.imwrite(out / "whole.tif", whole)
        results.append(
            {
                "name": case["name"],
                "tiled_s": tiled_s,
                "whole_s": whole_s,
                "context": context,
                "tiled": str(out / "labels.tif"),
                "whole": str(out / "whole.tif"),
            }
        )
        print(
            f"{spec['model']}: {case['name']} tiled {tiled_s:.1f} s, whole {whole_s:.1f} s", file=sys.stderr, flush=True
        )
    Path(spec["out"]).write_text(json.dumps(results))


def run_worker(
    framework: str, model_label: str, card, case_specs, work: Path, patch=None, context=0, model_context=True
):
    from segrefine.envs import env_python

    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "card": str(card),
        "model": model_label,
        "cases": case_specs,
        "out": str(work / "worker.json"),
        "work": str(work),
        "patch": patch,
        "context": context,
        "model_context": model_context,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [str(env_python(FRAMEWORK_ENV[framework])), str(Path(__file__).resolve()), "--worker", str(work / "spec.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"{model_label} worker failed:\n{proc.stderr[-4000:]}")
    sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith(model_label)))
    return json.loads((work / "worker.json").read_text())


# --- scoring (core env), the measures of bench/tiling.py --------------------------------------------------------------
def score(whole: np.ndarray, tiled: np.ndarray, tile: int, halo: int) -> dict:
    from segrefine.metrics import object_metrics
    from segrefine.stitch import seam_report

    m = object_metrics(whole.astype(np.int64), tiled.astype(np.int64))
    s = seam_report(whole, tiled, tile, near=halo)
    return {
        "cells_whole": int(m["n_true"]),
        "cells_tiled": int(m["n_pred"]),
        "f1": m["f1"],
        "mean_matched_iou": m["mean_matched_iou"],
        "seam_cells": s["seam_cells"],
        "cells_crossing_seams": s["cells_crossing_seams"],
        "cut_at_seams": s["cut_at_seams"],
        "duplicates": s["duplicates"],
        "ids_unique": s["ids_unique_and_dense"],
        "pixel_agreement": float(((whole > 0) == (tiled > 0)).mean()),
    }


def differing_cells(whole: np.ndarray, tiled: np.ndarray, tile: int, halo: int, iou: float = 0.5):
    """Whole-image cells with no tiled match at IoU >= ``iou``: how far each lies from the nearest core seam (px)."""
    from scipy import ndimage

    from segrefine.metrics import iou_matrix, match_pairs

    w, t = whole.astype(np.int64), tiled.astype(np.int64)
    ious = iou_matrix(w, t)
    rows, _ = match_pairs(ious, iou)
    ids = np.unique(w[w > 0])
    unmatched = set(ids.tolist()) - {int(ids[r]) for r in rows} if len(ids) == ious.shape[0] else set()
    H, W = whole.shape
    out = []
    for lab, sl in enumerate(ndimage.find_objects(w), 1):
        if sl is None or lab not in unmatched:
            continue
        cy, cx = [(s.start + s.stop - 1) / 2 for s in sl]
        seams_y = [k * tile for k in range(1, -(-H // tile))]
        seams_x = [k * tile for k in range(1, -(-W // tile))]
        d = min([abs(cy - s) for s in seams_y] + [abs(cx - s) for s in seams_x] + [1e9])
        out.append(
            {
                "cell": lab,
                "centre_xy": [round(cx), round(cy)],
                "seam_distance_px": round(d, 1),
                "extent_px": int(max(s.stop - s.start for s in sl)),
            }
        )
    return out


# --- main -------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cellpose-card", help="an existing Cellpose model card (default: train one)")
    ap.add_argument("--stardist-card", help="an existing StarDist model card (default: train one)")
    ap.add_argument("--models", nargs="+", default=["cellpose", "stardist"], choices=["cellpose", "stardist"])
    ap.add_argument("--cellpose-epochs", type=int, default=60)
    ap.add_argument("--stardist-epochs", type=int, default=15)
    ap.add_argument("--synthetic-size", type=int, default=512, help="synthetic demo slide size (0: none)")
    ap.add_argument(
        "--cellpose-base",
        default=str(REPO / "results" / "models" / "base" / "generic_nuclei" / "card.json"),
        help="the offline Cellpose base model to fine-tune (trained with `segrefine train-base` as "
        "bench/finetune_families.py does when this card is missing)",
    )
    ap.add_argument(
        "--variants",
        nargs="*",
        choices=list(VARIANTS),
        metavar="VARIANT",
        help=f"also run these diagnostic variants (none given: all): {list(VARIANTS)}",
    )
    ap.add_argument(
        "--context",
        type=int,
        default=0,
        help="context px added to every image's halo in the plan (tile-plan's context_px)",
    )
    ap.add_argument(
        "--model-context",
        choices=["on", "off"],
        default="on",
        help="on (the shipped default): the shard grows each window by the model's context_px() and "
        "crops the labels back; off: the model sees the plan's window only",
    )
    ap.add_argument(
        "--images", nargs="+", metavar="TEXT", help="only the images whose name contains one of these (default: all)"
    )
    ap.add_argument("--work", default="/tmp/segrefine-bench-tiling-trained")
    ap.add_argument("--out", help="write all figures as JSON here")
    a = ap.parse_args()
    if a.worker:
        return worker(Path(a.worker))

    import tifffile

    t_start = time.monotonic()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    given = {"cellpose": a.cellpose_card, "stardist": a.stardist_card}
    cards = {fw: Path(c).resolve() for fw, c in given.items() if c and fw in a.models}
    todo = [fw for fw in a.models if fw not in cards]
    train_info = {}
    if todo:
        t0 = time.monotonic()
        trained, train_info = train_models(work / "train", todo, a.cellpose_epochs, a.stardist_epochs, a.cellpose_base)
        cards.update(trained)
        print(f"trained {todo} in {time.monotonic() - t0:.0f} s: {json.dumps(train_info)}", file=sys.stderr)

    case_specs = []
    for name, img, tile, halo in cases(a.synthetic_size):
        if a.images and not any(t in name for t in a.images):
            continue
        key = name.replace(" ", "_")
        slide = work / "slides" / f"{key}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(slide, img, tile=(128, 128), photometric="rgb" if img.ndim == 3 else "minisblack")
        case_specs.append(
            {
                "name": name,
                "key": key,
                "slide": str(slide),
                "tile": tile,
                "halo": halo,
                "size": f"{img.shape[1]}x{img.shape[0]}",
            }
        )

    runs = [(fw, fw, None) for fw in a.models]
    if a.variants is not None:
        runs += [
            (fw, label, patch)
            for label, (fw, patch) in VARIANTS.items()
            if fw in a.models and (not a.variants or label in a.variants)
        ]
    rows = []
    for fw, label, patch in runs:
        card = cards[fw]
        cdata = json.loads(Path(card).read_text())
        specs = [
            dict(c, work=str(work / "runs" / label.replace(" ", "_").replace(",", "") / c["key"])) for c in case_specs
        ]
        res = run_worker(
            fw,
            label,
            card,
            specs,
            work / "runs" / label.replace(" ", "_").replace(",", ""),
            patch,
            a.context,
            a.model_context == "on",
        )
        for c, r in zip(case_specs, res):
            whole, tiled = tifffile.imread(r["whole"]), tifffile.imread(r["tiled"])
            plan = json.loads((Path(r["tiled"]).parent / "tiles.json").read_text())
            row = {
                "image": c["name"],
                "size": c["size"],
                "tiles": int(plan["tiles"]),
                "tile": c["tile"],
                "halo": c["halo"],
                "context": int(r["context"]),
                "model_context_px": _model_context(r["tiled"]),
                "model": label,
                "framework": fw,
                "card": str(card),
                "card_diameter_px": cdata.get("preprocessing", {}).get("diameter_px"),
                **score(whole, tiled, c["tile"], c["halo"]),
                "tiled_s": r["tiled_s"],
                "whole_s": r["whole_s"],
                "largest_whole_cell_px": _largest(whole),
            }
            row["unmatched_whole_cells"] = differing_cells(whole, tiled, c["tile"], c["halo"])
            rows.append(row)
            print(
                json.dumps({k: v for k, v in row.items() if k != "unmatched_whole_cells"}), file=sys.stderr, flush=True
            )

    print("\n## Fidelity with trained deep models: tiled vs whole-image inference, same model (F1 at IoU 0.5)\n")
    print(
        "| image | size | tiles (px, halo + context, + model context) | model | cells whole / tiled | F1 "
        "| seam cells | cut at seams | duplicates | ids unique | s tiled / whole |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['image']} | {r['size']} | {r['tiles']} ({r['tile']}, {r['halo']} + {r['context']}, + "
            f"{r['model_context_px']}) | {r['model']} | "
            f"{r['cells_whole']} / {r['cells_tiled']} | {r['f1']:.4f} | {r['seam_cells']} | "
            f"{r['cut_at_seams']} | {r['duplicates']} | {r['ids_unique']} | "
            f"{r['tiled_s']:.1f} / {r['whole_s']:.1f} |"
        )
    total = time.monotonic() - t_start
    print(
        f"\n(models: {', '.join(f'{fw} {cards[fw]}' for fw in a.models)}; total {total:.0f} s on "
        f"{os.cpu_count()} CPU cores)"
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(
            json.dumps(
                {
                    "machine": f"{os.cpu_count()} CPU cores",
                    "total_s": total,
                    "cards": {k: str(v) for k, v in cards.items()},
                    "training": train_info,
                    "fidelity": rows,
                },
                indent=2,
                default=float,
            )
            + "\n"
        )


def _model_context(labels_path) -> int:
    """How far the shard grew each window for the model (its shard report's model_context_px; 0 if absent)."""
    shards = sorted((Path(labels_path).parent / "shards").glob("*.json"))
    return int(json.loads(shards[0].read_text()).get("model_context_px", 0)) if shards else 0


def _largest(labels: np.ndarray) -> int:
    from scipy import ndimage

    return max(
        [max(s.stop - s.start for s in sl) for sl in ndimage.find_objects(labels.astype(np.int64)) if sl is not None]
        or [0]
    )


if __name__ == "__main__":
    main()
