"""The U-Net (CellBin's BCDU-Net D3) adapter, through the step commands in the tensorflow env, on real
CellBinDB Stereo-seq crops: weights in CellBin's Keras-2 .hdf5 layout, fine-tune, save, load, predict,
and the inputs it must refuse before training."""

import json
import os
import subprocess
import textwrap

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import SCRIPTS, run_step
from segrefine import SegRefineError
from segrefine.envs import env_python
from segrefine.models import CARD_KEYS

# a small network input (the architecture is unchanged; CellBin's is 256) keeps the CPU tests fast
PARAMS = {
    "n_epochs": 3,
    "steps_per_epoch": 2,
    "batch_size": 2,
    "patch_size": 64,
    "learning_rate": 1e-3,
    "tile_overlap": 16,
    "max_val_tiles": 6,
}

# CellBin's BCDU-Net D3 as tf.keras 2 named its layers (its published .hdf5 files hold these groups)
CELLBIN_WEIGHTED_LAYERS = [f"conv2d_{k}" if k else "conv2d" for k in range(20)] + [
    "conv2d_transpose",
    "conv2d_transpose_1",
    "conv2d_transpose_2",
    "batch_normalization",
    "batch_normalization_1",
    "batch_normalization_2",
    "conv_lst_m2d",
    "conv_lst_m2d_1",
    "conv_lst_m2d_2",
]


def tf_python(code: str, *args, check=True):
    """Run a short script in the tensorflow env (library calls that have no step command)."""
    proc = subprocess.run(
        [str(env_python("tensorflow")), "-c", textwrap.dedent(code), *map(str, args)],
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS), TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
    )
    if check and proc.returncode:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


SAVE_INITIAL = """
import sys
from segrefine.models.unet_adapter import UNetAdapter
UNetAdapter.from_pretrained(None, dict(patch_size=int(sys.argv[2]), stain=sys.argv[3], seed=0)).save(sys.argv[1])
"""


def _finetune(trainset, init_weights, out, seed=0, params=PARAMS):
    run_step(
        "tensorflow",
        "pretrained-card",
        "--framework",
        "unet",
        "--weights",
        init_weights,
        "--name",
        "u",
        "--source",
        "cellbin-layout-init",
        "--params",
        json.dumps(params),
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
        "u",
        "--params",
        json.dumps(params),
        "--seed",
        seed,
        "--out-dir",
        out / "finetuned",
    )
    return json.loads((out / "finetuned" / "card.json").read_text())


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """Seeded initial weights written in CellBin's Keras-2 .hdf5 layout (as the official files come)."""
    d = tmp_path_factory.mktemp("unet_init")
    tf_python(SAVE_INITIAL, d, PARAMS["patch_size"], "fluorescence")
    return d / "weights.hdf5"


