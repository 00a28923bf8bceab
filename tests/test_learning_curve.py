"""Learning curve: nested, seeded subsets of the training split; the steps by CLI with the classical
model on real crops; the rules in a dry run with the learning curve turned on."""

import json
import os
import shutil
import subprocess

import pandas as pd
import pytest

from conftest import REPO, SCRIPTS, make_real_trainset, run_step
from segrefine import SegRefineError
from segrefine.envs import env_python
from segrefine.learning_curve import parse_label, select_subset, subset_labels, train_order


def _rows(n_train=10):
    rows = [{"patch": f"S1-x{64 * k}_y0_w64_h64", "split": "train", "n_cells": 10 + k} for k in range(n_train)]
    rows += [
        {"patch": "S1-x0_y640_w64_h64", "split": "val", "n_cells": 5},
        {"patch": "S1-x64_y640_w64_h64", "split": "test", "n_cells": 7},
    ]
    return rows


def test_subsets_are_nested_deterministic_and_sized():
    rows = _rows()
    labels = ["f0.1", "f0.25", "f0.5", "c60", "f1"]
    subsets = {lab: [r["patch"] for r in select_subset(rows, lab, seed=3)] for lab in labels}
    assert [len(subsets[lab]) for lab in ("f0.1", "f0.25", "f0.5", "f1")] == [1, 2, 5, 10]  # round(f * 10), >= 1
    order = [r["patch"] for r in train_order(rows, 3)]
    for patches in subsets.values():
        assert patches == order[: len(patches)]  # every subset is a prefix of one order: nested
    cells = [r["n_cells"] for r in train_order(rows, 3)]
    n = len(subsets["c60"])
    assert sum(cells[:n]) >= 60 > sum(cells[: n - 1])  # the fewest patches reaching 60 cells
    assert all(r["split"] == "train" for lab in labels for r in select_subset(rows, lab, 3))
    # deterministic: the same seed gives the same subsets, input order does not matter; another seed reorders
    assert [r["patch"] for r in select_subset(rows[::-1], "f0.5", 3)] == subsets["f0.5"]
    assert [r["patch"] for r in train_order(rows, 4)] != order
    # more cells than the split holds: all training patches
    assert len(select_subset(rows, "c100000", 3)) == 10


def test_subset_labels_and_bad_sizes():
    assert subset_labels([0.25, 1.0], [300]) == ["f0.25", "f1", "c300"]
    assert parse_label("f0.25") == ("fraction", 0.25) and parse_label("c300") == ("cells", 300)
    for bad in ("f0", "f1.5", "c0", "x3", "cabc"):
        with pytest.raises(SegRefineError, match="learning-curve subset"):
            parse_label(bad)
    with pytest.raises(SegRefineError, match="fraction 1.5"):
        subset_labels([1.5])
    with pytest.raises(SegRefineError, match="no training patches"):
        select_subset([r for r in _rows() if r["split"] != "train"], "f1", 0)


@pytest.fixture(scope="module")
def real_trainset6(realdata, tmp_path_factory):
    """Six real ssDNA / DAPI crops (binary masks -> instances): three training patches."""
    return make_real_trainset(tmp_path_factory.mktemp("lc_real"), realdata, ["ssDNA", "DAPI"] * 3, 0.2, 0.2)


