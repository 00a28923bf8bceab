# Where to annotate next: candidate patches of each slide (grid, clear of annotated patches, with
# tissue) ranked by the disagreement of the configured model predictions and by tissue complexity;
# the top N as QuPath rectangles and as patch images. Off by default (evaluation.annotate_next.activate).
ANNOTATE_NEXT = {
    "activate": False,
    "top_n": 10,
    "size": 256,
    "step": 256,
    "models": [config["segmentation"]["model"]],
    "stages": ["pretrained", "finetuned"],
    "min_tissue": 0.02,
    "complexity_weight": 0.25,
    "uncertainty_weight": 0.0,
    "uncertainty_tta": 4,
    **EVALUATION.get("annotate_next", {}),
}
AN = f"{RESULTS}/annotate_next"
AN_PREDICTIONS = [(m, s) for m in ANNOTATE_NEXT["models"] for s in ANNOTATE_NEXT["stages"]]
if set(ANNOTATE_NEXT["models"]) - set(config["models"]):
    fail(
        f"evaluation.annotate_next.models {sorted(set(ANNOTATE_NEXT['models']) - set(config['models']))} are not "
        f"configured models: {sorted(config['models'])}"
    )
if ANNOTATE_NEXT["complexity_weight"] + ANNOTATE_NEXT["uncertainty_weight"] > 1:
    fail("evaluation.annotate_next: complexity_weight + uncertainty_weight must be at most 1")
if ANNOTATE_NEXT["activate"] and len(AN_PREDICTIONS) < 2:
    fail("evaluation.annotate_next: models x stages must give at least two predictions to compare")


rule annotate_next_predict:
    """A model's labels of every candidate patch of a slide (clear of annotated patches, with tissue)."""
    input:
        card=f"{RESULTS}/models/{{model}}/{{stage}}/card.json",
        slide=lambda wc: samples.loc[wc.sample, "image"],
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        f"{AN}/{{sample}}/predictions/{{model}}/{{stage}}.npz",
    log:
        "logs/annotate_next/{sample}/{model}/{stage}.log",
    conda:
        lambda wc: env_file(model_env(wc.model))
    threads: 2
    resources:
        gpu=lambda wc: model_gpu(wc.model),
    params:
        run=lambda wc: segrefine(model_env(wc.model)),
        cfg=ANNOTATE_NEXT,
        bright=lambda wc: "--bright-field" if samples.loc[wc.sample, "stain"] == "HE" else "",
        channel=channel_arg,
        # test-time augmentation only when the uncertainty counts in the ranking (it costs tta - 1 predictions)
        tta=ANNOTATE_NEXT["uncertainty_tta"] if ANNOTATE_NEXT["uncertainty_weight"] > 0 else 0,
    shell:
        "OMP_NUM_THREADS={threads} {params.run} annotate-next-predict --card {input.card} --slide {input.slide} "
        "--sn {wildcards.sample} --size {params.cfg[size]} --step {params.cfg[step]} --trainset {input.trainset} "
        "--min-tissue {params.cfg[min_tissue]} {params.bright} {params.channel} --tta {params.tta} --out {output} "
        "2> {log}"


rule annotate_next:
    """The candidates ranked by model disagreement and tissue complexity; the top N as QuPath
    annotation rectangles (GeoJSON) and as {name}-img.tif patches ready to annotate."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
        predictions=[f"{AN}/{{sample}}/predictions/{m}/{s}.npz" for m, s in AN_PREDICTIONS],
    output:
        table=report(
            f"{AN}/{{sample}}/ranking.csv",
            caption="../report/annotate_next.rst",
            category="4. Annotate next",
            labels={"sample": "{sample}", "table": "candidate ranking"},
        ),
        geojson=f"{AN}/{{sample}}/regions.geojson",
        patches=directory(f"{AN}/{{sample}}/patches"),
    log:
        "logs/annotate_next/{sample}/rank.log",
    conda:
        env_file("core")
    params:
        names=" ".join(f"{m}/{s}" for m, s in AN_PREDICTIONS),
        cfg=ANNOTATE_NEXT,
        channel=channel_arg,
    shell:
        segrefine("core") + " annotate-next --slide {input.slide} --sn {wildcards.sample} "
        "--predictions {input.predictions} --names {params.names} --top-n {params.cfg[top_n]} "
        "--complexity-weight {params.cfg[complexity_weight]} --uncertainty-weight {params.cfg[uncertainty_weight]} "
        "--out {output.table} --geojson {output.geojson} "
        "--out-dir {output.patches} {params.channel} > {log} 2>&1"
