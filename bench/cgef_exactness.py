"""How exact is the cgef? The exact writer and gefpy's writer, side by side, against an exact aggregation.

The reference (segrefine.gem.aggregate_by_labels, scipy) counts each transcript
at DNB (x, y) for the cell whose label covers that pixel. Each cgef is read
back with h5py, its cells mapped to label ids through cellmap.csv. Printed per
writer: UMIs the cgef gives to cells, the fraction of in-cell UMIs assigned to
the same cell and gene (sum over cells and genes of min(exact, cgef) / exact
total), cells whose UMI or gene count differs from the exact one, and the
wall time of `segrefine cgef`.

Default: the real Stereo-seq GEM in shared/realdata, with a mask of its region
made from the GEM's own UMI density (segrefine.gem.density_labels: Gaussian
sigma 3 DNB, local maxima >= 5 DNB apart, each cell the pixels within 5 DNB
nearer its centre than any other, so neighbouring cells touch). Then the whole
path: the exact cgef -> h5ad (stereopy env) -> opened with anndata on Python
3.11 (anndata env) -> QC tables and plots (core env).

Run it in the stereopy env (h5py, scipy, tifffile), after `make setup`:

    $(python3 workflow_scripts/segrefine/envs.py python stereopy) bench/cgef_exactness.py

or on the demo:
``... bench/cgef_exactness.py --gem demo/DEMO01.gem.gz --labels results/segmentation/DEMO01/labels.tif``.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

import benchlib
from benchlib import REPO, env_python
from segrefine.gem import aggregate_by_labels, density_labels, read_expression  # after benchlib (sys.path)

REAL_GEM = REPO.parent / "shared" / "realdata" / "stereoseq-spateo-gem" / "SS200000135TL_D1_bin1_small.gem.gz"


def step(env, *args):
    """Seconds that ``segrefine <args>`` took in ``env``."""
    t = time.perf_counter()
    benchlib.step(env, *args)
    return time.perf_counter() - t


def cgef_pairs(cgef, cellmap_csv, genes):
    """(label id, gene code, count) arrays of a cgef, cells mapped through its cellmap."""
    import h5py
    import pandas as pd

    cellmap = pd.read_csv(cellmap_csv)
    with h5py.File(cgef, "r") as f:
        cells = f["cellBin/cell"][:]
        exp = f["cellBin/cellExp"][:]
        names = [g.decode() for g in f["cellBin/gene"]["geneName"]]
    code = {g: i for i, g in enumerate(genes)}
    gene_code = np.array([code[n] for n in names], np.int64)
    label_of = dict(zip(cellmap["cgef_cell"], cellmap["label_id"]))
    labels = np.array([label_of[int(c)] for c in cells["id"]], np.int64)
    order = np.argsort(cells["offset"].astype(np.int64), kind="stable")  # cellExp is laid out by offset
    starts = cells["offset"].astype(np.int64)[order]
    row = np.repeat(order, cells["geneCount"].astype(np.int64)[order])
    assert len(row) == len(exp) and (len(starts) == 0 or starts[0] == 0)
    return labels[row], gene_code[exp["geneID"].astype(np.int64)], exp["count"].astype(np.int64)


def compare(ids, matrix, cg_lab, cg_gene, cg_count, n_genes):
    """Figures of one cgef against the exact aggregation."""
    coo = matrix.tocoo()
    ex_key = ids[coo.row].astype(np.int64) * n_genes + coo.col
    ex = dict(zip(ex_key.tolist(), coo.data.astype(np.int64).tolist()))
    got = {}
    for k, n in zip((cg_lab * n_genes + cg_gene).tolist(), cg_count.tolist()):
        got[k] = got.get(k, 0) + n
    total = int(coo.data.sum())
    same = sum(min(n, got.get(k, 0)) for k, n in ex.items())
    # per cell (label id): UMIs and genes
    ex_umi = dict(zip(ids.tolist(), np.asarray(matrix.sum(axis=1)).ravel().astype(np.int64).tolist()))
    ex_gen = dict(zip(ids.tolist(), np.diff(matrix.indptr).tolist()))
    cg_umi, cg_gen = {}, {}
    for k, n in got.items():
        lab = k // n_genes
        cg_umi[lab] = cg_umi.get(lab, 0) + n
        cg_gen[lab] = cg_gen.get(lab, 0) + (n > 0)
    labs = set(ex_umi) | set(cg_umi)
    d_umi = np.array([cg_umi.get(lab, 0) - ex_umi.get(lab, 0) for lab in labs])
    d_gen = np.array([cg_gen.get(lab, 0) - ex_gen.get(lab, 0) for lab in labs])
    return {
        "in_cells": sum(got.values()),
        "same": same,
        "frac": same / total if total else 1.0,
        "diff": total - same,
        "cells": len(cg_umi),
        "umi_cells_differ": int((d_umi != 0).sum()),
        "umi_max_abs": int(np.abs(d_umi).max()) if len(d_umi) else 0,
        "gene_cells_differ": int((d_gen != 0).sum()),
        "total": total,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gem", default=str(REAL_GEM))
    ap.add_argument("--labels", help="label image (default: a density mask of the GEM's region, written to --out)")
    ap.add_argument("--origin", default=None, help="'x,y': GEM coordinate of label pixel (0, 0)")
    ap.add_argument("--out", default="/tmp/segrefine-bench-cgef")
    ap.add_argument("--no-h5ad", action="store_true", help="skip the h5ad/anndata/QC part of the path")
    a = ap.parse_args()
    import tifffile

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gem = read_expression(a.gem)
    if a.labels:
        labels_path = Path(a.labels)
        labels = tifffile.imread(labels_path)
        origin = tuple(int(v) for v in a.origin.split(",")) if a.origin else (0, 0)
    else:
        x0, x1, y0, y1 = gem.extent()
        origin = (x0, y0)
        labels = density_labels(gem, origin, (y1 - y0 + 1, x1 - x0 + 1))
        labels_path = out / "labels.tif"
        tifffile.imwrite(labels_path, labels, compression="zlib")
        touching = np.count_nonzero((labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0))
        print(
            f"mask: {labels.max()} cells from the UMI density of {Path(a.gem).name}, "
            f"{(labels > 0).mean():.1%} of {labels.shape[1]}x{labels.shape[0]} DNB, "
            f"{touching} horizontal cell-cell contacts; origin {origin}"
        )
    ids, matrix, outside = aggregate_by_labels(gem, labels, origin)
    n_genes = len(gem.genes)
    res, secs = {}, {}
    for writer in ("exact", "gefpy"):
        cgef, cellmap = out / f"{writer}.cgef", out / f"{writer}.cellmap.csv"
        secs[writer] = step(
            "gef",
            "cgef",
            "--gem",
            a.gem,
            "--labels",
            labels_path,
            "--cgef",
            cgef,
            "--cellmap",
            cellmap,
            "--writer",
            writer,
            "--origin",
            f"{origin[0]},{origin[1]}",
            "--threads",
            1,
        )
        res[writer] = compare(ids, matrix, *cgef_pairs(cgef, cellmap, list(gem.genes)), n_genes)
    e, g = res["exact"], res["gefpy"]
    print(
        f"GEM {a.gem}: {int(gem.count.sum())} UMIs, {len(gem.count)} records, {n_genes} genes; "
        f"{e['total']} UMIs inside {len(ids)} cells (exact aggregation), {outside} outside cells"
    )
    print(f"{'':52} {'exact writer':>14} {'gefpy writer':>14}")
    rows = [
        ("UMIs given to cells", "in_cells", "d"),
        ("cells in the cgef (with >= 1 UMI)", "cells", "d"),
        ("in-cell UMIs assigned to the same cell and gene", "frac", ".4%"),
        ("in-cell UMIs assigned differently or lost", "diff", "d"),
        ("cells whose UMI count differs from exact", "umi_cells_differ", "d"),
        ("largest per-cell UMI difference", "umi_max_abs", "d"),
        ("cells whose gene count differs from exact", "gene_cells_differ", "d"),
    ]
    for title, key, fmt in rows:
        print(f"{title:52} {format(e[key], fmt):>14} {format(g[key], fmt):>14}")
    print(f"{'segrefine cgef wall time (s, incl. ~1 s start)':52} {secs['exact']:14.2f} {secs['gefpy']:14.2f}")
    if a.no_h5ad:
        return
    h5ad = out / "exact.h5ad"
    t_h5ad = step(
        "stereopy", "h5ad", "--cgef", out / "exact.cgef", "--cellmap", out / "exact.cellmap.csv", "--out", h5ad
    )
    check = (
        "import anndata, sys; a = anndata.read_h5ad(sys.argv[1]); "
        "print(f'anndata {anndata.__version__} (Python {sys.version.split()[0]}): {a.n_obs} cells x {a.n_vars}"
        " genes; obs {sorted(a.obs.columns)}; obsm {sorted(a.obsm.keys())}; "
        "total_counts sum {int(a.obs.total_counts.sum())}')"
    )
    proc = subprocess.run([str(env_python("anndata")), "-c", check, str(h5ad)], capture_output=True, text=True)
    print(f"h5ad (stereopy, {t_h5ad:.1f} s): {proc.stdout.strip() or proc.stderr[-2000:]}")
    step(
        "core",
        "expression-qc",
        "--cellmaps",
        out / "exact.cellmap.csv",
        out / "gefpy.cellmap.csv",
        "--samples",
        "exact",
        "gefpy",
        "--out-dir",
        out / "qc",
    )
    print(f"QC (exact vs gefpy cells): {out / 'qc'}/summary.csv, extreme_area.csv, distributions.png")


if __name__ == "__main__":
    main()
