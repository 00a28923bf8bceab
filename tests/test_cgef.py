"""The exact cgef writer: synthetic chips whose every cell's counts are known, read back by gefpy and stereopy."""
import gzip
import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import run_step
from segrefine import SegRefineError
from segrefine.cgef import exact_cell_bin
from segrefine.envs import env_python
from segrefine.expression import check_frame, resolve_origin
from segrefine.gem import Gem, density_labels, read_gem

ORIGIN = (1000, 500)  # GEM coordinate of label pixel (0, 0)
# label id -> {gene: UMIs}; 70000 > 65535 touches 3; 8 is empty; 3 and 9 sit at the chip border
EXPECTED = {3: {"A": 3, "B": 1}, 70000: {"A": 4, "C": 1}, 8: {}, 9: {"C": 5}}
AREA = {3: 16, 70000: 16, 8: 9, 9: 16}


def _labels():
    lab = np.zeros((20, 30), np.uint32)
    lab[0:4, 0:4] = 3
    lab[0:4, 4:8] = 70000
    lab[10:13, 10:13] = 8
    lab[16:20, 26:30] = 9
    return lab


def _gem_text(ox=ORIGIN[0], oy=ORIGIN[1], header=""):
    rows = [("A", 0, 0, 2), ("A", 0, 0, 1), ("B", 3, 3, 1),    # cell 3 (B on the pixel touching 70000)
            ("A", 4, 0, 4), ("C", 4, 3, 1),                     # cell 70000
            ("C", 29, 19, 5),                                   # cell 9, bottom-right corner of the chip
            ("A", 20, 5, 3),                                    # background
            ("Z", 5, 5, 0)]                                     # a gene with zero counts only
    body = "".join(f"{g}\t{c + ox}\t{r + oy}\t{n}\n" for g, c, r, n in rows)
    return header + "geneID\tx\ty\tMIDCount\n" + body


@pytest.fixture()
def chip(tmp_path):
    tifffile.imwrite(tmp_path / "labels.tif", _labels())
    with gzip.open(tmp_path / "chip.gem.gz", "wt") as fh:
        fh.write(_gem_text(header="#FileFormat=GEMv0.1\n"))
    return tmp_path


def _cgef(chip, writer="exact", gem="chip.gem.gz", origin="1000,500", check=True):
    return run_step("gef", "cgef", "--gem", chip / gem, "--labels", chip / "labels.tif", "--cgef",
                    chip / f"{writer}.cgef", "--cellmap", chip / f"{writer}.csv", "--writer", writer,
                    "--origin", origin, "--threads", 1, check=check)


READ_WITH_GEFPY = """
import json, sys
import numpy as np
from gefpy.cgef_reader_cy import CgefR
r = CgefR(sys.argv[1])
uniq, names, count, cell_index, gene_index = (np.asarray(v) for v in r.get_filtered_data([0, 2**31 - 1, 0, 2**31 - 1], []))
cells = r.get_cells()
print(json.dumps({"n_cells": int(r.get_cell_num()), "n_genes": int(r.get_gene_num()),
                  "genes": [g[1].decode() if isinstance(g[1], bytes) else str(g[1]) for g in r.get_genes()],
                  "cells": [[int(c["id"]), int(c["x"]), int(c["y"]), int(c["area"])] for c in cells],
                  "exp": [[int(uniq[c] >> 32), int(uniq[c] & 0xFFFFFFFF), str(names[g]), int(n)]
                          for c, g, n in zip(cell_index, gene_index, count)]}))
"""


