"""Purity of a segmentation's expression: hand-built chips whose every cell's answer is known."""

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import run_step
from segrefine import SegRefineError
from segrefine.envs import env_python
from segrefine.purity import (
    _TRIPLE,
    cell_purity,
    check_markers,
    mecr_of_sets,
    read_truth_types,
    summarize_purity,
    truth_purity,
)

MARKERS = {"A": ["a1"], "B": ["b1"]}
ORIGIN = (100, 50)  # GEM coordinate of label pixel (0, 0)


def _truth():
    t = np.zeros((12, 16), np.uint32)
    t[0:4, 0:4] = 1  # type A
    t[0:4, 4:8] = 2  # type B, touching 1
    t[6:10, 0:4] = 3  # type A
    return t


def _segmentation():
    s = np.zeros((12, 16), np.uint32)
    s[0:4, 0:8] = 10  # true cells 1 and 2 merged
    s[6:10, 0:4] = 20  # true cell 3 exactly
    s[6:10, 10:14] = 30  # no true cell under it
    return s


def _chip(d):
    rows = [
        ("a1", 0, 0, 4),
        ("a1", 3, 3, 2),
        ("h", 1, 2, 3),  # true cell 1: 6 marker UMIs of its type A, 3 other
        ("b1", 5, 1, 1),  # true cell 2: 1 UMI (a marker of B)
        ("a1", 2, 7, 4),
        ("h", 0, 9, 1),  # true cell 3
        ("h", 11, 8, 2),  # background under segmented cell 30
        ("h", 15, 11, 5),
    ]  # background outside every cell
    text = "#OffsetX=-100\n#OffsetY=-50\ngeneID\tx\ty\tMIDCount\n" + "".join(
        f"{g}\t{x + ORIGIN[0]}\t{y + ORIGIN[1]}\t{n}\n" for g, x, y, n in rows
    )
    (d / "chip.gem").write_text(text)
    tifffile.imwrite(d / "truth.tif", _truth())
    tifffile.imwrite(d / "labels.tif", _segmentation())
    (d / "types.csv").write_text("label,type\n1,A\n2,B\n3,A\n")
    return d / "chip.gem", d / "labels.tif", d / "truth.tif", d / "types.csv"


@pytest.mark.parametrize("chunk,band_rows", [(None, None), (2, 3)])
def test_truth_purity_of_known_cells(tmp_path, chunk, band_rows):
    gem, labels, truth, types = _chip(tmp_path)
    table, s = truth_purity(
        gem,
        labels,
        truth,
        types,
        MARKERS,
        out_cells=tmp_path / "cells.csv",
        out_summary=tmp_path / "summary.json",
        chunk=chunk,
        band_rows=band_rows,
    )
    t = table.set_index("label_id")
    assert list(t.index) == [10, 20, 30]
    assert t.loc[10, "umis"] == 10 and t.loc[10, "dominant_truth"] == 1 and t.loc[10, "truth_type"] == "A"
    assert t.loc[10, "purity"] == pytest.approx(0.9) and t.loc[10, "second_fraction"] == pytest.approx(0.1)
    assert bool(t.loc[10, "mixed"])  # 1 UMI in 10 from true cell 2
    assert t.loc[10, "marker_umis"] == 7 and t.loc[10, "marker_purity"] == pytest.approx(6 / 7)
    assert t.loc[20, "umis"] == 5 and t.loc[20, "purity"] == 1.0 and not t.loc[20, "mixed"]
    assert t.loc[20, "marker_purity"] == 1.0
    assert t.loc[30, "dominant_truth"] == 0 and t.loc[30, "truth_type"] == "" and t.loc[30, "purity"] == 0.0
    assert t.loc[30, "background_fraction"] == 1.0 and np.isnan(t.loc[30, "marker_purity"])
    assert s["cells"] == 3 and s["cells_without_true_cell"] == 1
    assert s["mean_purity"] == pytest.approx((0.9 + 1 + 0) / 3)
    assert s["fraction_mixed"] == pytest.approx(1 / 3)
    assert s["mean_marker_purity"] == pytest.approx((6 / 7 + 1) / 2)
    assert json.loads((tmp_path / "summary.json").read_text())["cells"] == 3
    assert pd.read_csv(tmp_path / "cells.csv")["label_id"].tolist() == [10, 20, 30]


