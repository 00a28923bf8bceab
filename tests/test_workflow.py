"""The real Snakemake workflow on the tiny test config (config/test): full run,
the exact rerun plan after adding an annotation, lint, and config errors."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import REPO, SCRIPTS, run_step
from segrefine.annotations import dump_geojson, labels_to_geojson, relabel_sequential
from segrefine.envs import env_python


def snakemake(workdir, *args, config="config.yaml"):
    cmd = [
        str(env_python("core")),
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--configfile",
        config,
        "--cores",
        "2",
        "--resources",
        "gpu=1",
        *args,
    ]
    # Snakemake prints its errors on stdout: merge the streams
    return subprocess.run(
        cmd,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("workflow")
    for f in (REPO / "config" / "test").iterdir():
        shutil.copy(f, d / f.name)
    run_step(
        "core", "demo-data", "--out", d / "demo", "--sn", "TINY01", "--size", 384, "--patches", 6, "--patch-size", 96
    )
    return d


def planned_jobs(proc):
    """{rule: count} from the job-stats table of a dry run."""
    table = proc.stdout.split("Job stats:")[-1]
    return {
        m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"
    }


def test_lint_is_clean(workdir):
    proc = snakemake(workdir, "--lint")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout


@pytest.mark.slow
def test_full_run(workdir):
    proc = snakemake(workdir)
    assert proc.returncode == 0, proc.stdout[-5000:]
    res = workdir / "results"
    summary = pd.read_csv(res / "evaluation" / "summary.csv")
    assert set(summary["stage"]) == {"pretrained", "finetuned"}
    assert summary[["precision", "recall", "f1", "jaccard", "dice"]].notna().all().all()
    card = json.loads((res / "models" / "tiny" / "finetuned" / "card.json").read_text())
    assert card["trainset_version"] == json.loads((res / "trainset" / "trainset.json").read_text())["version"]
    labels = tifffile.imread(res / "segmentation" / "TINY01" / "labels.tif")
    assert labels.shape == (384, 384) and labels.dtype == np.uint32
    cells = pd.read_csv(res / "segmentation" / "TINY01" / "cells.csv")
    assert len(cells) == len(np.unique(labels)) - 1 > 0
    # tiled: 2 x 2 tiles in 2 shard jobs, stitched with unique ids 1..N (docs/tiling.md)
    seg = json.loads((res / "segmentation" / "TINY01" / "segmentation.json").read_text())
    assert seg["tiles"] == 4 and seg["shards"] == 2 and seg["cells"] == len(cells) == labels.max()
    assert len(list((res / "candidates" / "TINY01" / "patches").glob("*-img.tif"))) == 9
    # the AnnData, read back with anndata in the stereopy env: every cell maps to a cell of the label image
    check = (
        "import anndata, sys; a = anndata.read_h5ad(sys.argv[1]); "
        "print(a.n_obs, a.n_vars, list(a.obs['label_id']), a.obsm['spatial'].shape)"
    )
    out = subprocess.run(
        [str(env_python("stereopy")), "-c", check, str(res / "expression" / "TINY01" / "cells.h5ad")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")[-2]
    n_obs, n_vars = map(int, out.split()[:2])
    label_ids = json.loads(out[out.index("[") : out.index("]") + 1])
    assert n_vars == 20 and n_obs > 0
    assert set(label_ids) <= set(cells["cell_id"]) and 0 not in label_ids
    # before/after QC (docs/expression.md): the slide also segmented with tiny's pretrained stage on the same tile
    # plan, beside the configured (fine-tuned) stage's unchanged paths; its cgef; the QC compares both stages
    pre = res / "segmentation" / "TINY01" / "pretrained"
    assert tifffile.imread(pre / "labels.tif").shape == (384, 384)
    assert json.loads((pre / "segmentation.json").read_text())["tiles"] == 4
    assert sorted(p.name for p in (pre / "shards").iterdir()) == ["0.json", "1.json"]
    cellmaps = {
        "finetuned": pd.read_csv(res / "expression" / "TINY01" / "cellmap.csv"),
        "pretrained": pd.read_csv(res / "expression" / "TINY01" / "pretrained" / "cellmap.csv"),
    }
    # every cell table has its h5ad: the cluster check (rules/purity.smk) clusters each of them
    assert (res / "expression" / "TINY01" / "pretrained" / "cells.h5ad").is_file()
    qc = res / "expression" / "qc"
    # nuclei grown into cells (expression.cells, 3 µm = 6 px in the test config): per stage, cell labels with the
    # nuclei's ids and their own matrix in expanded/ (docs/expression.md, Cells)
    for stage_res, top in (("finetuned", res / "segmentation" / "TINY01"), ("pretrained", pre)):
        nuclei, grown = tifffile.imread(top / "labels.tif"), tifffile.imread(top / "expanded" / "labels.tif")
        assert grown.dtype == np.uint32 and (grown[nuclei > 0] == nuclei[nuclei > 0]).all()
        assert set(np.unique(grown)) == set(np.unique(nuclei)) and (grown > 0).sum() > (nuclei > 0).sum()
        assert json.loads((top / "expanded" / "cells.json").read_text())["distance_px"] == 6
        sub = ["expanded"] if stage_res == "finetuned" else ["pretrained", "expanded"]
        cellmaps[f"{stage_res}_cells"] = pd.read_csv(res.joinpath("expression", "TINY01", *sub, "cellmap.csv"))
        assert set(cellmaps[f"{stage_res}_cells"]["label_id"]) <= set(np.unique(nuclei)) - {0}
    assert (res / "expression" / "TINY01" / "expanded" / "cells.h5ad").is_file()
    summary = pd.read_csv(qc / "summary.csv")
    assert summary[["sample", "stage"]].values.tolist() == [
        ["TINY01", "pretrained"],
        ["TINY01", "finetuned"],
        ["TINY01", "pretrained_cells"],
        ["TINY01", "finetuned_cells"],
    ]
    assert summary.set_index("stage")["cells"].to_dict() == {k: len(v) for k, v in cellmaps.items()}
    # purity of every cell table against the demo's truth, MECR of the configured markers, Leiden ARI
    purity = pd.read_csv(qc / "purity.csv")
    assert purity["stage"].tolist() == ["pretrained", "finetuned", "pretrained_cells", "finetuned_cells"]
    assert purity[["mecr", "mean_purity", "fraction_mixed", "ari_true_type"]].notna().all().all()
    assert ((purity["mean_purity"] > 0) & (purity["mean_purity"] <= 1)).all() and (qc / "purity.png").is_file()
    ba = pd.read_csv(qc / "before_after.csv")
    assert list(ba["metric"]) == ["total_counts", "n_genes", "area"] * 2
    assert list(ba["before"]) == ["pretrained"] * 3 + ["pretrained_cells"] * 3
    assert list(ba["after"]) == ["finetuned"] * 3 + ["finetuned_cells"] * 3
    area = ba[ba["before"] == "pretrained"].set_index("metric").loc["area"]
    assert (area["n_before"], area["n_after"]) == (len(cellmaps["pretrained"]), len(cellmaps["finetuned"]))
    assert area["median_after"] == np.median(cellmaps["finetuned"]["area"]) and 0 <= area["p_value"] <= 1
    assert set(pd.read_csv(qc / "extreme_area.csv")["stage"]) <= set(cellmaps)
    assert (qc / "distributions.png").read_bytes()[:4] == b"\x89PNG"
    # the SpatialData store (docs/spatialdata.md), read back with spatialdata in its own env: both labels, the
    # outlines, one table row per cell of the AnnData, linked to the nuclei labels; its spatialdata-plot figure
    check = (
        "import spatialdata, sys; s = spatialdata.read_zarr(sys.argv[1]); t = s.tables['table']; "
        "print(sorted(s.labels), sorted(s.shapes), t.n_obs, t.uns['spatialdata_attrs']['region'])"
    )
    out = (
        subprocess.run(
            [str(env_python("spatialdata")), "-c", check, str(res / "spatialdata" / "TINY01.zarr")],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split("\n")[-1]
    )
    assert out == f"['cells', 'nuclei'] ['nuclei_boundaries'] {n_obs} nuclei"
    assert (res / "spatialdata" / "TINY01.png").read_bytes()[:4] == b"\x89PNG"
    # nothing is left to do
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout


@pytest.mark.slow
def test_html_report(workdir):
    """`snakemake --report` gathers the evaluation tables, figures, overlays and loss curves."""
    proc = snakemake(workdir, "--report", "report.html")
    assert proc.returncode == 0, proc.stdout[-3000:]
    html = (workdir / "report.html").read_text(errors="replace")
    for name in (
        "summary.csv",
        "metrics_long.csv",
        "boxplots.png",
        "wilcoxon.csv",
        "loss_curves.png",
        "complexity_vs_accuracy.csv",
        "ranking.csv",
        "Overlays",
        "overlay.png",
        # expression QC, before vs after fine-tuning
        "Expression QC",
        "before_after.csv",
        "distributions.png",
        "extreme_area.csv",
    ):
        assert name in html, name


@pytest.mark.slow
def test_adding_an_annotation_reruns_exactly_what_depends_on_it(workdir):
    truth = tifffile.imread(workdir / "demo" / "TINY01-truth.tif")
    x, y, w = 288, 288, 96
    new = workdir / "demo" / "annotations" / f"TINY01-x{x}_y{y}_w{w}_h{w}.geojson"
    assert not new.exists()
    new.write_text(dump_geojson(labels_to_geojson(relabel_sequential(truth[y : y + w, x : x + w].astype(np.int64)))))
    try:
        plan = planned_jobs(snakemake(workdir, "-n"))
    finally:
        new.unlink()
    assert plan == {
        "annotated_patch": 1,
        "convert_annotation": 1,
        "trainset": 1,
        "finetune": 4,
        "evaluate": 8,
        "evaluation_summary": 1,
        # the fine-tuned stage's whole slide: the halo against the new training cells, then its shards;
        # the tile plan (slide and configuration only) and the pretrained stage's whole slide for the
        # before/after QC (segment_shard_qc, stitch_qc, cgef_qc) are NOT redone: neither depends on the
        # training set
        "halo_check": 1,
        "segment_shard": 2,
        "stitch": 1,
        "cgef": 1,
        "h5ad": 1,
        "expression_qc": 1,
        "all": 1,
        # the fine-tuned stage's nuclei grown into cells, and their matrix (rules/cells.smk)
        "cells": 1,
        "cgef_cells": 1,
        "h5ad_cells": 1,
        # evaluation figures and decisions (docs/evaluation.md): overlays per model and stage, threshold
        # sweeps of the cellpose, stardist and U-Net models, zero-shot screening of the 4 pretrained models
        "evaluation_boxplots": 1,
        "evaluation_overlays": 8,
        "loss_curves": 1,
        "complexity": 1,
        "threshold_sweep": 6,
        "screen_pretrained": 4,
        "screening_ranking": 1,
        # the sample's purity and cluster check (one job each over all its cell tables, the fine-tuned
        # ones among them) and the purity table (rules/purity.smk)
        "purity": 1,
        "cluster_check": 1,
        "purity_table": 1,
        # the sample's SpatialData store holds the fine-tuned stage's labels and table
        "spatialdata": 1,
    }


def _broken_config(workdir, old, new, name="broken.yaml"):
    text = (workdir / "config.yaml").read_text()
    assert old in text
    (workdir / name).write_text(text.replace(old, new))
    return name


def test_config_typo_fails_before_any_job_naming_the_key(workdir):
    cfg = _broken_config(workdir, "trainset: {seed: 0,", "trainset: {sed: 0,")
    proc = snakemake(workdir, "-n", config=cfg)
    assert proc.returncode != 0
    assert "config, key trainset: Additional properties are not allowed ('sed' was unexpected)" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) <= 8, proc.stdout  # a few lines, not the schema
    # a top-level typo: Snakemake's own message prints the whole schema (hundreds of lines)
    cfg = _broken_config(workdir, "model_cache: model_cache", "model_cach: model_cache", "top.yaml")
    proc = snakemake(workdir, "-n", config=cfg)
    assert proc.returncode != 0
    assert (
        "SegRefine configuration: config: Additional properties are not allowed ('model_cach' was unexpected)"
        in proc.stdout
    )
    assert len(proc.stdout.strip().splitlines()) <= 8, proc.stdout


def test_unconfigured_segmentation_model_is_named(workdir):
    cfg = _broken_config(workdir, "  model: tiny\n", "  model: tinyy\n", "segmodel.yaml")
    proc = snakemake(workdir, "-n", config=cfg)
    assert proc.returncode != 0
    assert (
        "segmentation.model 'tinyy' is not a configured model (models: baseline, sd, tiny, unet_tiny)" in proc.stdout
    ), proc.stdout


def test_a_users_configfile_replaces_the_demo_config(workdir):
    """--configfile replaces config/config.yaml instead of merging into it: the demo's model (cyto_demo) and sample
    (DEMO01) are not planned beside the test config's. --forceall plans every job, whatever earlier tests built."""
    proc = snakemake(workdir, "-n", "--forceall")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "cyto_demo" not in proc.stdout and "DEMO01" not in proc.stdout
    assert "model=tiny" in proc.stdout and planned_jobs(proc)["finetune"] == 4


