# Whole-slide segmentation: tile plan -> K shard jobs (model loaded once each, resumable) -> exact stitching.
# See docs/tiling.md for the ownership rule and the outputs. segment_shard and stitch segment with segmentation.stage
# of the model into results/segmentation/{sample}/; for the before/after expression QC (docs/expression.md) the same
# rules, as segment_shard_qc and stitch_qc (end of file), segment with the other stage on the same tile plan into
# results/segmentation/{sample}/{stage}/.


rule tile_plan:
    """Tile grid with halo windows, tissue flags (low resolution), prediction groups and shard assignment. From the
    slide and the configuration only: both stages share it, and new annotations do not change it."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        plan=f"{RESULTS}/segmentation/{{sample}}/tiles.tsv",
        meta=f"{RESULTS}/segmentation/{{sample}}/tiles.json",
    log:
        "logs/segment/{sample}.plan.log",
    benchmark:
        "benchmarks/segment/{sample}.plan.tsv"
    conda:
        env_file("core")
    params:
        args=tile_plan_args,
        channel=channel_arg,
    shell:
        segrefine("core") + " tile-plan --slide {input.slide:q} --out {output.plan} "
        "--out-json {output.meta} {params.args} {params.channel} 2> {log}"


rule halo_check:
    """The plan's halo against the largest cell of the training masks: the fine-tuned stage's shards wait for it
    (halo_check_input), the pretrained stage's do not depend on the training set."""
    input:
        meta=f"{RESULTS}/segmentation/{{sample}}/tiles.json",
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        f"{RESULTS}/segmentation/{{sample}}/halo_check.json",
    log:
        "logs/segment/{sample}.halo_check.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " halo-check --plan-json {input.meta} --trainset {input.trainset} --out {output} 2> {log}"


rule segment_shard:
    """Predict one shard's tiles with the configured model (one GPU per job for GPU frameworks); per-tile results
    are kept in tiles/ beside shards/, so a rerun predicts only unfinished tiles."""
    input:
        plan=f"{RESULTS}/segmentation/{{sample}}/tiles.tsv",
        card=segmentation_card,
        slide=lambda wc: samples.loc[wc.sample, "image"],
        halo_check=halo_check_input,
    output:
        f"{RESULTS}/segmentation/{{sample}}/shards/{{shard}}.json",
    log:
        "logs/segment/{sample}.shard{shard}.log",
    benchmark:
        "benchmarks/segment/{sample}.shard{shard}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        env_file(model_env(config["segmentation"]["model"]))
    threads: 2
    resources:
        gpu=model_gpu(config["segmentation"]["model"]),
    params:
        run=segrefine(model_env(config["segmentation"]["model"])),
        tiles=lambda wc, output: str(Path(output[0]).parent.parent / "tiles"),
        model_context="" if tiling_cfg()["model_context"] else "--no-model-context",
    shell:
        "OMP_NUM_THREADS={threads} {params.run} segment-shard --plan {input.plan} --shard {wildcards.shard} "
        "--card {input.card} --slide {input.slide:q} --tiles-dir {params.tiles} --out {output} "
        "--gpus {resources.gpu} {params.model_context} 2> {log}"


rule stitch:
    """Exact stitching, streamed tile by tile: pyramidal OME-TIFF labels (level 0 = uint32, full size), cell table
    (CSV + Parquet), QuPath GeoJSON outlines, overlay PNG, report."""
    input:
        plan=f"{RESULTS}/segmentation/{{sample}}/tiles.tsv",
        shards=lambda wc: expand(f"{slide_dir(wc)}/shards/{{k}}.json", k=range(n_shards())),
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        labels=f"{RESULTS}/segmentation/{{sample}}/labels.tif",
        cells=f"{RESULTS}/segmentation/{{sample}}/cells.csv",
        parquet=f"{RESULTS}/segmentation/{{sample}}/cells.parquet",
        geojson=f"{RESULTS}/segmentation/{{sample}}/cells.geojson",
        overlay=report(
            f"{RESULTS}/segmentation/{{sample}}/overlay.png",
            caption="../report/slide_overlay.rst",
            category="5. Whole slide",
            labels={"sample": "{sample}", "figure": "cell outlines", "stage": config["segmentation"]["stage"]},
        ),
        probability=report(
            f"{RESULTS}/segmentation/{{sample}}/probability_map.png",
            caption="../report/probability_map.rst",
            category="5. Whole slide",
            labels={"sample": "{sample}", "figure": "cell probability", "stage": config["segmentation"]["stage"]},
        ),
        report=f"{RESULTS}/segmentation/{{sample}}/segmentation.json",
    log:
        "logs/segment/{sample}.stitch.log",
    benchmark:
        "benchmarks/segment/{sample}.stitch.tsv"
    conda:
        env_file("core")
    params:
        tiles=lambda wc, output: str(Path(output.labels).parent / "tiles"),
        pixel_size=lambda wc: samples.loc[wc.sample, "pixel_size_um"],
    shell:
        segrefine("core") + " stitch --plan {input.plan} --tiles-dir {params.tiles} --shards {input.shards} "
        "--slide {input.slide:q} --labels {output.labels} --cells {output.cells} --parquet {output.parquet} "
        "--geojson {output.geojson} --overlay {output.overlay} --probability-map {output.probability} "
        "--report {output.report} "
        "--pixel-size-um {params.pixel_size} 2> {log}"


# The other stage's whole slide, for the before/after expression QC: the same rules, stage in the path.
QC_SLIDE = f"{RESULTS}/segmentation/{{sample}}/{{stage}}"


use rule segment_shard as segment_shard_qc with:
    output:
        f"{QC_SLIDE}/shards/{{shard}}.json",
    log:
        "logs/segment/{stage}/{sample}.shard{shard}.log",
    benchmark:
        "benchmarks/segment/{stage}/{sample}.shard{shard}.tsv"
    wildcard_constraints:
        shard=r"\d+",
        stage=other_stage(),


use rule stitch as stitch_qc with:
    output:
        labels=f"{QC_SLIDE}/labels.tif",
        cells=f"{QC_SLIDE}/cells.csv",
        parquet=f"{QC_SLIDE}/cells.parquet",
        geojson=f"{QC_SLIDE}/cells.geojson",
        overlay=report(
            f"{QC_SLIDE}/overlay.png",
            caption="../report/slide_overlay.rst",
            category="5. Whole slide",
            labels={"sample": "{sample}", "figure": "cell outlines", "stage": "{stage}"},
        ),
        probability=report(
            f"{QC_SLIDE}/probability_map.png",
            caption="../report/probability_map.rst",
            category="5. Whole slide",
            labels={"sample": "{sample}", "figure": "cell probability", "stage": "{stage}"},
        ),
        report=f"{QC_SLIDE}/segmentation.json",
    log:
        "logs/segment/{stage}/{sample}.stitch.log",
    benchmark:
        "benchmarks/segment/{stage}/{sample}.stitch.tsv"
    wildcard_constraints:
        stage=other_stage(),
