"""Benchmark: the annotation loop simulated with a ground truth (issue 16, part 4).

A slide with known cells (the demo generator's, or a mosaic of the real CellBinDB crops in ../shared/realdata
with their manual masks) is cut into a grid of patches with tissue (annotate_next's candidates). Fixed held-out
test patches and a fixed seed set (annotated from scratch) are the same for every strategy. Each round, a
strategy picks N more patches; a simulated annotator corrects the current model's pre-annotation of each picked
patch to the truth, and every edit is counted with the workflow's own counting (``corrections.diff_cells``:
a predicted cell matched to a true cell at IoU >= 0.5 keeps its id: accepted at IoU >= 0.99, else edited;
unmatched predictions deleted, unmatched true cells added). Drawing from scratch touches every true cell. The
model is then refitted from the ORIGINAL pretrained weights on all annotated patches (``segrefine finetune``,
in the model's env) and evaluated on the test patches (``segrefine evaluate``: F1 and AP at IoU 0.5,
mean AP over 0.5..0.95).

Strategies: ``ours`` = annotate_next's ranking (disagreement of the pretrained and the current fine-tuned
model + 0.25 x tissue complexity, ``annotate_next.score_candidates``); ``random`` = seeded random patches;
``hard`` = the paper's advice, hard regions first (tissue complexity alone: complexity_weight 1).

    python bench/annotation_loop.py [--data demo|realdata] [--rounds 3] [--per-round 3] [--test 8] [--seed-patches 2]
        [--patch 128] [--size 1024] [--pretrained-card CARD] [--params JSON] [--out DIR]

Without --pretrained-card the model is the classical baseline (default parameters; its fine-tuning is a grid
search), which runs in the core env in seconds; a card of another framework runs its steps in that env.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import REPO, step

SN = "LOOP01"


def demo_slide(size: int, seed: int):
    from segrefine.demo import make_slide

    img, labels, _ = make_slide(size, seed)
    return img, labels


def realdata_mosaic():
    """2 x 2 mosaic of the fluorescence CellBinDB crops (ssDNA, DAPI, mIF, 10x DAPI; 256 px each), each scaled to
    uint8 by its 1st..99.8th percentile; truth = their masks split into cells (annotations.mask_to_instances)."""
    import tifffile

    from segrefine.annotations import mask_to_instances

    root = REPO.parent / "shared" / "realdata" / "cellbindb-demo"
    img = np.zeros((512, 512), np.uint8)
    lab = np.zeros((512, 512), np.uint32)
    n = 0
    for k, stain in enumerate(["ssDNA", "DAPI", "mIF", "10xDAPI"]):
        y, x = 256 * (k // 2), 256 * (k % 2)
        a = tifffile.imread(root / f"{stain}_img.tif").astype(np.float64)
        lo, hi = np.percentile(a, [1, 99.8])
        img[y : y + 256, x : x + 256] = np.clip((a - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
        cells = mask_to_instances(tifffile.imread(root / f"{stain}_mask.tif"), source=stain).astype(np.uint32)
        lab[y : y + 256, x : x + 256] = np.where(cells > 0, cells + n, 0)
        n += int(cells.max())
    return img, lab


def correction_counts(pred: np.ndarray, truth: np.ndarray) -> dict:
    """The simulated annotator's edits of ``pred`` into ``truth``, counted by corrections.diff_cells."""
    from segrefine.annotations import CellObject, label_outlines, relabel_sequential
    from segrefine.corrections import STATUSES, diff_cells
    from segrefine.metrics import iou_matrix, match_pairs

    pred = relabel_sequential(np.asarray(pred).astype(np.int64))
    truth = relabel_sequential(np.asarray(truth).astype(np.int64))
    rows, cols = match_pairs(iou_matrix(truth, pred), 0.5)
    id_of_truth = {int(r) + 1: f"p{int(c) + 1}" for r, c in zip(rows, cols)}
    pre = [CellObject(i, f"p{lab}", "annotation", "Cell", {}, g) for i, (lab, g) in enumerate(label_outlines(pred))]
    post = [
        CellObject(i, id_of_truth.get(lab), "annotation", "Cell", {}, g)
        for i, (lab, g) in enumerate(label_outlines(truth))
    ]
    cells = diff_cells(pre, post)
    return {s: sum(c["status"] == s for c in cells) for s in STATUSES}


