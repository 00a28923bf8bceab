"""The Cellpose adapter, through the step commands in the cellpose env, on real
CellBinDB Stereo-seq crops (shared/realdata): train, save, load, predict; and
its slide-anchored inference (predict_window), in a cellpose-env subprocess."""

import json
import textwrap

import pandas as pd
import pytest

from conftest import env_json, run_step
from segrefine.models import CARD_KEYS


@pytest.fixture(scope="module")
def base_card(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    run_step(
        "cellpose",
        "train-base",
        "--framework",
        "cellpose",
        "--name",
        "tiny",
        "--params",
        json.dumps({"n_epochs": 2, "diam_mean": 17.0, "bsize": 96}),
        "--n-images",
        2,
        "--size",
        128,
        "--seed",
        0,
        "--out-dir",
        d / "base",
    )
    return d / "base" / "card.json"


def _finetune(base_card, trainset, out, seed=0, **params):
    pre = out / "pretrained"
    run_step(
        "cellpose",
        "pretrained-card",
        "--framework",
        "cellpose",
        "--weights",
        base_card,
        "--name",
        "m",
        "--source",
        "base:tiny",
        "--out-dir",
        pre,
    )
    run_step(
        "cellpose",
        "finetune",
        "--pretrained-card",
        pre / "card.json",
        "--trainset",
        trainset,
        "--name",
        "m",
        "--params",
        json.dumps({"n_epochs": 4, "bsize": 128, **params}),
        "--seed",
        seed,
        "--out-dir",
        out / "finetuned",
    )
    return json.loads((out / "finetuned" / "card.json").read_text())


@pytest.mark.slow
def test_base_model_card_is_complete(base_card):
    card = json.loads(base_card.read_text())
    assert set(CARD_KEYS) <= set(card)
    assert card["stage"] == "base" and card["device"] == "cpu"
    assert (base_card.parent / card["weights"]).is_file()
    assert len(json.loads((base_card.parent / "losses.json").read_text())["train_loss"]) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_augmentation_switch_reaches_training(base_card, real_trainset, tmp_path):
    with_rotation = _finetune(base_card, real_trainset, tmp_path / "rot")
    without = _finetune(base_card, real_trainset, tmp_path / "norot", augment_rotate=False)
    assert without["hyperparameters"]["augment_rotate"] is False
    assert without["weights_sha256"] != with_rotation["weights_sha256"]


@pytest.mark.slow
def test_saved_model_predicts_identically_after_reload(base_card, real_trainset, tmp_path):
    _finetune(base_card, real_trainset, tmp_path)
    card = tmp_path / "finetuned" / "card.json"
    for k in (1, 2):
        run_step(
            "cellpose",
            "evaluate",
            "--card",
            card,
            "--trainset",
            real_trainset,
            "--split",
            "test",
            "--out",
            tmp_path / f"eval{k}.csv",
        )
    e1, e2 = pd.read_csv(tmp_path / "eval1.csv"), pd.read_csv(tmp_path / "eval2.csv")
    pd.testing.assert_frame_equal(e1, e2)
    assert set(e1["stage"]) == {"finetuned"} and e1["n_true"].min() > 0


@pytest.mark.integration
def test_weights_of_the_wrong_kind_are_refused_before_training(tmp_path):
    bogus = tmp_path / "model.hdf5"
    bogus.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    proc = run_step(
        "cellpose",
        "pretrained-card",
        "--framework",
        "cellpose",
        "--weights",
        bogus,
        "--name",
        "m",
        "--source",
        str(bogus),
        "--out-dir",
        tmp_path / "out",
        check=False,
    )
    assert proc.returncode == 1
    assert "model.hdf5: not a Cellpose 3 weights file" in proc.stderr
    assert not (tmp_path / "out" / "card.json").exists()


# --- predict_window: a window with enough margin predicts what the whole image predicts -------------------------------
# Runs in the cellpose env. Small blocks (BLOCK 64, STRIDE 48 instead of 224 / 176) keep it fast on a CPU; the
# exactness argument does not depend on the block size. Two networks: cellpose's own CPnet, randomly initialised
# (seeded; its outputs, style vector included, must agree to the bit in the window's interior), and "Blobs", a fixed
# stand-in with CPnet's interface whose flows point up the blurred intensity and whose cell probability also depends
# on the block's mean (a global, style-like term), so that cellpose's dynamics find real cells whose labels can be
# compared.
BLOBS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    from segrefine.demo import make_slide
    from segrefine.intensity import intensity_reference
    from segrefine.models.cellpose_adapter import CellposeAdapter

    class Blobs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.device, self.mkldnn, self.nout = torch.device("cpu"), False, 3
            t = torch.arange(-3, 4, dtype=torch.float32)
            g = torch.exp(-t ** 2 / 8)
            self.register_buffer("k", (g[:, None] * g[None, :] / g.sum() ** 2)[None, None])

        def forward(self, x):
            b = torch.nn.functional.conv2d(x[:, :1], self.k, padding=3)
            gy = torch.nn.functional.pad(b[:, :, 2:] - b[:, :, :-2], (0, 0, 1, 1))
            gx = torch.nn.functional.pad(b[:, :, :, 2:] - b[:, :, :, :-2], (1, 1, 0, 0))
            n = (gy ** 2 + gx ** 2).sqrt() + 1e-3
            style = x[:, :1].mean(dim=(2, 3), keepdim=True)
            y = torch.cat([5 * gy / n, 5 * gx / n, 10 * (b - 0.35 - 0.2 * style)], 1)
            return y, style.flatten(1).expand(-1, 256)
""")
WINDOW_SCRIPT = BLOBS + textwrap.dedent("""
    img = make_slide(256, seed=3)[0]
    out = {}
    for name, diameter in (("up", 13.0), ("down", 24.0)):
        m = CellposeAdapter.from_pretrained(None, {"diam_mean": 17.0, "diameter": diameter, "seed": 0,
                                                    "flow_threshold": 0.0, "min_size": 8})
        m.BLOCK, m.STRIDE = 64, 48
        m.set_intensity_reference(intensity_reference(img))
        c = m.context_px()
        x0, y1 = 60, 200  # the window: x in [60, 256) (right edge = the slide's), y in [0, 200) (top = the slide's)
        win = img[:y1, x0:]
        res = {"context": c}
        whole = m.network_outputs(img, (0, 0))
        part = m.network_outputs(win, (x0, 0))
        res["interior_max_diff"] = float(np.abs(part[:, :y1 - c, c:] - whole[:, :y1 - c, x0 + c:]).max())
        res["edge_max_diff"] = float(np.abs(part - whole[:, :y1, x0:]).max())
        if name == "up":
            m.model.net = Blobs()
            whole, part = m.predict(img), m.predict_window(win, (x0, 0))
            res["predict_is_window_at_origin"] = bool((whole == m.predict_window(img, (0, 0))).all())
            inside = np.zeros(whole.shape, bool)
            inside[:y1 - c, x0 + c:] = True
            same = differ = 0
            for lab in np.unique(whole[inside & (whole > 0)]):
                cell = whole == lab
                if not inside[cell].all():
                    continue
                w = part[cell[:y1, x0:]]
                ok = w[0] > 0 and (w == w[0]).all() and (part == w[0]).sum() == cell.sum()
                same, differ = same + ok, differ + (not ok)
            res.update(cells_whole=int(len(np.unique(whole)) - 1), interior_cells_same=int(same),
                       interior_cells_differ=int(differ))
        out[name] = res
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def window_results():
    return env_json("cellpose", WINDOW_SCRIPT)


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["up", "down"])
def test_window_network_outputs_equal_the_whole_image_in_the_interior(window_results, scale):
    r = window_results[scale]
    assert r["interior_max_diff"] < 1e-5, r  # the same blocks, the same style vectors: float noise at most
    assert r["edge_max_diff"] > 1e-3, r  # near the window's cut edges the outputs differ: the test can see it


