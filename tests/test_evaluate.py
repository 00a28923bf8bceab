"""Evaluation steps: per-image tables in every mode, summary / long table / xlsx, box plots
with paired Wilcoxon tests, overlays and loss curves (classical model on real crops)."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from conftest import run_step
from segrefine import SegRefineError
from segrefine.evaluate import long_table, summarize
from segrefine.evaluation_plots import loss_curves, overlay_rgb, paired_tests


@pytest.fixture(scope="module")
def evaluated(real_trainset, tmp_path_factory):
    """The classical model's pretrained card, evaluated on the test split in all three modes."""
    d = tmp_path_factory.mktemp("eval")
    run_step(
        "core",
        "pretrained-card",
        "--framework",
        "classical",
        "--name",
        "base",
        "--source",
        "none",
        "--out-dir",
        d / "card",
    )
    run_step(
        "core",
        "evaluate",
        "--card",
        d / "card" / "card.json",
        "--trainset",
        real_trainset,
        "--split",
        "test",
        "--modes",
        "standard",
        "partial",
        "paper",
        "--min-size",
        4,
        "--predictions",
        d / "pred.npz",
        "--out",
        d / "per_image.csv",
    )
    return d


def test_evaluate_writes_every_mode_and_the_predictions(evaluated, real_trainset):
    df = pd.read_csv(evaluated / "per_image.csv")
    assert sorted(df["mode"]) == ["paper", "partial", "standard"]  # one test patch, three modes
    std = df[df["mode"] == "standard"].iloc[0]
    assert std["min_size"] == 4 and std["stage"] == "pretrained"
    assert 0 < std["f1"] <= 1 and 0 <= std["ap_mean"] <= std["ap_50"]
    assert std["ap_50"] == pytest.approx(std["ap"])
    paper = df[df["mode"] == "paper"].iloc[0]
    assert {"merges", "splits", "catastrophes"} <= set(df.columns) and paper["tp"] >= 0
    with np.load(evaluated / "pred.npz") as z:
        assert z.files == [std["image"]] and z[std["image"]].dtype == np.uint32


def test_summary_long_table_and_xlsx(evaluated, tmp_path):
    # a second stage from the same table, so the summary has both rows
    df = pd.read_csv(evaluated / "per_image.csv")
    fin = df.assign(stage="finetuned")
    fin.to_csv(tmp_path / "fin.csv", index=False)
    summary = summarize(
        [evaluated / "per_image.csv", tmp_path / "fin.csv"],
        tmp_path / "summary.csv",
        tmp_path / "long.csv",
        tmp_path / "metrics.xlsx",
    )
    assert list(summary.columns[:4]) == ["model", "stage", "mode", "n_images"]
    assert list(summary["stage"]) == ["pretrained"] * 3 + ["finetuned"] * 3  # before, then after
    assert list(summary["mode"]) == ["paper", "partial", "standard"] * 2
    long = pd.read_csv(tmp_path / "long.csv")
    assert list(long.columns) == ["model", "stage", "image", "mode", "metric", "value"]
    assert not long["value"].isna().any()
    # paper mode defines no AP sweep: those rows are absent, not NaN
    assert "ap_75" not in set(long[long["mode"] == "paper"]["metric"])
    f1 = long[(long["metric"] == "f1") & (long["mode"] == "standard") & (long["stage"] == "pretrained")]
    assert f1["value"].iloc[0] == pytest.approx(df[df["mode"] == "standard"]["f1"].iloc[0])
    sheets = pd.read_excel(tmp_path / "metrics.xlsx", sheet_name=None)
    assert set(sheets) == {"summary", "per_image", "definitions"}
    assert len(sheets["per_image"]) == len(long)
    assert "NOT the area under a precision-recall curve" in " ".join(sheets["definitions"]["definition"])