@pytest.mark.slow
def test_learning_curve_steps_by_cli(real_trainset6, tmp_path):
    """Subsets, fine-tuning from the pretrained card, test evaluation and the table, with the classical model."""
    d, real_trainset = tmp_path, real_trainset6
    full = pd.read_csv(real_trainset, sep="\t")
    n_train = int((full["split"] == "train").sum())
    assert n_train >= 2
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
        "paper",
        "--out",
        d / "pretrained.csv",
    )
    labels = ["f0.5", "f1"]
    for lab in labels:
        run_step(
            "core",
            "learning-curve-subset",
            "--trainset",
            real_trainset,
            "--subset",
            lab,
            "--seed",
            1,
            "--out",
            d / "subsets" / f"{lab}.tsv",
        )
        run_step(
            "core",
            "finetune",
            "--pretrained-card",
            d / "card" / "card.json",
            "--trainset",
            d / "subsets" / f"{lab}.tsv",
            "--name",
            "base",
            "--out-dir",
            d / lab / "model",
        )
        run_step(
            "core",
            "evaluate",
            "--card",
            d / lab / "model" / "card.json",
            "--trainset",
            d / "subsets" / f"{lab}.tsv",
            "--split",
            "test",
            "--modes",
            "standard",
            "paper",
            "--out",
            d / lab / "test.csv",
        )
    small, whole = (pd.read_csv(d / "subsets" / f"{lab}.tsv", sep="\t") for lab in labels)
    assert set(small[small["split"] == "train"]["patch"]) < set(whole[whole["split"] == "train"]["patch"])
    assert whole["patch"].tolist() == full["patch"].tolist()  # f1 keeps every row
    for sub in (small, whole):  # validation and test rows unchanged
        assert (
            sub[sub["split"] != "train"]
            .reset_index(drop=True)
            .equals(full[full["split"] != "train"].reset_index(drop=True))
        )
    summaries = [json.loads((d / "subsets" / f"{lab}.json").read_text()) for lab in labels]
    assert summaries[0]["version"] != summaries[1]["version"]
    cards = [json.loads((d / lab / "model" / "card.json").read_text()) for lab in labels]
    assert [c["trainset_version"] for c in cards] == [s["version"] for s in summaries]
    assert all(c["stage"] == "finetuned" and c["source"]["card"] == str(d / "card" / "card.json") for c in cards)

    proc = run_step(
        "core",
        "learning-curve",
        "--evaluations",
        *[d / lab / "test.csv" for lab in labels],
        "--subsets",
        *[d / "subsets" / f"{lab}.tsv" for lab in labels],
        "--pretrained",
        d / "pretrained.csv",
        "--out",
        d / "lc.csv",
        "--png",
        d / "lc.png",
    )
    table = pd.read_csv(d / "lc.csv")
    assert list(table.columns) == [
        "model",
        "subset",
        "n_patches",
        "n_cells",
        "n_test_images",
        "f1",
        "precision",
        "recall",
        "mode",
    ]
    std = table[table["mode"] == "standard"].set_index("subset")
    assert list(std.index) == ["pretrained", "f0.5", "f1"]  # by number of cells
    assert std.loc["pretrained", "n_cells"] == 0
    assert std.loc["f1", "n_patches"] == n_train
    assert std.loc["f1", "n_cells"] == full[full["split"] == "train"]["n_cells"].sum()
    assert std.loc["f0.5", "n_cells"] == summaries[0]["cells"]["train"]
    for lab in ["pretrained"] + labels:  # the means of the per-image tables
        src = d / "pretrained.csv" if lab == "pretrained" else d / lab / "test.csv"
        per_image = pd.read_csv(src)
        assert std.loc[lab, "f1"] == pytest.approx(per_image[per_image["mode"] == "standard"]["f1"].mean(), abs=1e-4)
    assert (d / "lc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pretrained" in proc.stdout

    bad = run_step(
        "core",
        "learning-curve",
        "--evaluations",
        d / "missing.csv",
        "--subsets",
        d / "subsets" / "f1.tsv",
        "--out",
        d / "x.csv",
        check=False,
    )
    assert bad.returncode != 0 and "missing.csv: evaluation table not found" in bad.stderr


def _dry_run(workdir, configfile, *args):
    """`snakemake -n` of the workflow in ``workdir`` with ``configfile``: the process, output in stdout."""
    return subprocess.run(
        [
            str(env_python("core")),
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "--configfile",
            configfile,
            *args,
            "-n",
        ],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
    )


@pytest.mark.integration
def test_dry_run_with_the_learning_curve_and_annotate_next_on(tmp_path):
    """The rules resolve with the learning curve and "annotate next" activated in a copy of the test
    config (dry run)."""
    for f in (REPO / "config" / "test").iterdir():
        shutil.copy(f, tmp_path / f.name)
    run_step(
        "core",
        "demo-data",
        "--out",
        tmp_path / "demo",
        "--sn",
        "TINY01",
        "--size",
        384,
        "--patches",
        6,
        "--patch-size",
        96,
    )
    text = (tmp_path / "config.yaml").read_text()
    assert "learning_curve" not in text and "annotate_next" not in text  # off in the integration test config
    (tmp_path / "lc.yaml").write_text(
        text + "  learning_curve: {activate: true, fractions: [0.5, 1.0], cells: [50], "
        "models: [baseline, tiny]}\n"
        "  annotate_next: {activate: true, size: 96, step: 48, top_n: 3}\n"
    )
    proc = _dry_run(tmp_path, "lc.yaml", "--cores", "2", "--resources", "gpu=1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    stats = proc.stdout.split("Job stats:")[-1]
    counts = {
        line.split()[0]: int(line.split()[1])
        for line in stats.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    # 3 subsets, shared by 2 models: 3 subset tables, 6 fine-tunings and evaluations, one table
    assert counts["learning_curve_subset"] == 3 and counts["learning_curve"] == 1
    assert counts["learning_curve_finetune"] == 6 and counts["learning_curve_evaluate"] == 6
    # annotate next: the segmentation model (tiny) pretrained and fine-tuned on the one sample, one ranking
    assert counts["annotate_next_predict"] == 2 and counts["annotate_next"] == 1

    (tmp_path / "bad.yaml").write_text(text + "  learning_curve: {activate: true, models: [nosuch]}\n")
    proc = _dry_run(tmp_path, "bad.yaml", "--cores", "1")
    assert proc.returncode != 0 and "learning_curve.models ['nosuch']" in proc.stdout
    (tmp_path / "bad2.yaml").write_text(text + "  annotate_next: {activate: true, stages: [finetuned]}\n")
    proc = _dry_run(tmp_path, "bad2.yaml", "--cores", "1")
    assert proc.returncode != 0 and "at least two predictions" in proc.stdout
