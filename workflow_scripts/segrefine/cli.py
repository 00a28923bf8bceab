"""segrefine <step>: every step the workflow's rules call, runnable by hand.

Each subcommand imports only what it needs, so the package works in every env
(the stereopy env is Python 3.8 with no torch; the gef env has no scikit-image).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import re
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


CHANNEL_HELP = (
    "the slide's channel to segment (0-based), read as a grayscale slide; needed for 2-channel and "
    "multi-channel fluorescence (the sample sheet's 'channel' column)"
)


# --- steps ------------------------------------------------------------------------------------------------------------
def cmd_demo_data(a):
    from segrefine.demo import make_demo

    info = make_demo(a.out, sn=a.sn, size=a.size, n_patches=a.patches, patch_size=a.patch_size, seed=a.seed)
    print(json.dumps(info))


def cmd_patches(a):
    from segrefine.io import Slide, write_tiff
    from segrefine.patches import boxes_from_table, grid_boxes, parse_patch_name, reflect_pad

    with Slide(a.slide, channel=a.channel) as slide:
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
            write_tiff(
                Path(a.out_dir) / f"{box.name}-img.tif", img, photometric="rgb" if img.ndim == 3 else "minisblack"
            )
    logging.info("%d patches -> %s", len(boxes), a.out_dir)


def cmd_convert_annotation(a):
    from segrefine.annotations import convert_annotation
    from segrefine.io import write_tiff
    from segrefine.patches import parse_patch_name

    box = parse_patch_name(Path(a.annotation).stem)
    labels = convert_annotation(
        a.annotation, (box.h, box.w), exclude_classes=a.exclude_class, use_nucleus=a.use_nucleus, origin=(box.x, box.y)
    )
    if a.pad_to:
        from segrefine.patches import reflect_pad_labels

        labels = reflect_pad_labels(labels, a.pad_to)
    write_tiff(a.out, labels, photometric="minisblack")
    logging.info("%s: %d cells -> %s", a.annotation, int(labels.max()), a.out)


def cmd_trainset(a):
    from segrefine.trainset import build_rows, write_trainset

    rows = build_rows(
        images=a.images, masks=a.masks, seed=a.seed, val_fraction=a.val_fraction, test_fraction=a.test_fraction
    )
    version = write_trainset(
        path=a.out, rows=rows, seed=a.seed, val_fraction=a.val_fraction, test_fraction=a.test_fraction
    )
    logging.info("training set %s: %d patches -> %s", version, len(rows), a.out)


def cmd_fetch_pretrained(a):
    from segrefine.pretrained import fetch_official

    print(fetch_official(a.framework, a.name, a.out))


def cmd_pretrained_card(a):
    from segrefine.finetune import pretrained_card

    pretrained_card(
        framework=a.framework, weights=a.weights, name=a.name, params=a.params, out_dir=a.out_dir, source=a.source
    )


def cmd_train_base(a):
    from segrefine.finetune import train_base

    train_base(
        framework=a.framework,
        name=a.name,
        params=a.params,
        n_images=a.n_images,
        size=a.size,
        seed=a.seed,
        out_dir=a.out_dir,
    )


def cmd_finetune(a):
    from segrefine.finetune import fine_tune

    fine_tune(
        pretrained_card_path=a.pretrained_card,
        trainset_path=a.trainset,
        name=a.name,
        params=a.params,
        seed=a.seed,
        out_dir=a.out_dir,
    )


def cmd_evaluate(a):
    from segrefine.evaluate import evaluate_model

    evaluate_model(
        card_path=a.card,
        trainset_path=a.trainset,
        split=a.split,
        out_csv=a.out,
        predictions_npz=a.predictions,
        iou_threshold=a.iou_threshold,
        modes=a.modes,
        min_size=a.min_size,
    )


def cmd_summarize(a):
    from segrefine.evaluate import summarize

    print(summarize(a.inputs, a.out, a.long, a.xlsx).to_string(index=False))


def cmd_threshold_sweep(a):
    from segrefine.evaluate import threshold_sweep

    grid = {k: [float(v) for v in vals] for k, vals in (a.grid or {}).items()}
    print(
        threshold_sweep(
            card_path=a.card,
            trainset_path=a.trainset,
            split=a.split,
            out_csv=a.out,
            grid=grid or None,
            iou_threshold=a.iou_threshold,
            min_size=a.min_size,
        ).to_string(index=False)
    )


def cmd_rank_candidates(a):
    from segrefine.evaluate import rank_candidates

    print(rank_candidates(a.inputs, a.out, a.metric).to_string(index=False))


def cmd_plot_evaluation(a):
    from segrefine.evaluation_plots import boxplots

    boxplots(a.long, a.out, a.stats, a.mode)


def cmd_overlays(a):
    from segrefine.evaluation_plots import overlays

    overlays(
        predictions_npz=a.predictions,
        trainset_path=a.trainset,
        out_dir=a.out_dir,
        title=a.title,
        threshold=a.iou_threshold,
    )


def cmd_loss_curves(a):
    from segrefine.evaluation_plots import loss_curves

    if len(a.names) != len(a.losses):
        raise SegRefineError(f"{len(a.losses)} losses files but {len(a.names)} names")
    loss_curves(dict(zip(a.names, a.losses)), a.out)


def _tissue_level(text: str):
    return None if text == "auto" else int(text)


def cmd_complexity(a):
    from segrefine.complexity import trainset_complexity

    trainset_complexity(trainset_path=a.trainset, out_csv=a.out, long_csv=a.long, out_joined=a.joined, grid=a.grid)


def cmd_learning_curve_subset(a):
    from segrefine.learning_curve import write_subset

    print(json.dumps(write_subset(a.trainset, a.subset, a.seed, a.out)["cells"]))


def cmd_learning_curve(a):
    from segrefine.learning_curve import learning_curve_table

    print(
        learning_curve_table(
            evaluations=a.evaluations, subsets=a.subsets, out_csv=a.out, png=a.png, pretrained=a.pretrained or ()
        ).to_string(index=False)
    )


def _annotated_names(a):
    from segrefine.trainset import read_trainset

    names = list(a.annotated or [])
    if a.trainset:
        names += [r["patch"] for r in read_trainset(a.trainset)]
    return names


def cmd_annotate_next_predict(a):
    from segrefine.annotate_next import predict_candidates

    predict_candidates(
        card_path=a.card,
        slide_path=a.slide,
        sn=a.sn,
        size=a.size,
        step=a.step,
        annotated=_annotated_names(a),
        out_npz=a.out,
        min_tissue=a.min_tissue,
        bright_field=a.bright_field,
        channel=a.channel,
        tta=a.tta,
    )


def cmd_annotate_next(a):
    from segrefine.annotate_next import annotate_next

    top = annotate_next(
        slide_path=a.slide,
        sn=a.sn,
        prediction_npzs=a.predictions,
        names=a.names,
        out_table=a.out,
        out_geojson=a.geojson,
        out_dir=a.out_dir,
        top_n=a.top_n,
        complexity_weight=a.complexity_weight,
        channel=a.channel,
        uncertainty_weight=a.uncertainty_weight,
    ).head(a.top_n)
    print(
        top[["rank", "patch", "score", "disagreement", "complexity", "uncertainty", "n_cells"]].to_string(index=False)
    )


def cmd_preannotate(a):
    from segrefine.preannotations import patches_to_preannotate, write_preannotations

    names = patches_to_preannotate(a.sn, a.ranking, a.top_n, a.patches or ())
    if not names:
        raise SegRefineError(f"no patch of chip {a.sn} to pre-annotate (give --ranking with --top-n, or --patches)")
    write_preannotations(
        card_path=a.card,
        pretrained_card_path=a.pretrained_card,
        slide_path=a.slide,
        sn=a.sn,
        patches=names,
        out_dir=a.out_dir,
        archive_dir=a.archive,
        summary_csv=a.summary,
        channel=a.channel,
        tta=a.tta,
    )
    print("\n".join(names))


def cmd_corrections(a):
    from segrefine.corrections import corrections

    per_round = corrections(
        annotation_files=a.annotations,
        archive_dir=a.archive,
        out_dir=a.out_dir,
        summary_csv=a.summary,
        model=a.model,
        exclude_classes=a.exclude_class,
        use_nucleus=a.use_nucleus,
        scratch_minutes=a.scratch_minutes,
        edit_fraction=a.edit_fraction,
        delete_fraction=a.delete_fraction,
        review_fraction=a.review_fraction,
    )
    print(per_round.to_string(index=False))


def cmd_segment(a):
    from segrefine.segment import segment_slide

    segment_slide(
        card_path=a.card,
        slide_path=a.slide,
        out_dir=a.out_dir,
        tile_size=a.tile_size,
        halo_px=a.halo,
        context_px=a.context,
        shards=a.shards,
        tissue=not a.no_tissue,
        tissue_level=_tissue_level(a.tissue_level),
        tissue_downsample=a.tissue_downsample,
        bright_field=a.bright_field,
        trainset=a.trainset,
        pixel_size_um=a.pixel_size_um,
        model_context=not a.no_model_context,
        channel=a.channel,
    )


def cmd_tile_plan(a):
    from segrefine.tiling import make_plan, write_plan

    halo = a.halo
    if a.halo_unit == "um":
        if not a.pixel_size_um:
            raise SegRefineError("--halo-unit um needs --pixel-size-um")
        halo = a.halo / a.pixel_size_um
    group = a.group if a.group == "auto" else _positive_int(a.group, "--group")
    plan, meta = make_plan(
        slide_path=a.slide,
        tile_size=a.tile_size,
        halo_px=int(round(halo)),
        context_px=a.context,
        shards=a.shards,
        tissue=not a.no_tissue,
        tissue_level=_tissue_level(a.tissue_level),
        tissue_downsample=a.tissue_downsample,
        bright_field=a.bright_field,
        trainset=a.trainset,
        group=group,
        context_bound_px=a.context_bound,
        channel=a.channel,
    )
    write_plan(plan, meta, a.out, a.out_json)


def _positive_int(value: str, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SegRefineError(f"{name} must be a positive integer or auto, got {value!r}")
    return n


def cmd_halo_check(a):
    from segrefine.tiling import halo_check

    halo_check(a.plan_json, a.trainset, a.out)


def cmd_segment_shard(a):
    from segrefine.tiling import run_shard

    run_shard(
        plan_tsv=a.plan,
        shard=a.shard,
        card_path=a.card,
        slide_path=a.slide,
        tiles_dir=a.tiles_dir,
        out_json=a.out,
        gpus=a.gpus,
        prefetch=a.prefetch,
        model_context=not a.no_model_context,
    )


def cmd_stitch(a):
    from segrefine.stitch import stitch

    stitch(
        plan_tsv=a.plan,
        tiles_dir=a.tiles_dir,
        shard_jsons=a.shards,
        slide_path=a.slide,
        labels_out=a.labels,
        cells_csv=a.cells,
        cells_parquet=a.parquet,
        geojson_out=a.geojson,
        overlay_out=a.overlay,
        report_out=a.report,
        pixel_size_um=a.pixel_size_um,
        probability_map_out=a.probability_map,
        probability_bin_px=a.probability_bin_px,
    )


def cmd_cells(a):
    from segrefine.cells import expand_label_image

    mode = "mask" if a.mask else "expand"
    expand_label_image(
        labels_path=a.labels,
        out_tif=a.out,
        report_out=a.report,
        mode=mode,
        distance=a.distance,
        unit=a.unit,
        um_per_px=a.um_per_px,
        mask_path=a.mask,
        band_rows=a.band_rows,
        block_cols=a.block_cols,
        pixel_size_um=a.pixel_size_um,
    )


def cmd_cgef(a):
    from segrefine.expression import make_cgef

    n = make_cgef(
        gem_path=a.gem,
        labels_path=a.labels,
        cgef_out=a.cgef,
        cellmap_out=a.cellmap,
        threads=a.threads,
        writer=a.writer,
        origin=a.origin,
        chunk=a.chunk,
        band_records=a.band_records,
        band_rows=a.band_rows,
        report_out=a.report,
    )
    logging.info("%d cells -> %s (%s writer)", n, a.cgef, a.writer)


def cmd_h5ad(a):
    from segrefine.expression import cgef_to_h5ad

    n = cgef_to_h5ad(cgef=a.cgef, cellmap_csv=a.cellmap, out_h5ad=a.out, writer=a.writer, chunk=a.chunk)
    logging.info("%d cells -> %s", n, a.out)


def cmd_expression_qc(a):
    from segrefine.qc import expression_qc

    expression_qc(
        cellmaps=a.cellmaps, samples=a.samples, out_dir=a.out_dir, k=a.extreme_iqr, stages=a.stages, reports=a.reports
    )


def cmd_saw_cells(a):
    from segrefine.saw import cellbin_cellmap

    n = cellbin_cellmap(a.cellbin, a.out)
    logging.getLogger("segrefine").info("%s: %d cells -> %s", a.cellbin, n, a.out)


def cmd_purity(a):
    from segrefine.purity import purity_step, read_markers

    purity_step(
        stages=a.stages,
        cgefs=a.cgefs,
        labels=a.labels,
        out_dir=a.out_dir,
        expression=a.expression,
        truth=a.truth,
        truth_types=a.truth_types,
        markers=read_markers(a.markers) if a.markers else None,
        mixed_fraction=a.mixed_fraction,
        origin=a.origin,
        sample=a.sample,
    )


def cmd_cluster_check(a):
    from segrefine.clusters import cluster_check

    cluster_check(
        stages=a.stages,
        h5ads=a.h5ads,
        out_json=a.out,
        cells=a.cells,
        sample=a.sample,
        resolution=a.resolution,
        seed=a.seed,
    )


def cmd_spatialdata(a):
    from segrefine.sdata import render_png, write_spatialdata

    summary = write_spatialdata(
        slide=a.slide,
        labels=a.labels,
        outlines=a.outlines,
        h5ad=a.h5ad,
        cell_table=a.cell_table,
        out_zarr=a.out,
        cells_labels=a.cells_labels,
        pixel_size_um=a.pixel_size_um,
        stain=a.stain,
        sample=a.sample,
        min_side=a.min_side,
    )
    if a.png:
        summary.update(render_png(a.out, a.png, a.close_up, a.sample))
    logging.getLogger("segrefine").info("SpatialData -> %s: %s", a.out, json.dumps(summary))


def cmd_purity_table(a):
    from segrefine.io import write_text_atomic
    from segrefine.purity import purity_table

    table = purity_table(a.summaries or (), a.clusters or ())
    write_text_atomic(a.out, table.to_csv(index=False, float_format="%.4g"))
    if a.plot:
        from segrefine.purity import plot_purity_table

        plot_purity_table(table, a.plot)


# --- parser -----------------------------------------------------------------------------------------------------------
def _step(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` (run by ``func``); ``help`` is its line in the list of steps and its description."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    return p


def _model_context_arg(p) -> None:
    p.add_argument(
        "--no-model-context",
        action="store_true",
        help="do not grow the windows by the margin the model declares for tile-exact prediction",
    )


def _tiling_args(p) -> None:
    p.add_argument("--tile-size", type=int, default=1024, help="core size of a tile (px)")
    p.add_argument("--halo", type=float, default=64, help="at least the largest cell diameter")
    p.add_argument("--context", type=int, default=0, help="extra margin (px) the model needs beyond the halo")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--no-tissue", action="store_true", help="predict every tile (no tissue detection)")
    p.add_argument("--tissue-level", default="auto", help="pyramid level for tissue detection, or auto")
    p.add_argument("--tissue-downsample", type=int, default=16, help="downsample of the tissue view (auto level)")
    p.add_argument("--bright-field", action="store_true", help="tissue is darker than background (H&E)")
    p.add_argument("--trainset", help="training-set table: the halo must cover its largest cell")
    p.add_argument("--pixel-size-um", type=float)
    p.add_argument("--channel", type=int, help=CHANNEL_HELP)


def _add_data_steps(sub) -> None:
    """Demo chip, patches cut from a slide, annotations converted to masks, the training-set table."""
    step = functools.partial(_step, sub)
    p = step("demo-data", cmd_demo_data, "write the seeded synthetic demo chip (slide, truth, GEM, QuPath annotations)")
    p.add_argument("--out", required=True)
    p.add_argument("--sn", default="DEMO01")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--patches", type=int, default=20)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)

    p = step(
        "patches", cmd_patches, "cut patches from a whole slide (named patches, or a grid), reading only their regions"
    )
    p.add_argument("--slide", required=True)
    p.add_argument("--out-dir", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--name", nargs="+", help="patch names {SN}-x{X}_y{Y}_w{W}_h{H}")
    g.add_argument("--grid", nargs=2, type=int, metavar=("SIZE", "STEP"), help="all patches of a grid")
    g.add_argument("--coords", help="TSV/CSV of patches with columns x, y, w, h")
    p.add_argument("--sn", help="chip SN for --grid/--coords names")
    p.add_argument("--pad-to", type=int, help="reflection-pad each patch to this size (e.g. 512)")
    p.add_argument("--channel", type=int, help=CHANNEL_HELP)

    p = step("convert-annotation", cmd_convert_annotation, "QuPath GeoJSON / binary / instance mask -> instance mask")
    p.add_argument(
        "--annotation", required=True, help="file named after its patch: {SN}-x.._y.._w.._h..[-img|-mask].ext"
    )
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


def _add_model_steps(sub) -> None:
    """Pretrained weights and their cards, the offline base model, fine-tuning."""
    step = functools.partial(_step, sub)
    p = step(
        "fetch-pretrained",
        cmd_fetch_pretrained,
        "download official pretrained weights into the model cache (needs network)",
    )
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


def _add_evaluation_steps(sub) -> None:
    """Evaluation of the models on the training set: metrics, sweeps, rankings, figures."""
    step = functools.partial(_step, sub)
    p = step("evaluate", cmd_evaluate, "evaluate a model (by its card) on one split of the training set")
    p.add_argument("--card", required=True)
    p.add_argument("--trainset", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--modes", nargs="+", default=["standard"], help="standard, partial and/or paper (see metrics.py)")
    p.add_argument("--min-size", type=int, default=0, help="ignore objects smaller than this (pixels)")
    p.add_argument("--predictions", help="also write the predicted labels here (.npz, one array per patch)")
    p.add_argument("--out", required=True)

    p = step("summarize", cmd_summarize, "mean metrics per model, stage and mode from per-image evaluation tables")
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--long", help="also write the long table (model, stage, image, mode, metric, value) as CSV")
    p.add_argument("--xlsx", help="also write summary, long table and definitions as .xlsx")

    p = step("threshold-sweep", cmd_threshold_sweep, "mean F1 of a model for every combination of its thresholds")
    p.add_argument("--card", required=True)
    p.add_argument("--trainset", required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--grid", type=_json, help='JSON {threshold: [values]}, e.g. {"prob_thresh": [0.4, 0.5]}')
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--min-size", type=int, default=0)
    p.add_argument("--out", required=True)

    p = step("rank-candidates", cmd_rank_candidates, "zero-shot screening: rank pretrained models by a mean metric")
    p.add_argument("--inputs", nargs="+", required=True, help="per-image tables of `evaluate --split all`")
    p.add_argument("--metric", default="f1")
    p.add_argument("--out", required=True)

    p = step("plot-evaluation", cmd_plot_evaluation, "box plots before vs after fine-tuning, paired Wilcoxon tests")
    p.add_argument("--long", required=True, help="long table written by `summarize --long`")
    p.add_argument("--mode", default="standard")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--stats", required=True, help="CSV of the paired tests")

    p = step("overlays", cmd_overlays, "per-patch PNG overlays: truth and prediction outlines, TP/FP/FN")
    p.add_argument("--predictions", required=True, help=".npz written by `evaluate --predictions`")
    p.add_argument("--trainset", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--out-dir", required=True)

    p = step("loss-curves", cmd_loss_curves, "the loss curves of every fine-tuning run in one figure")
    p.add_argument("--losses", nargs="+", required=True, help="losses.json files")
    p.add_argument("--names", nargs="+", required=True, help="one name per losses file")
    p.add_argument("--out", required=True)


def _add_analysis_steps(sub) -> None:
    """The training set's tissue complexity and learning curves."""
    step = functools.partial(_step, sub)
    p = step("complexity", cmd_complexity, "tissue complexity of every annotated patch (the paper's six measures)")
    p.add_argument("--trainset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--long", help="long evaluation table: also write complexity beside each test patch's accuracy")
    p.add_argument("--joined", help="output of the joined table (with --long)")
    p.add_argument("--grid", type=int, default=4, help="blocks per side for the local densities")

    p = step(
        "learning-curve-subset",
        cmd_learning_curve_subset,
        "a nested, seeded subset of the training split as a training-set table (f<fraction> or c<cells>)",
    )
    p.add_argument("--trainset", required=True)
    p.add_argument("--subset", required=True, help="f0.25: a fraction of the training patches; c300: >= 300 cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = step("learning-curve", cmd_learning_curve, "F1 / precision / recall versus annotated cells: table and PNG")
    p.add_argument("--evaluations", nargs="+", required=True, help="per-image tables, one per subset")
    p.add_argument("--subsets", nargs="+", required=True, help="the subset tables, in the same order")
    p.add_argument("--pretrained", nargs="*", help="per-image tables of the pretrained models (plotted at 0 cells)")
    p.add_argument("--out", required=True)
    p.add_argument("--png")


def _add_annotation_ranking_steps(sub) -> None:
    """The annotation loop, first half: candidate patches of a slide predicted and ranked for annotation."""
    step = functools.partial(_step, sub)
    p = step(
        "annotate-next-predict",
        cmd_annotate_next_predict,
        "a model's labels of every candidate patch of a slide (clear of annotations, with tissue)",
    )
    p.add_argument("--card", required=True)
    p.add_argument("--slide", required=True)
    p.add_argument("--sn", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--step", type=int, default=256)
    p.add_argument("--trainset", help="training-set table: its patches count as annotated")
    p.add_argument("--annotated", nargs="*", help="further annotated patch names")
    p.add_argument("--min-tissue", type=float, default=0.02, help="least fraction of tissue pixels (Otsu)")
    p.add_argument("--bright-field", action="store_true", help="dark tissue on a bright background (H&E)")
    p.add_argument("--out", required=True, help=".npz, one label array per candidate patch")
    p.add_argument("--channel", type=int, help=CHANNEL_HELP)
    p.add_argument(
        "--tta",
        type=int,
        choices=[0, 4, 8],
        default=0,
        help="test-time augmentations for the per-patch uncertainty (0: cell probability only)",
    )

    p = step(
        "annotate-next",
        cmd_annotate_next,
        "rank candidate patches by model disagreement and complexity: table, QuPath GeoJSON, patch images",
    )
    p.add_argument("--slide", required=True)
    p.add_argument("--sn", required=True)
    p.add_argument("--predictions", nargs="+", required=True, help="from annotate-next-predict, two or more")
    p.add_argument("--names", nargs="+", required=True, help="a name per predictions file (model/stage)")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--complexity-weight", type=float, default=0.25)
    p.add_argument(
        "--uncertainty-weight",
        type=float,
        default=0.0,
        help="weight of the models' per-patch uncertainty in the score (at most 1 - complexity weight)",
    )
    p.add_argument("--out", required=True, help="ranking of every candidate (.csv)")
    p.add_argument("--geojson", required=True, help="the top N as QuPath annotation rectangles")
    p.add_argument("--out-dir", required=True, help="the top N patches as {name}-img.tif")
    p.add_argument("--channel", type=int, help=CHANNEL_HELP)


def _add_preannotation_steps(sub) -> None:
    """The annotation loop, second half: patches pre-annotated, their corrections measured."""
    step = functools.partial(_step, sub)
    p = step(
        "preannotate",
        cmd_preannotate,
        "the best model's cells of suggested/listed patches as QuPath annotation objects to correct "
        "({patch}.geojson + {patch}-img.tif)",
    )
    p.add_argument("--card", required=True, help="model card of the model that pre-annotates (the fine-tuned stage)")
    p.add_argument("--pretrained-card", help="model card of its pretrained stage (the cells' other_iou)")
    p.add_argument("--slide", required=True)
    p.add_argument("--sn", required=True)
    p.add_argument("--ranking", help="annotate-next's ranking.csv: its top N patches are pre-annotated")
    p.add_argument("--top-n", type=int, default=10, help="how many ranked patches to pre-annotate [%(default)s]")
    p.add_argument("--patches", nargs="*", help="further patch names to pre-annotate (those of chip --sn)")
    p.add_argument("--summary", help="evaluation summary.csv: the model's test F1 goes into the files' record")
    p.add_argument(
        "--tta",
        type=int,
        default=4,
        choices=[0, 4, 8],
        help="test-time augmentations for the cells' tta_agreement [%(default)s]",
    )
    p.add_argument("--out-dir", required=True, help="output folder: {patch}.geojson and {patch}-img.tif per patch")
    p.add_argument(
        "--archive",
        required=True,
        help="archive folder: every pre-annotation is also kept as {patch}/{card sha[:12]}.geojson",
    )
    p.add_argument("--channel", type=int, help=CHANNEL_HELP)

    p = step(
        "corrections",
        cmd_corrections,
        "corrected annotation files against their pre-annotations: cells accepted/edited/deleted/added, minutes "
        "saved, F1 per round (tables and plot)",
    )
    p.add_argument(
        "--annotations",
        nargs="+",
        required=True,
        help="annotation files named after their patches (GeoJSON ones are compared)",
    )
    p.add_argument("--archive", required=True, help="the pre-annotation archive folder (see `preannotate`)")
    p.add_argument("--summary", help="evaluation summary.csv: the current fine-tuned model's F1 (last round)")
    p.add_argument("--model", help="the model of the pre-annotations (segmentation.model), to read --summary")
    p.add_argument("--exclude-class", nargs="*", default=["Region"], help="QuPath classes that are not cells")
    p.add_argument("--use-nucleus", action="store_true", help="take the nucleus of QuPath cell objects")
    p.add_argument(
        "--scratch-minutes",
        type=float,
        default=15.0,
        help="minutes to draw a 256x256 px patch from scratch (scaled by area) [%(default)s]",
    )
    p.add_argument(
        "--edit-fraction",
        type=float,
        default=0.5,
        help="cost of editing a cell, as a fraction of drawing it [%(default)s]",
    )
    p.add_argument(
        "--delete-fraction",
        type=float,
        default=0.05,
        help="cost of deleting a cell, as a fraction of drawing it [%(default)s]",
    )
    p.add_argument(
        "--review-fraction",
        type=float,
        default=0.05,
        help="cost of looking at a cell and accepting it, as a fraction of drawing it [%(default)s]",
    )
    p.add_argument(
        "--out-dir", required=True, help="output folder: per_cell.csv, per_patch.csv, per_round.csv, corrections.png"
    )


def _add_segmentation_steps(sub) -> None:
    """Whole-slide segmentation: in one process, or tile plan, shards and stitch."""
    step = functools.partial(_step, sub)
    p = step("segment", cmd_segment, "segment a whole slide with a saved model (plan, shards, stitch in one process)")
    p.add_argument("--card", required=True)
    p.add_argument("--slide", required=True)
    p.add_argument("--out-dir", required=True, help="labels.tif, cells.csv/.parquet/.geojson, overlay.png, ...")
    _tiling_args(p)
    _model_context_arg(p)

    p = step("tile-plan", cmd_tile_plan, "tile plan of a slide: cores, halo windows, tissue flags, shards")
    p.add_argument("--slide", required=True)
    p.add_argument("--out", required=True, help="plan table (TSV)")
    p.add_argument("--out-json", required=True, help="plan metadata (JSON)")
    p.add_argument("--halo-unit", choices=["px", "um"], default="px")
    p.add_argument(
        "--group", default="1", help="tiles per side a shard predicts in one window, or auto (sized from the margin)"
    )
    p.add_argument(
        "--context-bound", type=int, default=0, help="upper bound (px) of the model's own context, to size auto groups"
    )
    _tiling_args(p)

    p = step("halo-check", cmd_halo_check, "refuse a tile plan whose halo is smaller than the largest training cell")
    p.add_argument("--plan-json", required=True, help="the tile plan's metadata (tiles.json)")
    p.add_argument("--trainset", required=True)
    p.add_argument("--out", required=True, help="the check's result (JSON)")

    p = step("segment-shard", cmd_segment_shard, "predict the tiles of one shard (model loaded once, resumable)")
    p.add_argument("--plan", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--card", required=True)
    p.add_argument("--slide", required=True)
    p.add_argument("--tiles-dir", required=True, help="per-tile results (kept: a rerun skips finished tiles)")
    p.add_argument("--out", required=True, help="shard summary (JSON)")
    p.add_argument("--gpus", type=int, default=0, help="the job's gpu resource: take one free local GPU")
    p.add_argument("--prefetch", type=int, default=2, help="tiles read ahead while the model works")
    _model_context_arg(p)

    p = step("stitch", cmd_stitch, "stitch per-tile results into whole-slide labels, cell table, outlines, overlay")
    p.add_argument("--plan", required=True)
    p.add_argument("--tiles-dir", required=True)
    p.add_argument("--shards", nargs="+", required=True, help="shard summaries (JSON)")
    p.add_argument("--slide", required=True)
    p.add_argument("--labels", required=True, help="pyramidal OME-TIFF, level 0 = uint32 labels")
    p.add_argument("--cells", required=True, help="cell table (CSV)")
    p.add_argument("--parquet", help="cell table (Parquet)")
    p.add_argument("--geojson", help="cell outlines (QuPath GeoJSON)")
    p.add_argument("--overlay", help="downsampled overlay (PNG)")
    p.add_argument("--probability-map", help="heat map of the mean cell probability over the slide (PNG)")
    p.add_argument(
        "--probability-bin-px",
        type=int,
        default=64,
        help="bin size (px) of the probability map: cells averaged by their centroid's bin",
    )
    p.add_argument("--report", help="counts, large cells, timings (JSON)")
    p.add_argument("--pixel-size-um", type=float)


def _add_expression_steps(sub) -> None:
    """Whole-slide labels to cells, cell-bin GEF and AnnData."""
    step = functools.partial(_step, sub)
    p = step(
        "cells",
        cmd_cells,
        "whole-slide nuclei labels -> cell labels: each nucleus grown by a distance (nearest nucleus within "
        "it, ties to the lowest id, never two cells), or a user's cell mask; pyramidal OME-TIFF like labels.tif",
    )
    p.add_argument("--labels", required=True, help="nuclei labels (uint32 OME-TIFF from `stitch`)")
    p.add_argument(
        "--out", required=True, help="cell labels (pyramidal OME-TIFF, level 0 uint32; ids = nuclei ids when grown)"
    )
    p.add_argument("--report", help="counts, distance, timings (JSON)")
    p.add_argument(
        "--distance",
        type=float,
        default=10.0,
        help="expansion distance (> 0; at most 200 px or 100 µm) [%(default)s, cellbin2's correct_r]",
    )
    p.add_argument("--unit", choices=["px", "um"], default="px", help="unit of --distance [%(default)s]")
    p.add_argument("--um-per-px", type=float, help="the slide's µm per pixel (needed with --unit um)")
    p.add_argument(
        "--mask", help="a user's cell label image in the labels' frame (same size), used instead of growing the nuclei"
    )
    p.add_argument("--band-rows", type=int, default=1024, help="label rows computed at a time [%(default)s]")
    p.add_argument(
        "--block-cols", type=int, default=4096, help="label columns computed at a time within a band [%(default)s]"
    )
    p.add_argument(
        "--pixel-size-um", type=float, help="physical pixel size written in the OME metadata (default --um-per-px)"
    )

    p = step("cgef", cmd_cgef, "GEM/bgef + whole-slide labels -> cell-bin GEF (exact writer or gefpy)")
    p.add_argument("--gem", required=True, help="expression: GEM, GEM.gz or bin GEF (.bgef/.gef)")
    p.add_argument("--writer", default="exact", choices=["exact", "gefpy"])
    p.add_argument("--origin", default="auto", help="'auto' or 'x,y': GEM coordinate of label pixel (0, 0)")
    p.add_argument("--labels", required=True)
    p.add_argument("--cgef", required=True)
    p.add_argument("--cellmap", required=True, help="output table: cgef cell -> label id")
    p.add_argument(
        "--report",
        help="output JSON: UMIs in cells and the alignment check (the shift of the matrix "
        "that would put more UMIs in cells)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--chunk",
        type=int,
        help="expression records read at a time (default 2,097,152; a GEM in blocks of about as many lines)",
    )
    p.add_argument(
        "--band-records",
        type=int,
        help="at most this many records per band of label rows and per merge bucket (default 1,048,576)",
    )
    p.add_argument(
        "--band-rows",
        type=int,
        help="at most this many label rows read at a time (default: 512, "
        "or fewer so that a band holds at most 4,194,304 pixels)",
    )

    p = step("h5ad", cmd_h5ad, "cgef -> AnnData (.h5ad): streamed from the cgef (direct) or with stereopy")
    p.add_argument("--cgef", required=True)
    p.add_argument("--cellmap", required=True)
    p.add_argument(
        "--writer",
        default="direct",
        choices=["direct", "stereopy"],
        help="direct: X streamed from the cgef in bounded memory; stereopy: stereopy's read_gef and "
        "stereo_to_anndata (memory grows with the matrix) [%(default)s]",
    )
    p.add_argument(
        "--chunk", type=int, default=1 << 22, help="direct writer: matrix entries copied at a time [%(default)s]"
    )
    p.add_argument("--out", required=True)


def _add_expression_qc_steps(sub) -> None:
    """Expression QC and purity of the cells, SAW's cells beside ours, cluster checks."""
    step = functools.partial(_step, sub)
    p = step(
        "expression-qc",
        cmd_expression_qc,
        "per-cell QC (UMIs, genes, area) of the cell tables of the cgefs, before vs after fine-tuning",
    )
    p.add_argument("--cellmaps", nargs="+", required=True)
    p.add_argument("--samples", nargs="+", required=True, help="the sample of each cell table")
    p.add_argument(
        "--stages",
        nargs="+",
        help="the segmentation stage of each cell table (or one for all); with two stages the first is "
        "'before', the second 'after': before_after.csv and overlaid distributions",
    )
    p.add_argument("--extreme-iqr", type=float, default=3.0, help="area outlier fence in IQRs beyond the quartiles")
    p.add_argument(
        "--reports",
        nargs="*",
        help="the alignment reports (`cgef --report`) of the first cell tables, "
        "in their order: UMIs in cells and the alignment check in summary.csv",
    )
    p.add_argument("--out-dir", required=True)

    p = step(
        "saw-cells",
        cmd_saw_cells,
        "SAW's cell-bin GEF (cellbin.gef, adjusted.cellbin.gef) -> a per-cell table like `cgef`'s cellmap.csv, "
        "so the expression QC puts SAW's cells beside ours",
    )
    p.add_argument("--cellbin", required=True, help="SAW's (or gefpy's) cell-bin GEF")
    p.add_argument("--out", required=True, help="per-cell table (CSV, the columns of cellmap.csv)")

    p = step(
        "purity",
        cmd_purity,
        "how pure each cell's expression is, per stage of one sample: the mutually exclusive co-expression "
        "rate (MECR) of marker pairs from the cgef, and, with ground-truth labels, the share of each cell's "
        "UMIs from its dominant true cell and of its marker UMIs from its own type (docs/expression.md)",
    )
    p.add_argument("--stages", nargs="+", required=True, help="the stage name of each cell table (pretrained, ...)")
    p.add_argument("--cgefs", nargs="+", required=True, help="each stage's cell-bin GEF (for the MECR)")
    p.add_argument("--labels", nargs="+", required=True, help="each stage's whole-slide label image")
    p.add_argument(
        "--out-dir",
        required=True,
        help="folder for summary.json, mecr_pairs.csv (rows with markers), cells.csv (rows with truth)",
    )
    p.add_argument("--expression", help="the sample's GEM or bgef (needed with --truth)")
    p.add_argument("--truth", help="ground-truth instance labels, same size and frame as --labels")
    p.add_argument("--truth-types", help="CSV 'label,type': the cell type of every truth label (marker purity)")
    p.add_argument("--markers", help="marker genes per cell type: a JSON object {type: [genes]} or a JSON file")
    p.add_argument(
        "--mixed-fraction",
        type=float,
        default=0.10,
        help="a cell is mixed when UMIs from true cells other than its dominant one reach this fraction",
    )
    p.add_argument("--origin", default="auto", help="GEM coordinate of label pixel (0, 0): 'auto' or 'x,y'")
    p.add_argument("--sample", default="", help="the sample id written into the summary")

    p = step(
        "cluster-check",
        cmd_cluster_check,
        "open each stage's h5ad with current anndata and run scanpy's normalize/log1p/PCA/neighbours/Leiden; "
        "with purity cell tables, the adjusted Rand index of the clusters against the true cell types",
    )
    p.add_argument("--stages", nargs="+", required=True, help="the stage name of each h5ad")
    p.add_argument("--h5ads", nargs="+", required=True, help="each stage's AnnData (.h5ad)")
    p.add_argument("--cells", help="cells.csv of `segrefine purity --truth` (each cell's true type, per stage)")
    p.add_argument("--out", required=True, help="JSON: per stage, cells, Leiden clusters and ARI")
    p.add_argument("--sample", default="", help="the sample id written into the JSON")
    p.add_argument("--resolution", type=float, default=0.5, help="Leiden resolution")
    p.add_argument("--seed", type=int, default=0, help="seed of PCA, neighbours and Leiden")


def _add_report_steps(sub) -> None:
    """The sample's SpatialData store and the report's purity table."""
    step = functools.partial(_step, sub)
    p = step(
        "spatialdata",
        cmd_spatialdata,
        "one sample's SpatialData store (.zarr; scverse): the slide (multiscale), the nuclei (and cell) labels "
        "(multiscale), the outlines as shapes and the AnnData linked to the labels; runs in the spatialdata env "
        "(docs/spatialdata.md)",
    )
    p.add_argument("--slide", required=True, help="the slide TIFF (read lazily; its own pyramid is kept)")
    p.add_argument("--labels", required=True, help="nuclei labels: the pyramidal labels.tif of `segrefine stitch`")
    p.add_argument(
        "--cells-labels",
        help="cell labels (nuclei grown into cells: `segrefine cells`), same frame; written as labels 'cells'",
    )
    p.add_argument("--outlines", required=True, help="cell outlines: cells.geojson of `segrefine stitch`")
    p.add_argument(
        "--cell-table", required=True, help="cells.parquet or cells.csv of `segrefine stitch` (the cells' centres)"
    )
    p.add_argument("--h5ad", required=True, help="AnnData of `segrefine h5ad` (obs 'label_id' = id in --labels)")
    p.add_argument(
        "--out",
        required=True,
        help="the SpatialData store to write (a folder ending in .zarr); an "
        "existing one is replaced only if segrefine wrote it",
    )
    p.add_argument("--png", help="also render the store with spatialdata-plot into this PNG")
    p.add_argument(
        "--pixel-size-um", type=float, help="µm per slide pixel: adds the 'micron' coordinate system (omit if unknown)"
    )
    p.add_argument("--stain", help="the channel name of a grayscale slide (e.g. ssDNA, DAPI)")
    p.add_argument("--sample", help="sample id (the PNG's title and the store's 'segrefine' attributes)")
    p.add_argument(
        "--min-side",
        type=int,
        default=1024,
        help="a slide without its own pyramid is downsampled by 2 until its longer side is at most this "
        "(px) [%(default)s]",
    )
    p.add_argument(
        "--close-up", type=int, default=256, help="side (px) of the PNG's close-up around the median cell [%(default)s]"
    )

    p = step(
        "purity-table",
        cmd_purity_table,
        "one row per sample and stage of the purity summaries and cluster checks (the report's table)",
    )
    p.add_argument("--summaries", nargs="*", help="summary.json files of `segrefine purity`")
    p.add_argument("--clusters", nargs="*", help="JSON files of `segrefine cluster-check`")
    p.add_argument("--out", required=True, help="CSV table")
    p.add_argument("--plot", help="PNG: one panel per measure, one bar per sample and stage")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="segrefine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="step", required=True, metavar="<step>")
    _add_data_steps(sub)
    _add_model_steps(sub)
    _add_evaluation_steps(sub)
    _add_analysis_steps(sub)
    _add_annotation_ranking_steps(sub)
    _add_preannotation_steps(sub)
    _add_segmentation_steps(sub)
    _add_expression_steps(sub)
    _add_expression_qc_steps(sub)
    _add_report_steps(sub)
    _fill_help(ap)
    return ap


# --- help of the options whose add_argument above carries none: first per step, then by option name -------------------
STEP_OPTION_HELP = {
    ("demo-data", "--out"): "output folder of the demo chip",
    ("demo-data", "--sn"): "chip serial number (names the files) [%(default)s]",
    ("demo-data", "--size"): "slide side (px) [%(default)s]",
    ("demo-data", "--patches"): "number of annotated patches [%(default)s]",
    ("demo-data", "--patch-size"): "annotated patch side (px) [%(default)s]",
    ("patches", "--out-dir"): "output folder of the patches ({name}-img.tif)",
    ("convert-annotation", "--out"): "instance mask (TIFF, uint16/uint32 labels)",
    ("trainset", "--images"): "patch images, named {SN}-x.._y.._w.._h..-img.tif",
    ("trainset", "--masks"): "instance masks, named {SN}-x.._y.._w.._h..-mask.tif; "
    "paired with the images by patch name",
    ("trainset", "--out"): "training-set table (TSV; its summary JSON is written beside it)",
    ("trainset", "--seed"): "seed of the split assignment [%(default)s]",
    ("fetch-pretrained", "--name"): "official model name (e.g. cyto3, 2D_versatile_fluo)",
    ("fetch-pretrained", "--out"): "where to put the weights in the model cache",
    ("pretrained-card", "--name"): "model name written in the card",
    ("train-base", "--name"): "base model name",
    ("train-base", "--n-images"): "number of synthetic training images [%(default)s]",
    ("train-base", "--size"): "side of each synthetic image (px) [%(default)s]",
    ("finetune", "--pretrained-card"): "card.json of the pretrained model (fine-tuning always starts from it)",
    ("finetune", "--name"): "model name written in the fine-tuned card",
    ("evaluate", "--out"): "per-image metrics table (CSV)",
    ("summarize", "--inputs"): "per-image evaluation tables (CSV)",
    ("summarize", "--out"): "summary table (CSV)",
    ("threshold-sweep", "--out"): "mean F1 per threshold combination (CSV)",
    ("rank-candidates", "--metric"): "column of the per-image tables to rank by [%(default)s]",
    ("rank-candidates", "--out"): "ranking (CSV)",
    ("plot-evaluation", "--mode"): "metrics mode to plot (standard, partial, paper) [%(default)s]",
    ("overlays", "--title"): "figure title prefix",
    ("overlays", "--out-dir"): "output folder (created whole) of the overlay PNGs",
    ("loss-curves", "--out"): "figure (PNG)",
    ("complexity", "--out"): "complexity table (CSV)",
    ("learning-curve-subset", "--out"): "the subset as a training-set table (TSV)",
    ("learning-curve", "--out"): "learning-curve table (CSV)",
    ("learning-curve", "--png"): "learning-curve figure (PNG)",
    ("annotate-next-predict", "--size"): "candidate patch side (px) [%(default)s]",
    ("annotate-next-predict", "--step"): "step between candidate patches (px) [%(default)s]",
    ("annotate-next", "--top-n"): "how many patches to propose [%(default)s]",
    ("annotate-next", "--complexity-weight"): "weight of tissue complexity against model disagreement [%(default)s]",
    ("segment-shard", "--shard"): "shard number in the plan (0-based)",
    ("cgef", "--writer"): "exact: our writer of gefpy's cgef layout; gefpy: gefpy's generate_cgef [%(default)s]",
    ("cgef", "--labels"): "whole-slide labels (uint32 OME-TIFF from `stitch`)",
    ("cgef", "--cgef"): "output cell-bin GEF (.cgef)",
    ("h5ad", "--cgef"): "cell-bin GEF written by `segrefine cgef`",
    ("h5ad", "--cellmap"): "its cell table (cellmap.csv written by `segrefine cgef`)",
    ("h5ad", "--out"): "AnnData (.h5ad): one row per cell, label_id and centre in obs",
    ("expression-qc", "--cellmaps"): "cell tables (cellmap.csv) written by `segrefine cgef`",
    ("expression-qc", "--out-dir"): "output folder: cells.csv, summary.csv, extreme_area.csv, distributions.png",
}
OPTION_HELP = {
    "--out": "output file",
    "--out-dir": "output folder",
    "--seed": "random seed [%(default)s]",
    "--slide": "whole-slide image (TIFF/OME-TIFF/NDPI/SVS; read region by region)",
    "--sn": "chip serial number (prefix of the patch names)",
    "--card": "model card (card.json) of a saved model",
    "--trainset": "training-set table (TSV written by `segrefine trainset`)",
    "--framework": "model framework (cellpose, cpsam, stardist, unet, classical)",
    "--params": "hyperparameters as a JSON object [%(default)s]",
    "--split": "split of the training set to use [%(default)s]",
    "--iou-threshold": "IoU at which a predicted cell matches a true one [%(default)s]",
    "--min-size": "ignore objects smaller than this (pixels) [%(default)s]",
    "--val-fraction": "fraction of patches in the validation split [%(default)s]",
    "--test-fraction": "fraction of patches in the test split [%(default)s]",
    "--shards": "number of shards (one per GPU) [%(default)s]",
    "--pixel-size-um": "pixel size in micrometres",
    "--halo-unit": "unit of --halo: px or um (needs --pixel-size-um) [%(default)s]",
    "--plan": "tile plan (TSV written by `segrefine tile-plan`)",
    "--tiles-dir": "folder of the per-tile results",
    "--threads": "threads [%(default)s]",
}


def _fill_help(ap: argparse.ArgumentParser) -> None:
    """Give every option without a help text its text from the tables above (a test checks none is left without)."""
    for name, p in ap._subparsers._group_actions[0].choices.items():
        for action in p._actions:
            if action.help is None and action.option_strings:
                opt = max(action.option_strings, key=len)
                action.help = STEP_OPTION_HELP.get((name, opt)) or OPTION_HELP.get(opt)


# --- errors -----------------------------------------------------------------------------------------------------------
# the options that name a step's outputs (the default for every step, then per step), to name the file of a write error
# that carries no file name (a full disk under tifffile or pandas)
OUTPUT_OPTIONS = ("out", "out_dir", "out_json")
STEP_OUTPUTS = {
    "stitch": ("labels", "cells", "parquet", "geojson", "overlay", "report"),
    "cgef": ("cgef", "cellmap"),
    "cells": ("out", "report"),
    "spatialdata": ("out", "png"),
    "evaluate": ("out", "predictions"),
    "summarize": ("out", "long", "xlsx"),
    "plot-evaluation": ("out", "stats"),
    "complexity": ("out", "joined"),
    "learning-curve": ("out", "png"),
    "annotate-next": ("out", "geojson", "out_dir"),
    "preannotate": ("out_dir", "archive"),
}
_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file size limit or file system)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (failing disk or network file system)",
}
# h5py (HDF5) and other C libraries put the OS error in the message: "..., name = 'x.h5', errno = 28, ..."
_H5_ERRNO = re.compile(r"errno\s*=\s*(\d+)")
_H5_NAME = re.compile(r"(?:file)?name\s*=\s*'([^']*)'")


def _step_outputs(args) -> List[str]:
    keys = STEP_OUTPUTS.get(args.step, OUTPUT_OPTIONS)
    out = []
    for key in keys:
        value = getattr(args, key, None)
        if value:
            out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return out


def _free_space(path: str) -> str:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(str(p))
    except OSError:
        return ""
    return f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free on the device of {p}"


_TEMP_NAME = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.part")  # segrefine.io.atomic_path's temporary files
_TEMP_DIR = re.compile(r"(^|/)(tmp[a-z0-9_]{8}|\.[\w.-]+\.[a-z0-9_]{8}|\.stitch-[a-z0-9_]{8})/")  # mkdtemp's folders
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def os_error_message(exc: BaseException, args) -> Optional[str]:
    """One line naming the file and the problem for an OS-level failure (full disk, read-only or unwritable folder,
    quota, missing file), raised directly or through h5py/HDF5, tifffile or pandas; None for any other exception."""
    chain, seen = [], set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:  # the error itself, then what caused it
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        is_os = isinstance(e, OSError)
        code = e.errno if is_os else None
        name = e.filename if is_os else None
        text = str(e)
        if code is None:
            m = _H5_ERRNO.search(text)
            code = int(m.group(1)) if m else None
        if code is None and is_os and _SHORT_WRITE.search(text):  # numpy's tofile on a full disk says only this
            code = errno.ENOSPC
        if code is None or (not is_os and code not in _PROBLEMS):
            continue
        if not name:
            m = _H5_NAME.search(text)
            name = m.group(1) if m else None
        outputs = _step_outputs(args)
        where = ", ".join(outputs) or "the step's outputs"
        if name:
            name = str(name)
            m = _TEMP_NAME.match(Path(name).name)
            name = str(Path(name).parent / m.group(1)) if m else name  # the file it was to become
            # inside a temporary folder: name the outputs
            where = f"{where} (temporary file {name})" if _TEMP_DIR.search(name) and outputs else name
        problem = _PROBLEMS.get(code) or os.strerror(code)
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = _free_space(name or (outputs or ["."])[0])
            return (
                f"{where}: cannot write: {problem}"
                + (f" ({free})" if free else "")
                + "; no partial file is left under a final name: free space and rerun"
            )
        if code == errno.EROFS:
            return f"{where}: cannot write: {problem}; choose an output folder on a writable file system and rerun"
        if code in (errno.EACCES, errno.EPERM):
            return (
                f"{where}: {problem}; make it readable (an input) or its folder writable (an output) for this "
                "user and rerun"
            )
        return f"{where}: {problem}"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except SegRefineError as exc:
        print(f"segrefine {args.step}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an OS-level failure (full disk, read-only folder) as one line; anything else is a bug
        message = os_error_message(exc, args)
        if message is None:
            raise
        print(f"segrefine {args.step}: error: {message}", file=sys.stderr)
        if argv is not None:  # called from Python
            return 1
        sys.stdout.flush()
        sys.stderr.flush()
        # on the command line, leave at once: the temporary files are already removed, and a library's teardown
        # after a failed write can crash (stereopy/HDF5 after a full disk: a segmentation fault replacing status 1)
        os._exit(1)
    return 0