def test_a_merge_of_many_small_cells_is_mixed():
    """Twelve true cells of 1 UMI each in one segmented cell: no single neighbour reaches 10 %, all together do."""
    t = np.zeros(12, _TRIPLE)
    t["seg"], t["tru"], t["kind"], t["umis"] = 5, np.arange(1, 13), 0, 1
    table = cell_purity(t, {i: "A" for i in range(1, 13)}, [], 0.10)
    assert table.loc[0, "purity"] == pytest.approx(1 / 12) and table.loc[0, "second_fraction"] == pytest.approx(1 / 12)
    assert table.loc[0, "other_fraction"] == pytest.approx(11 / 12) and bool(table.loc[0, "mixed"])
    assert table.loc[0, "dominant_truth"] == 1  # ties go to the lower id
    assert summarize_purity(table)["fraction_mixed"] == 1.0


def test_mecr_of_known_marker_sets():
    present = {"a1": np.array([0, 1, 2, 3]), "a2": np.array([4]), "b1": np.array([3, 4, 5])}
    summary, pairs = mecr_of_sets(10, present, {"A": ["a1", "a2"], "B": ["b1", "b9"]})
    by = {(p["gene_a"], p["gene_b"]): p["mecr"] for p in pairs}
    assert by == {("a1", "b1"): pytest.approx(1 / 6), ("a2", "b1"): pytest.approx(1 / 3)}
    assert summary["mecr"] == pytest.approx(0.25) and summary["markers_missing"] == ["b9"]
    assert summary["cells_with_markers"] == 6 and summary["fraction_coexpressing"] == pytest.approx(2 / 6)


def test_bad_markers_truth_and_frames_are_refused(tmp_path):
    with pytest.raises(SegRefineError, match="two cell types"):
        check_markers({"A": ["x", "y"], "B": ["y"]})
    with pytest.raises(SegRefineError, match="at least two"):
        check_markers({"A": ["x"]})
    gem, labels, truth, types = _chip(tmp_path)
    tifffile.imwrite(tmp_path / "small.tif", _truth()[:10])
    with pytest.raises(SegRefineError, match="not the same frame"):
        truth_purity(gem, labels, tmp_path / "small.tif", types, MARKERS)
    with pytest.raises(SegRefineError, match="none of the markers of cell type 'B'"):
        truth_purity(gem, labels, truth, types, {"A": ["a1"], "B": ["zz"]})
    (tmp_path / "bad.csv").write_text("label,type\n1,A\n1,B\n")
    with pytest.raises(SegRefineError, match="listed twice"):
        read_truth_types(tmp_path / "bad.csv")


def test_purity_step_reads_the_mecr_from_the_cgef(tmp_path):
    """The CLI in the gef env: cgef of the chip, then MECR and the truth purity of two 'stages'."""
    gem, labels, truth, types = _chip(tmp_path)
    tifffile.imwrite(tmp_path / "truth_as_labels.tif", _truth())
    for name, lab in (("seg", labels), ("truth", tmp_path / "truth_as_labels.tif")):
        run_step(
            "gef",
            "cgef",
            "--gem",
            gem,
            "--labels",
            lab,
            "--cgef",
            tmp_path / f"{name}.cgef",
            "--cellmap",
            tmp_path / f"{name}.csv",
            "--origin",
            "auto",
        )
    run_step(
        "gef",
        "purity",
        "--stages",
        "pretrained",
        "ideal",
        "--cgefs",
        tmp_path / "seg.cgef",
        tmp_path / "truth.cgef",
        "--labels",
        labels,
        tmp_path / "truth_as_labels.tif",
        "--out-dir",
        tmp_path / "out",
        "--expression",
        gem,
        "--truth",
        truth,
        "--truth-types",
        types,
        "--markers",
        json.dumps(MARKERS),
        "--sample",
        "S1",
    )
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["sample"] == "S1"
    seg, ideal = doc["stages"]["pretrained"], doc["stages"]["ideal"]
    # a1 in cells 10 and 20, b1 in cell 10 only: 1 of 2 cells; the true cells never co-express
    assert seg["mecr"]["mecr"] == pytest.approx(0.5) and seg["mecr"]["fraction_coexpressing"] == pytest.approx(0.5)
    assert ideal["mecr"]["mecr"] == 0.0 and ideal["mecr"]["cells_with_markers"] == 3
    assert seg["truth"]["mean_marker_purity"] == pytest.approx((6 / 7 + 1) / 2)
    assert ideal["truth"]["mean_purity"] == 1.0 and ideal["truth"]["fraction_mixed"] == 0.0
    pairs = pd.read_csv(tmp_path / "out" / "mecr_pairs.csv")
    assert pairs[["stage", "gene_a", "gene_b", "cells_both"]].values.tolist() == [
        ["pretrained", "a1", "b1", 1],
        ["ideal", "a1", "b1", 0],
    ]
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert cells.groupby("stage")["label_id"].apply(list).to_dict() == {"ideal": [1, 2, 3], "pretrained": [10, 20, 30]}