def test_unknown_framework_names_the_allowed_values(workdir):
    cfg = _broken_config(workdir, "    framework: cellpose\n    pretrained", "    framework: celpose\n    pretrained")
    proc = snakemake(workdir, "-n", config=cfg)
    assert proc.returncode != 0 and "'celpose' is not one of ['cellpose', 'classical', " in proc.stdout
    assert "'stardist', 'unet']" in proc.stdout


def test_sample_sheet_errors_name_the_file(workdir):
    sheet = (workdir / "samples.tsv").read_text()
    (workdir / "missing.tsv").write_text(sheet.replace("demo/TINY01.tif", "demo/NOPE.tif"))
    cfg = _broken_config(workdir, "samples: samples.tsv", "samples: missing.tsv", "b1.yaml")
    proc = snakemake(workdir, "-n", config=cfg)
    assert proc.returncode != 0 and "missing.tsv: sample TINY01: image demo/NOPE.tif not found" in proc.stdout
    (workdir / "stain.tsv").write_text(sheet.replace("ssDNA", "Hoechst"))
    cfg = _broken_config(workdir, "samples: samples.tsv", "samples: stain.tsv", "b2.yaml")
    proc = snakemake(workdir, "-n", config=cfg)
    assert proc.returncode != 0 and "'Hoechst' is not one of ['ssDNA', 'DAPI', 'HE', 'mIF']" in proc.stdout


