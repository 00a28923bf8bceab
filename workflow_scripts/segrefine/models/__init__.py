"""Models behind one adapter interface, saved as folders with a model card.

A model folder holds its weights and ``card.json``; inference and evaluation
load any model through the card alone (``load_model(card_path)``).
Adapters are imported lazily: each lives in its framework's env.
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Dict

from segrefine import SegRefineError
from segrefine.io import sha256_file

# framework name -> "module:class"; adding a framework = one adapter module + one entry here
ADAPTERS: Dict[str, str] = {
    "cellpose": "segrefine.models.cellpose_adapter:CellposeAdapter",
    "classical": "segrefine.models.classical_adapter:ClassicalAdapter",
    "cpsam": "segrefine.models.cpsam_adapter:CpsamAdapter",
    "stardist": "segrefine.models.stardist_adapter:StarDistAdapter",
    "unet": "segrefine.models.unet_adapter:UNetAdapter",
}

CARD_NAME = "card.json"
CARD_KEYS = ("name", "framework", "stage", "weights", "weights_sha256", "source", "trainset_version",
             "preprocessing", "thresholds", "hyperparameters", "metrics", "device")


def adapter_class(framework: str):
    if framework not in ADAPTERS:
        raise SegRefineError(f"unknown framework {framework!r}; known: {sorted(ADAPTERS)}")
    module, cls = ADAPTERS[framework].split(":")
    return getattr(importlib.import_module(module), cls)




def read_card(card_path) -> dict:
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
            raise SegRefineError(f"{card_path}: weights file {weights} does not match the card's checksum "
                                 "(changed or truncated after the card was written)")
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