class Loop:
    def __init__(self, out: Path, img, truth, patch: int, card: Path, params: dict, seed: int):
        import tifffile

        from segrefine.annotate_next import candidate_boxes
        from segrefine.models import framework_env, read_card

        self.out, self.img, self.truth, self.patch, self.card, self.params, self.seed = (
            out,
            img,
            truth,
            patch,
            card,
            params,
            seed,
        )
        self.env = framework_env(read_card(card)["framework"])
        self.slide = out / f"{SN}.tif"
        tifffile.imwrite(self.slide, img)
        self.boxes = {b.name: b for b, _ in candidate_boxes(self.slide, SN, patch, patch, min_tissue=0.02)}
        (out / "patches").mkdir(exist_ok=True)

    def files(self, name):
        from segrefine.annotations import relabel_sequential
        from segrefine.io import write_tiff

        b = self.boxes[name]
        img, msk = self.out / "patches" / f"{name}-img.tif", self.out / "patches" / f"{name}-mask.tif"
        if not img.exists():
            write_tiff(img, self.img[b.y : b.y + b.h, b.x : b.x + b.w], photometric="minisblack")
            write_tiff(
                msk,
                relabel_sequential(self.truth[b.y : b.y + b.h, b.x : b.x + b.w].astype(np.int64)),
                photometric="minisblack",
            )
        return str(img), str(msk)

    def truth_of(self, name):
        b = self.boxes[name]
        return self.truth[b.y : b.y + b.h, b.x : b.x + b.w]

    def trainset(self, path: Path, train, test):
        from segrefine.trainset import build_rows, write_trainset

        names = list(train) + list(test)
        pairs = [self.files(n) for n in names]
        rows = build_rows([p[0] for p in pairs], [p[1] for p in pairs], 0, 0.0, 0.0)
        split = {**{n: "train" for n in train}, **{n: "test" for n in test}}
        for r in rows:
            r["split"] = split[r["patch"]]
        write_trainset(path, rows, 0, 0.0, 0.0)
        return path

    def fit_and_test(self, tag: str, train, test):
        d = self.out / tag
        ts = self.trainset(d / "trainset.tsv", train, test)
        step(
            self.env,
            "finetune",
            "--pretrained-card",
            self.card,
            "--trainset",
            ts,
            "--name",
            tag,
            "--params",
            json.dumps(self.params),
            "--seed",
            self.seed,
            "--out-dir",
            d / "model",
        )
        return (d / "model" / "card.json", *self.evaluate(d / "model" / "card.json", ts, d / "eval.csv"))

    def evaluate(self, card: Path, ts: Path, csv: Path):
        """(F1, AP at IoU 0.5, mean AP over 0.5..0.95) of the model on the test patches (means over patches)."""
        import pandas as pd

        step(self.env, "evaluate", "--card", card, "--trainset", ts, "--split", "test", "--out", csv)
        e = pd.read_csv(csv)
        return float(e["f1"].mean()), float(e["ap"].mean()), float(e["ap_mean"].mean())

    def predict_pool(self, card: Path, taken, npz: Path):
        step(
            self.env,
            "annotate-next-predict",
            "--card",
            card,
            "--slide",
            self.slide,
            "--sn",
            SN,
            "--size",
            self.patch,
            "--step",
            self.patch,
            "--annotated",
            *taken,
            "--out",
            npz,
        )
        with np.load(npz) as z:
            return {k: z[k] for k in z.files if not k.startswith("_")}


