# SpatialData (scverse) output (expression.spatialdata; docs/spatialdata.md): one store per sample with an expression
# matrix, results/spatialdata/{sample}.zarr: the slide and the configured stage's nuclei (and, with expression.cells,
# cells) labels as multiscale elements, the outlines as shapes, the AnnData linked to the nuclei labels; read back
# with spatialdata.read_zarr and drawn with spatialdata-plot into {sample}.png (the report's figure).


rule spatialdata:
    """The slide, its labels, outlines and AnnData as one SpatialData store, and a spatialdata-plot figure of it."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
        labels=f"{RESULTS}/segmentation/{{sample}}/labels.tif",
        cells=[f"{RESULTS}/segmentation/{{sample}}/expanded/labels.tif"] if cells_on() else [],
        outlines=f"{RESULTS}/segmentation/{{sample}}/cells.geojson",
        table=f"{RESULTS}/segmentation/{{sample}}/cells.parquet",
        h5ad=f"{RESULTS}/expression/{{sample}}/cells.h5ad",
    output:
        store=directory(f"{RESULTS}/spatialdata/{{sample}}.zarr"),
        png=report(
            f"{RESULTS}/spatialdata/{{sample}}.png",
            caption="../report/spatialdata.rst",
            category="5. Whole slide",
            labels={"sample": "{sample}", "figure": "SpatialData store", "stage": config["segmentation"]["stage"]},
        ),
    log:
        "logs/spatialdata/{sample}.log",
    benchmark:
        "benchmarks/spatialdata/{sample}.tsv"
    conda:
        env_file("spatialdata")
    params:
        cells=lambda wc, input: f"--cells-labels {input.cells[0]}" if input.cells else "",
        pixel_size=lambda wc: samples.loc[wc.sample, "pixel_size_um"],
        stain=lambda wc: samples.loc[wc.sample, "stain"],
    shell:
        segrefine("spatialdata") + " spatialdata --sample {wildcards.sample} --slide {input.slide:q} "
        "--labels {input.labels} {params.cells} --outlines {input.outlines} --cell-table {input.table} "
        "--h5ad {input.h5ad} --pixel-size-um {params.pixel_size} --stain {params.stain} --out {output.store} "
        "--png {output.png} > {log} 2>&1"
