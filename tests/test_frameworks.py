"""One home per fact: the framework registry (segrefine.models.FRAMEWORKS) against the adapters, the env files and
the config schema; the schema's defaults against the values the rules used to write in their own dicts."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from segrefine import SegRefineError
from segrefine.models import FRAMEWORKS, adapter_class, config_envs, framework_envs, threshold_grid

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schemas" / "config.schema.yaml"


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_registry_agrees_with_the_adapter_and_its_env(framework):
    entry = FRAMEWORKS[framework]
    assert set(entry) == {"adapter", "env", "gpu", "thresholds"}
    cls = adapter_class(framework)
    assert cls.framework == framework
    # the thresholds the sweep sets are exactly those the adapter's set_thresholds accepts
    assert set(cls.SWEEPABLE_THRESHOLDS) == set(threshold_grid(framework))
    assert all(len(v) >= 1 for v in threshold_grid(framework).values())
    assert (REPO / "envs" / f"{entry['env']}.yaml").is_file()
    assert isinstance(entry["gpu"], bool)


def test_schema_framework_enum_is_the_registry():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert sorted(schema["$defs"]["framework"]["enum"]) == sorted(FRAMEWORKS)


def test_makefile_builds_every_framework_env():
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO), "--no-print-directory", "print-envs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(framework_envs()) <= set(out)
    assert out[0] == "core"


def test_config_envs_are_its_models_frameworks_envs(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_models": {"generic": {"framework": "cellpose"}},
                "models": {
                    "sd": {"framework": "stardist"},
                    "unet": {"framework": "unet"},
                    "baseline": {"framework": "classical"},
                },
            }
        )
    )
    assert config_envs(config) == ["cellpose", "core", "tensorflow"]
    assert config_envs(REPO / "config" / "test" / "config.yaml") == ["cellpose", "core", "tensorflow"]
    config.write_text(yaml.safe_dump({"models": {"x": {"framework": "cpsam"}}}))
    assert config_envs(config) == ["cpsam"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("models:\n  x: {framework: nope}\n", r"config.yaml: models.x: framework 'nope' is none of \['cellpose'"),
        ("base_models:\n  b: {n_images: 4}\n", r"config.yaml: base_models.b: framework None is none of"),
        ("models: [a, b\n", r"config.yaml: not valid YAML"),
        ("- a\n", r"config.yaml: not a configuration"),
    ],
)
def test_config_envs_refuses_a_model_without_a_known_framework(tmp_path, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SegRefineError, match=message):
        config_envs(config)
    with pytest.raises(SegRefineError, match="missing.yaml: config file not found"):
        config_envs(tmp_path / "missing.yaml")


def test_make_demo_builds_only_what_the_demo_uses():
    """`make demo` builds the envs the rules name (Snakemake needs them to read the workflow) and those of the demo
    config's models' frameworks: not the other frameworks' (cpsam, 5.4 GB) nor the lint env; `make setup` (and so
    `make test`) builds every env."""

    def make(*args):
        return subprocess.run(
            ["make", "-s", "-C", str(REPO), "--no-print-directory", *args], capture_output=True, text=True, check=True
        ).stdout

    rule_envs = set()
    for smk in (REPO / "rules").glob("*.smk"):
        rule_envs |= set(re.findall(r'env_file\("(\w+)"\)', smk.read_text()))
    demo = make("print-demo-envs").split()
    assert len(demo) == len(set(demo)) and demo[0] == "core"
    assert set(demo) == rule_envs | set(config_envs(REPO / "config" / "config.yaml"))
    assert {"cpsam", "tensorflow", "lint"}.isdisjoint(demo)
    every = make("print-envs").split()
    assert set(every) == {p.stem for p in (REPO / "envs").glob("*.yaml")}
    # the demo's recipe builds the rules' envs + what config_envs prints for its config, then writes the report
    plan = make("-n", "demo")
    rules_part = " ".join(demo[: len(rule_envs)])
    assert set(demo[: len(rule_envs)]) == rule_envs
    computed = re.escape(f"config_envs(sys.argv[1]) if e not in sys.argv[2:]))' config/config.yaml {rules_part})")
    built = re.escape(f"workflow_scripts/segrefine/envs.py build {rules_part} $envs\n")
    assert re.search(computed + r'" && \S+ ' + built, plan), plan
    assert f"envs.py build {' '.join(every)}" in make("-n", "setup")
    assert f"envs.py build {' '.join(every)}" not in plan
    run, report = plan.index("-m snakemake --profile profiles/local\n"), plan.index("-m snakemake --report results/")
    assert run < report


def test_registry_reads_without_numpy_or_any_framework():
    code = (
        "import sys; import segrefine.models as m; m.framework_envs(); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] in "
        "('numpy', 'torch', 'tensorflow', 'cellpose', 'stardist')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO / "workflow_scripts")},
    ).stdout
    assert out.strip() == "[]"


# --- defaults: the schema fills what the rules' dicts used to hold ---------------------------------------------------
# the dicts as rules/common.smk (TILING_DEFAULTS), rules/evaluate.smk (EVALUATION) and rules/learning_curve.smk
# (LEARNING_CURVE, less its `models`, which depends on the configuration) wrote them before the schema held them
OLD_TILING = {
    "tile_size": 1024,
    "halo": 64,
    "halo_unit": "px",
    "context": 0,
    "model_context": True,
    "group": "auto",
    "shards": "auto",
    "tissue": {"activate": True, "level": "auto", "downsample": 16},
}
OLD_EVALUATION = {"modes": ["standard", "paper"], "iou_threshold": 0.5, "min_size": 0}
OLD_LEARNING_CURVE = {"activate": False, "fractions": [0.25, 0.5, 1.0], "cells": [], "seed": 0}


def old_tiling(given):
    cfg = {**OLD_TILING, **given}
    cfg["tissue"] = {**OLD_TILING["tissue"], **cfg["tissue"]}
    return cfg


def filled(cfg):
    cfg = copy.deepcopy(cfg)
    validate(cfg, schema=str(SCHEMA))
    return cfg


@pytest.fixture
def demo_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_schema_fills_the_tiling_defaults(demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["segmentation"].pop("tiling", None)
    assert filled(cfg)["segmentation"]["tiling"] == OLD_TILING
    given = {"tile_size": 192, "halo": 32, "tissue": {"downsample": 8}}
    cfg["segmentation"]["tiling"] = copy.deepcopy(given)
    assert filled(cfg)["segmentation"]["tiling"] == old_tiling(given)


def test_schema_fills_the_evaluation_defaults(demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg.pop("evaluation", None)
    evaluation = filled(cfg)["evaluation"]
    assert {k: evaluation[k] for k in OLD_EVALUATION} == OLD_EVALUATION
    assert evaluation["learning_curve"] == OLD_LEARNING_CURVE
    cfg["evaluation"] = {"iou_threshold": 0.7, "learning_curve": {"activate": True, "cells": [50]}}
    evaluation = filled(cfg)["evaluation"]
    assert {k: evaluation[k] for k in OLD_EVALUATION} == {**OLD_EVALUATION, "iou_threshold": 0.7}
    assert evaluation["learning_curve"] == {**OLD_LEARNING_CURVE, "activate": True, "cells": [50]}


@pytest.mark.parametrize("config", ["config/config.yaml", "config/test/config.yaml"])
def test_shipped_configs_fill_as_before(config):
    cfg = yaml.safe_load((REPO / config).read_text())
    out = filled(cfg)
    assert out["segmentation"]["tiling"] == old_tiling(cfg["segmentation"].get("tiling", {}))
    evaluation = cfg.get("evaluation", {})
    assert {k: out["evaluation"][k] for k in OLD_EVALUATION} == {
        **OLD_EVALUATION,
        **{k: v for k, v in evaluation.items() if k in OLD_EVALUATION},
    }
    assert out["evaluation"]["learning_curve"] == {**OLD_LEARNING_CURVE, **evaluation.get("learning_curve", {})}
    assert out["expression"]["writer"] == cfg["expression"].get("writer", "exact")
    assert out["expression"]["qc_before_after"] == cfg["expression"].get("qc_before_after", True)
    assert out["expression"]["origin"] == cfg["expression"].get("origin", "auto")
    assert out["expression"]["mixed_fraction"] == cfg["expression"].get("mixed_fraction", 0.1)
    assert out["expression"]["markers"] == (cfg["expression"].get("markers") or {})
    assert all(out["models"][m]["seed"] == cfg["models"][m].get("seed", 0) for m in cfg["models"])
