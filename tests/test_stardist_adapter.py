"""The StarDist adapter, through the step commands in the tensorflow env, on real
CellBinDB Stereo-seq crops: from scratch, fine-tune, save, load, predict."""

import json

import pandas as pd
import pytest

from conftest import run_step
from segrefine.models import CARD_KEYS

PARAMS = {"n_epochs": 4, "steps_per_epoch": 5, "patch_size": 128, "batch_size": 2, "n_rays": 16, "learning_rate": 1e-3}


def _finetune(trainset, out, seed=0):
    run_step(
        "tensorflow",
        "pretrained-card",
        "--framework",
        "stardist",
        "--name",
        "sd",
        "--source",
        "none",
        "--params",
        json.dumps(PARAMS),
        "--out-dir",
        out / "pretrained",
    )
    run_step(
        "tensorflow",
        "finetune",
        "--pretrained-card",
        out / "pretrained" / "card.json",
        "--trainset",
        trainset,
        "--name",
        "sd",
        "--params",
        json.dumps(PARAMS),
        "--seed",
        seed,
        "--out-dir",
        out / "finetuned",
    )
    return json.loads((out / "finetuned" / "card.json").read_text())


@pytest.fixture(scope="module")
def trained(real_trainset, tmp_path_factory):
    out = tmp_path_factory.mktemp("stardist")
    return out, _finetune(real_trainset, out)


@pytest.mark.slow
def test_finetuned_card_losses_and_thresholds(trained, real_trainset):
    out, card = trained
    assert set(CARD_KEYS) <= set(card) and card["framework"] == "stardist" and card["stage"] == "finetuned"
    assert card["trainset_version"] == json.loads(real_trainset.with_suffix(".json").read_text())["version"]
    losses = json.loads((out / "finetuned" / "losses.json").read_text())
    assert len(losses["train_loss"]) == 4 and len(losses["val_loss"]) == 4  # validation loss after every epoch
    assert losses["train_loss"][-1] < losses["train_loss"][0]
    thr = json.loads((out / "finetuned" / "thresholds.json").read_text())
    assert card["thresholds"] == {"prob_thresh": thr["prob"], "nms_thresh": thr["nms"]}  # optimized on validation
    assert {"config.json", "weights_best.h5", "loss.png"} <= {p.name for p in (out / "finetuned").iterdir()}


@pytest.mark.slow
def test_same_seed_same_model_and_reload_predicts_identically(trained, real_trainset, tmp_path):
    out, card = trained
    again = _finetune(real_trainset, tmp_path / "again")
    evals = []
    for k, c in enumerate(
        [
            out / "finetuned" / "card.json",
            out / "finetuned" / "card.json",
            tmp_path / "again" / "finetuned" / "card.json",
        ]
    ):
        run_step(
            "tensorflow",
            "evaluate",
            "--card",
            c,
            "--trainset",
            real_trainset,
            "--split",
            "test",
            "--out",
            tmp_path / f"e{k}.csv",
        )
        evals.append(pd.read_csv(tmp_path / f"e{k}.csv").drop(columns=["trainset_version"]))
    pd.testing.assert_frame_equal(evals[0], evals[1])
    pd.testing.assert_frame_equal(evals[0], evals[2])
    assert again["thresholds"] == card["thresholds"]


@pytest.mark.integration
def test_patches_smaller_than_the_training_size_are_refused_before_training(real_trainset, tmp_path):
    run_step(
        "tensorflow",
        "pretrained-card",
        "--framework",
        "stardist",
        "--name",
        "sd",
        "--source",
        "none",
        "--params",
        json.dumps(dict(PARAMS, patch_size=512)),
        "--out-dir",
        tmp_path / "pre",
    )
    proc = run_step(
        "tensorflow",
        "finetune",
        "--pretrained-card",
        tmp_path / "pre" / "card.json",
        "--trainset",
        real_trainset,
        "--name",
        "sd",
        "--params",
        json.dumps(dict(PARAMS, patch_size=512)),
        "--out-dir",
        tmp_path / "ft",
        check=False,
    )
    assert proc.returncode == 1
    assert "smaller than this StarDist model's training patch size 512" in proc.stderr
    assert not (tmp_path / "ft").exists()