def test_annotation_named_for_another_chip_is_refused(workdir):
    stray = workdir / "demo" / "annotations" / "OTHER-x0_y0_w96_h96.geojson"
    stray.write_text("{}")
    try:
        proc = snakemake(workdir, "-n")
    finally:
        stray.unlink()
    assert proc.returncode != 0 and "names chip 'OTHER' but sits in the folder of sample 'TINY01'" in proc.stdout


MAKE_SAW_GEFS = """
import sys
import h5py, numpy as np, tifffile
from gefpy.bgef_writer_cy import generate_bgef
from gefpy.cgef_writer_cy import generate_cgef
gem, tissue_gef, truth, cellbin_gef, mask = sys.argv[1:6]
generate_bgef(gem, tissue_gef, n_thread=1, bin_sizes=[1])
with h5py.File(tissue_gef, "r") as f:  # gefpy's mask must have the matrix's extent 0..maxX x 0..maxY
    a = f["geneExp/bin1/expression"].attrs
    w, h = int(a["maxX"][0]) + 1, int(a["maxY"][0]) + 1
tifffile.imwrite(mask, ((tifffile.imread(truth)[:h, :w] > 0) * 255).astype(np.uint8))
generate_cgef(cellbin_gef, tissue_gef, mask, [256, 256])
"""


