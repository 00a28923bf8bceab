rule cgef:
    """GEM/bgef + whole-slide labels -> cell-bin GEF (exact writer or gefpy) and its per-cell table; as cgef_qc, the
    same for the other stage's labels (before/after QC: results/expression/{sample}/{stage}/)."""
    input:
        gem=lambda wc: samples.loc[wc.sample, "expression"],
        labels=lambda wc: f"{slide_dir(wc)}/labels.tif",
    output:
        cgef=f"{RESULTS}/expression/{{sample}}/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/cellmap.csv",
        report=f"{RESULTS}/expression/{{sample}}/alignment.json",
    log:
        "logs/cgef/{sample}.log",
    benchmark:
        "benchmarks/cgef/{sample}.tsv"
    conda:
        env_file("gef")
    threads: config["expression"]["threads"]
    params:
        writer=config["expression"]["writer"],
        origin=expression_origin,
    shell:
        segrefine("gef") + " cgef --gem {input.gem:q} --labels {input.labels} --cgef {output.cgef} "
        "--cellmap {output.cellmap} --report {output.report} --writer {params.writer} --origin {params.origin} "
        "--threads {threads} > {log} 2>&1"


use rule cgef as cgef_qc with:
    output:
        cgef=f"{RESULTS}/expression/{{sample}}/{{stage}}/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/{{stage}}/cellmap.csv",
        report=f"{RESULTS}/expression/{{sample}}/{{stage}}/alignment.json",
    log:
        "logs/cgef/{stage}/{sample}.log",
    benchmark:
        "benchmarks/cgef/{stage}/{sample}.tsv"
    wildcard_constraints:
        stage=other_stage(),


rule h5ad:
    """cgef -> AnnData (.h5ad), X streamed from the cgef in bounded memory (`--writer stereopy` for stereopy's own
    reader); obs carries each cell's id in the label image."""
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
    """Per-cell and per-sample QC of each whole-slide stage: UMIs, genes and area per cell, cells of extreme area,
    distributions; with both stages (cgef and cgef_qc), before (pretrained) vs after (fine-tuned) with Mann-Whitney
    tests."""
    input:
        cellmaps=qc_cellmaps,
        reports=qc_reports,
    output:
        # one dict, so the optional outputs stay after the others (snakefmt moves a directive's `**` items first)
        **{
            "summary": report(qc_outputs()["summary"], caption="../report/qc_summary.rst", **QC_REPORT),
            "cells": qc_outputs()["cells"],
            "extreme": report(qc_outputs()["extreme"], caption="../report/qc_extreme_area.rst", **QC_REPORT),
            "plot": report(qc_outputs()["plot"], caption="../report/qc_distributions.rst", **QC_REPORT),
            **(
                {
                    "before_after": report(
                        qc_outputs()["before_after"], caption="../report/qc_before_after.rst", **QC_REPORT
                    )
                }
                if qc_before_after()
                else {}
            ),
            **(
                {
                    "saw_comparison": report(
                        qc_outputs()["saw_comparison"], caption="../report/qc_saw_comparison.rst", **QC_REPORT
                    )
                }
                if saw_tables()
                else {}
            ),
        },
    log:
        "logs/expression_qc.log",
    conda:
        env_file("core")
    params:
        args=qc_args,
        out_dir=lambda wc, output: str(Path(output.summary).parent),
    shell:
        segrefine("core") + " expression-qc --cellmaps {input.cellmaps} --reports {input.reports} {params.args} "
        "--out-dir {params.out_dir} > {log} 2>&1"


rule saw_cells:
    """SAW's own cell-bin GEF (a sample given as a SAW outs folder) -> a per-cell table like ours, so the expression QC
    puts SAW's nuclei (cellbin.gef) and cells (adjusted.cellbin.gef) beside ours."""
    input:
        lambda wc: samples.loc[wc.sample, "saw_cellbins"][wc.saw_stage],
    output:
        f"{RESULTS}/expression/{{sample}}/{{saw_stage}}/cellmap.csv",
    log:
        "logs/saw_cells/{sample}.{saw_stage}.log",
    wildcard_constraints:
        saw_stage="saw_nuclei|saw_cells",
    conda:
        env_file("gef")
    shell:
        segrefine("gef") + " saw-cells --cellbin {input:q} --out {output} > {log} 2>&1"