@pytest.mark.slow
def test_window_labels_equal_the_whole_image_in_the_interior(window_results):
    r = window_results["up"]
    assert r["interior_cells_same"] >= 5 and r["interior_cells_differ"] == 0, r


@pytest.mark.slow
def test_predict_is_predict_window_at_the_origin(window_results):
    assert window_results["up"]["predict_is_window_at_origin"]


# --- needed pixels: the blocks no kept pixel depends on are skipped, the overlap of windows predicted once ------------
SKIP_SCRIPT = BLOBS + textwrap.dedent("""
    import collections, tempfile
    from pathlib import Path
    from segrefine.io import write_tiff
    from segrefine.intensity import tissue_at
    from segrefine.tiling import make_plan, plan_tissue, read_tile, run_shard, tile_file, write_plan

    def model(net=None):
        m = CellposeAdapter.from_pretrained(None, {"diam_mean": 17.0, "diameter": 13.0, "seed": 0,
                                                    "flow_threshold": 0.0, "min_size": 8})
        m.BLOCK, m.STRIDE = 64, 48
        if net is not None:
            m.model.net = net
        return m

    img = make_slide(256, seed=3)[0]
    out = {}
    m = model()
    m.set_intensity_reference(intensity_reference(img))
    whole = m.network_outputs(img)
    yy, xx = np.mgrid[:256, :256]
    needed = (yy - 128) ** 2 + (xx - 100) ** 2 < 50 ** 2
    before = m.network_counts()
    part = m.network_outputs(img, (0, 0), needed)
    after = m.network_counts()
    out["needed_max_diff"] = float(np.abs(part - whole)[:, needed].max())
    out["computed"], out["skipped"] = after["computed"] - before["computed"], after["skipped"] - before["skipped"]
    out["all_blocks"] = before["computed"]
    bg = part[2] == m.BACKGROUND_LOGIT
    out["background_px"] = int(bg.sum())
    out["background_flows_zero"] = bool((part[:2, bg] == 0).all())
    dist = np.sqrt((yy - 128) ** 2 + (xx - 100) ** 2) - 50  # from the needed disc
    out["background_min_dist"] = float(dist[bg].min()) if bg.any() else None

    # two overlapping windows, their needed pixels at the model's context from their cut edges: with the cache the
    # overlap's blocks run once, and every needed pixel gets the whole image's outputs
    c = m.context_px()
    wins = [(0, 180), (76, 256)]
    need = []
    for x0, x1 in wins:
        n = np.zeros((256, x1 - x0), bool)
        n[:, (c if x0 > 0 else 0) : (x1 - x0) - (c if x1 < 256 else 0)] = True
        need.append(n)
    for cached in (False, True):
        m.cache_blocks(collections.Counter(k for (x0, _), n in zip(wins, need) for k in m.network_blocks(n, (x0, 0)))
                       if cached else None)
        c0 = m.network_counts()
        diffs = [float(np.abs(m.network_outputs(img[:, x0:x1], (x0, 0), n) - whole[:, :, x0:x1])[:, n].max())
                 for (x0, x1), n in zip(wins, need)]
        c1 = m.network_counts()
        out["cache" if cached else "nocache"] = {"max_diff": max(diffs), "computed": c1["computed"] - c0["computed"],
                                                  "reused": c1["reused"] - c0["reused"]}
    out["cache_left"] = len(m._cache)

    # the shard: every cell the whole image predicts with its anchor in the tissue, and only those, in the tiles
    d = Path(tempfile.mkdtemp())
    big = make_slide(256, seed=3)[0]
    big = np.concatenate([big, np.full((256, 128), big.min(), big.dtype)], axis=1)  # right third blank
    write_tiff(d / "slide.tif", big, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    (d / "card.json").write_text("{}")
    plan, meta = make_plan(d / "slide.tif", 64, 24, shards=1, tissue_downsample=4, group=2)
    write_plan(plan, meta, d / "tiles.tsv", d / "tiles.json")
    tissue = plan_tissue(meta)
    runs = {}
    for skip in (True, False):
        mm = model(Blobs())
        mm.skips_unneeded = skip
        runs[skip] = run_shard(d / "tiles.tsv", 0, d / "card.json", d / "slide.tif", d / f"tiles{skip}",
                               d / f"s{skip}.json", model=mm)
    ref = model(Blobs())
    ref.set_intensity_reference(meta["intensity_reference"])
    labels = ref.predict(big)
    want, got = set(), set()
    for lab in range(1, int(labels.max()) + 1):
        ys, xs = np.nonzero(labels == lab)
        if len(ys) and tissue_at(tissue, [int(np.floor(xs.mean()))], [int(np.floor(ys.mean()))])[0]:
            want.add(tuple(np.ravel_multi_index((ys, xs), big.shape)))
    outside = int(labels.max()) - len(want)
    for t in plan[plan["in_tissue"]]:
        owned, tmeta, _ = read_tile(tile_file(d / "tilesTrue", t.tile_id))
        ox, oy = tmeta["origin"]
        for lab in range(1, int(owned.max()) + 1 if owned.size else 1):
            ys, xs = np.nonzero(owned == lab)
            got.add(tuple(np.ravel_multi_index((ys + oy, xs + ox), big.shape)))
    out["shard"] = {"cells_whole": int(labels.max()), "cells_in_tissue": len(want), "cells_outside": outside,
                    "tiled": len(got), "same": len(want & got),
                    "network": {str(k): v.get("network") for k, v in runs.items()},
                    "ratio": {str(k): v.get("model_input_per_tissue_px") for k, v in runs.items()},
                    "tissue_fraction": float(tissue[0].mean())}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def skip_results():
    return env_json("cellpose", SKIP_SCRIPT)


@pytest.mark.integration
def test_needed_pixels_get_the_whole_image_outputs_and_unneeded_blocks_are_skipped(skip_results):
    r = skip_results
    assert r["needed_max_diff"] < 1e-5, r
    assert r["skipped"] > 0 and r["computed"] + r["skipped"] == r["all_blocks"], r
    # a pixel no computed block covers is background (no flow), and it is not a needed pixel
    assert r["background_px"] > 0 and r["background_flows_zero"] and r["background_min_dist"] > 0, r


@pytest.mark.integration
def test_overlapping_windows_reuse_their_shared_blocks(skip_results):
    nocache, cache = skip_results["nocache"], skip_results["cache"]
    assert nocache["max_diff"] < 1e-5 and cache["max_diff"] < 1e-5, skip_results
    assert nocache["reused"] == 0 and cache["reused"] > 0
    assert cache["computed"] + cache["reused"] == nocache["computed"]  # each shared block once instead of twice
    assert skip_results["cache_left"] == 0  # nothing is kept after the last window that needs it


@pytest.mark.integration
def test_shard_with_skipped_blocks_keeps_exactly_the_whole_image_cells_anchored_in_tissue(skip_results):
    s = skip_results["shard"]
    assert s["cells_in_tissue"] >= 50 and 0.3 < s["tissue_fraction"] < 0.9, s
    assert s["tiled"] == s["cells_in_tissue"] == s["same"], s
    skip, full = s["network"]["True"], s["network"]["False"]
    assert full is None or full["skipped"] == 0
    assert skip["skipped"] > 0 and skip["reused"] > 0, s
