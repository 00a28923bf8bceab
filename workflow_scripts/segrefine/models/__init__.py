"""Models behind one adapter interface, saved as folders with a model card.

A model folder holds its weights and ``card.json``; inference and evaluation
load any model through the card alone (``load_model(card_path)``).
Adapters are imported lazily: each lives in its framework's env. ``FRAMEWORKS`` is the one registry of the
frameworks' facts (adapter, env, GPU, sweepable thresholds); it is plain data, so this module imports with the
standard library alone (the Snakefile, the Makefile and the tests read it without any framework installed).
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Dict, List

from segrefine import SegRefineError

# The framework registry. Per framework: its adapter ("module:class"), the env it runs in (envs/<env>.yaml), whether
# its jobs ask for a GPU (`resources: gpu=1`; it runs on CPU too), and the inference thresholds the evaluation's
# threshold sweep sets, each with its default grid (`evaluation.threshold_grids` in the config overrides a grid; the
# adapter's SWEEPABLE_THRESHOLDS names the same keys). Adding a framework = one adapter module + one entry here +
# its env file + the framework enum of config/schemas/config.schema.yaml (tests/test_frameworks.py checks they agree).
FRAMEWORKS: Dict[str, dict] = {
    "cellpose": {
        "adapter": "segrefine.models.cellpose_adapter:CellposeAdapter",
        "env": "cellpose",
        "gpu": True,
        "thresholds": {"flow_threshold": [0.2, 0.4, 0.6, 0.8], "cellprob_threshold": [-2.0, -1.0, 0.0, 1.0, 2.0]},
    },
    "classical": {
        "adapter": "segrefine.models.classical_adapter:ClassicalAdapter",
        "env": "core",
        "gpu": False,
        "thresholds": {},
    },
    "cpsam": {
        "adapter": "segrefine.models.cpsam_adapter:CpsamAdapter",
        "env": "cpsam",
        "gpu": True,
        "thresholds": {"flow_threshold": [0.2, 0.4, 0.6, 0.8], "cellprob_threshold": [-2.0, -1.0, 0.0, 1.0, 2.0]},
    },
    "stardist": {
        "adapter": "segrefine.models.stardist_adapter:StarDistAdapter",
        "env": "tensorflow",
        "gpu": True,
        "thresholds": {"prob_thresh": [0.3, 0.4, 0.5, 0.6, 0.7], "nms_thresh": [0.2, 0.3, 0.4, 0.5]},
    },
    "unet": {
        "adapter": "segrefine.models.unet_adapter:UNetAdapter",
        "env": "tensorflow",
        "gpu": True,
        "thresholds": {"prob_thresh": [0.3, 0.4, 0.5, 0.6, 0.7], "min_distance": [2, 3, 4, 5]},
    },
}
ADAPTERS: Dict[str, str] = {name: f["adapter"] for name, f in FRAMEWORKS.items()}


def framework_env(framework: str) -> str:
    """The env (envs/<name>.yaml) the framework's steps run in."""
    return FRAMEWORKS[framework]["env"]


def framework_envs() -> List[str]:
    """Every env some framework runs in, sorted (the Makefile builds them)."""
    return sorted({f["env"] for f in FRAMEWORKS.values()})


def config_envs(config_path) -> List[str]:
    """The envs (sorted) of the frameworks a configuration file's models and base models use: beside the envs the
    rules name themselves, what a run of that configuration needs built (`make demo` builds only these)."""
    import yaml  # not at module level: the registry reads without any package installed

    config_path = Path(config_path)
    if not config_path.is_file():
        raise SegRefineError(f"{config_path}: config file not found")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise SegRefineError(f"{config_path}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise SegRefineError(f"{config_path}: not a configuration (a YAML mapping)")
    envs = set()
    for section in ("models", "base_models"):
        for name, entry in (config.get(section) or {}).items():
            framework = entry.get("framework") if isinstance(entry, dict) else None
            if framework not in FRAMEWORKS:
                raise SegRefineError(
                    f"{config_path}: {section}.{name}: framework {framework!r} is none of {sorted(FRAMEWORKS)}"
                )
            envs.add(framework_env(framework))
    return sorted(envs)


def uses_gpu(framework: str) -> bool:
    return bool(FRAMEWORKS[framework]["gpu"])


def threshold_grid(framework: str) -> Dict[str, list]:
    """The default threshold-sweep grid {threshold: [values]}; empty for a framework with nothing to sweep."""
    return {k: list(v) for k, v in FRAMEWORKS[framework]["thresholds"].items()}


CARD_NAME = "card.json"
CARD_KEYS = (
    "name",
    "framework",
    "stage",
    "weights",
    "weights_sha256",
    "source",
    "trainset_version",
    "preprocessing",
    "thresholds",
    "hyperparameters",
    "metrics",
    "device",
)


def adapter_class(framework: str):
    if framework not in FRAMEWORKS:
        raise SegRefineError(f"unknown framework {framework!r}; known: {sorted(FRAMEWORKS)}")
    module, cls = FRAMEWORKS[framework]["adapter"].split(":")
    return getattr(importlib.import_module(module), cls)


def read_card(card_path) -> dict:
    from segrefine.io import sha256_file

    card_path = Path(card_path)
    if not card_path.is_file():
        raise SegRefineError(f"{card_path}: model card not found")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise SegRefineError(f"{card_path}: not a valid model card ({exc})") from exc
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise SegRefineError(f"{card_path}: model card lacks {missing}")
    weights = weights_path(card_path, card)
    if weights is not None:
        if not weights.is_file():
            raise SegRefineError(f"{card_path}: weights file {weights} not found")
        if sha256_file(weights) != card["weights_sha256"]:
            raise SegRefineError(
                f"{card_path}: weights file {weights} does not match the card's checksum "
                "(changed or truncated after the card was written)"
            )
    return card


def weights_path(card_path, card: dict):
    if card.get("weights") is None:
        return None  # a model with no weights (e.g. a classical baseline)
    w = Path(card["weights"])
    return w if w.is_absolute() else Path(card_path).parent / w


def write_card(model_dir, card: dict) -> Path:
    from segrefine.io import write_text_atomic

    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    card = dict(card)
    card.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    path = Path(model_dir) / CARD_NAME
    write_text_atomic(path, json.dumps(card, indent=2, sort_keys=True) + "\n")
    return path


def load_model(card_path):
    """Any saved model, from its card: returns (adapter instance, card)."""
    card = read_card(card_path)
    return adapter_class(card["framework"]).load(card_path, card), card
