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
    rows = [
        ("A", 0, 0, 2),
        ("A", 0, 0, 1),
        ("B", 3, 3, 1),  # cell 3 (B on the pixel touching 70000)
        ("A", 4, 0, 4),
        ("C", 4, 3, 1),  # cell 70000
        ("C", 29, 19, 5),  # cell 9, bottom-right corner of the chip
        ("A", 20, 5, 3),  # background
        ("Z", 5, 5, 0),
    ]  # a gene with zero counts only
    body = "".join(f"{g}\t{c + ox}\t{r + oy}\t{n}\n" for g, c, r, n in rows)
    return header + "geneID\tx\ty\tMIDCount\n" + body


@pytest.fixture()
def chip(tmp_path):
    tifffile.imwrite(tmp_path / "labels.tif", _labels())
    with gzip.open(tmp_path / "chip.gem.gz", "wt") as fh:
        fh.write(_gem_text(header="#FileFormat=GEMv0.1\n"))
    return tmp_path


def _cgef(chip, writer="exact", gem="chip.gem.gz", origin="1000,500", check=True):
    return run_step(
        "gef",
        "cgef",
        "--gem",
        chip / gem,
        "--labels",
        chip / "labels.tif",
        "--cgef",
        chip / f"{writer}.cgef",
        "--cellmap",
        chip / f"{writer}.csv",
        "--writer",
        writer,
        "--origin",
        origin,
        "--threads",
        1,
        check=check,
    )


READ_WITH_GEFPY = """
import json, sys
import numpy as np
from gefpy.cgef_reader_cy import CgefR
r = CgefR(sys.argv[1])
filtered = r.get_filtered_data([0, 2**31 - 1, 0, 2**31 - 1], [])
uniq, names, count, cell_index, gene_index = (np.asarray(v) for v in filtered)
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


DUMP_WITH_H5PY = """
import json, sys
import h5py, numpy as np
with h5py.File(sys.argv[1], "r") as f:
    g = f["cellBin"]
    print(json.dumps({k: {n: np.asarray(g[k][n]).tolist() for n in g[k].dtype.names} if g[k].dtype.names
                      else np.asarray(g[k]).tolist() for k in ("cell", "cellExp", "geneExp", "blockIndex", "blockSize")}
                     | {"genes": [n.decode() for n in g["gene"]["geneName"]],
                        "gene": {n: np.asarray(g["gene"][n]).tolist() for n in g["gene"].dtype.names
                                 if n != "geneName"},
                        "border_shape": list(g["cellBorder"].shape), "maxX": int(f.attrs["maxX"][0])}))
