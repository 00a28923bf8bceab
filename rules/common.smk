import json
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

SCRIPTS = Path(workflow.basedir) / "workflow_scripts"
sys.path.insert(0, str(SCRIPTS))

from segrefine import SegRefineError  # noqa: E402
from segrefine.envs import EnvError, env_python  # noqa: E402
from segrefine.models import FRAMEWORKS, framework_env, threshold_grid, uses_gpu  # noqa: E402
from segrefine.patches import parse_patch_name  # noqa: E402
from segrefine.pretrained import official_path  # noqa: E402
from segrefine.saw import resolve_outs  # noqa: E402


def fail(message):
    raise WorkflowError(f"SegRefine configuration: {message}")


def validated(data, schema, what):
    """Snakemake's validate, its error cut to a few lines naming the key (the full error prints the whole schema)."""
    message = None
    try:
        validate(data, schema=schema)
    except WorkflowError as exc:
        err = exc.__context__  # the jsonschema ValidationError
        if not (hasattr(err, "absolute_path") and hasattr(err, "message")):
            raise
        where = ".".join(map(str, err.absolute_path))
        row = re.search(r"Error validating row (\d+)", str(exc))
        message = (
            f"{what}{f' row {int(row.group(1)) + 1}' if row else ''}{f', key {where}' if where else ''}: "
            f"{err.message}"
        )
    if message:
        fail(message)


validated(config, "../config/schemas/config.schema.yaml", "config")

RESULTS = config["results"]
ANNOTATION_SUFFIXES = (".geojson", ".json", ".tif", ".tiff", ".png")
if config["segmentation"]["model"] not in config["models"]:
    fail(
        f"segmentation.model {config['segmentation']['model']!r} is not a configured model "
        f"(models: {', '.join(sorted(config['models']))})"
    )


# --- samples ----------------------------------------------------------------------------------------------------------
def _read_samples(path):
    if not Path(path).is_file():
        fail(f"sample sheet {path} not found")
    sheet = pd.read_csv(
        path, sep="\t", dtype={"sample": str, "image": str, "expression": str, "saw_outs": str}, comment="#"
    )
    for col in ("image", "expression", "saw_outs"):  # optional columns, and empty cells, as ""
        sheet[col] = sheet[col].fillna("") if col in sheet else ""
    sheet["saw_cellbins"] = [{} for _ in range(len(sheet))]
    for i, row in sheet.iterrows():  # a SAW v8 outs folder gives the image and the matrix the sheet leaves empty
        if row["saw_outs"]:
            try:
                outs = resolve_outs(row["saw_outs"], row["sample"], row.get("stain"))
            except SegRefineError as exc:
                fail(f"{path}: sample {row['sample']}: {exc}")
            sheet.at[i, "image"] = row["image"] or outs.image
            sheet.at[i, "expression"] = row["expression"] or outs.expression
            sheet.at[i, "saw_cellbins"] = outs.cellbins
    validated(sheet.drop(columns=["saw_cellbins"]), "../config/schemas/samples.schema.yaml", f"sample sheet {path}")
    if sheet["sample"].duplicated().any():
        fail(f"{path}: duplicate sample ids {sorted(sheet['sample'][sheet['sample'].duplicated()])}")
    for row in sheet.itertuples():
        if not Path(row.image).is_file():
            fail(
                f"{path}: sample {row.sample}: image {row.image} not found"
                + (" (run `make demo-data` to create the demo)" if row.image.startswith("demo/") else "")
            )
        if row.expression and not Path(row.expression).is_file():
            fail(f"{path}: sample {row.sample}: expression matrix {row.expression} not found")
        if not Path(row.annotations).is_dir():
            fail(f"{path}: sample {row.sample}: annotation folder {row.annotations} not found")
    return sheet.set_index("sample", drop=False)


samples = _read_samples(config["samples"])


def channel_arg(wildcards):
    """`--channel N` where the sample sheet's optional 'channel' column chooses the slide's channel to segment
    (2-channel and multi-channel fluorescence; segrefine.io.Slide refuses such a slide without it)."""
    if "channel" not in samples or pd.isnull(samples.loc[wildcards.sample, "channel"]):
        return ""
    return f"--channel {int(samples.loc[wildcards.sample, 'channel'])}"


