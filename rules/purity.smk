# Purity of each cell table's expression (docs/expression.md, Purity): the MECR of marker pairs (expression.markers)
# and, for a sample with a truth (sample sheet columns truth, truth_types), each cell's purity against the true cells;
# scanpy's smoke analysis of every table's h5ad with the Leiden clusters' ARI against the true types; one table of
# them all in the expression QC (results/expression/qc/purity.csv, purity.png). Included after expression.smk and
# cells.smk: it reads their cgefs and h5ads, before vs after fine-tuning, nuclei and (with expression.cells) cells.
# Its input functions are in rules/common.smk (purity section).


use rule h5ad as h5ad_qc with:
    input:
        cgef=f"{RESULTS}/expression/{{sample}}/{{stage}}/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/{{stage}}/cellmap.csv",
    output:
        f"{RESULTS}/expression/{{sample}}/{{stage}}/cells.h5ad",
    log:
        "logs/h5ad/{stage}/{sample}.log",
    benchmark:
        "benchmarks/h5ad/{stage}/{sample}.tsv"
    wildcard_constraints:
        stage=other_stage(),


rule purity:
    """Per stage of one sample: the MECR of the marker pairs (from each cgef) and, with a truth, each cell's purity
    against the true cells (matrix streamed, labels read by bands)."""
    input:
        unpack(purity_truth_inputs),
        cgefs=lambda wc: [f"{table_dir(wc.sample, st)}/cells.cgef" for st in purity_stages()],
        labels=lambda wc: [table_labels(wc.sample, st) for st in purity_stages()],
    output:
        summary=f"{RESULTS}/expression/{{sample}}/purity/summary.json",
        cells=f"{RESULTS}/expression/{{sample}}/purity/cells.csv",
        pairs=f"{RESULTS}/expression/{{sample}}/purity/mecr_pairs.csv",
    log:
        "logs/purity/{sample}.log",
    benchmark:
        "benchmarks/purity/{sample}.tsv"
    conda:
        env_file("gef")
    params:
        stages=lambda wc: " ".join(purity_stages()),
        args=purity_args,
        origin=expression_origin,
        out_dir=lambda wc, output: str(Path(output.summary).parent),
    shell:
        segrefine("gef") + " purity --sample {wildcards.sample} --stages {params.stages} --cgefs {input.cgefs} "
        "--labels {input.labels} --out-dir {params.out_dir} --origin {params.origin}{params.args} > {log} 2>&1"


rule cluster_check:
    """Each stage's h5ad opened with current anndata and clustered by scanpy (normalize, log1p, PCA, neighbours,
    Leiden, seeded); with a truth, the adjusted Rand index of the clusters against the cells' true types."""
    input:
        h5ads=lambda wc: [f"{table_dir(wc.sample, st)}/cells.h5ad" for st in purity_stages()],
        cells=lambda wc: (
            [f"{RESULTS}/expression/{wc.sample}/purity/cells.csv"] if sample_column(wc.sample, "truth") else []
        ),
    output:
        f"{RESULTS}/expression/{{sample}}/purity/clusters.json",
    log:
        "logs/cluster_check/{sample}.log",
    benchmark:
        "benchmarks/cluster_check/{sample}.tsv"
    conda:
        env_file("anndata")
    params:
        stages=lambda wc: " ".join(purity_stages()),
        cells=lambda wc, input: f"--cells {input.cells}" if input.cells else "",
    shell:
        segrefine("anndata") + " cluster-check --sample {wildcards.sample} --stages {params.stages} "
        "--h5ads {input.h5ads} {params.cells} --out {output} > {log} 2>&1"


rule purity_table:
    """One row per sample and stage: MECR, purity, mixed cells, marker purity, Leiden clusters and ARI."""
    input:
        summaries=expand(f"{RESULTS}/expression/{{sample}}/purity/summary.json", sample=purity_samples()),
        clusters=expand(f"{RESULTS}/expression/{{sample}}/purity/clusters.json", sample=expression_samples()),
    output:
        table=report(f"{RESULTS}/expression/qc/purity.csv", caption="../report/qc_purity.rst", **QC_REPORT),
        plot=report(f"{RESULTS}/expression/qc/purity.png", caption="../report/qc_purity.rst", **QC_REPORT),
    log:
        "logs/purity_table.log",
    conda:
        env_file("core")
    params:
        summaries=lambda wc, input: f"--summaries {' '.join(input.summaries)}" if input.summaries else "",
    shell:
        segrefine("core") + " purity-table {params.summaries} --clusters {input.clusters} --out {output.table} "
        "--plot {output.plot} > {log} 2>&1"
