rule convert_annotation:
    """One annotation file (QuPath GeoJSON, binary or instance mask) -> instance mask.
    One job per file, so adding a file converts only that file."""
    input:
        lambda wc: annotations[(wc.sample, wc.patch)],
    output:
        f"{RESULTS}/annotations/{{sample}}/{{patch}}-mask.tif",
    log:
        "logs/annotations/{sample}/{patch}.log",
    conda:
        env_file("core")
    params:
        exclude=" ".join(shlex.quote(c) for c in config["annotations"]["exclude_classes"]),
        nucleus="--use-nucleus" if config["annotations"]["use_nucleus"] else "",
        pad=f"--pad-to {config['patches']['pad_to']}" if config["patches"]["pad_to"] else "",
    shell:
        segrefine("core") + " convert-annotation --annotation {input:q} --out {output} "
        "--exclude-class {params.exclude} {params.nucleus} {params.pad} 2> {log}"
