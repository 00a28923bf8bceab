"""scverse smoke analysis of the workflow's AnnData, and how well its clusters recover the true cell types.

Runs only in the anndata env (Python 3.12, anndata 0.13, scanpy; envs/anndata.yaml), so it may use what they
need; it still imports on Python 3.8 (nothing at module level but numpy).

``cluster_check`` opens each stage's h5ad with current anndata (the check that
scanpy reads it without stereopy), then runs scanpy's standard path:
``normalize_total`` (target 10,000), ``log1p``, ``pca`` (at most 50 components,
fewer with fewer genes or cells), ``neighbors`` (15), ``leiden`` (igraph
flavour, 2 iterations, seeded). With each cell's true type (``truth_type`` of
`segrefine purity`'s ``cells_<stage>.csv``, the type of its dominant true cell)
it scores the clusters by the adjusted Rand index (ARI, scikit-learn) over the
cells that have a true type: 1 is a perfect recovery, 0 what chance gives.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from segrefine import SegRefineError

MIN_UMIS = 10  # cells with fewer UMIs are left out of the clustering (scanpy's filter_cells)


def cluster_stage(h5ad, cells_csv=None, resolution: float = 0.5, seed: int = 0, min_umis: int = MIN_UMIS) -> dict:
    """The smoke analysis of one h5ad (module docstring) -> its figures (cells, genes, clusters, ARI)."""
    import anndata
    import pandas as pd
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    path = Path(h5ad)
    if not path.is_file():
        raise SegRefineError(f"{path}: AnnData (.h5ad) not found")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:
        raise SegRefineError(f"{path}: anndata {anndata.__version__} cannot read it ({type(exc).__name__}: {exc})"
                             ) from None
    if "label_id" not in adata.obs:
        raise SegRefineError(f"{path}: obs has no 'label_id' column (not written by `segrefine h5ad`)")
    out = {"h5ad": str(path), "cells": int(adata.n_obs), "genes": int(adata.n_vars),
           "anndata": anndata.__version__, "scanpy": sc.__version__}
    sc.pp.filter_cells(adata, min_counts=min_umis)
    out["cells_clustered"] = int(adata.n_obs)
    if adata.n_obs < 3:
        out.update(clusters=None, ari=None, note=f"fewer than 3 cells with >= {min_umis} UMIs: no clustering")
        return out
    adata.X = adata.X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_comps = int(max(1, min(50, adata.n_obs - 1, adata.n_vars - 1)))
    sc.pp.pca(adata, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=min(15, adata.n_obs - 1), n_pcs=n_comps, random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    clusters = adata.obs["leiden"].astype(str)
    out["clusters"] = int(clusters.nunique())
    out["cluster_sizes"] = {k: int(v) for k, v in clusters.value_counts().sort_index().items()}
    out["ari"] = None
    if cells_csv:
        truth = pd.read_csv(cells_csv, usecols=["label_id", "truth_type"], dtype={"truth_type": str})
        kinds = dict(zip(truth["label_id"].astype(np.int64), truth["truth_type"].fillna("")))
        true = np.array([kinds.get(int(i), "") for i in adata.obs["label_id"]], dtype=object)
        known = true != ""
        out["cells_with_true_type"] = int(known.sum())
        if known.sum() >= 2:
            out["ari"] = float(adjusted_rand_score(true[known], clusters.to_numpy()[known]))
            table = pd.crosstab(pd.Series(true[known], name="type"), pd.Series(clusters.to_numpy()[known],
                                                                               name="cluster"))
            out["types_by_cluster"] = {str(c): {str(t): int(table.loc[t, c]) for t in table.index if table.loc[t, c]}
                                       for c in table.columns}
    return out


def cluster_check(stages: Sequence[str], h5ads: Sequence, out_json, cells: Optional[Sequence] = None,
                  sample: str = "", resolution: float = 0.5, seed: int = 0) -> dict:
    """``cluster_stage`` of each stage's h5ad (with its purity cell table when given), written to ``out_json``."""
    from segrefine.io import write_text_atomic

    cells = list(cells or [])
    if len(stages) != len(h5ads) or (cells and len(cells) != len(stages)):
        raise SegRefineError(f"{len(stages)} stages, {len(h5ads)} h5ad files and {len(cells)} cell tables: give one "
                             "h5ad (and, with truth, one cell table) per stage")
    if not resolution > 0:
        raise SegRefineError(f"Leiden resolution {resolution}: expected a positive number")
    doc = {"sample": sample, "resolution": resolution, "seed": seed, "stages": {}}
    for i, (stage, h5ad) in enumerate(zip(stages, h5ads)):
        doc["stages"][stage] = cluster_stage(h5ad, cells[i] if cells else None, resolution, seed)
    write_text_atomic(out_json, json.dumps(doc, indent=2) + "\n")
    return doc
