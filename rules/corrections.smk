# The annotation loop: pre-annotations to correct in QuPath, and the corrections counted (docs/annotation.md).
# preannotate: the fine-tuned segmentation model's cells of annotate_next's top N patches (when it is active) and of
# the listed patches (evaluation.annotate_next.preannotate) as QuPath annotation objects; every file written is also
# kept in results/preannotations/{patch}/{model sha}.geojson, which the workflow never removes: the record a
# corrected file is compared with. corrections: runs once corrected GeoJSON files of pre-annotated patches are in
# the annotation folders.
PREANNOTATE_MODEL = config["segmentation"]["model"]
PREANNOTATE_LISTED = EVALUATION.get("annotate_next", {}).get("preannotate", [])
PREANNOTATIONS = f"{RESULTS}/preannotations"
for _name in PREANNOTATE_LISTED:
    try:
        _box = parse_patch_name(_name)
    except SegRefineError as exc:
        fail(f"evaluation.annotate_next.preannotate: {exc}")
    if _box.sn not in samples.index:
        fail(
            f"evaluation.annotate_next.preannotate: patch {_name} names chip {_box.sn!r}, which is no sample: "
            f"{sorted(samples.index)}"
        )


# the samples that get pre-annotations: all with annotate_next active, else those with listed patches
PREANNOTATE_SAMPLES = (
    list(samples.index) if ANNOTATE_NEXT["activate"] else sorted({parse_patch_name(n).sn for n in PREANNOTATE_LISTED})
)
KEPT_PREANNOTATIONS = sorted(str(p) for p in Path(PREANNOTATIONS).glob("*/*.geojson"))
# the GeoJSON annotation files, counted once at least one of them has a kept pre-annotation of its patch
_GEOJSON_ANNOTATIONS = {p: f for (s, p), f in annotations.items() if Path(f).suffix.lower() in (".geojson", ".json")}
CORRECTED_FILES = (
    sorted(_GEOJSON_ANNOTATIONS.values())
    if {Path(k).parent.name for k in KEPT_PREANNOTATIONS} & set(_GEOJSON_ANNOTATIONS)
    else []
)
# what `all` asks for (final_outputs in rules/common.smk)
ANNOTATION_LOOP_OUTPUTS = [f"{AN}/{s}/preannotations" for s in PREANNOTATE_SAMPLES]
if CORRECTED_FILES:
    ANNOTATION_LOOP_OUTPUTS += [
        f"{RESULTS}/corrections/per_patch.csv",
        f"{RESULTS}/corrections/per_round.csv",
        f"{RESULTS}/corrections/corrections.png",
    ]


rule preannotate:
    """The fine-tuned segmentation model's cells of the suggested and listed patches of a slide as QuPath annotation
    objects to correct ({patch}.geojson beside {patch}-img.tif), each with a stable id and the model's per-cell
    uncertainty as measurements; each file is also kept in results/preannotations/."""
    input:
        card=f"{RESULTS}/models/{PREANNOTATE_MODEL}/finetuned/card.json",
        pretrained=f"{RESULTS}/models/{PREANNOTATE_MODEL}/pretrained/card.json",
        slide=lambda wc: samples.loc[wc.sample, "image"],
        ranking=lambda wc: [f"{AN}/{wc.sample}/ranking.csv"] if ANNOTATE_NEXT["activate"] else [],
        summary=f"{RESULTS}/evaluation/summary.csv",
    output:
        directory(f"{AN}/{{sample}}/preannotations"),
    log:
        "logs/preannotate/{sample}.log",
    conda:
        env_file(model_env(PREANNOTATE_MODEL))
    threads: 2
    resources:
        gpu=model_gpu(PREANNOTATE_MODEL),
    params:
        run=segrefine(model_env(PREANNOTATE_MODEL)),
        ranking=lambda wc, input: (
            f"--ranking {input.ranking[0]} --top-n {ANNOTATE_NEXT['top_n']}" if input.ranking else ""
        ),
        listed=lambda wc: " ".join(n for n in PREANNOTATE_LISTED if parse_patch_name(n).sn == wc.sample),
        tta=ANNOTATE_NEXT.get("uncertainty_tta", 4),
        archive=PREANNOTATIONS,
        channel=channel_arg,
    shell:
        "OMP_NUM_THREADS={threads} {params.run} preannotate --card {input.card} --pretrained-card {input.pretrained} "
        "--slide {input.slide} --sn {wildcards.sample} {params.ranking} --patches {params.listed} "
        "--summary {input.summary} --tta {params.tta} --out-dir {output} --archive {params.archive} "
        "{params.channel} > {log} 2>&1"


rule corrections:
    """Each corrected annotation file against the pre-annotation it came from: cells accepted, edited, deleted and
    added, the minutes saved against drawing from scratch, and the test F1 per round (tables and plot)."""
    input:
        annotations=CORRECTED_FILES,
        # the pre-annotation folders this run writes (their jobs update the archive, so the counts follow them in
        # the same run); the archive itself when no pre-annotations are written any more
        preannotations=[f"{AN}/{s}/preannotations" for s in PREANNOTATE_SAMPLES] or KEPT_PREANNOTATIONS,
        summary=f"{RESULTS}/evaluation/summary.csv",
    output:
        cells=f"{RESULTS}/corrections/per_cell.csv",
        patches=report(
            f"{RESULTS}/corrections/per_patch.csv",
            caption="../report/corrections.rst",
            category="4. Annotate next",
            labels={"table": "corrections per patch"},
        ),
        rounds=report(
            f"{RESULTS}/corrections/per_round.csv",
            caption="../report/corrections.rst",
            category="4. Annotate next",
            labels={"table": "corrections per round"},
        ),
        png=report(
            f"{RESULTS}/corrections/corrections.png",
            caption="../report/corrections.rst",
            category="4. Annotate next",
            labels={"figure": "corrections"},
        ),
    log:
        "logs/corrections.log",
    conda:
        env_file("core")
    params:
        exclude=" ".join(shlex.quote(c) for c in config["annotations"]["exclude_classes"]),
        nucleus="--use-nucleus" if config["annotations"]["use_nucleus"] else "",
        archive=PREANNOTATIONS,
        model=PREANNOTATE_MODEL,
        out_dir=lambda wc, output: str(Path(output.cells).parent),
    shell:
        segrefine("core") + " corrections --annotations {input.annotations:q} --archive {params.archive} "
        "--summary {input.summary} --model {params.model} --exclude-class {params.exclude} {params.nucleus} "
        "--out-dir {params.out_dir} > {log} 2>&1"