def run(args):
    from segrefine.annotate_next import score_candidates
    from segrefine.corrections import minutes

    out = Path(args.out or tempfile.mkdtemp(prefix="annotation_loop."))
    out.mkdir(parents=True, exist_ok=True)
    img, truth = realdata_mosaic() if args.data == "realdata" else demo_slide(args.size, args.seed)
    card = Path(args.pretrained_card) if args.pretrained_card else None
    if card is None:
        step(
            "core",
            "pretrained-card",
            "--framework",
            "classical",
            "--name",
            "pre",
            "--source",
            "none",
            "--out-dir",
            out / "pre",
        )
        card = out / "pre" / "card.json"
    loop = Loop(out, img, truth, args.patch, card, json.loads(args.params), args.seed)
    rng = np.random.default_rng(args.seed)
    names = sorted(loop.boxes)
    order = list(rng.permutation(names))
    test, seed_set, pool0 = (
        order[: args.test],
        order[args.test : args.test + args.seed_patches],
        order[args.test + args.seed_patches :],
    )
    if len(pool0) < args.rounds * args.per_round:
        sys.exit(
            f"{len(names)} patches with tissue: too few for {args.test} test + {args.seed_patches} seed + "
            f"{args.rounds} x {args.per_round}"
        )
    print(
        f"slide {img.shape[1]}x{img.shape[0]} ({args.data}), {len(names)} patches of {args.patch} px with tissue: "
        f"{len(test)} test, {len(seed_set)} seed, {len(pool0)} to choose from; {int(truth.max())} true cells"
    )
    area = args.patch * args.patch
    pre_pool = loop.predict_pool(card, test + seed_set, out / "pretrained_pool.npz")
    f1_pre, ap_pre, apm_pre = loop.evaluate(
        card, loop.trainset(out / "pretrained" / "trainset.tsv", seed_set, test), out / "pretrained" / "eval.csv"
    )
    print(f"pretrained model on the test patches: F1 {f1_pre:.4f}, AP50 {ap_pre:.4f}, mean AP {apm_pre:.4f}")
    rows = []
    t0 = time.time()
    base_cells = sum(int(len(np.unique(loop.truth_of(n))) - 1) for n in seed_set)
    for strategy in args.strategies:
        annotated = list(seed_set)
        touched = drawn = base_cells
        mins_scratch = mins_corr = sum(
            minutes(
                {"accepted": 0, "edited": 0, "deleted": 0, "added": int(len(np.unique(loop.truth_of(n))) - 1)}, area
            )[0]
            for n in seed_set
        )
        srng = np.random.default_rng(args.seed + 1)
        for r in range(args.rounds + 1):
            tag = f"{strategy}_r{r}"
            cur, f1, ap, apm = loop.fit_and_test(tag, annotated, test)
            rows.append(
                {
                    "strategy": strategy,
                    "round": r,
                    "patches": len(annotated),
                    "cells_drawn_scratch": drawn,
                    "cells_touched_corrected": touched,
                    "minutes_scratch": round(mins_scratch, 1),
                    "minutes_corrected": round(mins_corr, 1),
                    "f1": round(f1, 4),
                    "ap50": round(ap, 4),
                    "ap_mean": round(apm, 4),
                }
            )
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
            if r == args.rounds:
                break
            pool = [n for n in pool0 if n not in annotated]
            cur_pool = loop.predict_pool(cur, test + annotated, out / tag / "pool.npz")
            if strategy == "random":
                picks = list(srng.choice(pool, args.per_round, replace=False))
            else:
                preds = {"pretrained": {n: pre_pool[n] for n in pool}, "current": {n: cur_pool[n] for n in pool}}
                images = {
                    n: loop.img[
                        loop.boxes[n].y : loop.boxes[n].y + args.patch, loop.boxes[n].x : loop.boxes[n].x + args.patch
                    ]
                    for n in pool
                }
                table = score_candidates(preds, images, complexity_weight=0.25 if strategy == "ours" else 1.0)
                picks = list(table["patch"][: args.per_round])
            for n in picks:
                t = loop.truth_of(n)
                c = correction_counts(cur_pool[n], t)
                scratch, corr, _ = minutes(c, area)
                n_true = int(len(np.unique(t)) - 1)
                touched += c["edited"] + c["deleted"] + c["added"]
                drawn += n_true
                mins_scratch += scratch
                mins_corr += corr
            annotated += picks
    print(f"\n{len(rows)} fits in {time.time() - t0:.0f} s; outputs in {out}\n")
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(out / "annotation_loop.csv", index=False)
    print(table.to_string(index=False))
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=["demo", "realdata"], default="demo")
    ap.add_argument("--size", type=int, default=1024, help="demo slide side (px)")
    ap.add_argument("--patch", type=int, default=128, help="patch side (px)")
    ap.add_argument("--test", type=int, default=8, help="held-out test patches")
    ap.add_argument("--seed-patches", type=int, default=2, help="patches annotated from scratch before round 1")
    ap.add_argument("--per-round", type=int, default=3, help="patches annotated per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategies", nargs="+", default=["ours", "random", "hard"])
    ap.add_argument("--pretrained-card", help="card of the pretrained model (default: the classical baseline)")
    ap.add_argument("--params", default="{}", help="fine-tuning hyperparameters (JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="output folder (default: a new temporary folder)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
