rule segment_slide:
    """Whole-slide instance labels and cell table with the configured model."""
    input:
        card=segmentation_card(),
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        labels=f"{RESULTS}/segmentation/{{sample}}/labels.tif",
        cells=f"{RESULTS}/segmentation/{{sample}}/cells.csv",
    params:
        run=segrefine(FRAMEWORK_ENV[model_cfg(config["segmentation"]["model"])["framework"]]),
    log:
        "logs/segment/{sample}.log",
    benchmark:
        "benchmarks/segment/{sample}.tsv"
    threads: 2
    resources:
        gpu=model_gpu(config["segmentation"]["model"]),
    conda:
        env_file(FRAMEWORK_ENV[model_cfg(config["segmentation"]["model"])["framework"]])
    shell:
        "OMP_NUM_THREADS={threads} {params.run} segment --card {input.card} --slide {input.slide:q} "
        "--labels {output.labels} --cells {output.cells} 2> {log}"
