# Nuclei grown into cells (expression.cells; docs/expression.md, Cells): the cell labels of each whole-slide stage
# beside its nuclei labels (results/segmentation/{sample}[/{stage}]/expanded/labels.tif), and the cells' matrix beside
# the nuclei's (results/expression/{sample}[/{stage}]/expanded/), as SAW writes adjusted.cellbin.gef beside
# cellbin.gef. The cell ids are the nuclei ids. Included after expression.smk: the matrix rules reuse cgef and h5ad.


rule cells:
    """Nuclei labels -> cell labels: each nucleus grown by expression.cells.distance (nearest nucleus within it,
    ties to the lowest id), or the user's cell mask; as cells_qc, the same for the other stage's labels."""
    input:
        labels=lambda wc: f"{slide_dir(wc)}/labels.tif",
        mask=cells_mask,
    output:
        labels=f"{RESULTS}/segmentation/{{sample}}/expanded/labels.tif",
        report=f"{RESULTS}/segmentation/{{sample}}/expanded/cells.json",
    log:
        "logs/cells/{sample}.log",
    benchmark:
        "benchmarks/cells/{sample}.tsv"
    conda:
        env_file("core")
    params:
        args=cells_args,
    shell:
        segrefine("core") + " cells --labels {input.labels} --out {output.labels} --report {output.report} "
        "{params.args} 2> {log}"


use rule cells as cells_qc with:
    output:
        labels=f"{RESULTS}/segmentation/{{sample}}/{{stage}}/expanded/labels.tif",
        report=f"{RESULTS}/segmentation/{{sample}}/{{stage}}/expanded/cells.json",
    log:
        "logs/cells/{stage}/{sample}.log",
    benchmark:
        "benchmarks/cells/{stage}/{sample}.tsv"
    wildcard_constraints:
        stage=other_stage(),


use rule cgef as cgef_cells with:
    input:
        gem=lambda wc: samples.loc[wc.sample, "expression"],
        labels=lambda wc: f"{slide_dir(wc)}/expanded/labels.tif",
    output:
        cgef=f"{RESULTS}/expression/{{sample}}/expanded/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/expanded/cellmap.csv",
        report=f"{RESULTS}/expression/{{sample}}/expanded/alignment.json",
    log:
        "logs/cgef/expanded/{sample}.log",
    benchmark:
        "benchmarks/cgef/expanded/{sample}.tsv"


use rule cgef_cells as cgef_cells_qc with:
    output:
        cgef=f"{RESULTS}/expression/{{sample}}/{{stage}}/expanded/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/{{stage}}/expanded/cellmap.csv",
        report=f"{RESULTS}/expression/{{sample}}/{{stage}}/expanded/alignment.json",
    log:
        "logs/cgef/expanded/{stage}/{sample}.log",
    benchmark:
        "benchmarks/cgef/expanded/{stage}/{sample}.tsv"
    wildcard_constraints:
        stage=other_stage(),


use rule h5ad as h5ad_cells with:
    input:
        cgef=f"{RESULTS}/expression/{{sample}}/expanded/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/expanded/cellmap.csv",
    output:
        f"{RESULTS}/expression/{{sample}}/expanded/cells.h5ad",
    log:
        "logs/h5ad/expanded/{sample}.log",
    benchmark:
        "benchmarks/h5ad/expanded/{sample}.tsv"


use rule h5ad as h5ad_cells_qc with:
    input:
        cgef=f"{RESULTS}/expression/{{sample}}/{{stage}}/expanded/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/{{stage}}/expanded/cellmap.csv",
    output:
        f"{RESULTS}/expression/{{sample}}/{{stage}}/expanded/cells.h5ad",
    log:
        "logs/h5ad/expanded/{stage}/{sample}.log",
    benchmark:
        "benchmarks/h5ad/expanded/{stage}/{sample}.tsv"
    wildcard_constraints:
        stage=other_stage(),