def _find_annotations():
    """{(sample, patch): annotation file}; file names must name their patch and chip."""
    found = {}
    for row in samples.itertuples():
        for f in sorted(Path(row.annotations).iterdir()):
            if f.name.startswith(".") or f.suffix.lower() not in ANNOTATION_SUFFIXES:
                continue
            try:
                box = parse_patch_name(f.stem)
            except SegRefineError as exc:
                fail(f"annotation file {f}: {exc}")
            if box.sn != row.sample:
                fail(f"annotation file {f} names chip {box.sn!r} but sits in the folder of sample {row.sample!r}")
            if (row.sample, box.name) in found:
                fail(f"two annotation files for patch {box.name}: {found[(row.sample, box.name)]} and {f}")
            found[(row.sample, box.name)] = str(f)
    if not found:
        fail("no annotation files in any sample's annotation folder")
    return found


annotations = _find_annotations()


wildcard_constraints:
    sample="|".join(map(str, samples.index)),
    patch=r"[A-Za-z0-9_.]+-x\d+_y\d+_w\d+_h\d+",
    model="|".join(config["models"]),
    stage="pretrained|finetuned",


# --- environments: conda on HPC, or the virtualenvs built from the same env files ------------------------------------
USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def env_file(name):
    return f"../envs/{name}.yaml"


def segrefine(env):
    """The command that runs one step in its framework's env: `... -m segrefine`."""
    if USE_CONDA:
        python = "python"
    else:
        try:
            python = str(env_python(env))
        except EnvError as exc:
            fail(str(exc))
    return f"PYTHONPATH={shlex.quote(str(SCRIPTS))} {shlex.quote(python)} -m segrefine"


# --- models: the frameworks' facts come from their registry (segrefine.models.FRAMEWORKS) ---
FRAMEWORK_ENV = {fw: framework_env(fw) for fw in FRAMEWORKS}  # -> envs/<name>.yaml
GPU_FRAMEWORKS = {fw for fw in FRAMEWORKS if uses_gpu(fw)}  # their jobs declare `resources: gpu=1`
SWEEP_FRAMEWORKS = {fw for fw in FRAMEWORKS if threshold_grid(fw)}  # the evaluation's threshold sweep


def model_env(model):
    return FRAMEWORK_ENV[model_cfg(model)["framework"]]


def model_gpu(model):
    return 1 if model_cfg(model)["framework"] in GPU_FRAMEWORKS else 0


def official_name(framework, weights_file):
    from segrefine.models import adapter_class

    names = {v: k for k, v in adapter_class(framework).official_weights.items()}
    if weights_file not in names:
        fail(f"{weights_file} is not an official {framework} weights file ({sorted(names)})")
    return names[weights_file]


def base_env(base):
    return FRAMEWORK_ENV[config["base_models"][base]["framework"]]


# --- models (cont.) -----------------------------------------------------------------------------------------------------------
def model_cfg(model):
    return config["models"][model]


def pretrained_weights(model):
    """Input of a model's pretrained card: base model card, cached official weights, a local file,
    or nothing (`none`: from scratch, or a model without weights)."""
    spec = model_cfg(model)["pretrained"]
    if spec == "none":
        return []
    if spec.startswith("base:"):
        base = spec[len("base:") :]
        if base not in config.get("base_models", {}):
            fail(f"model {model}: pretrained {spec!r} names no entry of base_models")
        return f"{RESULTS}/models/base/{base}/card.json"
    try:
        return str(official_path(model_cfg(model)["framework"], spec, config["model_cache"]))
    except SegRefineError:
        if not Path(spec).is_file():
            fail(f"model {model}: pretrained {spec!r} is neither an official name nor an existing weights file")
        return spec


def params_json(d):
    return shlex.quote(json.dumps(d or {}, sort_keys=True))


# --- outputs ----------------------------------------------------------------------------------------------------------
def annotated_patches(sample=None):
    return [(s, p) for (s, p) in annotations if sample is None or s == sample]


def segmentation_card(wildcards):
    """The card of the segmentation model at the stage whose whole slide is segmented: segmentation.stage, or the
    {stage} wildcard of the before/after QC's rules (segment_shard_qc)."""
    seg = config["segmentation"]
    if seg["model"] not in config["models"]:
        fail(f"segmentation.model {seg['model']!r} is not a configured model: {sorted(config['models'])}")
    return f"{RESULTS}/models/{seg['model']}/{wildcards.get('stage', seg['stage'])}/card.json"


def tiling_cfg():
    """segmentation.tiling, its defaults filled from the schema."""
    return config["segmentation"]["tiling"]


def n_shards():
    """segmentation.tiling.shards, or `auto`: one per GPU given to Snakemake (`--resources gpu=N`), at least 1."""
    shards = tiling_cfg()["shards"]
    if shards != "auto":
        return int(shards)
    gpu = workflow.global_resources.get("gpu")
    return max(1, int(getattr(gpu, "value", gpu) or 1))


