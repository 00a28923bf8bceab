# SegRefine: fine-tune cell segmentation on a few annotated patches, segment the
# whole slide, and build the single-cell expression matrix.
# Read it as a table of contents: each stage is one file in rules/.
from snakemake.utils import min_version

min_version("9.0")


# The demo's config, unless the run names its own with --configfile: Snakemake would merge the two, and the demo's
# models and samples would join the user's (as `--replace-workflow-config` does, a user's config replaces it whole).
if not workflow.overwrite_configfiles:

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
include: "rules/corrections.smk"
include: "rules/segment.smk"
include: "rules/expression.smk"
include: "rules/cells.smk"
include: "rules/purity.smk"
include: "rules/spatialdata.smk"
include: "rules/summary.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
