# Whole-slide segmentation: tile plan -> K shard jobs (model loaded once each, resumable) -> exact stitching.
# See docs/tiling.md for the ownership rule and the outputs.


rule tile_plan:
    """Tile grid with halo windows, tissue flags (low resolution) and shard assignment; checks the halo
    against the largest cell of the training masks."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        plan=f"{RESULTS}/segmentation/{{sample}}/tiles.tsv",
        meta=f"{RESULTS}/segmentation/{{sample}}/tiles.json",
    params:
        args=tile_plan_args,
    log:
        "logs/segment/{sample}.plan.log",
    benchmark:
        "benchmarks/segment/{sample}.plan.tsv"
    conda:
        env_file("core")
    shell:
        segrefine("core") + " tile-plan --slide {input.slide:q} --trainset {input.trainset} --out {output.plan} "
        "--out-json {output.meta} {params.args} 2> {log}"


rule segment_shard:
    """Predict one shard's tiles with the configured model (one GPU per job for GPU frameworks); per-tile results
    are kept in tiles/, so a rerun predicts only unfinished tiles."""
    input:
        plan=f"{RESULTS}/segmentation/{{sample}}/tiles.tsv",
        card=segmentation_card(),
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        f"{RESULTS}/segmentation/{{sample}}/shards/{{shard}}.json",
    params:
        run=segrefine(model_env(config["segmentation"]["model"])),
        tiles=lambda wc, input: str(Path(input.plan).parent / "tiles"),
    wildcard_constraints:
        shard=r"\d+",
    log:
        "logs/segment/{sample}.shard{shard}.log",
    benchmark:
        "benchmarks/segment/{sample}.shard{shard}.tsv"
    threads: 2
    resources:
        gpu=model_gpu(config["segmentation"]["model"]),
    conda:
        env_file(model_env(config["segmentation"]["model"]))
    shell:
        "OMP_NUM_THREADS={threads} {params.run} segment-shard --plan {input.plan} --shard {wildcards.shard} "
        "--card {input.card} --slide {input.slide:q} --tiles-dir {params.tiles} --out {output} "
        "--gpus {resources.gpu} 2> {log}"


rule stitch:
    """Exact stitching, streamed tile by tile: pyramidal OME-TIFF labels (level 0 = uint32, full size), cell table
    (CSV + Parquet), QuPath GeoJSON outlines, overlay PNG, report."""
    input:
        plan=f"{RESULTS}/segmentation/{{sample}}/tiles.tsv",
        shards=lambda wc: expand(f"{RESULTS}/segmentation/{wc.sample}/shards/{{k}}.json", k=range(n_shards())),
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        labels=f"{RESULTS}/segmentation/{{sample}}/labels.tif",
        cells=f"{RESULTS}/segmentation/{{sample}}/cells.csv",
        parquet=f"{RESULTS}/segmentation/{{sample}}/cells.parquet",
        geojson=f"{RESULTS}/segmentation/{{sample}}/cells.geojson",
        overlay=report(f"{RESULTS}/segmentation/{{sample}}/overlay.png", caption="../report/slide_overlay.rst",
                       category="5. Whole slide", labels={"sample": "{sample}", "figure": "cell outlines"}),
        report=f"{RESULTS}/segmentation/{{sample}}/segmentation.json",
    params:
        tiles=lambda wc, input: str(Path(input.plan).parent / "tiles"),
        pixel_size=lambda wc: samples.loc[wc.sample, "pixel_size_um"],
    log:
        "logs/segment/{sample}.stitch.log",
    benchmark:
        "benchmarks/segment/{sample}.stitch.tsv"
    conda:
        env_file("core")
    shell:
        segrefine("core") + " stitch --plan {input.plan} --tiles-dir {params.tiles} --shards {input.shards} "
        "--slide {input.slide:q} --labels {output.labels} --cells {output.cells} --parquet {output.parquet} "
        "--geojson {output.geojson} --overlay {output.overlay} --report {output.report} "
        "--pixel-size-um {params.pixel_size} 2> {log}"
