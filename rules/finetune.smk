rule finetune:
    """Fine-tune a model from its ORIGINAL pretrained weights on the training set."""
    input:
        pretrained=f"{RESULTS}/models/{{model}}/pretrained/card.json",
        trainset=f"{RESULTS}/trainset/trainset.tsv",
    output:
        card=f"{RESULTS}/models/{{model}}/finetuned/card.json",
        losses=f"{RESULTS}/models/{{model}}/finetuned/losses.json",
        curve=f"{RESULTS}/models/{{model}}/finetuned/loss.png",
    log:
        "logs/finetune/{model}.log",
    benchmark:
        "benchmarks/finetune/{model}.tsv"
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
