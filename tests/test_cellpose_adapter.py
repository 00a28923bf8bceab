"""The Cellpose adapter, through the step commands in the cellpose env, on real
CellBinDB Stereo-seq crops (shared/realdata): train, save, load, predict."""
import json

import pandas as pd
import pytest

from conftest import run_step
from segrefine.models import CARD_KEYS


@pytest.fixture(scope="module")
def base_card(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    run_step("cellpose", "train-base", "--framework", "cellpose", "--name", "tiny",
             "--params", json.dumps({"n_epochs": 2, "diam_mean": 17.0, "bsize": 96}),
             "--n-images", 2, "--size", 128, "--seed", 0, "--out-dir", d / "base")
    return d / "base" / "card.json"


def _finetune(base_card, trainset, out, seed=0, **params):
    pre = out / "pretrained"
    run_step("cellpose", "pretrained-card", "--framework", "cellpose", "--weights", base_card, "--name", "m",
             "--source", "base:tiny", "--out-dir", pre)
    run_step("cellpose", "finetune", "--pretrained-card", pre / "card.json", "--trainset", trainset, "--name", "m",
             "--params", json.dumps({"n_epochs": 4, "bsize": 128, **params}), "--seed", seed,
             "--out-dir", out / "finetuned")
    return json.loads((out / "finetuned" / "card.json").read_text())


def test_base_model_card_is_complete(base_card):
    card = json.loads(base_card.read_text())
    assert set(CARD_KEYS) <= set(card)
    assert card["stage"] == "base" and card["device"] == "cpu"
    assert (base_card.parent / card["weights"]).is_file()
    assert len(json.loads((base_card.parent / "losses.json").read_text())["train_loss"]) == 2


def test_finetune_on_real_crops_is_deterministic_and_learns(base_card, real_trainset, tmp_path):
    a = _finetune(base_card, real_trainset, tmp_path / "a")
    b = _finetune(base_card, real_trainset, tmp_path / "b")
    base = json.loads(base_card.read_text())
    assert a["stage"] == "finetuned" and set(CARD_KEYS) <= set(a)
    assert a["trainset_version"] == json.loads(real_trainset.with_suffix(".json").read_text())["version"]
    assert a["source"]["weights_sha256"] == base["weights_sha256"]
    assert a["weights_sha256"] != base["weights_sha256"], "fine-tuning changed the weights"
    assert a["weights_sha256"] == b["weights_sha256"], "same inputs and seed -> same weights"
    losses = json.loads((tmp_path / "a" / "finetuned" / "losses.json").read_text())["train_loss"]
    assert losses[-1] < losses[0]
    assert (tmp_path / "a" / "finetuned" / "loss.png").stat().st_size > 1000
    # a copy named by the training-set version is kept beside it
    kept = json.loads((tmp_path / "a" / "versions" / a["trainset_version"] / "card.json").read_text())
    assert kept["weights_sha256"] == a["weights_sha256"]


def test_augmentation_switch_reaches_training(base_card, real_trainset, tmp_path):
    with_rotation = _finetune(base_card, real_trainset, tmp_path / "rot")
    without = _finetune(base_card, real_trainset, tmp_path / "norot", augment_rotate=False)
    assert without["hyperparameters"]["augment_rotate"] is False
    assert without["weights_sha256"] != with_rotation["weights_sha256"]


def test_saved_model_predicts_identically_after_reload(base_card, real_trainset, tmp_path):
    _finetune(base_card, real_trainset, tmp_path)
    card = tmp_path / "finetuned" / "card.json"
    for k in (1, 2):
        run_step("cellpose", "evaluate", "--card", card, "--trainset", real_trainset, "--split", "test",
                 "--out", tmp_path / f"eval{k}.csv")
    e1, e2 = pd.read_csv(tmp_path / "eval1.csv"), pd.read_csv(tmp_path / "eval2.csv")
    pd.testing.assert_frame_equal(e1, e2)
    assert set(e1["stage"]) == {"finetuned"} and e1["n_true"].min() > 0


def test_weights_of_the_wrong_kind_are_refused_before_training(tmp_path):
    bogus = tmp_path / "model.hdf5"
    bogus.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    proc = run_step("cellpose", "pretrained-card", "--framework", "cellpose", "--weights", bogus, "--name", "m",
                    "--source", str(bogus), "--out-dir", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert "model.hdf5: not a Cellpose 3 weights file" in proc.stderr
    assert not (tmp_path / "out" / "card.json").exists()
