# SegRefine: fine-tune cell segmentation on a few annotated patches, segment the
# whole slide, and build the single-cell expression matrix.
# Read it as a table of contents: each stage is one file in rules/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/patches.smk"
include: "rules/annotations.smk"
include: "rules/trainset.smk"
include: "rules/models.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/learning_curve.smk"
include: "rules/annotate_next.smk"
include: "rules/segment.smk"
include: "rules/expression.smk"
include: "rules/summary.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
