rule cgef:
    """GEM + whole-slide labels -> cell-bin GEF (gefpy), touching cells kept apart."""
    input:
        gem=lambda wc: samples.loc[wc.sample, "expression"],
        labels=f"{RESULTS}/segmentation/{{sample}}/labels.tif",
    output:
        cgef=f"{RESULTS}/expression/{{sample}}/cells.cgef",
        cellmap=f"{RESULTS}/expression/{{sample}}/cellmap.csv",
    log:
        "logs/cgef/{sample}.log",
    benchmark:
        "benchmarks/cgef/{sample}.tsv"
    threads: config["expression"]["threads"]
    conda:
        env_file("gef")
    shell:
        segrefine("gef") + " cgef --gem {input.gem:q} --labels {input.labels} --cgef {output.cgef} "
        "--cellmap {output.cellmap} --threads {threads} > {log} 2>&1"


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