"""


def dump_with_h5py(cgef):
    out = subprocess.run([str(env_python("gef")), "-c", DUMP_WITH_H5PY, str(cgef)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_exact_tables_match_the_known_counts(chip):
    _cgef(chip)
    t = dump_with_h5py(chip / "exact.cgef")
    label_id = pd.read_csv(chip / "exact.csv")["label_id"].tolist()
    assert sorted(label_id) == sorted(EXPECTED) and t["genes"] == ["A", "B", "C", "Z"]
    c = t["cell"]
    for row, lab in enumerate(label_id):
        s, n = c["offset"][row], c["geneCount"][row]
        got = {t["genes"][g]: k for g, k in zip(t["cellExp"]["geneID"][s : s + n], t["cellExp"]["count"][s : s + n])}
        assert got == EXPECTED[lab] and c["area"][row] == AREA[lab]
        assert c["expCount"][row] == sum(EXPECTED[lab].values())
    # the gene index holds every gene (Z with no cell) and points back at the same counts
    assert t["gene"]["cellCount"] == [2, 1, 2, 0] and t["gene"]["expCount"] == [7, 1, 6, 0]
    assert sum(t["geneExp"]["count"]) == sum(t["cellExp"]["count"]) == 14
    # centres in GEM coordinates; cells ordered by 256-px block of the centre
    row3 = label_id.index(3)
    assert (c["x"][row3], c["y"][row3]) == (1002, 502)
    assert t["blockIndex"][-1] == 4 and t["blockSize"][:2] == [256, 256]


def test_more_than_65535_cells(tmp_path):
    h, w = 250, 300  # 75,000 one-pixel cells, each with one transcript of gene (id % 3)
    lab = np.arange(1, h * w + 1, dtype=np.uint32).reshape(h, w)
    tifffile.imwrite(tmp_path / "labels.tif", lab, compression="zlib", tile=(64, 64))
    yy, xx = np.mgrid[0:h, 0:w]
    (tmp_path / "g.gem").write_text(
        "geneID\tx\ty\tMIDCount\n"
        + "".join(f"G{v % 3}\t{x}\t{y}\t1\n" for v, x, y in zip(lab.ravel(), xx.ravel(), yy.ravel()))
    )
    run_step(
        "gef",
        "cgef",
        "--gem",
        tmp_path / "g.gem",
        "--labels",
        tmp_path / "labels.tif",
        "--cgef",
        tmp_path / "c.cgef",
        "--cellmap",
        tmp_path / "c.csv",
        "--chunk",
        20000,
        "--band-records",
        30000,
    )
    t = dump_with_h5py(tmp_path / "c.cgef")
    label_id = pd.read_csv(tmp_path / "c.csv")["label_id"].to_numpy()
    assert len(label_id) == h * w and max(t["cell"]["id"]) == h * w - 1 and set(t["cell"]["expCount"]) == {1}
    assert np.array_equal(np.array(t["cellExp"]["geneID"])[t["cell"]["offset"]], label_id % 3)


def _random_chip(d, tiled: bool):
    """Touching squares (ids up to 70,000), empty rows, records on background, several per DNB."""
    rng = np.random.default_rng(7)
    lab = np.zeros((64, 48), np.uint32)
    for k in range(1, 60):
        y, x = rng.integers(0, 58), rng.integers(0, 42)
        lab[y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = k if k % 7 else 70000 + k
    lab[30:36] = 0  # rows with no cell
    opts = dict(compression="zlib", tile=(16, 16)) if tiled else dict(compression="zlib", rowsperstrip=5)
    tifffile.imwrite(d / "labels.tif", lab, **opts)
    n = 3000
    x, y = rng.integers(3, 45, n), rng.integers(2, 62, n)
    keep = ~((y >= 10) & (y < 14))  # rows without any record: empty bands
    x, y = x[keep], y[keep]
    gene, count = rng.integers(0, 30, len(x)), rng.integers(0, 4, len(x))
    ox, oy = 500, 700
    (d / "g.gem").write_text(
        "#OffsetX=-500\n#OffsetY=-700\ngeneID\tx\ty\tMIDCount\n"
        + "".join(f"g{a:02d}\t{b + ox}\t{c + oy}\t{e}\n" for a, b, c, e in zip(gene, x, y, count))
    )
    return lab, (ox, oy)


@pytest.mark.integration
@pytest.mark.parametrize("tiled", [True, False])
def test_streaming_at_tiny_chunks_and_bands_equals_the_exact_reference(tmp_path, tiled):
    from segrefine.gem import aggregate_by_labels

    lab, origin = _random_chip(tmp_path, tiled)
    gem = read_gem(tmp_path / "g.gem")
    files = {}
    # chunk, band records, band rows: every cell cut by band edges, records at every chunk edge, empty bands
    for k, sizes in enumerate([(1 << 22, 1 << 22, 512), (1, 1, 1), (7, 40, 3), (1000, 500, 64)]):
        out = tmp_path / f"c{k}.cgef"
        run_step(
            "gef",
            "cgef",
            "--gem",
            tmp_path / "g.gem",
            "--labels",
            tmp_path / "labels.tif",
            "--cgef",
            out,
            "--cellmap",
            tmp_path / f"c{k}.csv",
            "--chunk",
            sizes[0],
            "--band-records",
            sizes[1],
            "--band-rows",
            sizes[2],
        )
        files[k] = (out.read_bytes(), (tmp_path / f"c{k}.csv").read_text())
    assert all(files[k] == files[0] for k in files)  # the same bytes whatever the sizes
    t = dump_with_h5py(tmp_path / "c0.cgef")
    cellmap = pd.read_csv(tmp_path / "c0.csv")
    ids, matrix, _ = aggregate_by_labels(gem, lab, origin)
    x0, x1, y0, y1 = gem.extent()
    box = lab[y0 - origin[1] : y1 - origin[1] + 1, x0 - origin[0] : x1 - origin[0] + 1]
    assert sorted(cellmap["label_id"]) == sorted(set(np.unique(box)) - {0})  # empty cells of the box included
    assert set(ids) <= set(cellmap["label_id"]) and len(ids) > 20
    dense = matrix.toarray()
    c = t["cell"]
    lx, ly = gem.x - origin[0], gem.y - origin[1]
    for row, lid in enumerate(cellmap["label_id"]):
        s, n = c["offset"][row], c["geneCount"][row]
        got = np.zeros(len(gem.genes), np.int64)
        got[t["cellExp"]["geneID"][s : s + n]] = t["cellExp"]["count"][s : s + n]
        want = dense[list(ids).index(lid)] if lid in ids else np.zeros(len(gem.genes), np.int64)
        assert np.array_equal(got, want)
        on = lab[ly, lx] == lid
        assert c["dnbCount"][row] == len(set(zip(lx[on], ly[on]))) and c["area"][row] == int((lab == lid).sum())
    # geneExp is the transpose, by gene then cell
    ge_cell, ge_count = np.array(t["geneExp"]["cellID"]), np.array(t["geneExp"]["count"])
    for g in range(len(gem.genes)):
        s, n = t["gene"]["offset"][g], t["gene"]["cellCount"][g]
        rows = ge_cell[s : s + n]
        assert list(rows) == sorted(rows)
        want = {
            r: dense[list(ids).index(cellmap["label_id"][r]), g]
            for r in range(len(cellmap))
            if cellmap["label_id"][r] in ids and dense[list(ids).index(cellmap["label_id"][r]), g]
        }
        assert dict(zip(rows.tolist(), ge_count[s : s + n].tolist())) == want


def test_a_matrix_with_no_transcript_in_any_cell_gives_an_empty_cgef(tmp_path):
    lab = np.zeros((40, 40), np.uint32)
    lab[30:35, 30:35] = 4  # outside the matrix's bounding box
    tifffile.imwrite(tmp_path / "labels.tif", lab)
    (tmp_path / "g.gem").write_text("geneID\tx\ty\tMIDCount\nA\t2\t3\t1\nB\t5\t9\t2\n")
    run_step(
        "gef",
        "cgef",
        "--gem",
        tmp_path / "g.gem",
        "--labels",
        tmp_path / "labels.tif",
        "--cgef",
        tmp_path / "c.cgef",
        "--cellmap",
        tmp_path / "c.csv",
    )
    t = dump_with_h5py(tmp_path / "c.cgef")
    assert t["cell"]["id"] == [] and t["cellExp"]["count"] == [] and t["geneExp"]["count"] == []
    assert t["genes"] == ["A", "B"] and t["gene"]["cellCount"] == [0, 0] and t["border_shape"] == [0, 32, 2]
    assert (tmp_path / "c.csv").read_text().splitlines() == [
        ",".join(("cgef_cell", "label_id", "x", "y", "area", "total_counts", "n_genes"))
    ]
    check = "import sys; from gefpy.cgef_reader_cy import CgefR; r = CgefR(sys.argv[1]); print(r.get_cell_num())"
    out = subprocess.run(
        [str(env_python("gef")), "-c", check, str(tmp_path / "c.cgef")], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.split()[-1] == "0", out.stderr[-2000:]  # gefpy opens it: 0 cells


def _cgef_into_o(chip, gem, *options, labels="labels.tif"):
    """`segrefine cgef` of ``chip/gem`` into ``chip/o`` (c.cgef, c.csv), exit status not checked: the refusals."""
    return run_step(
        "gef",
        "cgef",
        "--gem",
        chip / gem,
        "--labels",
        chip / labels,
        "--cgef",
        chip / "o" / "c.cgef",
        "--cellmap",
        chip / "o" / "c.csv",
        *options,
        check=False,
    )


def _leaves_only(d, names, proc, message):
    assert proc.returncode == 1 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]  # one line
    left = sorted(p.name for p in d.iterdir()) if d.exists() else []
    assert left == sorted(names)  # no output, no temporary folder


def test_a_malformed_line_in_the_last_chunk_is_named_and_nothing_is_left(chip):
    text = _gem_text() + "A\t1001\t501\t1\n" * 6 + "A\t1001\t501\n"
    (chip / "bad.gem").write_text(text)
    line = len(text.splitlines())
    proc = _cgef_into_o(chip, "bad.gem", "--origin", "1000,500", "--chunk", 4)
    _leaves_only(chip / "o", [], proc, f"bad.gem:{line}: malformed GEM line: no value in column MIDCount")


def test_a_truncated_bgef_and_oversized_label_ids_fail_naming_the_file(chip):
    make = (
        "import sys, h5py, numpy as np; f = h5py.File(sys.argv[1], 'w'); "  # a bgef-shaped file, then cut
        "f['geneExp/bin1/expression'] = np.zeros(100000, [('x', '<i4'), ('y', '<i4'), ('count', '<u2')]); "
        "f['geneExp/bin1/gene'] = np.array([(b'A', 0, 100000)], [('gene', 'S64'), ('offset', '<u4'), "
        "('count', '<u4')]); f.close()"
    )
    subprocess.run([str(env_python("gef")), "-c", make, str(chip / "fake.bgef")], check=True)
    data = (chip / "fake.bgef").read_bytes()
    (chip / "cut.bgef").write_bytes(data[: len(data) // 2])
    (chip / "fake.bgef").unlink()
    proc = _cgef_into_o(chip, "cut.bgef")
    _leaves_only(chip / "o", [], proc, "cut.bgef: cannot read as HDF5")
    big = _labels().astype(np.uint64)
    big[big == 9] = 1 << 33
    tifffile.imwrite(chip / "big.tif", big)
    proc = _cgef_into_o(chip, "chip.gem.gz", "--origin", "1000,500", labels="big.tif")
    _leaves_only(chip / "o", [], proc, "big.tif: label id 8589934592 does not fit in uint32")


def test_a_cell_gene_count_above_65535_summed_across_bands_is_refused_and_nothing_is_left(chip):
    """Cell 3 holds 40,000 + 30,000 UMIs of gene A on two label rows: each band's partial sum fits gefpy's uint16,
    their merge does not."""
    (chip / "many.gem").write_text("geneID\tx\ty\tMIDCount\nA\t1000\t500\t40000\nA\t1001\t501\t30000\n")
    proc = _cgef_into_o(chip, "many.gem", "--origin", "1000,500", "--band-rows", 1)
    message = "many.gem: cell 3 has 70000 UMIs of gene A; the cgef layout stores at most 65,535 per cell and gene"
    _leaves_only(chip / "o", [], proc, message)


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
    v01 = "".join(
        line + "\n"
        for line in _gem_text(header="#FileFormat=GEMv0.1\n#BinSize=1\n#OffsetX=0\n#OffsetY=0\n").splitlines()
        if not line.endswith("\t0")
    )
    (chip / "chip.v01").write_text(v01)
    make_bgef = (
        "import sys; sys.path.insert(0, sys.argv[3]); from segrefine.expression import _gem_to_bgef; "
        "_gem_to_bgef(sys.argv[1], sys.argv[2], 1)"
    )
    from conftest import SCRIPTS

    subprocess.run(
        [str(env_python("gef")), "-c", make_bgef, str(chip / "chip.v01"), str(chip / "chip.bgef"), str(SCRIPTS)],
        check=True,
        capture_output=True,
    )
    _cgef(chip)
    run_step(
        "gef",
        "cgef",
        "--gem",
        chip / "chip.bgef",
        "--labels",
        chip / "labels.tif",
        "--cgef",
        chip / "b.cgef",
        "--cellmap",
        chip / "b.csv",
        "--origin",
        "1000,500",
        "--chunk",
        2,
    )  # bgef read by slices of 2 rows
    assert pd.read_csv(chip / "b.csv").equals(pd.read_csv(chip / "exact.csv"))
    assert counts_by_label(chip / "b.csv", read_with_gefpy(chip / "b.cgef")["exp"]) == EXPECTED


@pytest.mark.integration
@pytest.mark.parametrize("writer", ["direct", "stereopy"])
def test_both_h5ad_writers_give_the_known_matrix_and_open_with_current_anndata(chip, writer):
    """The bounded direct writer (X streamed from cellExp, here by slices of 2 entries) and stereopy's: the same
    cells, genes, counts, areas and centres, read by the newest anndata (0.13, Python 3.12: the anndata env)."""
    _cgef(chip)
    run_step(
        "stereopy",
        "h5ad",
        "--cgef",
        chip / "exact.cgef",
        "--cellmap",
        chip / "exact.csv",
        "--out",
        chip / "cells.h5ad",
        "--writer",
        writer,
        *(["--chunk", 2] if writer == "direct" else []),
    )
    check = (
        "import anndata, json, sys; a = anndata.read_h5ad(sys.argv[1]); X = a.to_df(); "
        "print(json.dumps({'py': sys.version_info[:2], 'var': list(a.var_names), 'obsm': sorted(a.obsm.keys()), "
        "'obs': a.obs[['label_id', 'centroid_x', 'centroid_y', 'area', 'total_counts', 'n_genes']]"
        ".astype(int).values.tolist(), 'X': X.astype(int).values.tolist(), "
        "'spatial': a.obsm['spatial'].astype(int).tolist()}))"
    )
    out = subprocess.run(
        [str(env_python("anndata")), "-c", check, str(chip / "cells.h5ad")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a = json.loads(out.stdout.strip().splitlines()[-1])
    assert a["py"] == [3, 12] and a["var"] == ["A", "B", "C", "Z"] and "spatial" in a["obsm"]
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
    run_step(
        "gef",
        "cgef",
        "--gem",
        path,
        "--labels",
        tmp_path / "labels.tif",
        "--cgef",
        tmp_path / "r.cgef",
        "--cellmap",
        tmp_path / "r.csv",
        "--origin",
        f"{x0},{y0}",
    )
    got = counts_by_label(tmp_path / "r.csv", read_with_gefpy(tmp_path / "r.cgef")["exp"])
    ids, matrix, _ = aggregate_by_labels(gem, labels, (x0, y0))
    coo = matrix.tocoo()
    expected = {int(i): {} for i in ids}
    for r, g, n in zip(coo.row, coo.col, coo.data):
        expected[int(ids[r])][str(gem.genes[g])] = int(n)
    got = {k: v for k, v in got.items() if v}  # cells touching the matrix but holding no UMI
    assert got == expected and sum(sum(v.values()) for v in got.values()) == int(matrix.sum())


def test_origin_from_the_file_or_the_config():
    gem = Gem(
        genes=np.array(["A"]),
        gene=np.zeros(1, np.int64),
        x=np.array([5]),
        y=np.array([7]),
        count=np.ones(1, np.int64),
        header={"OffsetX": "100", "OffsetY": "200"},
    )
    assert resolve_origin(gem, "auto") == ((-100, -200), "the file's OffsetX/OffsetY")
    assert resolve_origin(gem, "10,20") == ((10, 20), "config")
    assert resolve_origin(gem, [3, 4]) == ((3, 4), "config")
    with pytest.raises(SegRefineError, match="expected 'auto' or two integers"):
        resolve_origin(gem, "10;20")
    check_frame(gem, (300, 200), (-100, -200), "file", "g.gem", "l.tif")  # (105, 207) lies inside 200 x 300
    with pytest.raises(
        SegRefineError,
        match=r"g.gem: transcripts span x 5..5, y 7..7, i.e. label pixels x 5..5, "
        r"y 7..7 with origin \(0, 0\) \[cfg\], but the label image l.tif is "
        r"4x4 px: the matrix and the image are not in the same coordinate frame",
    ):
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


def test_a_terminated_job_leaves_no_output_and_no_temporary_folder(tmp_path):
    import os
    import signal
    import time

    from conftest import SCRIPTS

    _random_chip(tmp_path, tiled=True)
    out = tmp_path / "o"
    out.mkdir()
    # one record per chunk and per band: slow enough to be stopped while it spills
    proc = subprocess.Popen(
        [
            str(env_python("gef")),
            "-m",
            "segrefine",
            "cgef",
            "--gem",
            str(tmp_path / "g.gem"),
            "--labels",
            str(tmp_path / "labels.tif"),
            "--cgef",
            str(out / "c.cgef"),
            "--cellmap",
            str(out / "c.csv"),
            "--chunk",
            "1",
            "--band-records",
            "1",
            "--band-rows",
            "1",
        ],
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not list(out.glob(".cgef.*/records.*.npy")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert list(out.iterdir()) == []  # nothing under a final name, the temporary folder removed


def _cells_and_gem(d, shift=(0, 0), seed=3, size=400, n_cells=200, radius=6):
    """Round cells at random places and a GEM of UMIs around their centres (90 %) or anywhere; the GEM's
    coordinates moved by ``shift`` (a matrix that is not in the image's frame but still inside it)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.uint32)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.integers(radius + 30, size - radius - 30, (n_cells, 2))
    for k, (cy, cx) in enumerate(centres):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k + 1
    tifffile.imwrite(d / "labels.tif", lab, tile=(64, 64))
    n = 20000
    pick = centres[rng.integers(0, n_cells, n)]
    y = np.clip(np.round(pick[:, 0] + rng.normal(0, radius / 2, n)), 0, size - 1).astype(int)
    x = np.clip(np.round(pick[:, 1] + rng.normal(0, radius / 2, n)), 0, size - 1).astype(int)
    bg = rng.random(n) < 0.1
    y[bg], x[bg] = rng.integers(30, size - 30, bg.sum()), rng.integers(30, size - 30, bg.sum())
    with gzip.open(d / "chip.gem.gz", "wt") as fh:
        fh.write("geneID\tx\ty\tMIDCount\n")
        fh.write("".join(f"G{g}\t{a + shift[0]}\t{b + shift[1]}\t1\n" for g, a, b in zip(rng.integers(0, 50, n), x, y)))
    return lab


@pytest.mark.parametrize("shift", [(0, 0), (17, -11)])
def test_the_alignment_report_finds_a_shifted_matrix_and_says_which_origin_to_set(tmp_path, shift):
    _cells_and_gem(tmp_path, shift)
    proc = run_step(
        "gef",
        "cgef",
        "--gem",
        tmp_path / "chip.gem.gz",
        "--labels",
        tmp_path / "labels.tif",
        "--cgef",
        tmp_path / "c.cgef",
        "--cellmap",
        tmp_path / "c.csv",
        "--report",
        tmp_path / "a.json",
        "--origin",
        "0,0",
    )
    report = json.loads((tmp_path / "a.json").read_text())
    cells = pd.read_csv(tmp_path / "c.csv")
    assert report["umis"] == 20000 and report["umis_in_cells"] == cells["total_counts"].sum()
    assert report["fraction_umis_in_cells"] == pytest.approx(cells["total_counts"].sum() / 20000)
    a = report["alignment"]
    assert a["checked"] and a["best_shift"] == [-shift[0], -shift[1]] and a["misaligned"] == (shift != (0, 0))
    if shift == (0, 0):
        assert report["fraction_umis_in_cells"] > 0.8 and "ALIGNMENT" not in proc.stderr
    else:
        assert report["fraction_umis_in_cells"] < 0.4 < 0.8 < a["fraction_in_cells_at_best_shift"]
        assert "ALIGNMENT" in proc.stderr and f"set expression.origin to '{shift[0]},{shift[1]}'" in proc.stderr


def test_a_rerun_removes_the_work_folder_of_a_killed_cgef_job(chip):
    """A SIGKILLed cgef job leaves its hidden work folder beside the output; the next run of the job removes it."""
    stale = chip / ".cgef.killed01"
    stale.mkdir()
    (stale / "records.0.npy").write_bytes(b"x" * 100)
    _cgef(chip)
    assert not stale.exists() and not list(chip.glob(".cgef.*")) and (chip / "exact.cgef").is_file()