def model_context_bound():
    """Upper bound (px) of the context the segmentation model's framework declares, to size the prediction groups
    (segrefine.tiling.FRAMEWORK_CONTEXT_BOUND_PX): from the configuration only, so the tile plan does not depend on
    the fine-tuned model; 0 with model_context off."""
    from segrefine.tiling import FRAMEWORK_CONTEXT_BOUND_PX

    if not tiling_cfg()["model_context"]:
        return 0
    return FRAMEWORK_CONTEXT_BOUND_PX.get(model_cfg(config["segmentation"]["model"])["framework"], 0)


def halo_check_input(wildcards):
    """The file of the halo_check job (the plan's halo against the training masks' largest cell), an input of the
    fine-tuned stage's shards only: the pretrained stage's whole slide does not depend on the training set, so a
    new annotation does not replan or resegment it."""
    stage = wildcards.get("stage", config["segmentation"]["stage"])
    return [f"{RESULTS}/segmentation/{wildcards.sample}/halo_check.json"] if stage == "finetuned" else []


def tile_plan_args(wildcards):
    t = tiling_cfg()
    args = (
        f"--tile-size {t['tile_size']} --halo {t['halo']} --halo-unit {t['halo_unit']} --context {t['context']} "
        f"--group {t['group']} --context-bound {model_context_bound()} "
        f"--shards {n_shards()} --pixel-size-um {samples.loc[wildcards.sample, 'pixel_size_um']} "
        f"--tissue-level {t['tissue']['level']} --tissue-downsample {t['tissue']['downsample']}"
    )
    if not t["tissue"]["activate"]:
        args += " --no-tissue"
    if samples.loc[wildcards.sample, "stain"] == "HE":
        args += " --bright-field"
    return args


def expression_samples():
    if not config["expression"]["activate"]:
        return []
    return [s for s in samples.index if samples.loc[s, "expression"]]


def expression_origin(wildcards):
    """expression.origin for one sample, as the `segrefine cgef --origin` argument."""
    origin = config["expression"]["origin"]
    if isinstance(origin, dict):
        origin = origin.get(wildcards.sample, "auto")
    return origin if origin == "auto" else f"{int(origin[0])},{int(origin[1])}"


# --- whole-slide stages: segmentation.stage, plus the other one for the before/after expression QC --------------------
STAGES = ("pretrained", "finetuned")  # before, after fine-tuning


def qc_before_after():
    """expression.qc_before_after (default on) with expression active and at least one sample with a matrix."""
    return bool(expression_samples()) and config["expression"]["qc_before_after"]


def other_stage():
    """The stage the before/after QC segments besides segmentation.stage (rules segment_shard_qc, stitch_qc,
    cgef_qc: results/segmentation/{sample}/{stage}/, results/expression/{sample}/{stage}/)."""
    return next(s for s in STAGES if s != config["segmentation"]["stage"])


def stage_dir(top, sample, stage=None):
    """results/<top>/<sample> for segmentation.stage (or no stage), results/<top>/<sample>/<stage> for the other."""
    sub = [stage] if stage and stage != config["segmentation"]["stage"] else []
    return str(Path(RESULTS, top, sample, *sub))


def slide_dir(wildcards):
    """The whole-slide segmentation folder of a job of segment_shard/stitch/cgef, or of their _qc forms."""
    return stage_dir("segmentation", wildcards.sample, wildcards.get("stage"))


def qc_outputs():
    """The expression QC's files; before_after.csv only with both stages segmented (docs/expression.md)."""
    qc = f"{RESULTS}/expression/qc"
    out = {
        "summary": f"{qc}/summary.csv",
        "cells": f"{qc}/cells.csv",
        "extreme": f"{qc}/extreme_area.csv",
        "plot": f"{qc}/distributions.png",
    }
    if qc_before_after():
        out["before_after"] = f"{qc}/before_after.csv"
    if saw_tables():
        out["saw_comparison"] = f"{qc}/saw_comparison.csv"
    return out


def qc_stages():
    """The stages the expression QC reads, pretrained (before) first."""
    return list(STAGES) if qc_before_after() else [config["segmentation"]["stage"]]


def saw_tables():
    """(sample, SAW stage) of every SAW cell-bin GEF the sample sheet gives (saw_outs): saw_nuclei (cellbin.gef),
    saw_cells (adjusted.cellbin.gef); the QC puts them beside our cells."""
    return [(s, stage) for s in expression_samples() for stage in samples.loc[s, "saw_cellbins"]]


