rule annotated_patch:
    """Cut one annotated patch from its slide, reading only that region."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        f"{RESULTS}/patches/{{sample}}/{{patch}}-img.tif",
    log:
        "logs/patches/{sample}/{patch}.log",
    conda:
        env_file("core")
    params:
        pad=f"--pad-to {config['patches']['pad_to']}" if config["patches"]["pad_to"] else "",
        outdir=lambda wc, output: str(Path(output[0]).parent),
        channel=channel_arg,
    shell:
        segrefine("core") + " patches --slide {input.slide} --name {wildcards.patch} "
        "--out-dir {params.outdir} {params.pad} {params.channel} 2> {log}"


rule candidate_patches:
    """Candidate patches of each slide (a grid, or a listed table), to annotate in QuPath."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
        coords=config["patches"]["candidates"].get("coordinates") or [],
    output:
        patches=directory(f"{RESULTS}/candidates/{{sample}}/patches"),
        done=touch(f"{RESULTS}/candidates/{{sample}}/done"),
    log:
        "logs/candidates/{sample}.log",
    conda:
        env_file("core")
    params:
        where=lambda wc, input: (
            f"--coords {shlex.quote(input.coords)}"
            if input.coords
            else "--grid {size} {step}".format(**config["patches"]["candidates"])
        ),
        channel=channel_arg,
    shell:
        segrefine("core") + " patches --slide {input.slide} {params.where} "
        "--sn {wildcards.sample} --out-dir {output.patches} {params.channel} 2> {log}"
