import numpy as np
import pandas as pd
import pytest

from conftest import run_step
from segrefine import SegRefineError
from segrefine.qc import expression_qc, extreme_area, read_cell_tables, summarize_cells


def _cellmap(path, areas, counts, genes):
    n = len(areas)
    pd.DataFrame({"cgef_cell": range(n), "label_id": np.arange(n) + 10, "x": np.arange(n), "y": np.arange(n) * 2,
                  "area": areas, "total_counts": counts, "n_genes": genes}).to_csv(path, index=False)
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
    assert list(ext["sample"]) == ["A", "A"] and ext["area_over_median"].iloc[0] == pytest.approx(3500 / np.median(a_area))


def test_expression_qc_step_writes_tables_and_plot(tmp_path):
    a = _cellmap(tmp_path / "a.csv", [10, 12, 300], [4, 5, 6], [2, 2, 3])
    run_step("core", "expression-qc", "--cellmaps", a, "--samples", "S1", "--out-dir", tmp_path / "qc")
    out = tmp_path / "qc"
    assert sorted(p.name for p in out.iterdir()) == ["cells.csv", "distributions.png", "extreme_area.csv",
                                                      "summary.csv"]
    assert (out / "distributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(out / "cells.csv")) == 3


def test_bad_cell_tables_are_named(tmp_path):
    (tmp_path / "x.csv").write_text("label_id,area\n1,2\n")
    with pytest.raises(SegRefineError, match=r"x.csv: missing column\(s\) \['x', 'y', 'total_counts', 'n_genes'\]"):
        expression_qc([tmp_path / "x.csv"], ["S"], tmp_path / "qc")
    with pytest.raises(SegRefineError, match="2 cell tables for 1 sample names"):
        read_cell_tables([tmp_path / "x.csv"] * 2, ["S"])