# --- cells: nuclei grown into cells (rules/cells.smk; docs/expression.md, Cells) ---------------------------------------
CELLS_SUFFIX = "_cells"  # the QC's stage of a stage's cells: pretrained_cells, finetuned_cells (segrefine.qc)


def cells_on():
    """expression.cells.mode expand or mask: the cells' matrix beside the nuclei's, in .../expanded/ folders."""
    return config["expression"]["cells"]["mode"] != "nuclei"


def cells_mask(wildcards):
    """[the user's cell mask of the sample] with expression.cells.mode mask (masks: sample, else '*'), else []."""
    c = config["expression"]["cells"]
    if c["mode"] != "mask":
        return []
    return [c["masks"].get(wildcards.sample, c["masks"].get("*"))]


def cells_args(wildcards):
    """The `segrefine cells` options of a sample: --mask, or --distance/--unit/--um-per-px."""
    c = config["expression"]["cells"]
    size = samples.loc[wildcards.sample, "pixel_size_um"]
    if c["mode"] == "mask":
        return f"--mask {shlex.quote(str(cells_mask(wildcards)[0]))} --pixel-size-um {size}"
    return f"--distance {c['distance']} --unit {c['unit']} --um-per-px {size}"


def _check_cells():
    from segrefine.cells import distance_px

    c = config["expression"]["cells"]
    for s in samples.index:
        if c["mode"] == "expand":
            try:
                distance_px(
                    c["distance"],
                    c["unit"],
                    float(samples.loc[s, "pixel_size_um"]),
                    where=f"expression.cells (sample {s})",
                )
            except SegRefineError as exc:
                fail(str(exc))
        elif c["mode"] == "mask":
            mask = c["masks"].get(s, c["masks"].get("*"))
            if not mask:
                fail(f"expression.cells.mode mask: no cell mask for sample {s} in expression.cells.masks")
            if not Path(mask).is_file():
                fail(f"expression.cells.masks: cell mask {mask} of sample {s} not found")


_check_cells()


def qc_our_stages():
    """Our stages in the QC: the nuclei's (qc_stages), then, with cells on, the same stages' cells (<stage>_cells)."""
    return qc_stages() + ([st + CELLS_SUFFIX for st in qc_stages()] if cells_on() else [])


def table_dir(sample, stage):
    """The folder of one of our cell tables: results/expression/<sample>[/<stage>], plus /expanded for the cells."""
    if stage.endswith(CELLS_SUFFIX) and stage[: -len(CELLS_SUFFIX)] in STAGES:
        return str(Path(stage_dir("expression", sample, stage[: -len(CELLS_SUFFIX)]), "expanded"))
    return stage_dir("expression", sample, stage)


def qc_tables():
    """(sample, stage) of every cell table the expression QC reads: ours, one stage after the other (pretrained
    first; nuclei, then cells), then SAW's."""
    return [(s, stage) for stage in qc_our_stages() for s in expression_samples()] + saw_tables()


def qc_cellmaps(wildcards):
    return [str(Path(table_dir(sample, stage), "cellmap.csv")) for sample, stage in qc_tables()]


def qc_reports(wildcards):
    """The cgef steps' alignment reports (UMIs in cells, shift check) of our tables, in qc_tables' order."""
    return [
        str(Path(table_dir(sample, stage), "alignment.json"))
        for stage in qc_our_stages()
        for sample in expression_samples()
    ]


def qc_args(wildcards):
    tables = qc_tables()
    return f"--samples {' '.join(s for s, _ in tables)} --stages {' '.join(st for _, st in tables)}"


QC_REPORT = {"category": "6. Expression QC"}


# --- purity: MECR, truth purity, scanpy clusters of every cell table (rules/purity.smk; docs/expression.md, Purity) ---
def sample_column(sample, column):
    """An optional sample-sheet column of one sample ('' when the sheet lacks it or leaves it empty)."""
    if column not in samples:
        return ""
    value = samples.loc[sample, column]
    return "" if pd.isnull(value) else str(value).strip()


def purity_markers():
    return config["expression"]["markers"]


def _check_purity():
    from segrefine.purity import check_markers

    if purity_markers():
        try:
            check_markers(purity_markers())
        except SegRefineError as exc:
            fail(f"expression.markers: {exc}")
    for s in samples.index:
        truth, types = sample_column(s, "truth"), sample_column(s, "truth_types")
        if types and not truth:
            fail(f"{config['samples']}: sample {s}: truth_types {types} given without truth labels (column truth)")
        for what, path in (("truth labels", truth), ("truth types", types)):
            if path and not Path(path).is_file():
                fail(f"{config['samples']}: sample {s}: {what} {path} not found")


_check_purity()


