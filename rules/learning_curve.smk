# Learning curve (the paper's Fig. 3): each configured model fine-tuned from its ORIGINAL pretrained
# card on nested, seeded subsets of the training split, each scored on the same test patches.
# Off by default (evaluation.learning_curve.activate): it multiplies the fine-tuning cost.
# the schema fills the other defaults; models (default: every configured model) depends on the configuration
LEARNING_CURVE = {"models": list(config["models"]), **EVALUATION["learning_curve"]}
LC = f"{RESULTS}/learning_curve"


from segrefine.learning_curve import subset_labels  # noqa: E402

try:
    LC_SUBSETS = subset_labels(LEARNING_CURVE["fractions"], LEARNING_CURVE["cells"])
except SegRefineError as exc:
    fail(f"evaluation.learning_curve: {exc}")
LC_MODELS = list(LEARNING_CURVE["models"])
if set(LC_MODELS) - set(config["models"]):
    fail(
        f"evaluation.learning_curve.models {sorted(set(LC_MODELS) - set(config['models']))} are not configured "
        f"models: {sorted(config['models'])}"
    )


rule learning_curve_subset:
    """A nested, seeded subset of the training split (f<fraction> of its patches, or c<cells>) as a
    training-set table; the validation and test rows are kept."""
    input:
        f"{RESULTS}/trainset/trainset.tsv",
    output:
        table=f"{LC}/subsets/{{subset}}.tsv",
        summary=f"{LC}/subsets/{{subset}}.json",
    log:
        "logs/learning_curve/subsets/{subset}.log",
    wildcard_constraints:
        subset=r"f[0-9.]+|c[0-9]+",
    conda:
        env_file("core")
    params:
        seed=LEARNING_CURVE["seed"],
    shell:
        segrefine("core") + " learning-curve-subset --trainset {input} --subset {wildcards.subset} "
        "--seed {params.seed} --out {output.table} > {log} 2>&1"


rule learning_curve_finetune:
    """Fine-tune a model from its ORIGINAL pretrained card on one learning-curve subset."""
    input:
        pretrained=f"{RESULTS}/models/{{model}}/pretrained/card.json",
        trainset=f"{LC}/subsets/{{subset}}.tsv",
    output:
        card=f"{LC}/{{model}}/{{subset}}/model/card.json",
        losses=f"{LC}/{{model}}/{{subset}}/model/losses.json",
    log:
        "logs/learning_curve/{model}/{subset}/finetune.log",
    benchmark:
        "benchmarks/learning_curve/{model}/{subset}/finetune.tsv"
    wildcard_constraints:
        subset=r"f[0-9.]+|c[0-9]+",
    conda:
        lambda wc: env_file(model_env(wc.model))
    threads: 2
    resources:
        gpu=lambda wc: model_gpu(wc.model),
    params:
        hp=lambda wc: params_json(model_cfg(wc.model).get("hyperparameters")),
        seed=lambda wc: model_cfg(wc.model)["seed"],
        outdir=lambda wc, output: str(Path(output.card).parent),
        run=lambda wc: segrefine(model_env(wc.model)),
    shell:
        "OMP_NUM_THREADS={threads} {params.run} finetune --pretrained-card {input.pretrained} "
        "--trainset {input.trainset} --name {wildcards.model} --params {params.hp} --seed {params.seed} "
        "--out-dir {params.outdir} 2> {log}"


rule learning_curve_evaluate:
    """A learning-curve model on the held-out test patches (the same for every subset)."""
    input:
        card=f"{LC}/{{model}}/{{subset}}/model/card.json",
        trainset=f"{LC}/subsets/{{subset}}.tsv",
    output:
        f"{LC}/{{model}}/{{subset}}/test.csv",
    log:
        "logs/learning_curve/{model}/{subset}/evaluate.log",
    wildcard_constraints:
        subset=r"f[0-9.]+|c[0-9]+",
    conda:
        lambda wc: env_file(model_env(wc.model))
    threads: 2
    resources:
        gpu=lambda wc: model_gpu(wc.model),
    params:
        run=lambda wc: segrefine(model_env(wc.model)),
        modes=" ".join(EVALUATION["modes"]),
        iou=EVALUATION["iou_threshold"],
        min_size=EVALUATION["min_size"],
    shell:
        "OMP_NUM_THREADS={threads} {params.run} evaluate --card {input.card} --trainset {input.trainset} "
        "--split test --modes {params.modes} --iou-threshold {params.iou} --min-size {params.min_size} "
        "--out {output} 2> {log}"


rule learning_curve:
    """F1, precision and recall versus the number of annotated training cells, per model and mode
    (the pretrained model at 0 cells)."""
    input:
        evaluations=expand(f"{LC}/{{model}}/{{subset}}/test.csv", model=LC_MODELS, subset=LC_SUBSETS),
        subsets=expand(f"{LC}/subsets/{{subset}}.tsv", model=LC_MODELS, subset=LC_SUBSETS),
        pretrained=expand(f"{EVAL}/{{model}}/pretrained.csv", model=LC_MODELS),
    output:
        table=report(
            f"{LC}/learning_curve.csv",
            caption="../report/learning_curve.rst",
            category="1. Evaluation",
            labels={"table": "learning curve"},
        ),
        png=report(
            f"{LC}/learning_curve.png",
            caption="../report/learning_curve.rst",
            category="1. Evaluation",
            labels={"figure": "learning curve"},
        ),
    log:
        "logs/learning_curve/learning_curve.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " learning-curve --evaluations {input.evaluations} --subsets {input.subsets} "
        "--pretrained {input.pretrained} --out {output.table} --png {output.png} > {log} 2>&1"