def read_with_gefpy(cgef):
    out = subprocess.run([str(env_python("gef")), "-c", READ_WITH_GEFPY, str(cgef)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def counts_by_label(cellmap_csv, exp):
    cellmap = pd.read_csv(cellmap_csv)
    label_at = {(x, y): lab for x, y, lab in zip(cellmap["x"], cellmap["y"], cellmap["label_id"])}
    got = {int(lab): {} for lab in cellmap["label_id"]}
    for x, y, gene, n in exp:
        got[int(label_at[(x, y)])][gene] = got[int(label_at[(x, y)])].get(gene, 0) + n
    return got


def test_exact_tables_in_memory_match_the_known_counts():
    gem = read_gem_text(_gem_text())
    t = exact_cell_bin(gem, _labels(), ORIGIN)
    assert sorted(t["label_id"]) == sorted(EXPECTED) and list(gem.genes) == ["A", "B", "C", "Z"]
    for row, lab in enumerate(t["label_id"]):
        c = t["cell"][row]
        part = t["cell_exp"][c["offset"]: c["offset"] + c["geneCount"]]
        assert {gem.genes[g]: int(n) for g, n in zip(part["geneID"], part["count"])} == EXPECTED[lab]
        assert c["area"] == AREA[lab] and c["expCount"] == sum(EXPECTED[lab].values())
    # the gene index holds every gene (Z with no cell) and points back at the same counts
    genes = t["gene"]
    assert [g.decode() for g in genes["geneName"]] == ["A", "B", "C", "Z"]
    assert list(genes["cellCount"]) == [2, 1, 2, 0] and list(genes["expCount"]) == [7, 1, 6, 0]
    assert int(t["gene_exp"]["count"].sum()) == int(t["cell_exp"]["count"].sum()) == 14
    # centres in GEM coordinates; cells ordered by 256-px block of the centre
    row3 = list(t["label_id"]).index(3)
    assert (t["cell"][row3]["x"], t["cell"][row3]["y"]) == (1002, 502)
    assert t["block_index"][-1] == 4 and list(t["block_size"][:2]) == [256, 256]


def read_gem_text(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "g.gem"
        p.write_text(text)
        return read_gem(p)


def test_more_than_65535_cells():
    h, w = 250, 300  # 75,000 one-pixel cells, each with one transcript of gene (id % 3)
    lab = np.arange(1, h * w + 1, dtype=np.uint32).reshape(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    gene = (lab.ravel().astype(np.int64) % 3)
    gem = Gem(genes=np.array(["G0", "G1", "G2"]), gene=gene, x=xx.ravel().astype(np.int64),
              y=yy.ravel().astype(np.int64), count=np.ones(h * w, np.int64))
    t = exact_cell_bin(gem, lab, (0, 0))
    assert len(t["cell"]) == h * w and t["cell"]["id"].max() == h * w - 1
    row = np.argsort(t["label_id"])
    assert np.all(t["cell"]["expCount"] == 1)
    assert np.all(t["cell_exp"]["geneID"][t["cell"]["offset"][row]] == np.arange(1, h * w + 1) % 3)


def test_exact_cgef_is_read_by_gefpy_with_the_known_counts(chip):
    _cgef(chip)
    got = read_with_gefpy(chip / "exact.cgef")
    assert got["n_cells"] == 4 and got["genes"] == ["A", "B", "C", "Z"]
    assert counts_by_label(chip / "exact.csv", got["exp"]) == EXPECTED
    cellmap = pd.read_csv(chip / "exact.csv")
    assert dict(zip(cellmap["label_id"], cellmap["area"])) == AREA
    assert dict(zip(cellmap["label_id"], cellmap["total_counts"])) == {k: sum(v.values()) for k, v in EXPECTED.items()}
    assert dict(zip(cellmap["label_id"], cellmap["n_genes"])) == {k: len(v) for k, v in EXPECTED.items()}


def test_gefpy_writer_keeps_touching_cells_apart_but_loses_their_contact_pixels(chip):
    _cgef(chip, writer="gefpy")
    got = counts_by_label(chip / "gefpy.csv", read_with_gefpy(chip / "gefpy.cgef")["exp"])
    assert got[70000] == EXPECTED[70000] and got[9] == EXPECTED[9]  # the higher-numbered side keeps its pixels
    assert got[3] == {"A": 3}  # B lay on the pixel cell 3 gave up to keep it apart from 70000


def test_bgef_input_gives_the_same_cells_as_the_gem(chip):
    make_bgef = ("import sys; sys.path.insert(0, sys.argv[3]); from segrefine.gem import read_gem; "
                 "from segrefine.expression import write_gem_v01, _gem_to_bgef; "
                 "write_gem_v01(read_gem(sys.argv[1]), sys.argv[1] + '.v01'); _gem_to_bgef(sys.argv[1] + '.v01', sys.argv[2], 1)")
    from conftest import SCRIPTS
    subprocess.run([str(env_python("gef")), "-c", make_bgef, str(chip / "chip.gem.gz"), str(chip / "chip.bgef"),
                    str(SCRIPTS)], check=True, capture_output=True)
    _cgef(chip)
    run_step("gef", "cgef", "--gem", chip / "chip.bgef", "--labels", chip / "labels.tif", "--cgef", chip / "b.cgef",
             "--cellmap", chip / "b.csv", "--origin", "1000,500")
    assert pd.read_csv(chip / "b.csv").equals(pd.read_csv(chip / "exact.csv"))
    assert counts_by_label(chip / "b.csv", read_with_gefpy(chip / "b.cgef")["exp"]) == EXPECTED


def test_stereopy_reads_the_exact_cgef_and_the_h5ad_opens_with_current_anndata(chip):
    _cgef(chip)
    run_step("stereopy", "h5ad", "--cgef", chip / "exact.cgef", "--cellmap", chip / "exact.csv", "--out",
             chip / "cells.h5ad")
    check = ("import anndata, json, sys; a = anndata.read_h5ad(sys.argv[1]); X = a.to_df(); "
             "print(json.dumps({'py': sys.version_info[:2], 'var': list(a.var_names), 'obsm': sorted(a.obsm.keys()), "
             "'obs': a.obs[['label_id', 'centroid_x', 'centroid_y', 'area', 'total_counts', 'n_genes']]"
             ".astype(int).values.tolist(), 'X': X.astype(int).values.tolist(), "
             "'spatial': a.obsm['spatial'].astype(int).tolist()}))")
    out = subprocess.run([str(env_python("anndata")), "-c", check, str(chip / "cells.h5ad")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    a = json.loads(out.stdout.strip().splitlines()[-1])
    assert a["py"] == [3, 11] and a["var"] == ["A", "B", "C", "Z"] and "spatial" in a["obsm"]
    assert sorted(row[0] for row in a["obs"]) == sorted(EXPECTED)
    for (lab, cx, cy, area, total, n_genes), x, xy in zip(a["obs"], a["X"], a["spatial"]):
        assert dict(zip("ABCZ", x)) == {g: EXPECTED[lab].get(g, 0) for g in "ABCZ"}
        assert area == AREA[lab] and total == sum(EXPECTED[lab].values()) and n_genes == len(EXPECTED[lab])
        assert xy == [cx, cy]


def test_real_gem_through_the_exact_writer_equals_the_exact_aggregation(realdata, tmp_path):
    from segrefine.gem import aggregate_by_labels

    path = realdata / "stereoseq-spateo-gem" / "SS200000135TL_D1_bin1_small.gem.gz"
    gem = read_gem(path)
    x0, x1, y0, y1 = gem.extent()
    labels = density_labels(gem, (x0, y0), (y1 - y0 + 1, x1 - x0 + 1))
    assert labels.max() > 100
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    run_step("gef", "cgef", "--gem", path, "--labels", tmp_path / "labels.tif", "--cgef", tmp_path / "r.cgef",
             "--cellmap", tmp_path / "r.csv", "--origin", f"{x0},{y0}")
    got = counts_by_label(tmp_path / "r.csv", read_with_gefpy(tmp_path / "r.cgef")["exp"])
    ids, matrix, _ = aggregate_by_labels(gem, labels, (x0, y0))
    coo = matrix.tocoo()
    expected = {int(i): {} for i in ids}
    for r, g, n in zip(coo.row, coo.col, coo.data):
        expected[int(ids[r])][str(gem.genes[g])] = int(n)
    got = {k: v for k, v in got.items() if v}  # cells touching the matrix but holding no UMI
    assert got == expected and sum(sum(v.values()) for v in got.values()) == int(matrix.sum())


def test_origin_from_the_file_or_the_config():
    gem = Gem(genes=np.array(["A"]), gene=np.zeros(1, np.int64), x=np.array([5]), y=np.array([7]),
              count=np.ones(1, np.int64), header={"OffsetX": "100", "OffsetY": "200"})
    assert resolve_origin(gem, "auto") == ((-100, -200), "the file's OffsetX/OffsetY")
    assert resolve_origin(gem, "10,20") == ((10, 20), "config")
    assert resolve_origin(gem, [3, 4]) == ((3, 4), "config")
    with pytest.raises(SegRefineError, match="expected 'auto' or two integers"):
        resolve_origin(gem, "10;20")
    check_frame(gem, (300, 200), (-100, -200), "file", "g.gem", "l.tif")  # (105, 207) lies inside 200 x 300
    with pytest.raises(SegRefineError, match=r"g.gem: transcripts span x 5..5, y 7..7, i.e. label pixels x 5..5, "
                                             r"y 7..7 with origin \(0, 0\) \[cfg\], but the label image l.tif is "
                                             r"4x4 px: the matrix and the image are not in the same coordinate frame"):
        check_frame(gem, (4, 4), (0, 0), "cfg", "g.gem", "l.tif")


@pytest.mark.parametrize("writer", ["exact", "gefpy"])
def test_a_mask_in_another_frame_fails_and_leaves_nothing_behind(chip, writer):
    proc = _cgef(chip, writer=writer, origin="0,0", check=False)
    assert proc.returncode == 1
    assert "not in the same coordinate frame" in proc.stderr and "chip.gem.gz" in proc.stderr
    assert sorted(p.name for p in chip.iterdir()) == ["chip.gem.gz", "labels.tif"]


def test_a_truncated_gem_fails_naming_the_file_and_leaves_nothing_behind(chip):
    data = gzip.compress(_gem_text().encode() + b"A\t1001\t501\t1\n" * 20000)
    (chip / "cut.gem.gz").write_bytes(data[: len(data) // 2])
    proc = _cgef(chip, gem="cut.gem.gz", check=False)
    assert proc.returncode == 1 and "cut.gem.gz: the gzip stream is damaged or ends early" in proc.stderr
    assert sorted(p.name for p in chip.iterdir()) == ["chip.gem.gz", "cut.gem.gz", "labels.tif"]