def test_paired_wilcoxon_equals_scipy_on_the_same_pairs():
    rng = np.random.default_rng(0)
    before, after = rng.uniform(0.3, 0.7, 8), rng.uniform(0.5, 0.9, 8)
    rows = [
        {"model": "m", "stage": s, "image": f"p{k}", "mode": "standard", "metric": "f1", "value": v}
        for s, vals in (("pretrained", before), ("finetuned", after))
        for k, v in enumerate(vals)
    ]
    stats = paired_tests(pd.DataFrame(rows))
    assert len(stats) == 1
    r = stats.iloc[0]
    assert r["n_images"] == 8 and r["wilcoxon_p"] == pytest.approx(wilcoxon(after, before).pvalue)
    assert r["mean_difference"] == pytest.approx((after - before).mean())


def test_boxplots_and_stats_through_the_step(tmp_path):
    rows = [
        {
            "model": m,
            "stage": s,
            "image": f"p{k}",
            "mode": "standard",
            "metric": metric,
            "value": 0.5 + 0.1 * k * (s == "finetuned") + 0.01 * j,
        }
        for m in ("a", "b")
        for s in ("pretrained", "finetuned")
        for k in range(4)
        for j, metric in enumerate(["f1", "precision"])
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "long.csv", index=False)
    run_step(
        "core",
        "plot-evaluation",
        "--long",
        tmp_path / "long.csv",
        "--out",
        tmp_path / "box.png",
        "--stats",
        tmp_path / "stats.csv",
    )
    assert (tmp_path / "box.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = pd.read_csv(tmp_path / "stats.csv")
    assert len(stats) == 4 and list(stats["mean_difference"]) == pytest.approx([0.15] * 4)
    proc = run_step(
        "core",
        "plot-evaluation",
        "--long",
        tmp_path / "long.csv",
        "--mode",
        "paper",
        "--out",
        tmp_path / "p.png",
        "--stats",
        tmp_path / "p.csv",
        check=False,
    )
    assert proc.returncode == 1 and "no values in mode 'paper'" in proc.stderr


def test_overlay_colours_mark_tp_fp_fn():
    truth = np.zeros((30, 30), np.int32)
    truth[2:10, 2:10], truth[15:25, 15:25] = 1, 2
    pred = np.zeros_like(truth)
    pred[2:10, 2:10] = 5  # TP
    pred[2:8, 20:28] = 6  # FP; truth 2 is missed (FN)
    rgb, n = overlay_rgb(np.zeros((30, 30), np.uint16), truth, pred)
    assert n == {"tp": 1, "fp": 1, "fn": 1}
    assert tuple(rgb[2, 5]) == (0, 158, 255)  # TP prediction outline
    assert tuple(rgb[2, 22]) == (255, 140, 0)  # FP prediction outline
    assert tuple(rgb[15, 20]) == (230, 0, 230)  # FN truth outline
    assert tuple(rgb[5, 5]) == (0, 0, 0)  # inside: the image


def test_overlays_step_writes_one_png_per_patch(evaluated, real_trainset):
    run_step(
        "core",
        "overlays",
        "--predictions",
        evaluated / "pred.npz",
        "--trainset",
        real_trainset,
        "--title",
        "base (pretrained)",
        "--out-dir",
        evaluated / "overlays",
    )
    pngs = sorted((evaluated / "overlays").glob("*.png"))
    with np.load(evaluated / "pred.npz") as z:
        assert [p.stem for p in pngs] == sorted(z.files)
    assert not [p for p in evaluated.iterdir() if p.name.startswith(".overlays")]  # no temporary folder left


def test_loss_curves(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"train_loss": [3, 2, 1], "val_loss": [2.5, 1.5], "val_epoch": [0, 2]}))
    (tmp_path / "b.json").write_text(json.dumps({"train_loss": [1.0], "val_loss": [], "val_epoch": []}))
    loss_curves({"a": tmp_path / "a.json", "b": tmp_path / "b.json"}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    (tmp_path / "c.json").write_text("{broken")
    with pytest.raises(SegRefineError, match="c.json: cannot read the losses of c"):
        loss_curves({"c": tmp_path / "c.json"}, tmp_path / "x.png")


def test_bad_evaluation_inputs(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SegRefineError, match=r"x.csv: not a per-image evaluation table"):
        summarize([tmp_path / "x.csv"], tmp_path / "s.csv")
    per_image = pd.DataFrame(
        [{"model": "m", "stage": "pretrained", "image": "p", "mode": "paper", "f1": 0.5, "ap_75": np.nan, "notes": "x"}]
    )
    assert list(long_table(per_image)["metric"]) == ["f1"]


def test_zero_shot_screening_ranks_by_mean_f1(real_trainset, evaluated, tmp_path):
    run_step(
        "core",
        "evaluate",
        "--card",
        evaluated / "card" / "card.json",
        "--trainset",
        real_trainset,
        "--split",
        "all",
        "--out",
        tmp_path / "base.csv",
    )
    base = pd.read_csv(tmp_path / "base.csv")
    assert len(base) == len(pd.read_csv(real_trainset, sep="\t"))  # every annotated patch
    other = base.assign(model="other", f1=base["f1"] / 2)
    other.to_csv(tmp_path / "other.csv", index=False)
    run_step(
        "core",
        "rank-candidates",
        "--inputs",
        tmp_path / "other.csv",
        tmp_path / "base.csv",
        "--out",
        tmp_path / "ranking.csv",
    )
    ranking = pd.read_csv(tmp_path / "ranking.csv")
    assert list(ranking["model"]) == ["base", "other"] and list(ranking["rank"]) == [1, 2]
    assert ranking["f1"].iloc[0] == pytest.approx(base["f1"].mean(), abs=1e-4)
    assert (ranking["n_images"] == len(base)).all() and (ranking["mode"] == "standard").all()


@pytest.mark.slow
def test_threshold_sweep_of_a_cellpose_model(real_trainset, tmp_path):
    run_step(
        "cellpose",
        "pretrained-card",
        "--framework",
        "cellpose",
        "--name",
        "cp",
        "--source",
        "none",
        "--out-dir",
        tmp_path / "cp",
    )
    grid = json.dumps({"flow_threshold": [0.4, 0.8], "cellprob_threshold": [0.0, 1.0]})
    run_step(
        "cellpose",
        "threshold-sweep",
        "--card",
        tmp_path / "cp" / "card.json",
        "--trainset",
        real_trainset,
        "--split",
        "val",
        "--grid",
        grid,
        "--out",
        tmp_path / "sweep.csv",
    )
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    assert len(sweep) == 4 and set(sweep["flow_threshold"]) == {0.4, 0.8}
    assert sweep["best"].sum() == 1 and sweep.loc[sweep["best"], "f1"].iloc[0] == sweep["f1"].max()
    # the card's own thresholds (cellpose defaults 0.4 / 0.0) are marked
    assert list(sweep.loc[sweep["current"], ["flow_threshold", "cellprob_threshold"]].iloc[0]) == [0.4, 0.0]


@pytest.mark.slow
def test_threshold_sweep_of_a_unet_model(real_trainset, tmp_path):
    """The U-Net's thresholds (FRAMEWORKS["unet"]) are swept like Cellpose's: probability and watershed seeds."""
    run_step(
        "tensorflow",
        "pretrained-card",
        "--framework",
        "unet",
        "--name",
        "u",
        "--source",
        "none",
        "--out-dir",
        tmp_path / "u",
    )
    grid = json.dumps({"prob_thresh": [0.4, 0.5], "min_distance": [3]})
    run_step(
        "tensorflow",
        "threshold-sweep",
        "--card",
        tmp_path / "u" / "card.json",
        "--trainset",
        real_trainset,
        "--split",
        "val",
        "--grid",
        grid,
        "--out",
        tmp_path / "sweep.csv",
    )
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    assert len(sweep) == 2 and set(sweep["framework"]) == {"unet"} and set(sweep["prob_thresh"]) == {0.4, 0.5}
    assert sweep["best"].sum() == 1
    # the card's own thresholds (the U-Net's defaults 0.5 / 3) are marked
    assert list(sweep.loc[sweep["current"], ["prob_thresh", "min_distance"]].iloc[0]) == [0.5, 3]
