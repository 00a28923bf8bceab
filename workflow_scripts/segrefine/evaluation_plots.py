"""The figures of the evaluation: before/after box plots with paired Wilcoxon tests,
per-patch overlays (TP / FP / FN), and the loss curves of every fine-tuning run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

log = logging.getLogger("segrefine.evaluation_plots")

BOX_METRICS = ["precision", "recall", "f1", "jaccard", "dice", "ap_mean", "pq"]
# overlay colours (RGB): distinct for colour-blind readers too (blue / orange / magenta / white)
COLOURS = {"tp": (0, 158, 255), "fp": (255, 140, 0), "fn": (230, 0, 230), "truth": (255, 255, 255)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi=110):
    from segrefine.io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _pyplot().close(fig)


def paired_tests(long, mode: str = "standard", metrics: Sequence[str] = BOX_METRICS):
    """Per model and metric: paired (by image) pretrained vs finetuned values, their means and the
    two-sided Wilcoxon signed-rank p-value (NaN with fewer than one non-zero difference)."""
    import pandas as pd
    from scipy.stats import wilcoxon

    d = long[(long["mode"] == mode) & long["metric"].isin(metrics)]
    rows = []
    for (model, metric), g in d.groupby(["model", "metric"], sort=True):
        wide = g.pivot_table(index="image", columns="stage", values="value", aggfunc="first")
        if not {"pretrained", "finetuned"} <= set(wide.columns):
            continue
        wide = wide.dropna(subset=["pretrained", "finetuned"])
        diff = wide["finetuned"] - wide["pretrained"]
        p = float("nan")
        if (diff != 0).sum() >= 1:
            p = float(wilcoxon(wide["finetuned"], wide["pretrained"], zero_method="wilcox").pvalue)
        rows.append(
            {
                "model": model,
                "mode": mode,
                "metric": metric,
                "n_images": len(wide),
                "pretrained_mean": wide["pretrained"].mean(),
                "finetuned_mean": wide["finetuned"].mean(),
                "mean_difference": diff.mean(),
                "wilcoxon_p": p,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "model",
            "mode",
            "metric",
            "n_images",
            "pretrained_mean",
            "finetuned_mean",
            "mean_difference",
            "wilcoxon_p",
        ],
    )


def boxplots(long_csv, out_png, out_stats_csv, mode: str = "standard") -> None:
    """One panel per model (row) and metric (column): pretrained vs finetuned per test image,
    paired lines, and the Wilcoxon signed-rank p-value in the title."""
    import pandas as pd

    from segrefine import SegRefineError
    from segrefine.io import atomic_path

    long = pd.read_csv(long_csv)
    if mode not in set(long["mode"]):
        raise SegRefineError(f"{long_csv}: no values in mode {mode!r} (modes: {sorted(set(long['mode']))})")
    stats = paired_tests(long, mode)
    with atomic_path(out_stats_csv) as tmp:
        stats.to_csv(tmp, index=False, float_format="%.6g")
    d = long[long["mode"] == mode]
    models = sorted(d["model"].unique())
    metrics = [m for m in BOX_METRICS if m in set(d["metric"])]
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(models), len(metrics), figsize=(1.9 * len(metrics) + 0.6, 2.5 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            g = d[(d["model"] == model) & (d["metric"] == metric)]
            wide = g.pivot_table(index="image", columns="stage", values="value", aggfunc="first")
            stages = [s for s in ("pretrained", "finetuned") if s in wide]
            ax.boxplot([wide[s].dropna().values for s in stages], widths=0.5)
            ax.set_xticks(
                range(1, len(stages) + 1), ["before" if s == "pretrained" else "after" for s in stages], fontsize=8
            )
            if len(stages) == 2:
                for _, r in wide.dropna().iterrows():
                    ax.plot([1, 2], [r["pretrained"], r["finetuned"]], color="0.6", lw=0.6, zorder=0)
            hit = stats[(stats["model"] == model) & (stats["metric"] == metric)]
            p = hit["wilcoxon_p"].iloc[0] if len(hit) else float("nan")
            ax.set_title(f"{metric}\np = {p:.3g}" if p == p else f"{metric}\np = n/a", fontsize=8)
            ax.set_ylim(-0.03, 1.03)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel(model, fontsize=9)
    fig.suptitle(f"before vs after fine-tuning, per test patch ({mode} mode; paired Wilcoxon signed-rank)", fontsize=9)
    fig.tight_layout()
    _save(fig, out_png)


def _normalize(image: np.ndarray) -> np.ndarray:
    """RGB float in [0, 1] from a gray or RGB patch (1st-99.8th percentile stretch)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] not in (3, 4) and img.shape[0] in (1, 2, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3:
        img = img[..., :3] if img.shape[-1] >= 3 else img.mean(axis=-1)
    lo, hi = np.percentile(img, [1, 99.8])
    img = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img


def overlay_rgb(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5):
    """(RGB uint8 overlay, counts): prediction outlines blue where matched (TP) and orange where
    unmatched (FP); unmatched true cells (FN) outlined magenta; matched true cells thin white."""
    from skimage.segmentation import find_boundaries, relabel_sequential

    from segrefine.metrics import iou_matrix, match_pairs

    t = relabel_sequential(np.asarray(truth).astype(np.int64))[0]
    p = relabel_sequential(np.asarray(pred).astype(np.int64))[0]
    rows, cols = match_pairs(iou_matrix(t, p), threshold)
    tp_t, tp_p = np.isin(t, rows + 1) & (t > 0), np.isin(p, cols + 1) & (p > 0)
    out = (_normalize(image) * 255).astype(np.uint8)
    t_edge = find_boundaries(t, mode="inner")
    p_edge = find_boundaries(p, mode="inner")
    out[t_edge & tp_t] = COLOURS["truth"]
    out[t_edge & ~tp_t & (t > 0)] = COLOURS["fn"]
    out[p_edge & tp_p] = COLOURS["tp"]
    out[p_edge & ~tp_p & (p > 0)] = COLOURS["fp"]
    counts = {"tp": len(rows), "fp": int(p.max()) - len(rows), "fn": int(t.max()) - len(rows)}
    return out, counts


def overlays(predictions_npz, trainset_path, out_dir, title: str, threshold: float = 0.5) -> int:
    """One PNG per evaluated patch (the patches in ``predictions_npz``), written into ``out_dir``
    (created whole: a temporary folder renamed at the end)."""
    import shutil

    from matplotlib.patches import Patch

    from segrefine import SegRefineError
    from segrefine.io import new_work_dir, read_tiff
    from segrefine.trainset import read_trainset

    rows = {r["patch"]: r for r in read_trainset(trainset_path)}
    out_dir = Path(out_dir)
    work = new_work_dir(out_dir.parent, f".{out_dir.name}.")  # after removing the work folders of killed runs
    plt = _pyplot()
    try:
        with np.load(predictions_npz) as preds:
            names = sorted(preds.files)
            for name in names:
                if name not in rows:
                    raise SegRefineError(f"{predictions_npz}: patch {name} is not in {trainset_path}")
                r = rows[name]
                truth = read_tiff(r["mask"])
                pred = preds[name]
                if truth.shape != pred.shape:
                    raise SegRefineError(
                        f"{r['mask']}: ground truth {truth.shape} and prediction {pred.shape} differ in shape"
                    )
                rgb, n = overlay_rgb(read_tiff(r["image"]), truth, pred, threshold)
                h, w = rgb.shape[:2]
                fig, ax = plt.subplots(figsize=(max(3.4, w / 90), max(3.4, h / 90) + 1.0))
                ax.imshow(rgb, interpolation="nearest")
                ax.set_axis_off()
                ax.set_title(
                    f"{title}\n{name}\nTP {n['tp']}  FP {n['fp']}  FN {n['fn']} (IoU >= {threshold})", fontsize=7
                )
                handles = [
                    Patch(facecolor=np.array(COLOURS[k]) / 255, edgecolor="0.3", label=lab)
                    for k, lab in (
                        ("tp", "TP prediction"),
                        ("fp", "FP prediction"),
                        ("fn", "FN (missed) truth"),
                        ("truth", "matched truth"),
                    )
                ]
                ax.legend(
                    handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=6, frameon=False
                )
                fig.tight_layout()
                fig.savefig(work / f"{name}.png", dpi=110, format="png")
                plt.close(fig)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log.info("%d overlays -> %s", len(names), out_dir)
    return len(names)


def loss_curves(losses: Dict[str, str], out_png) -> None:
    """All fine-tuning runs' training and validation losses, one panel per model."""
    from segrefine import SegRefineError

    if not losses:
        raise SegRefineError("no fine-tuning run to plot")
    plt = _pyplot()
    n = len(losses)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax, (name, path) in zip(axes.ravel(), sorted(losses.items())):
        try:
            curve = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SegRefineError(f"{path}: cannot read the losses of {name}: {exc}")
        tr = curve.get("train_loss") or []
        ax.plot(np.arange(len(tr)), tr, label="train")
        if curve.get("val_loss"):
            ax.plot(
                curve.get("val_epoch") or np.arange(len(curve["val_loss"])),
                curve["val_loss"],
                "o-",
                ms=3,
                label="validation",
            )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_png)
