"""How exact is the cgef that gefpy writes? Compared with an exact aggregation of the GEM.

For every cell of the whole-slide label image, the exact aggregation
(segrefine.gem.aggregate_by_labels) counts each transcript at DNB (x, y) for
the cell whose label covers that pixel. The cgef's cells are mapped to label
ids through cellmap.csv. Printed side by side: UMIs inside cells, UMIs the cgef
gives to cells, and the fraction of in-cell UMIs that the cgef assigns to the
same cell and gene (sum of min(exact, cgef) over cells and genes / exact total).

Run it in the stereopy env (it has h5py and scipy), after `make demo`:

    .envs/stereopy/bin/python bench/cgef_exactness.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from segrefine.gem import aggregate_by_labels, read_gem  # noqa: E402


def cgef_counts(cgef, cellmap_csv, genes):
    """{(label id, gene code): count} of the cgef."""
    import h5py
    import pandas as pd

    cellmap = pd.read_csv(cellmap_csv)
    with h5py.File(cgef, "r") as f:
        cells = f["cellBin/cell"][:]
        exp = f["cellBin/cellExp"][:]
        names = [g.decode() for g in f["cellBin/gene"]["geneName"]]
    code = {g: i for i, g in enumerate(genes)}
    cgef_gene = np.array([code[n] for n in names])
    label_of = dict(zip(cellmap["cgef_cell"], cellmap["label_id"]))
    out = {}
    for c in cells:
        lab = int(label_of[int(c["id"])])
        part = exp[int(c["offset"]): int(c["offset"]) + int(c["geneCount"])]
        for g, n in zip(part["geneID"], part["count"]):
            key = (lab, int(cgef_gene[g]))
            out[key] = out.get(key, 0) + int(n)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gem", default="demo/DEMO01.gem.gz")
    ap.add_argument("--labels", default="results/segmentation/DEMO01/labels.tif")
    ap.add_argument("--cgef", default="results/expression/DEMO01/cells.cgef")
    ap.add_argument("--cellmap", default="results/expression/DEMO01/cellmap.csv")
    a = ap.parse_args()
    import tifffile

    gem = read_gem(a.gem)
    labels = tifffile.imread(a.labels)
    ids, matrix, outside = aggregate_by_labels(gem, labels)
    exact = {}
    coo = matrix.tocoo()
    for r, g, n in zip(coo.row, coo.col, coo.data):
        exact[(int(ids[r]), int(g))] = int(n)
    got = cgef_counts(a.cgef, a.cellmap, list(gem.genes))
    total = sum(exact.values())
    same = sum(min(n, got.get(k, 0)) for k, n in exact.items())
    cells_exact = len(ids)
    cells_cgef = len({k[0] for k in got})
    print(f"{'':38} {'exact':>12} {'gefpy cgef':>12}")
    print(f"{'UMIs in the GEM':38} {int(gem.count.sum()):12d} {'':>12}")
    print(f"{'UMIs inside cells':38} {total:12d} {sum(got.values()):12d}")
    print(f"{'cells with at least one UMI':38} {cells_exact:12d} {cells_cgef:12d}")
    print(f"same cell and gene as the exact aggregation: {same / total:.4f} of in-cell UMIs "
          f"({total - same} UMIs assigned differently or lost)")


if __name__ == "__main__":
    main()