def purity_samples():
    """The expression samples the purity step measures: all of them with markers, else those with a truth."""
    return [s for s in expression_samples() if purity_markers() or sample_column(s, "truth")]


def purity_stages():
    """Every cell table of a sample the purity and cluster checks read, pretrained first: the QC's own stages
    (qc_our_stages: the nuclei of each stage, then with expression.cells the same stages' cells, <stage>_cells).
    A new kind of cell table joins here, with its folder in table_dir and its labels in table_labels."""
    return qc_our_stages()


def table_labels(sample, stage):
    """The label image a cell table was built from: results/segmentation/<sample>[/<stage>]/labels.tif, and the
    cells' expanded/labels.tif beside it (table_dir's rule)."""
    if stage.endswith(CELLS_SUFFIX) and stage[: -len(CELLS_SUFFIX)] in STAGES:
        return str(Path(stage_dir("segmentation", sample, stage[: -len(CELLS_SUFFIX)]), "expanded", "labels.tif"))
    return str(Path(stage_dir("segmentation", sample, stage), "labels.tif"))


def purity_truth_inputs(wildcards):
    """The matrix, truth labels and truth types of a sample with a truth, else nothing."""
    s = wildcards.sample
    if not sample_column(s, "truth"):
        return {}
    out = {"expression": samples.loc[s, "expression"], "truth": sample_column(s, "truth")}
    if sample_column(s, "truth_types"):
        out["truth_types"] = sample_column(s, "truth_types")
    return out


def purity_args(wildcards, input):
    args = ""
    for key in ("expression", "truth", "truth_types"):
        if key in input.keys():
            args += f" --{key.replace('_', '-')} {shlex.quote(str(input[key]))}"
    if purity_markers():
        args += f" --markers {shlex.quote(json.dumps(purity_markers()))}"
    return args + f" --mixed-fraction {config['expression']['mixed_fraction']}"


def purity_outputs():
    """The purity QC's table and figure (with expression active and a sample with a matrix)."""
    if not expression_samples():
        return {}
    qc = f"{RESULTS}/expression/qc"
    return {"table": f"{qc}/purity.csv", "plot": f"{qc}/purity.png"}


def spatialdata_samples():
    """The samples that get a SpatialData store: those with a matrix, unless expression.spatialdata is off."""
    return expression_samples() if config["expression"]["spatialdata"] else []


def final_outputs():
    out = [
        f"{RESULTS}/evaluation/summary.csv",
        f"{RESULTS}/evaluation/boxplots.png",
        f"{RESULTS}/evaluation/loss_curves.png",
        f"{RESULTS}/evaluation/complexity_vs_accuracy.csv",
        f"{RESULTS}/evaluation/screening/ranking.csv",
    ]
    out += expand(
        f"{RESULTS}/evaluation/{{model}}/{{stage}}_overlays", model=config["models"], stage=["pretrained", "finetuned"]
    )
    out += expand(
        f"{RESULTS}/evaluation/threshold_sweep/{{model}}/{{stage}}.csv",
        model=SWEEP_MODELS,
        stage=["pretrained", "finetuned"],
    )
    out += [f"{RESULTS}/models/{m}/finetuned/card.json" for m in config["models"]]
    out += expand(f"{RESULTS}/segmentation/{{sample}}/labels.tif", sample=samples.index)
    out += expand(f"{RESULTS}/expression/{{sample}}/cells.h5ad", sample=expression_samples())
    if cells_on():
        out += expand(f"{RESULTS}/segmentation/{{sample}}/expanded/labels.tif", sample=samples.index)
        out += expand(f"{RESULTS}/expression/{{sample}}/expanded/cells.h5ad", sample=expression_samples())
    if expression_samples():
        out += qc_outputs().values()
        out += purity_outputs().values()  # rules/purity.smk
    # rules/spatialdata.smk
    out += expand(f"{RESULTS}/spatialdata/{{sample}}.{{ext}}", sample=spatialdata_samples(), ext=["zarr", "png"])
    if config["patches"]["candidates"]["activate"]:
        out += expand(f"{RESULTS}/candidates/{{sample}}/done", sample=samples.index)
    if config["evaluation"]["learning_curve"]["activate"]:
        out += [f"{RESULTS}/learning_curve/learning_curve.csv", f"{RESULTS}/learning_curve/learning_curve.png"]
    if config.get("evaluation", {}).get("annotate_next", {}).get("activate", False):
        out += expand(f"{RESULTS}/annotate_next/{{sample}}/regions.geojson", sample=samples.index)
    out += ANNOTATION_LOOP_OUTPUTS  # rules/corrections.smk: pre-annotations, corrections counted
    return out
