"""Model folders: the card of a pretrained model, the offline base model, and fine-tuning.

Fine-tuning always starts from the card of the ORIGINAL pretrained weights
(never from an earlier fine-tuned checkpoint), so refitting after new
annotations cannot inherit an earlier fit's forgetting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from segrefine import SegRefineError
from segrefine.io import new_work_dir, sha256_file
from segrefine.models import adapter_class, read_card, weights_path, write_card

log = logging.getLogger("segrefine.finetune")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _publish(work: Path, out_dir: Path) -> None:
    """Move a finished model folder into place (whole folder, so no half model is ever visible)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work), str(out_dir))


def _keep_version(model_dir: Path, version: str) -> None:
    """Keep a copy of each fine-tuned model under ``versions/<training-set version>`` beside it,
    so models fitted on earlier annotation sets stay available for comparison."""
    target = model_dir.parent / "versions" / version
    if target.exists():
        return
    tmp = new_work_dir(model_dir.parent, f".{model_dir.name}.")  # the model's own prefix: one cleanup for both
    try:
        shutil.copytree(model_dir, tmp / "m")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "m", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pretrained_card(framework: str, weights: Optional[str], name: str, params: dict, out_dir, source: str) -> Path:
    """A card for existing pretrained weights (checked to load), without copying them."""
    cls = adapter_class(framework)
    w = Path(weights).resolve() if weights else None
    if w is not None and w.name == "card.json":  # a base model trained by the workflow
        base = read_card(w)
        if base["framework"] != framework:
            raise SegRefineError(f"{w}: a {base['framework']} model cannot be the pretrained {framework} model")
        w = weights_path(w, base).resolve()
    adapter = cls.from_pretrained(w, params)  # fails early on a wrong or missing file
    card = {
        "name": name,
        "framework": framework,
        "stage": "pretrained",
        "weights": str(w) if w else None,
        "weights_sha256": sha256_file(w) if w else None,
        "source": {"pretrained": source, "weights_sha256": sha256_file(w) if w else None},
        "trainset_version": None,
        "metrics": {},
        "device": adapter.device,
        **adapter.card_fields(),
    }
    return write_card(out_dir, card)


def plot_losses(losses: dict, title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segrefine.io import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.2))
    tr = losses.get("train_loss", [])
    ax.plot(np.arange(len(tr)), tr, label="train")
    if losses.get("val_loss"):
        ax.plot(losses["val_epoch"], losses["val_loss"], "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _train_and_save(adapter, train, val, params: dict, seed: int, out_dir, card: dict) -> Path:
    out_dir = Path(out_dir)
    work = new_work_dir(out_dir.parent, f".{out_dir.name}.")  # after removing the work folders of killed runs
    try:
        t0 = time.time()
        losses = adapter.fine_tune(train, val, params, seed, work / "scratch")
        seconds = time.time() - t0
        shutil.rmtree(work / "scratch", ignore_errors=True)
        weights = adapter.save(work)
        (work / "losses.json").write_text(json.dumps(losses) + "\n")
        plot_losses(losses, f"{card['name']} ({card['stage']})", work / "loss.png")
        card = dict(
            card,
            weights=weights.name,
            weights_sha256=sha256_file(weights),
            device=adapter.device,
            metrics={
                "final_train_loss": losses["train_loss"][-1] if losses["train_loss"] else None,
                "final_val_loss": losses["val_loss"][-1] if losses.get("val_loss") else None,
                "train_seconds": round(seconds, 1),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "epochs": len(losses["train_loss"]),
            },
            **adapter.card_fields(),
        )
        write_card(work, card)
        _publish(work, out_dir)
        if card.get("trainset_version"):
            _keep_version(out_dir, card["trainset_version"])
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log.info("saved %s model %s to %s", card["stage"], card["name"], out_dir)
    return out_dir / "card.json"


def train_base(framework: str, name: str, params: dict, n_images: int, size: int, seed: int, out_dir) -> Path:
    """The offline base model: trained from scratch on the generic synthetic nuclei set."""
    from segrefine.demo import generic_nuclei

    images, masks = generic_nuclei(n_images, size, seed)
    adapter = adapter_class(framework).from_pretrained(None, dict(params, seed=seed))
    card = {
        "name": name,
        "framework": framework,
        "stage": "base",
        "source": {
            "pretrained": None,
            "weights_sha256": None,
            "data": f"segrefine.demo.generic_nuclei(n_images={n_images}, size={size}, seed={seed})",
        },
        "trainset_version": None,
    }
    return _train_and_save(adapter, list(zip(images, masks)), [], params, seed, out_dir, card)


def fine_tune(pretrained_card_path, trainset_path, name: str, params: dict, seed: int, out_dir) -> Path:
    """Fine-tune from the pretrained card on the training set's train (and val) split."""
    from segrefine.trainset import load_pairs, read_trainset

    src = read_card(pretrained_card_path)
    if src["stage"] == "finetuned":
        raise SegRefineError(
            f"{pretrained_card_path}: fine-tuning must start from original pretrained weights, "
            "not from a fine-tuned model"
        )
    rows = read_trainset(trainset_path)
    version = json.loads(Path(trainset_path).with_suffix(".json").read_text())["version"]
    train, val = load_pairs(rows, "train"), load_pairs(rows, "val")
    if not train or sum(int(m.max() > 0) for _, m in train) == 0:
        raise SegRefineError(f"{trainset_path}: the training split holds no cells")
    cls = adapter_class(src["framework"])
    merged = dict(src.get("hyperparameters", {}), **src.get("thresholds", {}))
    merged.update(params)
    adapter = cls.from_pretrained(weights_path(pretrained_card_path, src), merged)
    log.info("fine-tuning %s (%s) from %s on %s", name, src["framework"], pretrained_card_path, adapter.device)
    card = {
        "name": name,
        "framework": src["framework"],
        "stage": "finetuned",
        "source": {
            "pretrained": src["source"].get("pretrained") or src["name"],
            "card": str(pretrained_card_path),
            "weights_sha256": src["weights_sha256"],
        },
        "trainset_version": version,
    }
    return _train_and_save(adapter, train, val, merged, seed, out_dir, card)
