"""scverse smoke analysis of the workflow's AnnData, and how well its clusters recover the true cell types.

Runs only in the anndata env (Python 3.12, anndata 0.13, scanpy; envs/anndata.yaml), so it may use what they
need; it still imports on Python 3.8 (nothing at module level but numpy).

``cluster_check`` opens each stage's h5ad with current anndata (the check that
scanpy reads it without stereopy), then runs scanpy's standard path:
``normalize_total`` (target 10,000), ``log1p``, ``pca`` (at most 50 components,
fewer with fewer genes or cells), ``neighbors`` (15), ``leiden`` (igraph
flavour, 2 iterations, seeded). With each cell's true type (``truth_type`` of
`segrefine purity`'s ``cells.csv``, the type of its dominant true cell)
it scores the clusters by the adjusted Rand index (ARI, scikit-learn) over the
cells that have a true type: 1 is a perfect recovery, 0 what chance gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from segrefine import SegRefineError

MIN_UMIS = 10  # cells with fewer UMIs are left out of the clustering (scanpy's filter_cells)


def cluster_stage(h5ad, truth_types=None, resolution: float = 0.5, seed: int = 0, min_umis: int = MIN_UMIS) -> dict:
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
        raise SegRefineError(f"{path}: this anndata cannot read it ({type(exc).__name__}: {exc})") from None
    if "label_id" not in adata.obs:
        raise SegRefineError(f"{path}: obs has no 'label_id' column (not written by `segrefine h5ad`)")
    from importlib.metadata import version

    out = {
        "h5ad": str(path),
        "cells": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "anndata": version("anndata"),
        "scanpy": version("scanpy"),
    }
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
    if truth_types:
        true = np.array([truth_types.get(int(i), "") for i in adata.obs["label_id"]], dtype=object)
        known = true != ""
        out["cells_with_true_type"] = int(known.sum())
        if known.sum() >= 2:
            out["ari"] = float(adjusted_rand_score(true[known], clusters.to_numpy()[known]))
            table = pd.crosstab(
                pd.Series(true[known], name="type"), pd.Series(clusters.to_numpy()[known], name="cluster")
            )
            out["types_by_cluster"] = {
                str(c): {str(t): int(table.loc[t, c]) for t in table.index if table.loc[t, c]} for c in table.columns
            }
    return out


def read_true_types(cells_csv) -> Dict[str, Dict[int, str]]:
    """{stage: {label id: true type}} from `segrefine purity`'s cells.csv (cells without a true cell left out)."""
    import pandas as pd

    try:
        table = pd.read_csv(
            cells_csv, usecols=["stage", "label_id", "truth_type"], dtype={"truth_type": str, "stage": str}
        )
    except (OSError, ValueError) as exc:
        raise SegRefineError(f"{cells_csv}: not a cell table of `segrefine purity` ({exc})") from None
    table = table[table["truth_type"].fillna("") != ""]
    return {stage: dict(zip(g["label_id"].astype(np.int64), g["truth_type"])) for stage, g in table.groupby("stage")}


def cluster_check(
    stages: Sequence[str],
    h5ads: Sequence,
    out_json,
    cells=None,
    sample: str = "",
    resolution: float = 0.5,
    seed: int = 0,
) -> dict:
    """``cluster_stage`` of each stage's h5ad, scored against the true types of ``cells`` (`segrefine purity`'s
    cells.csv) when given, written to ``out_json``."""
    from segrefine.io import write_text_atomic

    if len(stages) != len(h5ads):
        raise SegRefineError(f"{len(stages)} stages and {len(h5ads)} h5ad files: give one h5ad per stage")
    if not resolution > 0:
        raise SegRefineError(f"Leiden resolution {resolution}: expected a positive number")
    types = read_true_types(cells) if cells else {}
    doc = {"sample": sample, "resolution": resolution, "seed": seed, "stages": {}}
    for stage, h5ad in zip(stages, h5ads):
        doc["stages"][stage] = cluster_stage(h5ad, types.get(stage) if cells else None, resolution, seed)
    write_text_atomic(out_json, json.dumps(doc, indent=2) + "\n")
    return doc
