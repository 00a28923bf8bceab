rule cgef:
    """GEM/bgef + whole-slide labels -> cell-bin GEF (exact writer or gefpy) and its per-cell table."""
    input:
        gem=lambda wc: samples.loc[wc.sample, "expression"],
        labels=f"{RESULTS}/segmentation/{{sample}}/labels.tif",
    output:
        cgef=f"{RESULTS}/expression/{{sample}}/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/cellmap.csv",
    params:
        writer=config["expression"].get("writer", "exact"),
        origin=expression_origin,
    log:
        "logs/cgef/{sample}.log",
    benchmark:
        "benchmarks/cgef/{sample}.tsv"
    threads: config["expression"]["threads"]
    conda:
        env_file("gef")
    shell:
        segrefine("gef") + " cgef --gem {input.gem:q} --labels {input.labels} --cgef {output.cgef} "
        "--cellmap {output.cellmap} --writer {params.writer} --origin {params.origin} --threads {threads} > {log} 2>&1"


rule h5ad:
    """cgef -> AnnData (.h5ad) with stereopy; obs carries each cell's id in the label image."""
    input:
        cgef=f"{RESULTS}/expression/{{sample}}/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/cellmap.csv",
    output:
        f"{RESULTS}/expression/{{sample}}/cells.h5ad",
    log:
        "logs/h5ad/{sample}.log",
    benchmark:
        "benchmarks/h5ad/{sample}.tsv"
    conda:
        env_file("stereopy")
    shell:
        segrefine("stereopy") + " h5ad --cgef {input.cgef} --cellmap {input.cellmap} --out {output} > {log} 2>&1"


rule expression_qc:
    """Per-cell and per-sample QC: UMIs, genes and area per cell, cells of extreme area, distributions."""
    input:
        cellmaps=expand(f"{RESULTS}/expression/{{sample}}/cellmap.csv", sample=expression_samples()),
    output:
        summary=f"{RESULTS}/expression/qc/summary.csv",
        cells=f"{RESULTS}/expression/qc/cells.csv",
        extreme=f"{RESULTS}/expression/qc/extreme_area.csv",
        plot=f"{RESULTS}/expression/qc/distributions.png",
    params:
        samples=" ".join(expression_samples()),
        out_dir=lambda wc, output: str(Path(output.summary).parent),
    log:
        "logs/expression_qc.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " expression-qc --cellmaps {input.cellmaps} --samples {params.samples} "
        "--out-dir {params.out_dir} > {log} 2>&1"
