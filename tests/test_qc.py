import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import run_step
from segrefine import SegRefineError
from segrefine.qc import compare_stages, expression_qc, extreme_area, read_cell_tables, summarize_cells


def _cellmap(path, areas, counts, genes):
    n = len(areas)
    pd.DataFrame(
        {
            "cgef_cell": range(n),
            "label_id": np.arange(n) + 10,
            "x": np.arange(n),
            "y": np.arange(n) * 2,
            "area": areas,
            "total_counts": counts,
            "n_genes": genes,
        }
    ).to_csv(path, index=False)
    return path


def test_summary_and_extreme_areas(tmp_path):
    # sample A: 20 cells of 100-119 px and one 3,500 px cell (a merge) and one 2 px fragment; B: no outlier
    a_area = list(range(100, 120)) + [3500, 2]
    a = _cellmap(tmp_path / "a.csv", a_area, [0] + [5] * 21, [0] + [3] * 21)
    b = _cellmap(tmp_path / "b.csv", [50, 60, 70, 80], [1, 2, 3, 4], [1, 1, 2, 2])
    cells = read_cell_tables([a, b], ["A", "B"])
    summary = summarize_cells(cells).set_index("sample")
    assert summary.loc["A", "cells"] == 22 and summary.loc["A", "empty_cells"] == 1
    assert summary.loc["B", "umis_in_cells"] == 10 and summary.loc["B", "area_q50"] == 65
    assert summary.loc["B", "n_genes_mean"] == 1.5
    ext = extreme_area(cells, k=3.0)
    assert list(ext["label_id"]) == [30, 31] and list(ext["side"]) == ["large", "small"]
    assert list(ext["sample"]) == ["A", "A"]
    assert ext["area_over_median"].iloc[0] == pytest.approx(3500 / np.median(a_area))


