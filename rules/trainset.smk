rule trainset:
    """The versioned training set: every annotated patch with its split and a content hash."""
    input:
        images=[f"{RESULTS}/patches/{s}/{p}-img.tif" for s, p in annotated_patches()],
        masks=[f"{RESULTS}/annotations/{s}/{p}-mask.tif" for s, p in annotated_patches()],
    output:
        table=f"{RESULTS}/trainset/trainset.tsv",
        summary=f"{RESULTS}/trainset/trainset.json",
    log:
        "logs/trainset/trainset.log",
    conda:
        env_file("core")
    params:
        cfg=config["trainset"],
    shell:
        segrefine("core") + " trainset --images {input.images} --masks {input.masks} --out {output.table} "
        "--seed {params.cfg[seed]} --val-fraction {params.cfg[val_fraction]} "
        "--test-fraction {params.cfg[test_fraction]} 2> {log}"
