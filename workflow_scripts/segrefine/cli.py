"""segrefine <step>: every step the workflow's rules call, runnable by hand.

Each subcommand imports only what it needs, so the package works in every env
(the stereopy env is Python 3.8 with no torch; the gef env has no scikit-image).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from segrefine import SegRefineError, __version__


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


# --- steps ------------------------------------------------------------------------------------------------------------
def cmd_demo_data(a):
    from segrefine.demo import make_demo

    info = make_demo(a.out, sn=a.sn, size=a.size, n_patches=a.patches, patch_size=a.patch_size, seed=a.seed)
    print(json.dumps(info))


def cmd_patches(a):
    from segrefine.io import Slide, write_tiff
    from segrefine.patches import boxes_from_table, grid_boxes, parse_patch_name, reflect_pad

    with Slide(a.slide) as slide:
        if a.name:
            boxes = [parse_patch_name(n) for n in a.name]
        elif a.coords:
            boxes = boxes_from_table(a.coords, a.sn)
        else:
            boxes = grid_boxes(a.sn, slide.shape, a.grid[0], a.grid[1])
        for box in boxes:
            img = slide.read(box.x, box.y, box.w, box.h)
            if a.pad_to:
                img = reflect_pad(img, a.pad_to)
            write_tiff(Path(a.out_dir) / f"{box.name}-img.tif", img,
                       photometric="rgb" if img.ndim == 3 else "minisblack")
    logging.info("%d patches -> %s", len(boxes), a.out_dir)


def cmd_convert_annotation(a):
    from segrefine.annotations import convert_annotation
    from segrefine.io import write_tiff
    from segrefine.patches import parse_patch_name

    box = parse_patch_name(Path(a.annotation).stem)
    labels = convert_annotation(a.annotation, (box.h, box.w), exclude_classes=a.exclude_class,
                                use_nucleus=a.use_nucleus)
    if a.pad_to:
        from segrefine.patches import reflect_pad_labels

        labels = reflect_pad_labels(labels, a.pad_to)
    write_tiff(a.out, labels, photometric="minisblack")
    logging.info("%s: %d cells -> %s", a.annotation, int(labels.max()), a.out)


def cmd_trainset(a):
    from segrefine.trainset import build_rows, write_trainset

    rows = build_rows(a.images, a.masks, a.seed, a.val_fraction, a.test_fraction)
    version = write_trainset(a.out, rows, a.seed, a.val_fraction, a.test_fraction)
    logging.info("training set %s: %d patches -> %s", version, len(rows), a.out)


def cmd_fetch_pretrained(a):
    from segrefine.pretrained import fetch_official

    print(fetch_official(a.framework, a.name, a.out))


def cmd_pretrained_card(a):
    from segrefine.finetune import pretrained_card

    pretrained_card(a.framework, a.weights, a.name, a.params, a.out_dir, a.source)


def cmd_train_base(a):
    from segrefine.finetune import train_base

    train_base(a.framework, a.name, a.params, a.n_images, a.size, a.seed, a.out_dir)


def cmd_finetune(a):
    from segrefine.finetune import fine_tune

    fine_tune(a.pretrained_card, a.trainset, a.name, a.params, a.seed, a.out_dir)


def cmd_evaluate(a):
    from segrefine.evaluate import evaluate_model

    evaluate_model(a.card, a.trainset, a.split, a.out, a.iou_threshold)


def cmd_summarize(a):
    from segrefine.evaluate import summarize

    print(summarize(a.inputs, a.out).to_string(index=False))


def cmd_segment(a):
    from segrefine.segment import segment_slide

    segment_slide(a.card, a.slide, a.labels, a.cells)


def cmd_cgef(a):
    from segrefine.expression import make_cgef

    n = make_cgef(a.gem, a.labels, a.cgef, a.cellmap, a.threads)
    logging.info("%d cells -> %s", n, a.cgef)


def cmd_h5ad(a):
    from segrefine.expression import cgef_to_h5ad

    n = cgef_to_h5ad(a.cgef, a.cellmap, a.out)
    logging.info("%d cells -> %s", n, a.out)


# --- parser -----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="segrefine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="step", required=True, metavar="<step>")

    def step(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = step("demo-data", cmd_demo_data, "write the seeded synthetic demo chip (slide, truth, GEM, QuPath annotations)")
    p.add_argument("--out", required=True)
    p.add_argument("--sn", default="DEMO01")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--patches", type=int, default=20)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)

    p = step("patches", cmd_patches, "cut patches from a whole slide (named patches, or a grid), reading only their regions")
    p.add_argument("--slide", required=True)
    p.add_argument("--out-dir", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--name", nargs="+", help="patch names {SN}-x{X}_y{Y}_w{W}_h{H}")
    g.add_argument("--grid", nargs=2, type=int, metavar=("SIZE", "STEP"), help="all patches of a grid")
    g.add_argument("--coords", help="TSV/CSV of patches with columns x, y, w, h")
    p.add_argument("--sn", help="chip SN for --grid/--coords names")
    p.add_argument("--pad-to", type=int, help="reflection-pad each patch to this size (e.g. 512)")

    p = step("convert-annotation", cmd_convert_annotation, "QuPath GeoJSON / binary / instance mask -> instance mask")
    p.add_argument("--annotation", required=True, help="file named after its patch: {SN}-x.._y.._w.._h..[-img|-mask].ext")
    p.add_argument("--out", required=True)
    p.add_argument("--exclude-class", nargs="*", default=["Region"], help="QuPath classes that are not cells")
    p.add_argument("--use-nucleus", action="store_true", help="take the nucleus of QuPath cell objects")
    p.add_argument("--pad-to", type=int, help="reflection-pad the mask like its patch image (see `patches --pad-to`)")

    p = step("trainset", cmd_trainset, "build the versioned training-set table (train/val/test splits)")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--masks", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)

    p = step("fetch-pretrained", cmd_fetch_pretrained, "download official pretrained weights into the model cache (needs network)")
    p.add_argument("--framework", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)

    p = step("pretrained-card", cmd_pretrained_card, "write the model card of existing pretrained weights")
    p.add_argument("--framework", required=True)
    p.add_argument("--weights", help="weights file (omit: from scratch)")
    p.add_argument("--name", required=True)
    p.add_argument("--source", required=True, help="what the config called these weights")
    p.add_argument("--params", type=_json, default={})
    p.add_argument("--out-dir", required=True)

    p = step("train-base", cmd_train_base, "train the offline base model from scratch on generic synthetic nuclei")
    p.add_argument("--framework", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--params", type=_json, default={})
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True)

    p = step("finetune", cmd_finetune, "fine-tune a model from its ORIGINAL pretrained card on the training set")
    p.add_argument("--pretrained-card", required=True)
    p.add_argument("--trainset", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--params", type=_json, default={})
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True)

    p = step("evaluate", cmd_evaluate, "evaluate a model (by its card) on one split of the training set")
    p.add_argument("--card", required=True)
    p.add_argument("--trainset", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--out", required=True)

    p = step("summarize", cmd_summarize, "mean metrics per model and stage from per-image evaluation tables")
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out", required=True)

    p = step("segment", cmd_segment, "segment a whole slide with a saved model")
    p.add_argument("--card", required=True)
    p.add_argument("--slide", required=True)
    p.add_argument("--labels", required=True, help="output instance labels (uint32 TIFF)")
    p.add_argument("--cells", required=True, help="output cell table (CSV)")

    p = step("cgef", cmd_cgef, "GEM + whole-slide labels -> cgef with gefpy (touching cells kept apart)")
    p.add_argument("--gem", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--cgef", required=True)
    p.add_argument("--cellmap", required=True, help="output table: cgef cell -> label id")
    p.add_argument("--threads", type=int, default=2)

    p = step("h5ad", cmd_h5ad, "cgef -> AnnData (.h5ad) with stereopy")
    p.add_argument("--cgef", required=True)
    p.add_argument("--cellmap", required=True)
    p.add_argument("--out", required=True)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except SegRefineError as exc:
        print(f"segrefine {args.step}: error: {exc}", file=sys.stderr)
        return 1
    return 0
