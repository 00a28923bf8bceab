localrules:
    fetch_pretrained,


rule fetch_pretrained:
    """Official pretrained weights into the model cache (needs network: run it on a login node).
    Offline, its error says which file to put where."""
    output:
        f"{config['model_cache']}/{{framework}}/{{weights}}",
    log:
        "logs/fetch_pretrained/{framework}/{weights}.log",
    conda:
        lambda wc: env_file(FRAMEWORK_ENV[wc.framework])
    params:
        name=lambda wc: official_name(wc.framework, wc.weights),
        run=lambda wc: segrefine(FRAMEWORK_ENV[wc.framework]),
    shell:
        "{params.run} fetch-pretrained --framework {wildcards.framework} --name {params.name} "
        "--out {output} 2> {log}"


rule train_base:
    """The offline base model: trained from scratch on a generic synthetic nuclei set."""
    output:
        card=f"{RESULTS}/models/base/{{base}}/card.json",
    log:
        "logs/train_base/{base}.log",
    benchmark:
        "benchmarks/train_base/{base}.tsv"
    conda:
        lambda wc: env_file(base_env(wc.base))
    threads: 2
    resources:
        gpu=1,
    params:
        cfg=lambda wc: config["base_models"][wc.base],
        hp=lambda wc: params_json(config["base_models"][wc.base].get("hyperparameters")),
        outdir=lambda wc, output: str(Path(output.card).parent),
        run=lambda wc: segrefine(base_env(wc.base)),
    shell:
        "OMP_NUM_THREADS={threads} {params.run} train-base --framework {params.cfg[framework]} "
        "--name {wildcards.base} --params {params.hp} --n-images {params.cfg[n_images]} "
        "--size {params.cfg[size]} --seed {params.cfg[seed]} --out-dir {params.outdir} 2> {log}"


rule pretrained_card:
    """The card of a model's original pretrained weights: what fine-tuning always starts from."""
    input:
        weights=lambda wc: pretrained_weights(wc.model),
    output:
        card=f"{RESULTS}/models/{{model}}/pretrained/card.json",
    log:
        "logs/pretrained_card/{model}.log",
    conda:
        lambda wc: env_file(model_env(wc.model))
    params:
        framework=lambda wc: model_cfg(wc.model)["framework"],
        source=lambda wc: shlex.quote(model_cfg(wc.model)["pretrained"]),
        hp=lambda wc: params_json(model_cfg(wc.model).get("hyperparameters")),
        outdir=lambda wc, output: str(Path(output.card).parent),
        run=lambda wc: segrefine(model_env(wc.model)),
        weights=lambda wc, input: f"--weights {shlex.quote(input.weights)}" if input.weights else "",
    shell:
        "{params.run} pretrained-card --framework {params.framework} {params.weights} "
        "--name {wildcards.model} --source {params.source} --params {params.hp} --out-dir {params.outdir} 2> {log}"
