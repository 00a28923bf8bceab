"""Whole-slide tiling (segrefine.tiling): the plan, tissue detection, ownership, grouped windows, resumable
shards, and tiled inference equal to whole-image inference."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import run_step
from segrefine import SegRefineError
from segrefine.demo import make_slide
from segrefine.io import write_tiff
from segrefine.metrics import object_metrics
from segrefine.stitch import seam_report
from segrefine.tiling import auto_group, grid_tiles, halo_check, make_plan, own_cells, run_shard, write_plan
from tiling_helpers import LocalClassical, run_all


def test_grid_partitions_the_slide_and_windows_add_the_margin():
    plan = grid_tiles((300, 500), 128, 20)
    cover = np.zeros((300, 500), int)
    for t in plan:
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
        assert (t.wx0, t.wy0) == (max(0, t.x0 - 20), max(0, t.y0 - 20))
        assert (t.wx1, t.wy1) == (min(500, t.x1 + 20), min(300, t.y1 + 20))
    assert (cover == 1).all() and len(plan) == 3 * 4


def test_tiled_equals_whole_image_exactly_with_unique_ids_and_all_outputs(slide, tmp_path):
    slide_path, img, card = slide
    model = LocalClassical()
    plan, meta, rep = run_all(tmp_path, slide_path, card, model)
    # background tiles (the blank right third) are skipped and counted
    assert meta["tiles_skipped_background"] >= 4 and rep["tiles_skipped_background"] == meta["tiles_skipped_background"]
    assert not plan[plan["x0"] >= 400]["in_tissue"].any()
    whole = model.predict(img)
    tiled = tifffile.imread(tmp_path / "labels.tif")
    assert tiled.dtype == np.uint32 and tiled.shape == img.shape
    m = object_metrics(whole.astype(np.int64), tiled.astype(np.int64))
    assert m["f1"] >= 0.99, m
    seams = seam_report(whole, tiled, 96, near=24)
    assert seams["cells_crossing_seams"] > 10
    assert seams["cut_at_seams"] == 0 and seams["duplicates"] == 0 and seams["ids_unique_and_dense"]
    assert rep["cells"] == tiled.max() and rep["n_large_cells"] == 0
    # the cell table agrees with the label image exactly, in CSV and Parquet
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert list(cells.columns) == [
        "cell_id",
        "centroid_x",
        "centroid_y",
        "area_px",
        "bbox_x0",
        "bbox_y0",
        "bbox_x1",
        "bbox_y1",
        "probability",
    ]
    assert cells["probability"].isna().all()  # a model without probabilities: NaN
    assert rep["probability"]["cells_with_probability"] == 0 and rep["probability"]["mean"] is None
    assert cells["cell_id"].tolist() == list(range(1, rep["cells"] + 1))
    areas = np.bincount(tiled.ravel())[1:]
    assert (cells["area_px"].to_numpy() == areas).all()
    row = cells.iloc[len(cells) // 2]
    ys, xs = np.nonzero(tiled == row.cell_id)
    assert (row.bbox_x0, row.bbox_y0, row.bbox_x1, row.bbox_y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert abs(row.centroid_x - xs.mean()) < 1e-6 and abs(row.centroid_y - ys.mean()) < 1e-6
    pq = pd.read_parquet(tmp_path / "cells.parquet")  # the same table, and the tile that owns each cell
    pd.testing.assert_frame_equal(pq.drop(columns="tile_id"), cells, check_exact=True)
    anchors = zip(np.floor(cells["centroid_x"]).astype(int), np.floor(cells["centroid_y"]).astype(int))
    assert pq["tile_id"].tolist() == [
        int(plan[(plan["x0"] <= x) & (x < plan["x1"]) & (plan["y0"] <= y) & (y < plan["y1"])]["tile_id"][0])
        for x, y in anchors
    ]
    # QuPath detections, one per cell
    gj = json.loads((tmp_path / "cells.geojson").read_text())
    assert sorted(f["properties"]["measurements"]["cell_id"] for f in gj["features"]) == cells["cell_id"].tolist()
    assert {f["properties"]["objectType"] for f in gj["features"]} == {"detection"}
    # pyramidal OME-TIFF with physical pixel size
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        assert tif.is_ome and tif.pages[0].is_tiled and tif.pages[0].compression == 8  # ADOBE_DEFLATE (zlib)
        assert tif.series[0].levels[0].shape == img.shape
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    # the overlay: the slide in gray at full size (576 px wide: level 0), the cells' inner boundaries in yellow
    from PIL import Image

    from segrefine.stitch import inner_boundaries

    with Image.open(tmp_path / "overlay.png") as im:
        overlay = np.asarray(im.convert("RGB"))
    assert overlay.shape == img.shape + (3,)
    yellow = (overlay == (255, 216, 0)).all(axis=-1)
    assert (yellow == inner_boundaries(tiled)).all() and yellow.any()
    assert (overlay[~yellow, 0] == overlay[~yellow, 1]).all() and (overlay[~yellow, 1] == overlay[~yellow, 2]).all()
    assert not list(tmp_path.glob(".*"))  # no temporary file or stitch folder left


def test_shard_cell_sums_equal_the_table_of_the_owned_labels():
    from segrefine.tiling import cell_stats

    img, _, _ = make_slide(256, seed=5)
    labels = LocalClassical().predict(img)
    H, W = labels.shape
    for t in grid_tiles((H, W), 96, 24):
        owned, origin, large, stats = own_cells(labels[t.wy0 : t.wy1, t.wx0 : t.wx1], t, (H, W), with_stats=True)
        assert stats.shape == (int(owned.max()) if owned.size else 0, 7)
        assert (stats == cell_stats(owned)).all()


def test_a_killed_shard_reruns_only_its_unfinished_tiles(slide, tmp_path):
    slide_path, _, card = slide
    plan, meta = make_plan(slide_path, 96, 24, shards=1, tissue_downsample=4)
    write_plan(plan, meta, tmp_path / "tiles.tsv", tmp_path / "tiles.json")
    n = int(plan["in_tissue"].sum())
    with pytest.raises(KeyboardInterrupt):
        run_shard(
            tmp_path / "tiles.tsv",
            0,
            card,
            slide_path,
            tmp_path / "tiles",
            tmp_path / "s0.json",
            model=LocalClassical(fail_on_call=5),
        )
    done = sorted((tmp_path / "tiles").glob("tile*.npz"))
    assert 3 <= len(done) <= 4 and not list((tmp_path / "tiles").glob(".*"))  # complete files only
    assert not (tmp_path / "s0.json").exists()
    model = LocalClassical()
    stats = run_shard(
        tmp_path / "tiles.tsv", 0, card, slide_path, tmp_path / "tiles", tmp_path / "s0.json", model=model
    )
    assert stats["tiles_resumed"] == len(done) and stats["tiles_computed"] == model.calls == n - len(done)
    # a different model (card) invalidates every tile
    other = tmp_path / "other.json"
    other.write_text(card.read_text() + " ")
    stats = run_shard(
        tmp_path / "tiles.tsv", 0, other, slide_path, tmp_path / "tiles", tmp_path / "s0.json", model=LocalClassical()
    )
    assert stats["tiles_computed"] == n


def test_full_disk_is_a_clear_error_and_leaves_nothing(slide, tmp_path, monkeypatch):
    import errno

    slide_path, _, card = slide
    plan, meta = make_plan(slide_path, 192, 24, shards=1, tissue_downsample=4)
    write_plan(plan, meta, tmp_path / "tiles.tsv", tmp_path / "tiles.json")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(SegRefineError, match="tile0000..\\.npz: cannot write the tile result .*disk full"):
        run_shard(
            tmp_path / "tiles.tsv",
            0,
            card,
            slide_path,
            tmp_path / "tiles",
            tmp_path / "s0.json",
            model=LocalClassical(),
        )
    assert not list((tmp_path / "tiles").iterdir())


def test_ownership_keeps_each_seam_cell_in_exactly_one_tile():
    H, W = 100, 200
    labels = np.zeros((H, W), np.int32)
    labels[40:50, 95:106] = 7  # straddles the seam at x=100; centroid x = 100 -> right tile
    labels[10:20, 90:99] = 3  # left core
    plan = grid_tiles((H, W), 100, 20)
    owners = []
    for t in plan:
        win = labels[t.wy0 : t.wy1, t.wx0 : t.wx1]
        owned, origin, large = own_cells(win, t, (H, W))
        owners.append(int(owned.max()) if owned.size else 0)
        assert not large
    assert owners == [1, 1]  # each tile owns one cell: the seam cell goes to the tile holding its anchor
    t = plan[1]
    owned, (ox, oy), _ = own_cells(labels[t.wy0 : t.wy1, t.wx0 : t.wx1], t, (H, W))
    assert (ox, oy) == (95, 40) and owned.shape == (10, 11)


def test_ownership_with_a_tissue_mask_keeps_only_cells_anchored_in_tissue():
    H, W = 100, 200
    labels = np.zeros((H, W), np.int32)
    labels[10:20, 10:20] = 1  # anchor (14, 14): tissue
    labels[10:20, 60:80] = 2  # anchor (69, 14): outside the tissue, although its left end lies in it
    labels[60:70, 30:40] = 3  # anchor (34, 64): tissue
    mask = np.zeros((10, 20), bool)  # 10 px per mask pixel
    mask[:, :6] = True  # x < 60
    t = grid_tiles((H, W), 200, 0)[0]
    owned, _, _ = own_cells(labels, t, (H, W))
    assert owned.max() == 3
    owned, (ox, oy), _ = own_cells(labels, t, (H, W), tissue=(mask, 10.0))
    assert owned.max() == 2 and (ox, oy) == (10, 10)
    assert set(np.unique(labels[oy : oy + owned.shape[0], ox : ox + owned.shape[1]][owned > 0])) == {1, 3}


def test_plan_keeps_its_tissue_mask_and_the_needed_pixels_follow_it(slide, tmp_path):
    from segrefine.intensity import tissue_pixels
    from segrefine.tiling import grow_tissue, needed_pixels, plan_tissue, prediction_windows, read_plan

    slide_path, img, _ = slide
    plan, meta = make_plan(slide_path, 96, 24, shards=1, tissue_downsample=4, group=2)
    write_plan(plan, meta, tmp_path / "tiles.tsv", tmp_path / "tiles.json")
    mask, f = plan_tissue(read_plan(tmp_path / "tiles.tsv")[1])
    assert f == 4.0 and mask.shape == (96, 144) and 0.4 < mask.mean() < 0.9
    assert mask.mean() == pytest.approx(meta["tissue"]["tissue_fraction"])
    assert not mask[:, 100:].any()  # the blank right third
    grown = grow_tissue((mask, f), 24)
    # every pixel within 24 px of a tissue pixel is in the grown mask
    tis = tissue_pixels((mask, f), 0, 0, 576, 384)
    from scipy import ndimage

    assert not (ndimage.binary_dilation(tis, np.ones((47, 47), bool)) & ~tissue_pixels(grown, 0, 0, 576, 384)).any()
    job = prediction_windows([t for t in plan if t.in_tissue], 2, 10, (384, 576))[-1]
    need = needed_pixels(job, grown)
    gx0, gy0, gx1, gy1 = job[1]
    assert need.shape == (gy1 - gy0, gx1 - gx0)
    inside = np.zeros_like(need)
    for t in job[0]:
        inside[t.wy0 - gy0 : t.wy1 - gy0, t.wx0 - gx0 : t.wx1 - gx0] = True
    assert (need == (inside & tissue_pixels(grown, gx0, gy0, gx1 - gx0, gy1 - gy0))).all()
    assert need.any() and not need.all()
    assert (needed_pixels(job, None) == inside).all()
    # without tissue detection the plan has no mask: nothing is skipped or filtered
    assert plan_tissue(make_plan(slide_path, 96, 24, tissue=False)[1]) is None


def test_cells_larger_than_the_halo_are_reported_with_their_location():
    H, W = 100, 200
    labels = np.zeros((H, W), np.int32)
    labels[30:70, 60:140] = 1  # 80 px wide: larger than the 10 px halo
    plan = grid_tiles((H, W), 100, 10)
    reports = []
    for t in plan:  # each window sees a clipped part (x 60..110 and 90..140) and owns it
        owned, origin, large = own_cells(labels[t.wy0 : t.wy1, t.wx0 : t.wx1], t, (H, W))
        assert owned.max() == 1 and len(large) == 1
        reports.append((large[0]["anchor_x"], large[0]["bbox_x0"], large[0]["bbox_x1"]))
    assert reports == [(84, 60, 110), (114, 90, 140)]


def test_halo_smaller_than_training_cells_fails_naming_the_mask(slide, tmp_path):
    slide_path, _, _ = slide
    mask = np.zeros((64, 64), np.uint16)
    mask[5:35, 10:30] = 1  # 30 px tall
    write_tiff(tmp_path / "m-mask.tif", mask)
    pd.DataFrame(
        {
            "patch": ["m"],
            "sn": ["S"],
            "image": ["x"],
            "mask": [str(tmp_path / "m-mask.tif")],
            "n_cells": [1],
            "split": ["train"],
            "image_sha256": ["-"],
            "mask_sha256": ["-"],
        }
    ).to_csv(tmp_path / "ts.tsv", sep="\t", index=False)
    with pytest.raises(
        SegRefineError,
        match=r"halo 24 px is smaller than the largest cell in the training masks "
        r"\(30 px: cell 1 of .*m-mask.tif",
    ):
        make_plan(slide_path, 96, 24, trainset=tmp_path / "ts.tsv")
    _, meta = make_plan(slide_path, 96, 30, trainset=tmp_path / "ts.tsv")
    assert meta["largest_training_cell"]["extent_px"] == 30
    # the workflow's check (rule halo_check), apart from the plan: the same message, from the plan's metadata
    for halo in (24, 30):
        plan, meta = make_plan(slide_path, 96, halo)
        write_plan(plan, meta, tmp_path / f"p{halo}.tsv", tmp_path / f"p{halo}.json")
    with pytest.raises(
        SegRefineError,
        match=r"halo 24 px is smaller than the largest cell in the training masks "
        r"\(30 px: cell 1 of .*m-mask.tif",
    ):
        halo_check(tmp_path / "p24.json", tmp_path / "ts.tsv", tmp_path / "check24.json")
    assert not (tmp_path / "check24.json").exists()
    out = halo_check(tmp_path / "p30.json", tmp_path / "ts.tsv", tmp_path / "check30.json")
    assert json.loads((tmp_path / "check30.json").read_text()) == json.loads(json.dumps(out))
    assert out["largest_training_cell"]["extent_px"] == 30 and out["halo_px"] == 30


def test_unreadable_slide_is_named(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(SegRefineError, match="bad.tif: not a readable TIFF slide"):
        make_plan(bad, 128, 16)
    proc = run_step(
        "core", "tile-plan", "--slide", bad, "--out", tmp_path / "p.tsv", "--out-json", tmp_path / "p.json", check=False
    )
    assert proc.returncode == 1 and "bad.tif: not a readable TIFF slide" in proc.stderr
    assert not (tmp_path / "p.tsv").exists()


def test_cli_steps_run_the_workflow_chain(slide, tmp_path):
    slide_path, img, card = slide
    run_step(
        "core",
        "tile-plan",
        "--slide",
        slide_path,
        "--out",
        tmp_path / "tiles.tsv",
        "--out-json",
        tmp_path / "tiles.json",
        "--tile-size",
        192,
        "--halo",
        12,
        "--halo-unit",
        "um",
        "--pixel-size-um",
        0.5,
        "--shards",
        2,
        "--tissue-downsample",
        4,
    )
    meta = json.loads((tmp_path / "tiles.json").read_text())
    assert meta["halo_px"] == 24 and meta["shards"] == 2
    for k in range(2):
        run_step(
            "core",
            "segment-shard",
            "--plan",
            tmp_path / "tiles.tsv",
            "--shard",
            k,
            "--card",
            card,
            "--slide",
            slide_path,
            "--tiles-dir",
            tmp_path / "tiles",
            "--out",
            tmp_path / f"s{k}.json",
        )
    proc = run_step(
        "core",
        "stitch",
        "--plan",
        tmp_path / "tiles.tsv",
        "--tiles-dir",
        tmp_path / "tiles",
        "--shards",
        tmp_path / "s0.json",
        tmp_path / "s1.json",
        "--slide",
        slide_path,
        "--labels",
        tmp_path / "labels.tif",
        "--cells",
        tmp_path / "cells.csv",
    )
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == img.shape and labels.max() == len(pd.read_csv(tmp_path / "cells.csv")) > 0
    assert re.search(rf"stitched {labels.max()} cells from \d+ tiles", proc.stderr), proc.stderr[-2000:]
    proc = run_step(
        "core",
        "segment-shard",
        "--plan",
        tmp_path / "tiles.tsv",
        "--shard",
        7,
        "--card",
        card,
        "--slide",
        slide_path,
        "--tiles-dir",
        tmp_path / "tiles",
        "--out",
        tmp_path / "s7.json",
        check=False,
    )
    assert proc.returncode == 1 and "shard 7 is not in the plan (0..1)" in proc.stderr


@pytest.mark.parametrize("name", ["ssDNA", "DAPI"])
def test_real_crops_tiled_equal_whole(realdata, tmp_path, name, slide):
    """Real CellBinDB crops (256 px): 3 x 3 tiles of 96 px, halo 24 px."""
    _, _, card = slide
    src = realdata / "cellbindb-demo" / f"{name}_img.tif"
    img = tifffile.imread(src)
    shutil.copy(src, tmp_path / "real.tif")
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    model = LocalClassical(threshold=threshold_otsu(ndimage.gaussian_filter(img.astype(np.float32), 1.0)))
    _, _, rep = run_all(tmp_path, tmp_path / "real.tif", card, model, tile=96, halo=24, shards=2, tissue=False)
    whole = model.predict(img)
    tiled = tifffile.imread(tmp_path / "labels.tif")
    m = object_metrics(whole.astype(np.int64), tiled.astype(np.int64))
    seams = seam_report(whole, tiled, 96, near=24)
    assert m["f1"] >= 0.99 and seams["cut_at_seams"] == 0 and seams["duplicates"] == 0, (m, seams)


class ContextModel:
    """A strictly local model (connected components above a fixed level) that declares a context: the shard
    must predict each window grown by it (clipped at the slide), at its place in the slide, and crop back."""

    device = "cpu"

    def __init__(self, context):
        self.context, self.seen = context, []

    def context_px(self):
        return self.context

    def predict(self, img):
        from scipy import ndimage

        return ndimage.label(img > 60)[0]

    def predict_window(self, img, origin):
        self.seen.append((tuple(int(v) for v in origin), img.shape[:2]))
        return self.predict(img)


def test_shard_grows_windows_by_the_model_context_and_crops_back(slide, tmp_path):
    slide_path, img, card = slide
    plain = tmp_path / "plain"
    plain.mkdir()
    run_all(plain, slide_path, card, ContextModel(0), shards=1)
    model = ContextModel(20)
    plan, meta, rep = run_all(tmp_path, slide_path, card, model, shards=1)
    H, W = img.shape
    want = sorted(
        (
            (max(0, t.wx0 - 20), max(0, t.wy0 - 20)),
            (min(H, t.wy1 + 20) - max(0, t.wy0 - 20), min(W, t.wx1 + 20) - max(0, t.wx0 - 20)),
        )
        for t in plan
        if t.in_tissue
    )
    assert sorted(model.seen) == want
    assert json.loads((tmp_path / "s0.json").read_text())["model_context_px"] == 20
    assert (tifffile.imread(tmp_path / "labels.tif") == tifffile.imread(plain / "labels.tif")).all()
    # the context is part of what a tile was computed from: without it the shard predicts every tile again
    stats = run_shard(
        tmp_path / "tiles.tsv",
        0,
        card,
        slide_path,
        tmp_path / "tiles",
        tmp_path / "s0b.json",
        model=ContextModel(20),
        model_context=False,
    )
    assert stats["tiles_computed"] == stats["tiles"] and stats["model_context_px"] == 0


def test_auto_group_keeps_the_grouped_window_within_the_target_ratio():
    assert auto_group(1024, 64) == 1  # the halo alone: 1152² windows, 1.27x the core
    # Cellpose's context bound on top of the halo: 5 x 5 tiles per window, 5760² for 5120² of cores
    assert auto_group(1024, 64 + 256) == 5 and (5760 / 5120) ** 2 <= 1.3 < (4736 / 4096) ** 2
    assert auto_group(1024, 1000) == 4  # capped: no window wider than MAX_GROUP_WINDOW_PX (6144)
    assert auto_group(96, 24 + 100, max_window=10**6) == 19  # 1 + 248 / (96 g) <= sqrt(1.3)


def test_grouped_windows_are_tile_exact_and_the_seen_ratio_is_what_the_model_saw(slide, tmp_path):
    """A context-declaring local model predicting 2 x 2 (then 3 x 3) tiles per window: the windows are the groups'
    bounding boxes grown by the context, the labels equal the one-tile-at-a-time run's, and the shard reports the
    pixels the model saw per core pixel."""
    slide_path, img, card = slide
    H, W = img.shape
    single = ContextModel(20)
    plan1, meta1, rep1 = run_all(tmp_path / "g1", slide_path, card, single, shards=1)
    assert meta1["group_tiles"] == 1 and len(single.seen) == rep1["tiles_in_tissue"]
    for g in (2, 3):
        model = ContextModel(20)
        plan, meta, rep = run_all(tmp_path / f"g{g}", slide_path, card, model, shards=1, group=g)
        assert meta["group_tiles"] == g
        assert (
            tifffile.imread(tmp_path / f"g{g}" / "labels.tif") == tifffile.imread(tmp_path / "g1" / "labels.tif")
        ).all()
        assert rep["cells"] == rep1["cells"]
        tissue = [t for t in plan if t.in_tissue]
        # group (0, 0): cores [0, 96 g)², windows to 96 g + 24, grown by the context 20: one window from the origin
        assert ((0, 0), (min(H, 96 * g + 44), min(W, 96 * g + 44))) in model.seen
        assert len(model.seen) < len(single.seen)
        stats = json.loads((tmp_path / f"g{g}" / "s0.json").read_text())
        seen = sum(h * w for _, (h, w) in model.seen)
        cores = sum((t.x1 - t.x0) * (t.y1 - t.y0) for t in tissue)
        assert (stats["pixels_seen"], stats["pixels_cores"], stats["windows"]) == (seen, cores, len(model.seen))
        assert stats["seen_ratio"] == pytest.approx(seen / cores)
        single_seen = sum(h * w for _, (h, w) in single.seen)
        assert json.loads((tmp_path / "g1" / "s0.json").read_text())["seen_ratio"] == pytest.approx(single_seen / cores)
        assert stats["seen_ratio"] < single_seen / cores
        # every window holds each of its tiles' plan windows 20 px inside, wherever that is not the slide's edge
        for t in tissue:
            assert any(
                ox <= max(0, t.wx0 - 20)
                and oy <= max(0, t.wy0 - 20)
                and ox + w >= min(W, t.wx1 + 20)
                and oy + h >= min(H, t.wy1 + 20)
                for (ox, oy), (h, w) in model.seen
            )


def test_classical_model_with_grouped_windows_equals_whole_image(slide, tmp_path):
    slide_path, img, card = slide
    model = LocalClassical()
    whole = model.predict(img)
    _, meta, rep = run_all(tmp_path, slide_path, card, model, shards=2, group=3)
    tiled = tifffile.imread(tmp_path / "labels.tif")
    m = object_metrics(whole, tiled)
    assert m["f1"] == 1.0 and rep["cells"] == len(np.unique(whole)) - 1


def test_plan_assigns_shards_by_group_and_auto_leaves_no_shard_idle(slide, tmp_path):
    slide_path, img, _ = slide
    plan, meta = make_plan(slide_path, 96, 24, shards=2, tissue_downsample=4, group="auto", context_bound_px=100)
    g = meta["group_tiles"]
    assert 1 <= g < auto_group(96, 124) and meta["group"] == "auto" and meta["groups"] >= 2
    tissue = [t for t in plan if t.in_tissue]
    by_group = {}
    for t in tissue:
        by_group.setdefault((t.row // g, t.col // g), set()).add(int(t.shard))
    assert all(len(v) == 1 for v in by_group.values()) and len(by_group) == meta["groups"]
    assert {int(t.shard) for t in tissue} == {0, 1}
    assert all(t.shard == -1 for t in plan if not t.in_tissue)
    # the plan's pixel figures: cores in tissue, the plan's own windows, the estimate at the context bound
    px = meta["pixels"]
    assert px["cores_in_tissue"] == sum((t.x1 - t.x0) * (t.y1 - t.y0) for t in tissue)
    assert px["windows_planned"] == sum((t.wx1 - t.wx0) * (t.wy1 - t.wy0) for t in tissue)
    assert px["slide"] == img.size and 0 < px["tissue"] <= img.size
    assert meta["seen_ratio_at_context_bound"] == pytest.approx(px["seen_at_context_bound"] / px["cores_in_tissue"])
    with pytest.raises(SegRefineError, match="group must be a positive number of tiles or 'auto'"):
        make_plan(slide_path, 96, 24, group=0)


@pytest.mark.parametrize("radius", [0.4, 0.56])
def test_tissue_is_the_region_between_nuclei_not_the_nuclei(radius):
    """Nuclei (radius 5 px, 85 % of an 18 px grid) on dark tissue inside a disc, seen at 16x: the detector finds
    the disc (not the nuclei alone, nor nothing when the tissue covers most of the view, clipped by the edge at
    0.56), and no nucleus pixel lies outside the mask."""
    from segrefine.tiling import detect_tissue

    rng = np.random.default_rng(3)
    n, step, f = 4096, 18, 16
    yy, xx = np.mgrid[0:step, 0:step]
    node = ((yy - step // 2) ** 2 + (xx - step // 2) ** 2) <= 25
    nuclei = np.kron(rng.random((n // step + 1, n // step + 1)) < 0.85, node)[:n, :n]
    c = (np.arange(n) + 0.5) / n - 0.5
    disc = (c[:, None] ** 2 + c[None, :] ** 2) <= radius**2
    img = np.clip(rng.normal(12, 6, (n, n)), 0, 255)
    img[nuclei & disc] = 200
    thumb = img.reshape(n // f, f, n // f, f).mean(axis=(1, 3)).astype(np.uint8)
    mask, _ = detect_tissue(thumb, False, f)
    assert abs(mask.mean() - disc.mean()) < 0.03, (mask.mean(), disc.mean())
    rows, cols = np.nonzero(nuclei & disc)
    assert mask[rows // f, cols // f].all()
