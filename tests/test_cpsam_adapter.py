"""The Cellpose-SAM (cpsam, cellpose 4) adapter, through the step commands in the cpsam env,
on one small real CellBinDB ssDNA crop (shared/realdata).

cpsam is a 305 M parameter ViT-L: one training step takes ~40 s and 7-11 GB on a CPU,
so the fine-tune here is one image and two epochs (cellpose 4's train_seg warms the
learning rate up from 0, so epoch 0 leaves the weights unchanged; epoch 1 is the step
that moves them). Only one cpsam process runs at a time.
"""

import json
import math

import pytest
import tifffile

from conftest import env_json, run_step
from segrefine import SegRefineError
from segrefine.models import CARD_KEYS
from segrefine.models.cpsam_adapter import CpsamAdapter
from segrefine.pretrained import official_path

CROP = 128  # pixels; smaller than cpsam's 256 tile, which cellpose pads to


@pytest.fixture(scope="module")
def small_trainset(tmp_path_factory, realdata):
    """Two 128 x 128 real crops (ssDNA, DAPI): one in the train split, one in the test split."""
    d = tmp_path_factory.mktemp("cpsam-real")
    images, masks = [], []
    for k, stain in enumerate(["ssDNA", "DAPI"]):
        name = f"CPSAM{k}-x0_y0_w{CROP}_h{CROP}"
        img = tifffile.imread(realdata / "cellbindb-demo" / f"{stain}_img.tif")[:CROP, :CROP]
        mask = tifffile.imread(realdata / "cellbindb-demo" / f"{stain}_mask.tif")[:CROP, :CROP]
        tifffile.imwrite(d / f"{name}-img.tif", img)
        tifffile.imwrite(d / f"{name}-mask.tif", mask)  # binary; converted to instances in place
        run_step("core", "convert-annotation", "--annotation", d / f"{name}-mask.tif", "--out", d / f"{name}-mask.tif")
        images.append(d / f"{name}-img.tif")
        masks.append(d / f"{name}-mask.tif")
    run_step(
        "core",
        "trainset",
        "--images",
        *images,
        "--masks",
        *masks,
        "--out",
        d / "trainset.tsv",
        "--val-fraction",
        "0",
        "--test-fraction",
        "0.5",
    )
    return d / "trainset.tsv"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, small_trainset):
    """From scratch (seeded; no model hub here) -> fine-tuned on the one training crop."""
    d = tmp_path_factory.mktemp("cpsam")
    run_step(
        "cpsam",
        "pretrained-card",
        "--framework",
        "cpsam",
        "--name",
        "sam",
        "--source",
        "none",
        "--params",
        json.dumps({"seed": 0}),
        "--out-dir",
        d / "pretrained",
    )
    run_step(
        "cpsam",
        "finetune",
        "--pretrained-card",
        d / "pretrained" / "card.json",
        "--trainset",
        small_trainset,
        "--name",
        "sam",
        "--params",
        json.dumps({"n_epochs": 2}),
        "--seed",
        0,
        "--out-dir",
        d / "finetuned",
    )
    return d