def test_expression_qc_step_writes_tables_and_plot(tmp_path):
    a = _cellmap(tmp_path / "a.csv", [10, 12, 300], [4, 5, 6], [2, 2, 3])
    run_step("core", "expression-qc", "--cellmaps", a, "--samples", "S1", "--out-dir", tmp_path / "qc")
    out = tmp_path / "qc"
    assert sorted(p.name for p in out.iterdir()) == [
        "cells.csv",
        "distributions.png",
        "extreme_area.csv",
        "summary.csv",
    ]
    assert (out / "distributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(out / "cells.csv")) == 3


def test_bad_cell_tables_are_named(tmp_path):
    (tmp_path / "x.csv").write_text("label_id,area\n1,2\n")
    with pytest.raises(SegRefineError, match=r"x.csv: missing column\(s\) \['x', 'y', 'total_counts', 'n_genes'\]"):
        expression_qc([tmp_path / "x.csv"], ["S"], tmp_path / "qc")
    with pytest.raises(SegRefineError, match="2 cell tables for 1 sample names"):
        read_cell_tables([tmp_path / "x.csv"] * 2, ["S"])


def _stages(tmp_path):
    """Sample A before fine-tuning: 20 cells of 100-119 px and a 3,500 px merge; after: the merge split and every
    cell smaller, 40 cells of 50-89 px, fewer UMIs each. Sample B: the same 5 cells at both stages."""
    pre = _cellmap(
        tmp_path / "a_pre.csv", list(range(100, 120)) + [3500], list(range(20, 40)) + [700], [10] * 20 + [90]
    )
    post = _cellmap(tmp_path / "a_post.csv", list(range(50, 90)), list(range(5, 45)), [4] * 40)
    b = [_cellmap(tmp_path / f"b_{st}.csv", [30, 40, 50, 60, 70], [3, 4, 5, 6, 7], [2] * 5) for st in ("pre", "post")]
    return [pre, b[0], post, b[1]], ["A", "B", "A", "B"], ["pretrained", "pretrained", "finetuned", "finetuned"]


def test_before_after_comparison_of_known_cells(tmp_path):
    cells = read_cell_tables(*_stages(tmp_path))
    summary = summarize_cells(cells).set_index(["sample", "stage"])
    assert list(summary.index) == [("A", "pretrained"), ("B", "pretrained"), ("A", "finetuned"), ("B", "finetuned")]
    assert summary.loc[("A", "pretrained"), "cells"] == 21 and summary.loc[("A", "finetuned"), "cells"] == 40
    assert summary.loc[("A", "pretrained"), "area_q50"] == 110 and summary.loc[("A", "finetuned"), "area_q50"] == 69.5
    assert summary.loc[("A", "pretrained"), "area_max"] == 3500 and summary.loc[("A", "finetuned"), "area_max"] == 89
    assert summary.loc[("A", "pretrained"), "extreme_large"] == 1
    assert summary.loc[("A", "finetuned"), "extreme_large"] == 0
    # the extreme-area table of both stages: only the merge, before fine-tuning
    ext = extreme_area(cells)
    assert ext[["sample", "stage", "label_id", "area", "side"]].values.tolist() == [
        ["A", "pretrained", 30, 3500, "large"]
    ]
    t = compare_stages(cells, "pretrained", "finetuned").set_index(["sample", "metric"])
    assert len(t) == 6 and set(t["before"]) == {"pretrained"} and set(t["after"]) == {"finetuned"}
    area = t.loc[("A", "area")]
    assert (area["n_before"], area["n_after"]) == (21, 40)
    assert (area["median_before"], area["median_after"]) == (110, 69.5)
    assert area["median_ratio"] == pytest.approx(69.5 / 110)
    # every cell after is smaller than every cell before: U = 0, P(after > before) = 0; the two-sided p-value of the
    # normal approximation with continuity correction, no ties: z = (n1 n2 / 2 - 0.5) / sqrt(n1 n2 (n1 + n2 + 1) / 12)
    assert area["mannwhitney_u"] == 0 and area["prob_after_greater"] == 0
    z = (40 * 21 / 2 - 0.5) / math.sqrt(40 * 21 * 62 / 12)
    assert area["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)
    umis = t.loc[("A", "total_counts")]
    assert (umis["median_before"], umis["median_after"]) == (30, 24.5) and umis["prob_after_greater"] < 0.5
    # B did not change: U = n1 n2 / 2, p = 1; genes are identical (all 2): p = 1 without a test
    for metric in ("area", "total_counts", "n_genes"):
        row = t.loc[("B", metric)]
        assert row["prob_after_greater"] == 0.5 and row["p_value"] == pytest.approx(1.0)


def test_expression_qc_step_compares_two_stages(tmp_path):
    cellmaps, samples, stages = _stages(tmp_path)
    run_step(
        "core",
        "expression-qc",
        "--cellmaps",
        *cellmaps,
        "--samples",
        *samples,
        "--stages",
        *stages,
        "--out-dir",
        tmp_path / "qc",
    )
    out = tmp_path / "qc"
    assert sorted(p.name for p in out.iterdir()) == [
        "before_after.csv",
        "cells.csv",
        "distributions.png",
        "extreme_area.csv",
        "summary.csv",
    ]
    assert (out / "distributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = pd.read_csv(out / "cells.csv")
    assert cells.groupby(["sample", "stage"]).size().to_dict() == {
        ("A", "finetuned"): 40,
        ("A", "pretrained"): 21,
        ("B", "finetuned"): 5,
        ("B", "pretrained"): 5,
    }
    ba = pd.read_csv(out / "before_after.csv")
    assert len(ba) == 6 and list(ba["sample"].unique()) == ["A", "B"]
    assert len(pd.read_csv(out / "summary.csv")) == 4 and len(pd.read_csv(out / "extreme_area.csv")) == 1


def test_stage_names_are_checked(tmp_path):
    cellmaps, samples, stages = _stages(tmp_path)
    with pytest.raises(SegRefineError, match="4 cell tables for 3 stage names"):
        read_cell_tables(cellmaps, samples, stages[:3])
    with pytest.raises(SegRefineError, match="two cell tables for the same sample and stage"):
        read_cell_tables(cellmaps, samples, ["pretrained"])
    with pytest.raises(SegRefineError, match=r"cell tables of 3 stages \['a', 'b', 'c'\]: the comparison takes two"):
        expression_qc(cellmaps[:3], samples[:3], tmp_path / "qc", stages=["a", "b", "c"])


@pytest.mark.integration
def test_a_slide_without_cells_gives_zero_cell_tables_and_a_plot_saying_so(tmp_path):
    """0 cells is a result: every table is written (a 0-cell summary row per table, 0-row cell tables and
    comparison), the plot says there is no cell, and the step exits 0 naming the empty tables."""
    empty = _cellmap(tmp_path / "empty.csv", [], [], [])
    some = _cellmap(tmp_path / "some.csv", [10, 12, 300], [4, 5, 6], [2, 2, 3])
    proc = run_step(
        "core",
        "expression-qc",
        "--cellmaps",
        empty,
        empty,
        "--samples",
        "S1",
        "S1",
        "--stages",
        "pretrained",
        "finetuned",
        "--out-dir",
        tmp_path / "qc",
    )
    assert f"no cell in {empty} (S1 pretrained), {empty} (S1 finetuned)" in proc.stderr
    out = tmp_path / "qc"
    assert sorted(p.name for p in out.iterdir()) == [
        "before_after.csv",
        "cells.csv",
        "distributions.png",
        "extreme_area.csv",
        "summary.csv",
    ]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["stage"]) == ["pretrained", "finetuned"] and list(summary["cells"]) == [0, 0]
    assert math.isnan(summary["area_q50"].iloc[0])
    for name in ("cells.csv", "extreme_area.csv", "before_after.csv"):
        table = pd.read_csv(out / name)
        assert len(table) == 0 and "sample" in table.columns
    assert (out / "distributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one stage without cells, the other with: the empty one keeps its summary row, the comparison has no row
    run_step(
        "core",
        "expression-qc",
        "--cellmaps",
        empty,
        some,
        "--samples",
        "S1",
        "S1",
        "--stages",
        "pretrained",
        "finetuned",
        "--out-dir",
        tmp_path / "qc2",
    )
    summary = pd.read_csv(tmp_path / "qc2" / "summary.csv")
    assert list(summary["cells"]) == [0, 3]
    assert len(pd.read_csv(tmp_path / "qc2" / "before_after.csv")) == 0


def test_saws_cells_are_a_reference_stage_beside_ours(tmp_path):
    """SAW's nuclei (stage saw_nuclei) beside both our stages: their summary rows, their curves, and
    saw_comparison.csv (SAW's cells as 'before', our fine-tuned cells as 'after'); before_after.csv unchanged."""
    cellmaps, samples, stages = _stages(tmp_path)
    saw = tmp_path / "saw.csv"
    pd.DataFrame(
        {
            "cgef_cell": range(3),
            "label_id": range(3),
            "x": [1, 2, 3],
            "y": [1, 2, 3],
            "area": [500, 520, 540],
            "total_counts": [90, 95, 100],
            "n_genes": [2, 2, 2],
        }
    ).to_csv(saw, index=False)
    run_step(
        "core",
        "expression-qc",
        "--cellmaps",
        *cellmaps,
        saw,
        "--samples",
        *samples,
        "A",
        "--stages",
        *stages,
        "saw_nuclei",
        "--out-dir",
        tmp_path / "qc",
    )
    out = tmp_path / "qc"
    summary = pd.read_csv(out / "summary.csv").set_index(["sample", "stage"])
    assert summary.loc[("A", "saw_nuclei"), "cells"] == 3 and summary.loc[("A", "saw_nuclei"), "area_q50"] == 520
    ba = pd.read_csv(out / "before_after.csv")
    assert set(ba["before"]) == {"pretrained"} and set(ba["after"]) == {"finetuned"} and len(ba) == 6
    sc = pd.read_csv(out / "saw_comparison.csv").set_index(["sample", "metric"])
    assert list(sc.index.unique(0)) == ["A"]
    assert set(sc["before"]) == {"saw_nuclei"} and set(sc["after"]) == {"finetuned"}
    area = sc.loc[("A", "area")]
    assert (area["n_before"], area["n_after"], area["median_before"]) == (3, 40, 520)
    assert area["prob_after_greater"] == 0  # our 40 fine-tuned cells are all smaller than SAW's 3


def test_alignment_reports_become_summary_columns_and_a_misaligned_matrix_is_named(tmp_path):
    cellmaps, samples, stages = _stages(tmp_path)
    reports = []
    for i, sm in enumerate(samples):
        shifted = sm == "B"  # B's matrix looks shifted by (+20, -4) px in both stages
        reports.append(tmp_path / f"a{i}.json")
        reports[-1].write_text(
            json.dumps(
                {
                    "umis": 1000,
                    "umis_in_cells": 150 if shifted else 800,
                    "fraction_umis_in_cells": 0.15 if shifted else 0.8,
                    "alignment": {
                        "best_shift": [20, -4] if shifted else [0, 0],
                        "fraction_in_cells_at_best_shift": 0.79 if shifted else 0.8,
                        "misaligned": shifted,
                    },
                }
            )
        )
    proc = run_step(
        "core",
        "expression-qc",
        "--cellmaps",
        *cellmaps,
        "--reports",
        *reports,
        "--samples",
        *samples,
        "--stages",
        *stages,
        "--out-dir",
        tmp_path / "qc",
    )
    summary = pd.read_csv(tmp_path / "qc" / "summary.csv").set_index(["sample", "stage"])
    assert summary.loc[("A", "finetuned"), "fraction_umis_in_cells"] == 0.8
    assert summary.loc[("B", "pretrained"), "alignment_best_shift"] == "+20,-4"
    assert summary["alignment_misaligned"].to_dict() == {
        ("A", "pretrained"): False,
        ("B", "pretrained"): True,
        ("A", "finetuned"): False,
        ("B", "finetuned"): True,
    }
    assert "B finetuned: only 15.0 % of UMIs fell in cells" in proc.stderr and "(+20,-4) px" in proc.stderr
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SegRefineError, match="bad.json: not an alignment report"):
        expression_qc(cellmaps, samples, tmp_path / "qc2", stages=stages, reports=[tmp_path / "bad.json"])