@pytest.mark.integration
def test_a_saw_outs_folder_is_a_sample_and_saws_cells_join_the_qc(workdir, tmp_path):
    """A sample given as SAW v8 outs/ (registered image, tissue.gef, cellbin.gef; no GEM): the image and the bgef
    come from the folder, and SAW's nuclei are read (saw_cells) into the QC beside both our stages."""
    import gzip

    outs = workdir / "saw" / "outs"
    (outs / "image").mkdir(parents=True, exist_ok=True)
    (outs / "feature_expression").mkdir(exist_ok=True)
    shutil.copy(workdir / "demo" / "TINY01.tif", outs / "image" / "TINY01_ssDNA_regist.tif")
    gem = tmp_path / "v01.gem"  # gefpy's bgef writer takes GEMv0.1 with its header
    with gzip.open(workdir / "demo" / "TINY01.gem.gz", "rt") as fh:
        body = [line for line in fh if not line.startswith("#")]
    gem.write_text("#FileFormat=GEMv0.1\n#BinSize=1\n#OffsetX=0\n#OffsetY=0\n" + "".join(body))
    proc = subprocess.run(
        [
            str(env_python("gef")),
            "-c",
            MAKE_SAW_GEFS,
            gem,
            outs / "feature_expression" / "TINY01.tissue.gef",
            workdir / "demo" / "TINY01-truth.tif",
            outs / "feature_expression" / "TINY01.cellbin.gef",
            tmp_path / "mask.tif",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (workdir / "saw.tsv").write_text(
        "sample\timage\tstain\tpixel_size_um\texpression\tannotations\tsaw_outs\n"
        "TINY01\t\tssDNA\t0.5\t\tdemo/annotations\tsaw/outs\n"
    )
    cfg = _broken_config(workdir, "samples: samples.tsv", "samples: saw.tsv", "saw.yaml")
    proc = snakemake(workdir, "-n", "-p", config=cfg)
    assert proc.returncode == 0, proc.stdout[-3000:]
    jobs = planned_jobs(proc)
    assert jobs["saw_cells"] == 1 and jobs["cgef"] == 1 and jobs["cgef_qc"] == 1 and jobs["expression_qc"] == 1
    assert "--slide saw/outs/image/TINY01_ssDNA_regist.tif" in proc.stdout
    assert "--gem saw/outs/feature_expression/TINY01.tissue.gef" in proc.stdout
    assert "saw-cells --cellbin saw/outs/feature_expression/TINY01.cellbin.gef" in proc.stdout
    assert "--stages pretrained finetuned pretrained_cells finetuned_cells saw_nuclei" in proc.stdout
    assert "saw_comparison.csv" in proc.stdout
    # SAW's table itself, as the rule makes it
    run_step(
        "gef",
        "saw-cells",
        "--cellbin",
        outs / "feature_expression" / "TINY01.cellbin.gef",
        "--out",
        tmp_path / "saw.csv",
    )
    saw = pd.read_csv(tmp_path / "saw.csv")
    truth = tifffile.imread(workdir / "demo" / "TINY01-truth.tif")
    assert 0 < len(saw) <= len(np.unique(truth)) - 1 and saw["total_counts"].sum() > 0
