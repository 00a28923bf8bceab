rule annotated_patch:
    """Cut one annotated patch from its slide, reading only that region."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        f"{RESULTS}/patches/{{sample}}/{{patch}}-img.tif",
    params:
        pad=f"--pad-to {config['patches']['pad_to']}" if config["patches"]["pad_to"] else "",
        outdir=lambda wc, output: str(Path(output[0]).parent),
    log:
        "logs/patches/{sample}/{patch}.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " patches --slide {input.slide} --name {wildcards.patch} "
        "--out-dir {params.outdir} {params.pad} 2> {log}"


rule candidate_patches:
    """A grid of patches of each slide, to choose from and annotate in QuPath."""
    input:
        slide=lambda wc: samples.loc[wc.sample, "image"],
    output:
        patches=directory(f"{RESULTS}/candidates/{{sample}}/patches"),
        done=touch(f"{RESULTS}/candidates/{{sample}}/done"),
    params:
        size=config["patches"]["candidates"]["size"],
        step=config["patches"]["candidates"]["step"],
    log:
        "logs/candidates/{sample}.log",
    conda:
        env_file("core")
    shell:
        segrefine("core") + " patches --slide {input.slide} --grid {params.size} {params.step} "
        "--sn {wildcards.sample} --out-dir {output.patches} 2> {log}"
