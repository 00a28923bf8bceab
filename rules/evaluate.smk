rule evaluate:
    """A model, before (pretrained) or after (finetuned) fine-tuning, on the held-out test patches."""
    input:
        card=f"{RESULTS}/models/{{model}}/{{stage}}/card.json",
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        f"{RESULTS}/evaluation/{{model}}/{{stage}}.csv",
    params:
        run=lambda wc: segrefine(model_env(wc.model)),
    log:
        "logs/evaluate/{model}/{stage}.log",
    benchmark:
        "benchmarks/evaluate/{model}/{stage}.tsv"
    threads: 2
    resources:
        gpu=lambda wc: model_gpu(wc.model),
    conda:
        lambda wc: env_file(model_env(wc.model))
    shell:
        "OMP_NUM_THREADS={threads} {params.run} evaluate --card {input.card} --trainset {input.trainset} "
        "--split test --out {output} 2> {log}"


rule evaluation_summary:
    """Mean precision, recall, F1 (IoU 0.5), Jaccard and Dice per model, before and after fine-tuning."""
    input:
        expand(f"{RESULTS}/evaluation/{{model}}/{{stage}}.csv", model=config["models"],
               stage=["pretrained", "finetuned"]),
    output:
        f"{RESULTS}/evaluation/summary.csv",
    log:
        "logs/evaluate/summary.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " summarize --inputs {input} --out {output} > {log} 2>&1"