def test_purity_step_without_truth_writes_the_mecr_and_an_empty_cell_table(tmp_path):
    from segrefine.purity import CELL_COLUMNS, purity_step

    with pytest.raises(SegRefineError, match="nothing to measure"):
        purity_step(["s"], ["x.cgef"], ["x.tif"], tmp_path)
    gem, labels, truth, types = _chip(tmp_path)
    doc = purity_step(["s"], ["x.cgef"], [labels], tmp_path / "o", gem, truth, types)  # truth only: no cgef read
    assert doc["stages"]["s"]["truth"]["cells"] == 3 and "mecr" not in doc["stages"]["s"]
    assert list(pd.read_csv(tmp_path / "o" / "cells.csv").columns) == ["stage", *CELL_COLUMNS]
    assert pd.read_csv(tmp_path / "o" / "mecr_pairs.csv").empty


@pytest.mark.integration
def test_cluster_check_recovers_two_separated_types_with_current_scanpy(tmp_path):
    """An h5ad of two cell types with disjoint genes, read by anndata 0.13 and clustered by scanpy: ARI 1."""
    make = (
        "import anndata, numpy as np, pandas as pd, scipy.sparse as sp, sys\n"
        "rng = np.random.default_rng(0)\n"
        "X = rng.poisson(0.2, (80, 20)); X[:40, :5] += rng.poisson(6, (40, 5)); X[40:, 5:10] += rng.poisson(6, "
        "(40, 5))\n"
        "obs = pd.DataFrame({'label_id': np.arange(1, 81)}, index=[str(i) for i in range(1, 81)])\n"
        "anndata.AnnData(sp.csr_matrix(X.astype(np.uint32)), obs=obs, "
        "var=pd.DataFrame(index=[f'g{i}' for i in range(20)])).write_h5ad(sys.argv[1])\n"
    )
    subprocess.run([str(env_python("anndata")), "-c", make, str(tmp_path / "a.h5ad")], check=True)
    cells = pd.DataFrame(
        {"stage": "finetuned", "label_id": np.arange(1, 81), "truth_type": ["A"] * 40 + ["B"] * 39 + [None]}
    )
    pd.concat([cells, cells.assign(stage="other", truth_type="B")]).to_csv(tmp_path / "cells.csv", index=False)
    run_step(
        "anndata",
        "cluster-check",
        "--stages",
        "finetuned",
        "--h5ads",
        tmp_path / "a.h5ad",
        "--cells",
        tmp_path / "cells.csv",
        "--out",
        tmp_path / "c.json",
        "--sample",
        "S1",
    )
    doc = json.loads((tmp_path / "c.json").read_text())
    e = doc["stages"]["finetuned"]
    assert e["cells"] == 80 and e["cells_clustered"] == 80 and e["cells_with_true_type"] == 79
    assert e["clusters"] == 2 and e["ari"] == pytest.approx(1.0)
    assert e["anndata"].startswith("0.13")