@pytest.mark.slow
def test_same_inputs_and_seed_give_the_same_weights(finetuned, small_trainset):
    run_step(
        "cpsam",
        "finetune",
        "--pretrained-card",
        finetuned / "pretrained" / "card.json",
        "--trainset",
        small_trainset,
        "--name",
        "sam",
        "--params",
        json.dumps({"n_epochs": 2}),
        "--seed",
        0,
        "--out-dir",
        finetuned / "again",
    )
    a = json.loads((finetuned / "finetuned" / "card.json").read_text())
    b = json.loads((finetuned / "again" / "card.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"], "same inputs and seed -> same weights"
    assert json.loads((finetuned / "finetuned" / "losses.json").read_text()) == json.loads(
        (finetuned / "again" / "losses.json").read_text()
    )


@pytest.mark.slow
def test_card_is_complete_and_loss_recorded(finetuned, small_trainset):
    card = json.loads((finetuned / "finetuned" / "card.json").read_text())
    assert set(CARD_KEYS) <= set(card)
    assert card["framework"] == "cpsam" and card["stage"] == "finetuned" and card["device"] == "cpu"
    assert card["trainset_version"] == json.loads(small_trainset.with_suffix(".json").read_text())["version"]
    assert card["hyperparameters"]["learning_rate"] == 1e-5 and card["hyperparameters"]["batch_size"] == 1
    assert card["hyperparameters"]["n_epochs"] == 2
    assert card["preprocessing"]["tile_px"] == 256 and card["preprocessing"]["dtype"] == "float32"
    assert set(card["thresholds"]) == {"flow_threshold", "cellprob_threshold", "min_size"}
    assert card["metrics"]["epochs"] == 2 and card["metrics"]["train_seconds"] > 0
    assert (finetuned / "finetuned" / card["weights"]).is_file()
    losses = json.loads((finetuned / "finetuned" / "losses.json").read_text())["train_loss"]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert (finetuned / "finetuned" / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_weights_change_and_reload_predicts_identically(finetuned, small_trainset):
    """The trainable weights moved from the seeded initial ones; the saved model, loaded
    twice through its card alone, gives identical predictions (and network outputs)."""
    out = env_json(
        "cpsam",
        f"""
import json, numpy as np, torch
from segrefine.io import read_tiff
from segrefine.models import load_model
from segrefine.models.cpsam_adapter import CpsamAdapter, _as_chw
from segrefine.trainset import read_trainset
init = {{k: v.clone() for k, v in CpsamAdapter.from_pretrained(None, {{"seed": 0}}).model.net.state_dict().items()}}
tuned = torch.load({str(finetuned / "finetuned" / "weights.cpsam")!r}, map_location="cpu", weights_only=True)
trainable = [k for k in tuned if k not in ("W2", "diam_mean", "diam_labels")]
moved = [k for k in trainable if not torch.equal(init[k], tuned[k])]
max_change = max(float((init[k] - tuned[k]).abs().max()) for k in trainable)
del init, tuned
img = read_tiff([r for r in read_trainset({str(small_trainset)!r}) if r["split"] == "test"][0]["image"])
preds, flows = [], []
for _ in range(2):
    model, card = load_model({str(finetuned / "finetuned" / "card.json")!r})
    preds.append(model.predict(img))
    flows.append(model.model.eval(_as_chw(img), channel_axis=0, compute_masks=False)[1][2])
    del model
print(json.dumps({{"n_trainable": len(trainable), "n_moved": len(moved), "max_change": max_change,
                  "same_pred": bool(np.array_equal(preds[0], preds[1])), "dtype": str(preds[0].dtype),
                  "shape": list(preds[0].shape), "same_cellprob": bool(np.array_equal(flows[0], flows[1])),
                  "cellprob_std": float(np.std(flows[0]))}}))
""",
    )
    print("cpsam weights/reload check:", out)
    assert out["n_trainable"] > 100
    assert out["n_moved"] > 0.9 * out["n_trainable"], out
    # one AdamW step at the warm-up learning rate (1e-5 / 9) moves a weight by about 1e-6; a change
    # as large as the init's spread would mean the seeded from-scratch init is not reproducible
    assert out["max_change"] < 1e-4, out
    assert out["same_pred"] and out["same_cellprob"], out
    assert out["dtype"] == "uint32" and out["shape"] == [CROP, CROP]
    assert out["cellprob_std"] > 0, "the network output is not constant"


def test_unknown_pretrained_name_is_refused(tmp_path):
    assert official_path("cpsam", "cpsam", tmp_path) == tmp_path / "cpsam" / "cpsam"
    with pytest.raises(SegRefineError, match=r"unknown pretrained cpsam model 'cyto3'.*\['cpsam'\]"):
        official_path("cpsam", "cyto3", tmp_path)
    proc = run_step(
        "cpsam",
        "fetch-pretrained",
        "--framework",
        "cpsam",
        "--name",
        "cpsam_v9",
        "--out",
        tmp_path / "cpsam" / "cpsam_v9",
        check=False,
    )
    assert proc.returncode == 1 and "unknown pretrained cpsam model 'cpsam_v9'" in proc.stderr


@pytest.mark.slow
def test_weights_of_another_framework_are_refused_before_training(tmp_path):
    # a real Cellpose 3 model (what the cellpose env trains), and a Keras HDF5 file
    run_step(
        "cellpose",
        "train-base",
        "--framework",
        "cellpose",
        "--name",
        "cp3",
        "--params",
        json.dumps({"n_epochs": 1, "bsize": 64}),
        "--n-images",
        1,
        "--size",
        64,
        "--out-dir",
        tmp_path / "cp3",
    )
    cp3 = tmp_path / "cp3" / json.loads((tmp_path / "cp3" / "card.json").read_text())["weights"]
    keras = tmp_path / "model.hdf5"
    keras.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    for weights, why in ((cp3, "a Cellpose 3 (cyto/nuclei) model"), (keras, "torch cannot read it")):
        out = tmp_path / f"out-{weights.stem}"
        proc = run_step(
            "cpsam",
            "pretrained-card",
            "--framework",
            "cpsam",
            "--weights",
            weights,
            "--name",
            "m",
            "--source",
            str(weights),
            "--out-dir",
            out,
            check=False,
        )
        assert proc.returncode == 1, proc.stderr
        assert f"{weights}: not a Cellpose-SAM (cellpose 4) weights file" in proc.stderr
        assert why in proc.stderr
        assert not (out / "card.json").exists()
    # and a cpsam card cannot be the pretrained model of the cellpose (3) framework either way round
    proc = run_step(
        "cpsam",
        "pretrained-card",
        "--framework",
        "cpsam",
        "--weights",
        tmp_path / "cp3" / "card.json",
        "--name",
        "m",
        "--source",
        "x",
        "--out-dir",
        tmp_path / "o3",
        check=False,
    )
    assert proc.returncode == 1 and "a cellpose model cannot be the pretrained cpsam model" in proc.stderr


def test_settings_cellpose4_cannot_honour_are_refused():
    """Checked before torch is even imported (so this runs in the core env)."""
    for params, msg in (
        ({"augment_rotate": False}, "cannot be turned off"),
        ({"bsize": 224}, "bsize must be 256"),
        ({"n_epochs": 0}, "must be >= 1"),
    ):
        with pytest.raises(SegRefineError, match=msg):
            CpsamAdapter.from_pretrained(None, params)


def test_inference_thresholds_can_be_set_for_a_sweep():
    adapter = CpsamAdapter(model=None, params={})
    adapter.set_thresholds(flow_threshold=0.8, cellprob_threshold=-1)
    assert adapter.params["flow_threshold"] == 0.8 and adapter.params["cellprob_threshold"] == -1.0
    with pytest.raises(SegRefineError, match=r"cpsam has no inference thresholds \['prob_thresh'\]"):
        adapter.set_thresholds(prob_thresh=0.5)