@pytest.fixture(scope="module")
def trained(real_trainset, init_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("unet")
    return out, _finetune(real_trainset, init_weights, out)


@pytest.mark.slow
def test_finetuned_card_losses_and_changed_weights(trained, real_trainset):
    out, card = trained
    assert set(CARD_KEYS) <= set(card) and card["framework"] == "unet" and card["stage"] == "finetuned"
    assert card["device"] == "cpu" and card["source"]["pretrained"] == "cellbin-layout-init"
    assert card["trainset_version"] == json.loads(real_trainset.with_suffix(".json").read_text())["version"]
    assert card["weights_sha256"] != card["source"]["weights_sha256"], "fine-tuning changed the weights"
    assert card["preprocessing"]["stain"] == "fluorescence" and card["preprocessing"]["input_channels"] == 1
    assert card["thresholds"] == {"prob_thresh": 0.5, "min_distance": 3, "min_size": 15}
    hyper = card["hyperparameters"]
    assert hyper["architecture"] == "BCDU-Net D3 (CellBin)" and hyper["optimizer"] == "Adam"
    assert hyper["loss"] == "binary_crossentropy" and hyper["patience"] == 30 and hyper["patch_size"] == 64
    losses = json.loads((out / "finetuned" / "losses.json").read_text())
    assert len(losses["train_loss"]) == 3 and len(losses["val_loss"]) == 3  # validation loss after every epoch
    assert losses["train_loss"][-1] < losses["train_loss"][0]
    assert card["metrics"]["epochs"] == 3 and card["metrics"]["train_seconds"] > 0
    assert {"weights.hdf5", "loss.png", "losses.json"} <= {p.name for p in (out / "finetuned").iterdir()}


@pytest.mark.slow
def test_same_seed_same_weights_and_reload_predicts_identically(trained, real_trainset, init_weights, tmp_path):
    out, card = trained
    again = _finetune(real_trainset, init_weights, tmp_path / "again")
    assert again["weights_sha256"] == card["weights_sha256"], "same inputs and seed -> same weights"
    # inference and evaluation load the model through its card alone
    run_step(
        "tensorflow",
        "evaluate",
        "--card",
        out / "finetuned" / "card.json",
        "--trainset",
        real_trainset,
        "--split",
        "test",
        "--out",
        tmp_path / "eval.csv",
    )
    evals = pd.read_csv(tmp_path / "eval.csv")
    assert set(evals["framework"]) == {"unet"} and set(evals["stage"]) == {"finetuned"}
    assert evals["n_true"].min() > 0 and evals["f1"].between(0, 1).all()
    # save -> load in a fresh model: identical probabilities and labels on a real image of another size
    tf_python(
        """
        import sys, numpy as np, tifffile
        from pathlib import Path
        from segrefine.models import load_model, write_card
        from segrefine.io import sha256_file
        a, card = load_model(sys.argv[1])
        img = tifffile.imread(sys.argv[2])[:200, :173]
        a.save(sys.argv[3])
        write_card(sys.argv[3], dict(card, weights="weights.hdf5",
                                     weights_sha256=sha256_file(Path(sys.argv[3]) / "weights.hdf5")))
        b, _ = load_model(Path(sys.argv[3]) / "card.json")
        pa, pb = a.probability(img), b.probability(img)
        assert pa.shape == (200, 173) and np.array_equal(pa, pb)
        la, lb = a.predict(img), b.predict(img)
        assert la.dtype == np.uint32 and la.shape == (200, 173) and np.array_equal(la, lb)
        b.set_thresholds(prob_thresh=1.01)  # the evaluation's threshold sweep moves the foreground threshold
        assert b.predict(img).max() == 0
    """,
        out / "finetuned" / "card.json",
        real_trainset.parent / "REAL1-x0_y0_w256_h256-img.tif",
        tmp_path / "resaved",
    )


@pytest.mark.integration
def test_cellbin_layer_names_and_keras2_hdf5_round_trip(tmp_path):
    """Weights written in the tf.keras 2 layouts (a weights file, and a whole saved model with its weights under
    model_weights, layers in another order) load by layer name into a fresh network and predict identically;
    Keras 3's own load_weights reads the same file; an H&E (3-channel) file makes an H&E model."""
    proc = tf_python(
        """
        import json, sys, h5py, numpy as np
        from segrefine.models.unet_adapter import (UNetAdapter, build_bcdu_net_d3, load_keras2_weights,
                                                   write_keras2_weights)
        out = sys.argv[1]
        a = build_bcdu_net_d3(64, 1)
        write_keras2_weights(a, out + "/w.hdf5")
        # the layout of tf.keras 2 `model.save('x.hdf5')`: weights under model_weights, here in reverse layer order
        with h5py.File(out + "/w.hdf5", "r") as src, h5py.File(out + "/model.hdf5", "w") as dst:
            dst.attrs["model_config"] = b"{}"
            g = dst.create_group("model_weights")
            g.attrs["layer_names"] = src.attrs["layer_names"][::-1]
            for n in src.attrs["layer_names"][::-1]:
                src.copy(src[n.decode()], g, name=n.decode())
        x = np.random.default_rng(1).random((2, 64, 64, 1)).astype("float32")
        ref = np.asarray(a(x))
        for f in ("w.hdf5", "model.hdf5"):
            b = build_bcdu_net_d3(64, 1)  # fresh random weights
            assert not np.array_equal(np.asarray(b(x)), ref)
            load_keras2_weights(b, out + "/" + f)
            assert all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights())), f
            assert np.array_equal(np.asarray(b(x)), ref), f
        c = build_bcdu_net_d3(64, 1)
        c.load_weights(out + "/w.hdf5")  # Keras 3's legacy reader (by position) agrees on this file
        assert np.array_equal(np.asarray(c(x)), ref)
        with h5py.File(out + "/w.hdf5", "r") as fh:
            names = [n.decode() for n in fh.attrs["layer_names"]]
            weighted = [n for n in names if len(fh[n].attrs["weight_names"])]
            shapes = {n: [fh[n][w].shape for w in fh[n].attrs["weight_names"]] for n in weighted}
        he = build_bcdu_net_d3(64, 3)
        write_keras2_weights(he, out + "/he.hdf5")
        m = UNetAdapter.from_pretrained(out + "/he.hdf5", {"patch_size": 64})
        print(json.dumps({"weighted": weighted, "names": names, "n_params": a.count_params(),
                          "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
                          "he_stain": m.params["stain"],
                          "he_first": list(m.model.get_layer("conv2d").weights[0].shape)}))
    """,
        tmp_path,
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(got["weighted"]) == sorted(CELLBIN_WEIGHTED_LAYERS)
    assert got["names"][0] == "input_1" and got["names"][-1] == "conv2d_19"
    assert got["shapes"]["conv2d"] == [[3, 3, 1, 64], [64]]
    assert got["shapes"]["conv2d_10"] == [[3, 3, 1024, 512], [512]]  # the dense D3 concatenation
    assert got["shapes"]["conv_lst_m2d"] == [[3, 3, 256, 512], [3, 3, 128, 512], [512]]  # ConvLSTM, 128 filters
    assert got["shapes"]["conv_lst_m2d_2"] == [[3, 3, 64, 128], [3, 3, 32, 128], [128]]
    assert got["shapes"]["conv2d_19"] == [[1, 1, 2, 1], [1]]
    assert got["n_params"] == 20659717  # same count at any input size: all layers are convolutional
    assert got["he_stain"] == "he" and got["he_first"] == [3, 3, 3, 64]


@pytest.mark.integration
def test_weights_of_other_frameworks_are_refused(tmp_path):
    torch_like = tmp_path / "cyto3.pt"
    torch_like.write_bytes(b"PK\x03\x04" + bytes(200))  # a PyTorch checkpoint is a zip archive
    tf_python(
        """
        import sys
        from segrefine.models.stardist_adapter import StarDistAdapter
        StarDistAdapter.from_pretrained(None, dict(n_rays=8, patch_size=64)).save(sys.argv[1])
    """,
        tmp_path / "stardist",
    )
    for weights, message in [
        (torch_like, "cyto3.pt: not an HDF5 file"),
        (
            tmp_path / "stardist" / "weights_best.h5",
            "weights_best.h5: its layers are not those of CellBin's BCDU-Net D3",
        ),
    ]:
        proc = run_step(
            "tensorflow",
            "pretrained-card",
            "--framework",
            "unet",
            "--weights",
            weights,
            "--name",
            "u",
            "--source",
            str(weights),
            "--out-dir",
            tmp_path / "out",
            check=False,
        )
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "out" / "card.json").exists()


@pytest.mark.integration
def test_patch_sizes_the_network_cannot_take_are_refused(real_trainset, init_weights, tmp_path):
    proc = run_step(
        "tensorflow",
        "pretrained-card",
        "--framework",
        "unet",
        "--name",
        "u",
        "--source",
        "none",
        "--params",
        json.dumps(dict(PARAMS, patch_size=60)),
        "--out-dir",
        tmp_path / "p60",
        check=False,
    )
    assert proc.returncode == 1 and "multiple of 8" in proc.stderr and "patch_size 60" in proc.stderr
    big = dict(PARAMS, patch_size=512)
    run_step(
        "tensorflow",
        "pretrained-card",
        "--framework",
        "unet",
        "--name",
        "u",
        "--source",
        "none",
        "--params",
        json.dumps(big),
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
        "u",
        "--params",
        json.dumps(big),
        "--out-dir",
        tmp_path / "ft",
        check=False,
    )
    assert proc.returncode == 1 and "smaller than this U-Net's input patch_size 512" in proc.stderr
    assert not (tmp_path / "ft").exists()


@pytest.mark.integration
def test_semantic_masks_are_refused_before_training(real_trainset, init_weights, tmp_path):
    """A binary (semantic) mask is not an instance mask: refused by the fine-tuning step, nothing written."""
    d = tmp_path / "sem"
    d.mkdir()
    rows = pd.read_csv(real_trainset, sep="\t")
    images, masks = [], []
    for r in rows.itertuples():
        img, mask = d / os.path.basename(r.image), d / os.path.basename(r.mask)
        tifffile.imwrite(img, tifffile.imread(r.image))
        tifffile.imwrite(mask, (tifffile.imread(r.mask) > 0).astype(np.uint8) * 255)
        images.append(img)
        masks.append(mask)
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
        "0.25",
        "--test-fraction",
        "0.25",
    )
    run_step(
        "tensorflow",
        "pretrained-card",
        "--framework",
        "unet",
        "--weights",
        init_weights,
        "--name",
        "u",
        "--source",
        "init",
        "--params",
        json.dumps(PARAMS),
        "--out-dir",
        tmp_path / "pre",
    )
    proc = run_step(
        "tensorflow",
        "finetune",
        "--pretrained-card",
        tmp_path / "pre" / "card.json",
        "--trainset",
        d / "trainset.tsv",
        "--name",
        "u",
        "--params",
        json.dumps(PARAMS),
        "--out-dir",
        tmp_path / "ft",
        check=False,
    )
    assert proc.returncode == 1 and "mask is binary/semantic" in proc.stderr and "not an instance mask" in proc.stderr
    assert not (tmp_path / "ft").exists()


def test_pair_checks_name_the_problem():
    """The checks the adapter runs before training (plain numpy, no TensorFlow needed)."""
    from segrefine.models.unet_adapter import check_pairs, foreground_target, tile_starts

    img = np.zeros((64, 64), np.uint16)
    with pytest.raises(SegRefineError, match="hold no cells"):
        check_pairs([(img, np.zeros((64, 64), np.uint16))], 64)
    with pytest.raises(SegRefineError, match="not an instance mask"):
        check_pairs([(img, np.zeros((64, 64), np.float32))], 64)
    with pytest.raises(SegRefineError, match="differ in size"):
        check_pairs([(img, np.ones((32, 64), np.uint16))], 32)
    # two touching cells: their contact pixels become background in the training target
    two = np.zeros((8, 8), np.int32)
    two[2:6, 1:4], two[2:6, 4:7] = 1, 2
    target = foreground_target(two, separate_touching=True)
    assert target[2:6, 3].sum() == 0 and target[2:6, 4].sum() == 0 and target[3, 1] == 1
    assert foreground_target(two, separate_touching=False).sum() == (two > 0).sum()
    assert tile_starts(256, 64, 16) == [0, 48, 96, 144, 192]
    assert tile_starts(50, 64, 16) == [0]
