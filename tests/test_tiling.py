"""Whole-slide tiling: the plan, tissue detection, ownership, resumable shards, exact stitching,
the pyramidal OME-TIFF and the other outputs, the GPU allocator, and bad input."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import run_step
from segrefine import SegRefineError
from segrefine.demo import make_slide
from segrefine.devices import gpu_device
from segrefine.io import Slide, write_tiff
from segrefine.metrics import object_metrics
from segrefine.models.classical_adapter import DEFAULTS, segment
from segrefine.stitch import cell_outlines, seam_report, stitch
from segrefine.tiling import (auto_group, grid_tiles, halo_check, make_plan, own_cells, read_plan, run_shard,
                              tile_file, write_plan)


class LocalClassical:
    """The classical model with one fixed threshold: translation-local, so tiling must reproduce
    its whole-image result exactly (any difference is the engine's fault)."""
    device = "cpu"

    def __init__(self, threshold=60.0, fail_on_call=None):
        self.threshold, self.calls, self.fail_on_call = threshold, 0, fail_on_call

    def predict(self, img):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("killed")  # what a killed job looks like from inside
        p = DEFAULTS
        return segment(img, p["sigma"], p["threshold_scale"], p["min_distance"], p["min_size"], p["invert"],
                       threshold=self.threshold)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """The 384 px demo chip with a blank background band on the right (so some tiles hold no tissue)."""
    d = tmp_path_factory.mktemp("slide")
    img, truth, _ = make_slide(384, seed=3)
    img = np.concatenate([img, np.full((384, 192), img.min(), img.dtype)], axis=1)  # 576 wide, right third blank
    write_tiff(d / "slide.tif", img, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    card = d / "classical"
    run_step("core", "pretrained-card", "--framework", "classical", "--name", "c", "--source", "none",
             "--out-dir", card)
    return d / "slide.tif", img, card / "card.json"


def run_all(tmp, slide_path, card, model, tile=96, halo=24, shards=2, **kw):
    tmp.mkdir(parents=True, exist_ok=True)
    plan, meta = make_plan(slide_path, tile, halo, shards=shards, tissue_downsample=4, **kw)
    write_plan(plan, meta, tmp / "tiles.tsv", tmp / "tiles.json")
    jsons = [tmp / f"s{k}.json" for k in range(shards)]
    for k, j in enumerate(jsons):
        run_shard(tmp / "tiles.tsv", k, card, slide_path, tmp / "tiles", j, model=model)
    rep = stitch(tmp / "tiles.tsv", tmp / "tiles", jsons, slide_path, tmp / "labels.tif", tmp / "cells.csv",
                 tmp / "cells.parquet", tmp / "cells.geojson", tmp / "overlay.png", tmp / "report.json",
                 pixel_size_um=0.5, probability_map_out=tmp / "probability_map.png")
    return plan, meta, rep


def test_grid_partitions_the_slide_and_windows_add_the_margin():
    plan = grid_tiles((300, 500), 128, 20)
    cover = np.zeros((300, 500), int)
    for t in plan:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
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
    assert list(cells.columns) == ["cell_id", "centroid_x", "centroid_y", "area_px", "bbox_x0", "bbox_y0",
                                   "bbox_x1", "bbox_y1", "probability"]
    assert cells["probability"].isna().all()  # a model without probabilities: NaN
    assert rep["probability"]["cells_with_probability"] == 0 and rep["probability"]["mean"] is None
    assert cells["cell_id"].tolist() == list(range(1, rep["cells"] + 1))
    areas = np.bincount(tiled.ravel())[1:]
    assert (cells["area_px"].to_numpy() == areas).all()
    row = cells.iloc[len(cells) // 2]
    ys, xs = np.nonzero(tiled == row.cell_id)
    assert (row.bbox_x0, row.bbox_y0, row.bbox_x1, row.bbox_y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert abs(row.centroid_x - xs.mean()) < 1e-6 and abs(row.centroid_y - ys.mean()) < 1e-6
    pq = pd.read_parquet(tmp_path / "cells.parquet")
    assert len(pq) == len(cells) and (pq["cell_id"].to_numpy() == cells["cell_id"].to_numpy()).all()
    # QuPath detections, one per cell
    gj = json.loads((tmp_path / "cells.geojson").read_text())
    assert len(gj["features"]) == len(cells)
    assert {f["properties"]["objectType"] for f in gj["features"]} == {"detection"}
    # pyramidal OME-TIFF with physical pixel size
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        assert tif.is_ome and tif.pages[0].is_tiled and tif.pages[0].compression == 8  # ADOBE_DEFLATE (zlib)
        assert tif.series[0].levels[0].shape == img.shape
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    assert (tmp_path / "overlay.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*"))  # no temporary file or stitch folder left


class WindowDependent(LocalClassical):
    """The classical model with a threshold that depends on the window's content: neighbouring windows segment
    the cells near a seam differently, so the stitch has conflicts to resolve (duplicates dropped, pixels
    trimmed), and the table and outlines of the trimmed cells must be recomputed."""

    def predict(self, img):
        self.threshold = 35.0 + int(np.asarray(img, np.int64).sum()) % 40
        return super().predict(img)


class LocalClassicalWithProbability(LocalClassical):
    """LocalClassical with a per-pixel probability that depends on the pixel alone (a squashed intensity), so the
    tiled cells' mean probabilities must equal those of the whole image exactly."""

    @staticmethod
    def probability(img):
        return (1 / (1 + np.exp(-(np.asarray(img, np.float64) - 60.0) / 20.0))).astype(np.float32)

    def predict_window_with_probability(self, img, origin):
        return self.predict(img), self.probability(img)


def test_cell_probability_column_and_map_equal_the_whole_image_means(slide, tmp_path):
    slide_path, img, card = slide
    _, _, rep = run_all(tmp_path, slide_path, card, LocalClassicalWithProbability())
    tiled = tifffile.imread(tmp_path / "labels.tif").astype(np.int64)
    prob = LocalClassicalWithProbability.probability(img).astype(np.float64)
    want = np.bincount(tiled.ravel(), weights=prob.ravel())[1:] / np.bincount(tiled.ravel())[1:]
    for got in (pd.read_csv(tmp_path / "cells.csv"), pd.read_parquet(tmp_path / "cells.parquet")):
        assert len(got) == len(want) > 10
        assert np.abs(got["probability"].to_numpy() - want).max() < 1e-6  # float32 map, float64 sums
    assert rep["probability"]["cells_with_probability"] == rep["cells"]
    assert rep["probability"]["mean"] == pytest.approx(want.mean())
    from PIL import Image

    from segrefine.stitch import _colours

    with Image.open(tmp_path / "probability_map.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    # 64 px bins: 6 x 9 for the 384 x 576 slide, each k px square (k = 57: at least 512 px a side), a colour bar below
    k = 57
    assert rgb.shape == (6 * k + 40, 9 * k, 3)
    cells = pd.read_csv(tmp_path / "cells.csv")
    r, c = (cells["centroid_y"] // 64).astype(int), (cells["centroid_x"] // 64).astype(int)
    for (i, j), grp in cells.groupby([r, c]):
        assert (rgb[i * k + k // 2, j * k + k // 2] == _colours(np.array(grp["probability"].mean()))).all()
    empty = sorted(set(np.ndindex(6, 9)) - set(zip(r, c)))
    assert empty and all((rgb[i * k + k // 2, j * k + k // 2] == 224).all() for i, j in empty)  # no cell: gray
    # a tile of the previous format (2: no cell_prob) is read with NaN probabilities and recomputed by its shard
    from segrefine.tiling import read_tile

    files = sorted((tmp_path / "tiles").glob("tile*.npz"))
    for f in files:
        with np.load(f) as d:
            arrays = {k: d[k] for k in d.files if k != "cell_prob"}
        meta = json.loads(str(arrays["meta"]))
        arrays["meta"] = np.array(json.dumps(dict(meta, format=2)))
        np.savez(f, **arrays)
        owned, _, cells = read_tile(f)
        assert np.isnan(cells["prob"]).all() and len(cells["prob"]) == (int(owned.max()) if owned.size else 0)
    model = LocalClassicalWithProbability()
    done = 0
    for k in range(2):
        stats = run_shard(tmp_path / "tiles.tsv", k, card, slide_path, tmp_path / "tiles", tmp_path / f"s{k}.json",
                          model=model)
        assert stats["tiles_resumed"] == 0
        done += stats["tiles_computed"]
    assert done == len(files) and all(not np.isnan(read_tile(f)[2]["prob"]).any() for f in files)


def _expected_table(tiled):
    from skimage.measure import regionprops

    rows = [(r.label, r.centroid[1], r.centroid[0], int(r.area), r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2])
            for r in regionprops(tiled.astype(np.int64))]
    return pd.DataFrame(rows, columns=["cell_id", "centroid_x", "centroid_y", "area_px", "bbox_x0", "bbox_y0",
                                       "bbox_x1", "bbox_y1"])


def _check_outputs_agree_with_labels(tmp):
    """cells.csv / cells.parquet = regionprops of labels.tif; cells.geojson = the outlines of labels.tif."""
    tiled = tifffile.imread(tmp / "labels.tif")
    want = _expected_table(tiled)
    for got in (pd.read_csv(tmp / "cells.csv"), pd.read_parquet(tmp / "cells.parquet")):
        assert got["cell_id"].tolist() == want["cell_id"].tolist() == list(range(1, int(tiled.max()) + 1))
        for c in ("area_px", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"):
            assert (got[c].to_numpy() == want[c].to_numpy()).all(), c
        for c in ("centroid_x", "centroid_y"):
            assert np.abs(got[c].to_numpy() - want[c].to_numpy()).max() < 1e-9, c
    gj = json.loads((tmp / "cells.geojson").read_text())
    rings = {f["properties"]["measurements"]["cell_id"]: f["geometry"]["coordinates"][0] for f in gj["features"]}
    assert len(rings) == len(gj["features"]) == len(want)
    assert rings == dict(cell_outlines(tiled))
    f = gj["features"][0]
    cid = f["properties"]["measurements"]["cell_id"]
    assert f == {"type": "Feature", "id": f"cell-{cid}", "geometry": {"type": "Polygon", "coordinates": [rings[cid]]},
                 "properties": {"objectType": "detection", "name": f"cell {cid}",
                                "classification": {"name": "Nucleus", "color": [255, 0, 0]},
                                "measurements": {"cell_id": cid}}}


def _check_overlay_pixels(tmp, slide_path):
    """overlay.png has the pixels the previous writer (matplotlib.image.imsave of the float RGB view) wrote."""
    import matplotlib.image
    from skimage.segmentation import find_boundaries

    with tifffile.TiffFile(tmp / "labels.tif") as tif:
        levels = [lv.asarray() for lv in tif.series[0].levels]
    k = next((i for i, lv in enumerate(levels) if max(lv.shape) <= 1024), len(levels) - 1)
    lab = levels[k]
    with Slide(slide_path) as s:
        thumb, f = s.thumbnail(2 ** k)
    ys = np.minimum((np.arange(lab.shape[0]) * 2 ** k / f).astype(int), thumb.shape[0] - 1)
    xs = np.minimum((np.arange(lab.shape[1]) * 2 ** k / f).astype(int), thumb.shape[1] - 1)
    g = thumb[np.ix_(ys, xs)]
    lo, hi = np.percentile(g, [1, 99.5])
    g = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    rgb[find_boundaries(lab, mode="inner")] = (1.0, 0.85, 0.0)
    matplotlib.image.imsave(tmp / "old_overlay.png", (rgb * 255).astype(np.uint8), format="png")
    want = matplotlib.image.imread(tmp / "old_overlay.png")
    got = matplotlib.image.imread(tmp / "overlay.png")
    assert got.shape == want.shape and (got == want).all()
    (tmp / "old_overlay.png").unlink()


def test_table_and_outlines_equal_those_of_the_stitched_labels_when_cells_are_trimmed_or_dropped(slide, tmp_path):
    slide_path, _, card = slide
    _, _, rep = run_all(tmp_path, slide_path, card, WindowDependent(), tile=64, halo=24)
    assert rep["duplicates_resolved"] > 0 and rep["pixels_trimmed"] > 0, rep
    _check_outputs_agree_with_labels(tmp_path)
    _check_overlay_pixels(tmp_path, slide_path)
    # and on a conflict-free run (no cell trimmed: the shard's sums and outline text are used as they are)
    _, _, rep = run_all(tmp_path / "clean", slide_path, card, LocalClassical())
    assert rep["pixels_trimmed"] == 0
    _check_outputs_agree_with_labels(tmp_path / "clean")


def test_old_format_tiles_are_recomputed_by_the_shard_and_read_correctly_by_the_stitch(slide, tmp_path):
    """Tiles written before the per-cell table sums and outline text existed (format 1: labels + outline
    coordinates) give the stitch the same outputs, and a shard rerun recomputes them."""
    import zlib

    from segrefine.tiling import TILE_FORMAT, read_tile

    slide_path, _, card = slide
    run_all(tmp_path, slide_path, card, WindowDependent(), tile=64, halo=24, shards=1)
    files = sorted((tmp_path / "tiles").glob("tile*.npz"))
    for f in files:  # rewrite each tile as the previous version wrote it
        owned, meta, _ = read_tile(f)
        assert meta["format"] == TILE_FORMAT
        del meta["format"]
        outlines = cell_outlines(owned, meta["origin"])
        xy = np.array([p for _, r in outlines for p in r], np.float64).reshape(-1, 2)
        offsets = np.concatenate([[0], np.cumsum([len(r) for _, r in outlines])]).astype(np.int64)
        np.savez(f, labels_zlib=np.frombuffer(zlib.compress(owned.tobytes(), 1), np.uint8),
                 meta=np.array(json.dumps(meta)), outline_ids=np.array([i for i, _ in outlines], np.uint32),
                 outline_offsets=offsets, outline_xy=xy)
    old = tmp_path / "from_old"
    stitch(tmp_path / "tiles.tsv", tmp_path / "tiles", [tmp_path / "s0.json"], slide_path, old / "labels.tif",
           old / "cells.csv", old / "cells.parquet", old / "cells.geojson")
    assert (tifffile.imread(old / "labels.tif") == tifffile.imread(tmp_path / "labels.tif")).all()
    for name in ("cells.csv", "cells.geojson"):
        assert (old / name).read_bytes() == (tmp_path / name).read_bytes(), name
    model = WindowDependent()
    stats = run_shard(tmp_path / "tiles.tsv", 0, card, slide_path, tmp_path / "tiles", tmp_path / "s0.json",
                      model=model)
    assert stats["tiles_resumed"] == 0 and stats["tiles_computed"] == model.calls == len(files)
    assert all(read_tile(f)[1]["format"] == TILE_FORMAT for f in files)


def test_geojson_feature_text_is_json_dumps_of_the_feature():
    from segrefine.stitch import FEATURE
    from segrefine.tiling import outline_texts

    lab = np.zeros((12, 14), np.uint32)
    lab[2:6, 3:8], lab[7:11, 1:4], lab[8, 4] = 7, 123456, 123456
    ids, texts = outline_texts(lab, origin=(1000, 2000))
    for (cid, ring), i, text in zip(cell_outlines(lab, origin=(1000, 2000)), ids, texts):
        feature = {"type": "Feature", "id": f"cell-{cid}", "geometry": {"type": "Polygon", "coordinates": [ring]},
                   "properties": {"objectType": "detection", "name": f"cell {cid}",
                                  "classification": {"name": "Nucleus", "color": [255, 0, 0]},
                                  "measurements": {"cell_id": cid}}}
        assert i == cid and text == json.dumps(ring)
        assert FEATURE % {"id": cid, "ring": text} == json.dumps(feature)


def test_shard_cell_sums_equal_the_table_of_the_owned_labels():
    from segrefine.tiling import cell_stats

    img, _, _ = make_slide(256, seed=5)
    labels = LocalClassical().predict(img)
    H, W = labels.shape
    for t in grid_tiles((H, W), 96, 24):
        owned, origin, large, stats = own_cells(labels[t.wy0:t.wy1, t.wx0:t.wx1], t, (H, W), with_stats=True)
        assert stats.shape == (int(owned.max()) if owned.size else 0, 7)
        assert (stats == cell_stats(owned)).all()


def test_pyramid_levels_are_nearest_downsamples(tmp_path):
    from segrefine.io import label_pyramid_levels, write_pyramid_ome_tiff

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5000, (1500, 2300)).astype(np.uint32)
    levels = label_pyramid_levels(lab, tmp_path, min_side=400, block=512)
    write_pyramid_ome_tiff(tmp_path / "p.tif", levels, tile=256)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        got = [lv.asarray() for lv in tif.series[0].levels]
    assert len(got) == 4
    assert all((g == lab[::2 ** k, ::2 ** k]).all() for k, g in enumerate(got))


def test_a_killed_shard_reruns_only_its_unfinished_tiles(slide, tmp_path):
    slide_path, _, card = slide
    plan, meta = make_plan(slide_path, 96, 24, shards=1, tissue_downsample=4)
    write_plan(plan, meta, tmp_path / "tiles.tsv", tmp_path / "tiles.json")
    n = int(plan["in_tissue"].sum())
    with pytest.raises(KeyboardInterrupt):
        run_shard(tmp_path / "tiles.tsv", 0, card, slide_path, tmp_path / "tiles", tmp_path / "s0.json",
                  model=LocalClassical(fail_on_call=5))
    done = sorted((tmp_path / "tiles").glob("tile*.npz"))
    assert 3 <= len(done) <= 4 and not list((tmp_path / "tiles").glob(".*"))  # complete files only
    assert not (tmp_path / "s0.json").exists()
    model = LocalClassical()
    stats = run_shard(tmp_path / "tiles.tsv", 0, card, slide_path, tmp_path / "tiles", tmp_path / "s0.json",
                      model=model)
    assert stats["tiles_resumed"] == len(done) and stats["tiles_computed"] == model.calls == n - len(done)
    # a different model (card) invalidates every tile
    other = tmp_path / "other.json"
    other.write_text(card.read_text() + " ")
    stats = run_shard(tmp_path / "tiles.tsv", 0, other, slide_path, tmp_path / "tiles", tmp_path / "s0.json",
                      model=LocalClassical())
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
        run_shard(tmp_path / "tiles.tsv", 0, card, slide_path, tmp_path / "tiles", tmp_path / "s0.json",
                  model=LocalClassical())
    assert not list((tmp_path / "tiles").iterdir())


def test_ownership_keeps_each_seam_cell_in_exactly_one_tile():
    H, W = 100, 200
    labels = np.zeros((H, W), np.int32)
    labels[40:50, 95:106] = 7  # straddles the seam at x=100; centroid x = 100 -> right tile
    labels[10:20, 90:99] = 3   # left core
    plan = grid_tiles((H, W), 100, 20)
    owners = []
    for t in plan:
        win = labels[t.wy0:t.wy1, t.wx0:t.wx1]
        owned, origin, large = own_cells(win, t, (H, W))
        owners.append(int(owned.max()) if owned.size else 0)
        assert not large
    assert owners == [1, 1]  # each tile owns one cell: the seam cell goes to the tile holding its anchor
    t = plan[1]
    owned, (ox, oy), _ = own_cells(labels[t.wy0:t.wy1, t.wx0:t.wx1], t, (H, W))
    assert (ox, oy) == (95, 40) and owned.shape == (10, 11)


def test_cells_larger_than_the_halo_are_reported_with_their_location():
    H, W = 100, 200
    labels = np.zeros((H, W), np.int32)
    labels[30:70, 60:140] = 1  # 80 px wide: larger than the 10 px halo
    plan = grid_tiles((H, W), 100, 10)
    reports = []
    for t in plan:  # each window sees a clipped part (x 60..110 and 90..140) and owns it
        owned, origin, large = own_cells(labels[t.wy0:t.wy1, t.wx0:t.wx1], t, (H, W))
        assert owned.max() == 1 and len(large) == 1
        reports.append((large[0]["anchor_x"], large[0]["bbox_x0"], large[0]["bbox_x1"]))
    assert reports == [(84, 60, 110), (114, 90, 140)]


def test_halo_smaller_than_training_cells_fails_naming_the_mask(slide, tmp_path):
    slide_path, _, _ = slide
    mask = np.zeros((64, 64), np.uint16)
    mask[5:35, 10:30] = 1  # 30 px tall
    write_tiff(tmp_path / "m-mask.tif", mask)
    pd.DataFrame({"patch": ["m"], "sn": ["S"], "image": ["x"], "mask": [str(tmp_path / "m-mask.tif")], "n_cells": [1],
                  "split": ["train"], "image_sha256": ["-"], "mask_sha256": ["-"]}).to_csv(
        tmp_path / "ts.tsv", sep="\t", index=False)
    with pytest.raises(SegRefineError, match=r"halo 24 px is smaller than the largest cell in the training masks "
                                             r"\(30 px: cell 1 of .*m-mask.tif"):
        make_plan(slide_path, 96, 24, trainset=tmp_path / "ts.tsv")
    _, meta = make_plan(slide_path, 96, 30, trainset=tmp_path / "ts.tsv")
    assert meta["largest_training_cell"]["extent_px"] == 30
    # the workflow's check (rule halo_check), apart from the plan: the same message, from the plan's metadata
    for halo in (24, 30):
        plan, meta = make_plan(slide_path, 96, halo)
        write_plan(plan, meta, tmp_path / f"p{halo}.tsv", tmp_path / f"p{halo}.json")
    with pytest.raises(SegRefineError, match=r"halo 24 px is smaller than the largest cell in the training masks "
                                             r"\(30 px: cell 1 of .*m-mask.tif"):
        halo_check(tmp_path / "p24.json", tmp_path / "ts.tsv", tmp_path / "check24.json")
    assert not (tmp_path / "check24.json").exists()
    out = halo_check(tmp_path / "p30.json", tmp_path / "ts.tsv", tmp_path / "check30.json")
    assert json.loads((tmp_path / "check30.json").read_text()) == json.loads(json.dumps(out))
    assert out["largest_training_cell"]["extent_px"] == 30 and out["halo_px"] == 30


def test_pyramid_levels_read_and_missing_level_named(tmp_path):
    img, _, _ = make_slide(512, seed=1)
    with tifffile.TiffWriter(tmp_path / "pyr.ome.tif", ome=True) as tif:
        tif.write(img, tile=(128, 128), subifds=2, metadata={"axes": "YX"})
        tif.write(img[::2, ::2], tile=(128, 128), subfiletype=1)
        tif.write(img[::4, ::4], tile=(128, 128), subfiletype=1)
    with Slide(tmp_path / "pyr.ome.tif") as s:
        assert s.levels == [(512, 512), (256, 256), (128, 128)] and s.downsample(2) == 4
        assert (s.read_level(1) == img[::2, ::2]).all()
        thumb, f = s.thumbnail(4)
        assert f == 4 and thumb.shape == (128, 128)
        with pytest.raises(SegRefineError, match=r"pyr.ome.tif: pyramid level 3 is missing: the slide has 3 level"):
            s.thumbnail(16, level=3)
    with pytest.raises(SegRefineError, match="pyramid level 5 is missing"):
        make_plan(tmp_path / "pyr.ome.tif", 128, 16, tissue_level=5)
    # a plain TIFF: the tissue view is a block mean streamed from level 0
    write_tiff(tmp_path / "plain.tif", img)
    with Slide(tmp_path / "plain.tif") as s:
        thumb, f = s.thumbnail(8, strip=64)
        assert f == 8 and np.allclose(thumb, img.astype(np.float32).reshape(64, 8, 64, 8).mean(axis=(1, 3)))


def test_unreadable_slide_is_named(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(SegRefineError, match="bad.tif: not a readable TIFF slide"):
        make_plan(bad, 128, 16)
    proc = run_step("core", "tile-plan", "--slide", bad, "--out", tmp_path / "p.tsv", "--out-json",
                    tmp_path / "p.json", check=False)
    assert proc.returncode == 1 and "bad.tif: not a readable TIFF slide" in proc.stderr
    assert not (tmp_path / "p.tsv").exists()


def test_stitch_refuses_missing_tiles_and_other_plans(slide, tmp_path):
    slide_path, _, card = slide
    run_all(tmp_path, slide_path, card, LocalClassical(), shards=1)
    plan = read_plan(tmp_path / "tiles.tsv")[0]
    victim = tile_file(tmp_path / "tiles", int(plan[plan["in_tissue"]]["tile_id"][0]))
    victim.unlink()
    with pytest.raises(SegRefineError, match="1 tile result\\(s\\) missing .*forcerun segment_shard"):
        stitch(tmp_path / "tiles.tsv", tmp_path / "tiles", [tmp_path / "s0.json"], slide_path, tmp_path / "l2.tif",
               tmp_path / "c2.csv")
    assert not (tmp_path / "l2.tif").exists() and not (tmp_path / "c2.csv").exists()


def test_cell_outlines_follow_pixel_edges():
    lab = np.zeros((10, 10), np.uint32)
    lab[2:5, 3:7] = 42
    [(cid, ring)] = cell_outlines(lab, origin=(100, 200))
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert cid == 42 and ring[0] == ring[-1]
    assert (min(xs), max(xs), min(ys), max(ys)) == (103, 107, 202, 205)


def _reference_outlines(labels, origin):
    """The outlines as first written: skimage's find_contours on each cell's padded mask."""
    from scipy import ndimage
    from skimage.measure import find_contours

    ids = np.unique(labels)
    ids = ids[ids > 0]
    dense = np.searchsorted(ids, labels).astype(np.int32) + 1
    dense[labels == 0] = 0
    out = []
    for k, sl in enumerate(ndimage.find_objects(dense), 1):
        if sl is None:
            continue
        c = max(find_contours(np.pad(dense[sl] == k, 1).astype(np.uint8), 0.5), key=len)
        xs = np.round(c[:, 1] - 1 + sl[1].start + origin[0] + 0.5, 2)
        ys = np.round(c[:, 0] - 1 + sl[0].start + origin[1] + 0.5, 2)
        ring = np.stack([xs, ys], axis=1).tolist()
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        out.append((int(ids[k - 1]), ring))
    return out


def test_cell_outlines_equal_find_contours_of_each_cell():
    img, _, _ = make_slide(256, seed=2)
    labels = LocalClassical().predict(img).astype(np.uint32)
    labels[100:120, 100:130] = 999_999  # sparse id; a cell with a hole and one in two pieces (diagonal touch)
    labels[108:112, 110:115] = 0
    labels[200:205, 10:15] = labels[205:210, 15:20] = 77_777
    for lab in (labels, np.where(labels > 0, labels * 3 + 5, 0).astype(np.uint32)):
        assert cell_outlines(lab, (1000, 50)) == _reference_outlines(lab, (1000, 50))


def test_outline_texts_of_all_cells_at_once_equal_the_per_cell_contours():
    """The vectorised marching squares (shard and stitch) give the text of exactly the per-cell rings, also on
    fragmented labels: holes, cells in pieces, saddles, ties between equally long pieces, sparse ids."""
    from segrefine.tiling import outline_texts

    rng = np.random.default_rng(1)
    img, _, _ = make_slide(256, seed=4)
    cases = [LocalClassical().predict(img).astype(np.uint32)]
    cases += [(rng.integers(0, 2 + k, (20 + k, 33)) * (1 + 1000 * (k % 2))).astype(np.uint32) for k in range(12)]
    cases += [np.zeros((5, 5), np.uint32), np.pad(np.ones((3, 3), np.uint32), 1)]
    for k, lab in enumerate(cases):
        ids, texts = outline_texts(lab, (k, 3 * k))
        ref = cell_outlines(lab, (k, 3 * k))
        assert ids.tolist() == [cid for cid, _ in ref] and texts == [json.dumps(r) for _, r in ref], k


def test_each_concurrent_gpu_job_gets_its_own_device(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGREFINE_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with gpu_device(1) as a:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == a
        os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"  # a second job starts with the same environment
        with gpu_device(1) as b:
            assert {a, b} == {"3", "5"}
            os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"
            with pytest.raises(SegRefineError, match="no free GPU among \\['3', '5'\\]"):
                with gpu_device(1, timeout_s=0.2, poll_s=0.05):
                    pass
    with gpu_device(1) as c:  # released when the jobs ended
        assert c == "3"
    with gpu_device(0) as none:
        assert none is None
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with gpu_device(1) as s:
        assert s == "1"  # under SLURM the allocation's device is kept


def test_cli_steps_run_the_workflow_chain(slide, tmp_path):
    slide_path, img, card = slide
    run_step("core", "tile-plan", "--slide", slide_path, "--out", tmp_path / "tiles.tsv", "--out-json",
             tmp_path / "tiles.json", "--tile-size", 192, "--halo", 12, "--halo-unit", "um", "--pixel-size-um", 0.5,
             "--shards", 2, "--tissue-downsample", 4)
    meta = json.loads((tmp_path / "tiles.json").read_text())
    assert meta["halo_px"] == 24 and meta["shards"] == 2
    for k in range(2):
        run_step("core", "segment-shard", "--plan", tmp_path / "tiles.tsv", "--shard", k, "--card", card,
                 "--slide", slide_path, "--tiles-dir", tmp_path / "tiles", "--out", tmp_path / f"s{k}.json")
    proc = run_step("core", "stitch", "--plan", tmp_path / "tiles.tsv", "--tiles-dir", tmp_path / "tiles",
                    "--shards", tmp_path / "s0.json", tmp_path / "s1.json", "--slide", slide_path,
                    "--labels", tmp_path / "labels.tif", "--cells", tmp_path / "cells.csv")
    assert "stitched" in proc.stderr
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == img.shape and labels.max() == len(pd.read_csv(tmp_path / "cells.csv")) > 0
    proc = run_step("core", "segment-shard", "--plan", tmp_path / "tiles.tsv", "--shard", 7, "--card", card,
                    "--slide", slide_path, "--tiles-dir", tmp_path / "tiles", "--out", tmp_path / "s7.json",
                    check=False)
    assert proc.returncode == 1 and "shard 7 is not in the plan (0..1)" in proc.stderr


def test_segment_by_hand_runs_in_a_model_env_without_pyarrow(slide, tmp_path):
    """`segrefine segment` (plan, shards, stitch in one process) is run by hand in the model's env; the model
    envs have no pyarrow: every output but cells.parquet, and the same labels as the core env's run."""
    slide_path, img, card = slide
    args = ["--card", card, "--slide", slide_path, "--tile-size", 192, "--halo", 24, "--no-tissue"]
    proc = run_step("cellpose", "segment", *args, "--out-dir", tmp_path / "cp")
    assert "no cells.parquet" in proc.stderr
    run_step("core", "segment", *args, "--out-dir", tmp_path / "core")
    assert not (tmp_path / "cp" / "cells.parquet").exists() and (tmp_path / "core" / "cells.parquet").is_file()
    for name in ("cells.csv", "cells.geojson"):
        assert (tmp_path / "cp" / name).read_bytes() == (tmp_path / "core" / name).read_bytes()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cp" / "labels.tif"),
                                  tifffile.imread(tmp_path / "core" / "labels.tif"))


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


# --- slide-level intensity reference -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_histogram_percentiles_equal_numpy_on_the_whole_image(dtype, tmp_path):
    """The streamed exact histogram gives np.percentile's values (linear interpolation) on the whole image,
    per channel and for the gray mean, whether read from an array or region by region from a tiled slide."""
    from segrefine.intensity import PERCENTILES, intensity_reference, percentile

    rng = np.random.default_rng(11)
    top = np.iinfo(dtype).max
    img = rng.integers(0, top, (301, 187, 3), endpoint=True).astype(dtype)
    img[:20] = rng.integers(0, 7, (20, 187, 3))  # a skewed distribution: repeated values, ties at order statistics
    write_tiff(tmp_path / "s.tif", img, tiled=True, photometric="rgb")
    with Slide(tmp_path / "s.tif") as s:
        refs = [intensity_reference(img, block=64), intensity_reference(s, block=128)]
    gray = img.astype(np.float64).mean(axis=-1)
    for ref in refs:
        assert ref["method"] == "exact histogram" and ref["n_pixels"] == 301 * 187
        for q in PERCENTILES:
            want = [np.percentile(img[..., c], q) for c in range(3)]
            assert np.allclose(percentile(ref, q), want, rtol=0, atol=1e-9), q
            assert abs(percentile(ref, q, "gray") - np.percentile(gray, q)) <= 1e-9, q
    assert refs[0] == refs[1]
    with pytest.raises(SegRefineError, match="no 42th percentile"):
        percentile(refs[0], 42)


def _classical_fidelity(tmp_path, slide_path, img, card, tile, halo, invert=False):
    """Tiled (plan's reference) vs whole image (same reference on the whole image) with the shipped classical model."""
    from segrefine.models.classical_adapter import ClassicalAdapter
    from segrefine.segment import segment_whole

    _, meta, rep = run_all(tmp_path, slide_path, card, ClassicalAdapter({"invert": invert}), tile=tile, halo=halo,
                           shards=2, tissue=False)
    whole = segment_whole(card, slide_path, model=ClassicalAdapter({"invert": invert}))
    tiled = tifffile.imread(tmp_path / "labels.tif")
    assert meta["intensity_reference"]["method"] == "exact histogram" and rep["normalization"] == ["slide"]
    assert json.loads((tmp_path / "report.json").read_text())["intensity_reference"] == meta["intensity_reference"]
    return object_metrics(whole.astype(np.int64), tiled.astype(np.int64)), seam_report(whole, tiled, tile, near=halo)


def test_shipped_classical_model_tiled_equals_whole_with_the_slide_reference(slide, tmp_path):
    """The shipped classical adapter (Otsu threshold of the image's histogram): with the plan's slide-level
    reference, 96 px tiles reproduce the whole-image result; each window's own histogram does not."""
    slide_path, img, card = slide
    m, seams = _classical_fidelity(tmp_path, slide_path, img, card, 96, 24)
    assert m["f1"] >= 0.99 and seams["cut_at_seams"] == 0 and seams["duplicates"] == 0, (m, seams)
    # the same model normalised per window (no reference) is measurably worse on the same tiles: the control
    from segrefine.models.classical_adapter import ClassicalAdapter

    plan, meta = read_plan(tmp_path / "tiles.tsv")
    per_window, slide_level = ClassicalAdapter({}), ClassicalAdapter({})
    assert slide_level.set_intensity_reference(meta["intensity_reference"]) is True
    windows = [img[t.wy0:t.wy1, t.wx0:t.wx1] for t in plan]
    assert any((per_window.predict(w) > 0).sum() != (slide_level.predict(w) > 0).sum() for w in windows)


@pytest.mark.parametrize("name,tile,halo,invert", [("mIF", 96, 24, False), ("DAPI", 96, 24, False),
                                                    ("HE", 96, 40, True)])
def test_real_image_tiled_equals_whole_with_the_slide_reference(realdata, tmp_path, slide, name, tile, halo, invert):
    """Real CellBinDB crops in 96 px tiles: mIF and DAPI 256 px (F1 0.79 and 0.86 with per-window Otsu), H&E
    512 px RGB, inverted, whose largest nuclei need a 40 px halo. On H&E one or two small cells on a seam come
    out split differently: the watershed's seeds (peak_local_max) and plateaus break ties by scan order, which
    differs in a window; that is the model's own non-locality, not normalisation (F1 stays 1.0)."""
    _, _, card = slide
    src = realdata / "cellbindb-demo" / f"{name}_img.tif"
    img = tifffile.imread(src)
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        img = np.moveaxis(img, 0, -1)
    write_tiff(tmp_path / "real.tif", img, tiled=True, photometric="rgb" if img.ndim == 3 else "minisblack")
    m, seams = _classical_fidelity(tmp_path, tmp_path / "real.tif", img, card, tile, halo, invert)
    cut_allowed = 0 if img.ndim == 2 else 0.01 * seams["seam_cells"]
    assert m["f1"] >= 0.99 and seams["cut_at_seams"] <= cut_allowed and seams["duplicates"] == 0, (m, seams)


def test_intensity_reference_of_the_tissue_pixels_equals_numpy_on_them(tmp_path):
    """With the plan's tissue mask (low resolution, 4 px per mask px, on a slide whose size is no multiple of 4)
    the reference is np.percentile / Otsu of the tissue pixels only, from an array or region by region; a mask
    without tissue falls back to all pixels."""
    from segrefine.intensity import PERCENTILES, intensity_reference, percentile, tissue_pixels

    rng = np.random.default_rng(5)
    img = rng.integers(0, 30, (301, 187), endpoint=True).astype(np.uint8)
    img[100:200, 40:150] = rng.integers(80, 255, (100, 110))
    mask = np.zeros((75, 46), bool)
    mask[25:50, 10:38] = True
    mask[-1, -1] = True  # the last mask pixel also covers the slide's partial last rows and columns
    f = 4.0
    want = np.zeros(img.shape, bool)
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            want[y, x] = mask[min(y // 4, 74), min(x // 4, 45)]
    assert (tissue_pixels((mask, f), 0, 0, 187, 301) == want).all()
    assert (tissue_pixels((mask, f), 30, 90, 50, 20) == want[90:110, 30:80]).all()
    write_tiff(tmp_path / "s.tif", img, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    with Slide(tmp_path / "s.tif") as s:
        refs = [intensity_reference(img, block=64, tissue=(mask, f)),
                intensity_reference(s, block=128, tissue=(mask, f))]
    for ref in refs:
        assert ref["pixels"] == "tissue" and ref["n_pixels"] == int(want.sum())
        for q in PERCENTILES:
            assert abs(percentile(ref, q, 0) - np.percentile(img[want], q)) <= 1e-9, q
    assert refs[0] == refs[1]
    everything = intensity_reference(img)
    assert everything["pixels"] == "all" and everything["gray"]["otsu"] < refs[0]["gray"]["otsu"]
    assert intensity_reference(img, tissue=(np.zeros_like(mask), f)) == everything


def test_mostly_background_chip_takes_its_reference_from_the_tissue(slide, tmp_path):
    """A chip that is mostly noisy background with a small tissue region: the slide's Otsu threshold over all
    pixels falls into the noise and the classical model finds "cells" in it; over the plan's tissue pixels it
    separates nuclei from tissue, no cell lies outside the tissue, and tiled still equals whole-image inference
    with the same tissue settings."""
    from segrefine.intensity import intensity_reference
    from segrefine.models.classical_adapter import ClassicalAdapter
    from segrefine.segment import segment_whole

    _, _, card = slide
    chip, _, _ = make_slide(256, seed=4)
    rng = np.random.default_rng(6)
    img = np.clip(rng.normal(12, 6.0, (1536, 1536)), 0, 255).astype(np.uint8)  # background noise
    img[720:816, 720:816] = np.maximum(chip[80:176, 80:176], img[720:816, 720:816])  # tissue: 0.4 % of the chip
    path = tmp_path / "chip.tif"
    write_tiff(path, img, tiled=True, photometric="minisblack", metadata={"axes": "YX"})
    _, meta = make_plan(path, 256, 32, shards=1, tissue_downsample=4)
    ref = meta["intensity_reference"]
    assert ref["pixels"] == "tissue" and ref["n_pixels"] < 0.02 * img.size, ref["n_pixels"]
    outside = np.ones(img.shape, bool)
    outside[720 - 32:816 + 32, 720 - 32:816 + 32] = False
    run_all(tmp_path, path, card, ClassicalAdapter({}), tile=256, halo=32, shards=1)
    tiled = tifffile.imread(tmp_path / "labels.tif")
    whole = segment_whole(card, path, model=ClassicalAdapter({}), tissue=True, tissue_downsample=4)
    m = object_metrics(whole.astype(np.int64), tiled.astype(np.int64))
    assert m["f1"] >= 0.99 and m["n_true"] > 10, m
    # the same model with the reference of all pixels (what tile-plan computed before)
    all_pixels = ClassicalAdapter({})
    all_pixels.set_intensity_reference(intensity_reference(img))
    results = {True: tiled, False: all_pixels.predict(img)}
    assert len(np.unique(results[True][outside])) == 1  # background only
    assert len(np.unique(results[False][outside])) > 100  # noise segmented as cells


def test_disk_array_reads_what_was_written_and_stays_sparse(tmp_path):
    """The stitch's working store: regions written and read back equal a numpy array's; full-width rows, edges,
    empty slices; never-written regions read as 0 and take no disk."""
    from segrefine.io import DiskArray

    rng = np.random.default_rng(2)
    H, W = 700, 900
    want = np.zeros((H, W), np.uint32)
    a = DiskArray(tmp_path / "a.raw", (H, W))
    try:
        for _ in range(40):
            y0, x0 = int(rng.integers(0, H)), int(rng.integers(0, W))
            y1, x1 = int(rng.integers(y0, H + 1)), int(rng.integers(x0, W + 1))
            v = rng.integers(0, 2 ** 32, (y1 - y0, x1 - x0), dtype=np.uint64).astype(np.uint32)
            a[y0:y1, x0:x1] = v
            want[y0:y1, x0:x1] = v
            assert (a[y0:y1, x0:x1] == v).all()
        a[100:110, :] = 7  # full-width rows, a broadcast scalar
        want[100:110, :] = 7
        assert (a[:, :] == want).all() and (np.asarray(a) == want).all()
        assert (a[-5:, 3:9] == want[-5:, 3:9]).all() and a[5:5, :].shape == (0, W)
        with pytest.raises(TypeError):
            a[::2, :]
    finally:
        a.close()
    b = DiskArray(tmp_path / "b.raw", (20000, 20000))  # 1.6 GB if it were not sparse
    try:
        b[0:64, 0:64] = 1
        assert (b[0:64, 0:64] == 1).all() and (b[10000:10010, 5000:5010] == 0).all()
        assert os.stat(tmp_path / "b.raw").st_blocks * 512 < 10 * 2 ** 20
    finally:
        b.close()


def test_inner_boundaries_equal_scikit_image_find_boundaries():
    from skimage.segmentation import find_boundaries

    from segrefine.stitch import inner_boundaries

    rng = np.random.default_rng(8)
    lab = np.repeat(np.repeat(rng.integers(0, 6, (30, 41)), 3, 0), 2, 1).astype(np.uint32)
    lab[rng.random(lab.shape) < 0.05] = 7
    assert (inner_boundaries(lab) == find_boundaries(lab, mode="inner")).all()


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
    want = sorted(((max(0, t.wx0 - 20), max(0, t.wy0 - 20)), (min(H, t.wy1 + 20) - max(0, t.wy0 - 20),
                                                                min(W, t.wx1 + 20) - max(0, t.wx0 - 20)))
                  for t in plan if t.in_tissue)
    assert sorted(model.seen) == want
    assert json.loads((tmp_path / "s0.json").read_text())["model_context_px"] == 20
    assert (tifffile.imread(tmp_path / "labels.tif") == tifffile.imread(plain / "labels.tif")).all()
    # the context is part of what a tile was computed from: without it the shard predicts every tile again
    stats = run_shard(tmp_path / "tiles.tsv", 0, card, slide_path, tmp_path / "tiles", tmp_path / "s0b.json",
                      model=ContextModel(20), model_context=False)
    assert stats["tiles_computed"] == stats["tiles"] and stats["model_context_px"] == 0


def test_auto_group_keeps_the_grouped_window_within_the_target_ratio():
    assert auto_group(1024, 64) == 1  # the halo alone: 1152² windows, 1.27x the core
    # Cellpose's context bound on top of the halo: 5 x 5 tiles per window, 5760² for 5120² of cores
    assert auto_group(1024, 64 + 256) == 5 and (5760 / 5120) ** 2 <= 1.3 < (4736 / 4096) ** 2
    assert auto_group(1024, 1000) == 4  # capped: no window wider than MAX_GROUP_WINDOW_PX (6144)
    assert auto_group(96, 24 + 100, max_window=10 ** 6) == 19  # 1 + 248 / (96 g) <= sqrt(1.3)


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
        assert (tifffile.imread(tmp_path / f"g{g}" / "labels.tif") ==
                tifffile.imread(tmp_path / "g1" / "labels.tif")).all()
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
            assert any(ox <= max(0, t.wx0 - 20) and oy <= max(0, t.wy0 - 20) and ox + w >= min(W, t.wx1 + 20)
                       and oy + h >= min(H, t.wy1 + 20) for (ox, oy), (h, w) in model.seen)


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
    disc = (c[:, None] ** 2 + c[None, :] ** 2) <= radius ** 2
    img = np.clip(rng.normal(12, 6, (n, n)), 0, 255)
    img[nuclei & disc] = 200
    thumb = img.reshape(n // f, f, n // f, f).mean(axis=(1, 3)).astype(np.uint8)
    mask, _ = detect_tissue(thumb, False, f)
    assert abs(mask.mean() - disc.mean()) < 0.03, (mask.mean(), disc.mean())
    rows, cols = np.nonzero(nuclei & disc)
    assert mask[rows // f, cols // f].all()
