EVALUATION = config["evaluation"]  # defaults filled from config/schemas/config.schema.yaml
EVAL = f"{RESULTS}/evaluation"


rule evaluate:
    """A model, before (pretrained) or after (finetuned) fine-tuning, on the held-out test patches,
    in every configured mode; its predictions are kept for the overlays."""
    input:
        card=f"{RESULTS}/models/{{model}}/{{stage}}/card.json",
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        csv=f"{EVAL}/{{model}}/{{stage}}.csv",
        predictions=f"{EVAL}/{{model}}/{{stage}}_predictions.npz",
    log:
        "logs/evaluate/{model}/{stage}.log",
    benchmark:
        "benchmarks/evaluate/{model}/{stage}.tsv"
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
        "--predictions {output.predictions} --out {output.csv} 2> {log}"


rule evaluation_summary:
    """Mean of every metric per model, stage and mode; the long table as CSV and .xlsx."""
    input:
        expand(f"{EVAL}/{{model}}/{{stage}}.csv", model=config["models"], stage=["pretrained", "finetuned"]),
    output:
        summary=report(
            f"{EVAL}/summary.csv",
            caption="../report/summary.rst",
            category="1. Evaluation",
            labels={"table": "summary (mean per model, stage, mode)"},
        ),
        long=report(
            f"{EVAL}/metrics_long.csv",
            caption="../report/metrics_long.rst",
            category="1. Evaluation",
            labels={"table": "every value (long format)"},
        ),
        xlsx=f"{EVAL}/metrics.xlsx",
    log:
        "logs/evaluate/summary.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " summarize --inputs {input} --out {output.summary} --long {output.long} "
        "--xlsx {output.xlsx} > {log} 2>&1"


rule evaluation_boxplots:
    """Before vs after fine-tuning per model and metric, paired Wilcoxon signed-rank tests."""
    input:
        f"{EVAL}/metrics_long.csv",
    output:
        png=report(
            f"{EVAL}/boxplots.png",
            caption="../report/boxplots.rst",
            category="1. Evaluation",
            labels={"figure": "box plots before vs after fine-tuning"},
        ),
        stats=report(
            f"{EVAL}/wilcoxon.csv",
            caption="../report/wilcoxon.rst",
            category="1. Evaluation",
            labels={"table": "paired Wilcoxon signed-rank tests"},
        ),
    log:
        "logs/evaluate/boxplots.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " plot-evaluation --long {input} --mode standard --out {output.png} "
        "--stats {output.stats} 2> {log}"


rule evaluation_overlays:
    """One PNG per test patch: truth and prediction outlines, TP / FP / FN in distinct colours."""
    input:
        predictions=f"{EVAL}/{{model}}/{{stage}}_predictions.npz",
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        report(
            directory(f"{EVAL}/{{model}}/{{stage}}_overlays"),
            patterns=["{patch}.png"],
            caption="../report/overlays.rst",
            category="2. Overlays",
            subcategory="{model} {stage}",
            labels={"model": "{model}", "stage": "{stage}", "patch": "{patch}"},
        ),
    log:
        "logs/evaluate/overlays/{model}/{stage}.log",
    conda:
        env_file("core")
    params:
        iou=EVALUATION["iou_threshold"],
    shell:
        segrefine("core") + " overlays --predictions {input.predictions} --trainset {input.trainset} "
        "--title '{wildcards.model} ({wildcards.stage})' --iou-threshold {params.iou} --out-dir {output} 2> {log}"


rule loss_curves:
    """The training and validation losses of every fine-tuning run, side by side."""
    input:
        expand(f"{RESULTS}/models/{{model}}/finetuned/losses.json", model=config["models"]),
    output:
        report(
            f"{EVAL}/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="3. Fine-tuning",
            labels={"figure": "loss curves"},
        ),
    log:
        "logs/evaluate/loss_curves.log",
    conda:
        env_file("core")
    params:
        names=" ".join(config["models"]),
    shell:
        segrefine("core") + " loss-curves --losses {input} --names {params.names} --out {output} 2> {log}"


rule complexity:
    """The six tissue-complexity measures of every annotated patch, and beside each test patch's accuracy."""
    input:
        trainset=f"{RESULTS}/trainset/trainset.tsv",
        long=f"{EVAL}/metrics_long.csv",
    output:
        table=report(
            f"{EVAL}/complexity.csv",
            caption="../report/complexity.rst",
            category="1. Evaluation",
            labels={"table": "tissue complexity per patch"},
        ),
        joined=report(
            f"{EVAL}/complexity_vs_accuracy.csv",
            caption="../report/complexity_vs_accuracy.rst",
            category="1. Evaluation",
            labels={"table": "complexity beside accuracy"},
        ),
    log:
        "logs/evaluate/complexity.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " complexity --trainset {input.trainset} --long {input.long} --out {output.table} "
        "--joined {output.joined} 2> {log}"


rule screen_pretrained:
    """Zero-shot screening: a model's ORIGINAL pretrained weights on every annotated patch."""
    input:
        card=f"{RESULTS}/models/{{model}}/pretrained/card.json",
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        f"{EVAL}/screening/{{model}}.csv",
    log:
        "logs/evaluate/screening/{model}.log",
    benchmark:
        "benchmarks/evaluate/screening/{model}.tsv"
    conda:
        lambda wc: env_file(model_env(wc.model))
    threads: 2
    resources:
        gpu=lambda wc: model_gpu(wc.model),
    params:
        run=lambda wc: segrefine(model_env(wc.model)),
        iou=EVALUATION["iou_threshold"],
        min_size=EVALUATION["min_size"],
    shell:
        "OMP_NUM_THREADS={threads} {params.run} evaluate --card {input.card} --trainset {input.trainset} "
        "--split all --modes standard --iou-threshold {params.iou} --min-size {params.min_size} "
        "--out {output} 2> {log}"


rule screening_ranking:
    """The pretrained candidates ranked by their mean F1 on the annotated patches: where to start."""
    input:
        expand(f"{EVAL}/screening/{{model}}.csv", model=config["models"]),
    output:
        report(
            f"{EVAL}/screening/ranking.csv",
            caption="../report/screening.rst",
            category="1. Evaluation",
            labels={"table": "zero-shot screening of pretrained models"},
        ),
    log:
        "logs/evaluate/screening/ranking.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " rank-candidates --inputs {input} --metric f1 --out {output} > {log} 2>&1"


# models whose framework has inference thresholds to sweep (segrefine.models.FRAMEWORKS)
SWEEP_MODELS = [m for m in config["models"] if model_cfg(m)["framework"] in SWEEP_FRAMEWORKS]


rule threshold_sweep:
    """Mean F1 on the validation patches for every combination of the model's inference thresholds
    (the framework's grid in segrefine.models.FRAMEWORKS, or evaluation.threshold_grids)."""
    input:
        card=f"{RESULTS}/models/{{model}}/{{stage}}/card.json",
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        report(
            f"{EVAL}/threshold_sweep/{{model}}/{{stage}}.csv",
            caption="../report/threshold_sweep.rst",
            category="1. Evaluation",
            subcategory="threshold sweeps",
            labels={"model": "{model}", "stage": "{stage}"},
        ),
    log:
        "logs/evaluate/threshold_sweep/{model}/{stage}.log",
    benchmark:
        "benchmarks/evaluate/threshold_sweep/{model}/{stage}.tsv"
    conda:
        lambda wc: env_file(model_env(wc.model))
    threads: 2
    resources:
        gpu=lambda wc: model_gpu(wc.model),
    params:
        run=lambda wc: segrefine(model_env(wc.model)),
        grid=lambda wc: params_json(EVALUATION.get("threshold_grids", {}).get(model_cfg(wc.model)["framework"])),
        iou=EVALUATION["iou_threshold"],
        min_size=EVALUATION["min_size"],
    shell:
        "OMP_NUM_THREADS={threads} {params.run} threshold-sweep --card {input.card} --trainset {input.trainset} "
        "--split val --grid {params.grid} --iou-threshold {params.iou} --min-size {params.min_size} "
        "--out {output} > {log} 2>&1"
