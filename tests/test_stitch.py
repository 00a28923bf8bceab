"""The stitch (segrefine.stitch): exact outputs from the tile results (labels, cell table, outlines, overlay,
probability column and map), conflicts resolved, old tile formats, missing tiles."""

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from segrefine import SegRefineError
from segrefine.io import Slide
from segrefine.outlines import cell_outlines
from segrefine.stitch import stitch
from segrefine.tiling import read_plan, run_shard, tile_file
from tiling_helpers import LocalClassical, _check_outputs_agree_with_labels, run_all


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
        stats = run_shard(
            tmp_path / "tiles.tsv", k, card, slide_path, tmp_path / "tiles", tmp_path / f"s{k}.json", model=model
        )
        assert stats["tiles_resumed"] == 0
        done += stats["tiles_computed"]
    assert done == len(files) and all(not np.isnan(read_tile(f)[2]["prob"]).any() for f in files)


def _check_overlay_pixels(tmp, slide_path):
    """overlay.png has the pixels the previous writer (matplotlib.image.imsave of the float RGB view) wrote."""
    import matplotlib.image
    from skimage.segmentation import find_boundaries

    with tifffile.TiffFile(tmp / "labels.tif") as tif:
        levels = [lv.asarray() for lv in tif.series[0].levels]
    k = next((i for i, lv in enumerate(levels) if max(lv.shape) <= 1024), len(levels) - 1)
    lab = levels[k]
    with Slide(slide_path) as s:
        thumb, f = s.thumbnail(2**k)
    ys = np.minimum((np.arange(lab.shape[0]) * 2**k / f).astype(int), thumb.shape[0] - 1)
    xs = np.minimum((np.arange(lab.shape[1]) * 2**k / f).astype(int), thumb.shape[1] - 1)
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
        np.savez(
            f,
            labels_zlib=np.frombuffer(zlib.compress(owned.tobytes(), 1), np.uint8),
            meta=np.array(json.dumps(meta)),
            outline_ids=np.array([i for i, _ in outlines], np.uint32),
            outline_offsets=offsets,
            outline_xy=xy,
        )
    old = tmp_path / "from_old"
    stitch(
        tmp_path / "tiles.tsv",
        tmp_path / "tiles",
        [tmp_path / "s0.json"],
        slide_path,
        old / "labels.tif",
        old / "cells.csv",
        old / "cells.parquet",
        old / "cells.geojson",
    )
    assert (tifffile.imread(old / "labels.tif") == tifffile.imread(tmp_path / "labels.tif")).all()
    for name in ("cells.csv", "cells.geojson"):
        assert (old / name).read_bytes() == (tmp_path / name).read_bytes(), name
    model = WindowDependent()
    stats = run_shard(
        tmp_path / "tiles.tsv", 0, card, slide_path, tmp_path / "tiles", tmp_path / "s0.json", model=model
    )
    assert stats["tiles_resumed"] == 0 and stats["tiles_computed"] == model.calls == len(files)
    assert all(read_tile(f)[1]["format"] == TILE_FORMAT for f in files)


def test_geojson_feature_text_is_json_dumps_of_the_feature():
    from segrefine.stitch import FEATURE
    from segrefine.outlines import outline_texts

    lab = np.zeros((12, 14), np.uint32)
    lab[2:6, 3:8], lab[7:11, 1:4], lab[8, 4] = 7, 123456, 123456
    ids, texts = outline_texts(lab, origin=(1000, 2000))
    for (cid, ring), i, text in zip(cell_outlines(lab, origin=(1000, 2000)), ids, texts):
        feature = {
            "type": "Feature",
            "id": f"cell-{cid}",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "name": f"cell {cid}",
                "classification": {"name": "Nucleus", "color": [255, 0, 0]},
                "measurements": {"cell_id": cid},
            },
        }
        assert i == cid and text == json.dumps(ring)
        assert FEATURE % {"id": cid, "ring": text} == json.dumps(feature)


def test_stitch_refuses_missing_tiles_and_other_plans(slide, tmp_path):
    slide_path, _, card = slide
    run_all(tmp_path, slide_path, card, LocalClassical(), shards=1)
    plan = read_plan(tmp_path / "tiles.tsv")[0]
    victim = tile_file(tmp_path / "tiles", int(plan[plan["in_tissue"]]["tile_id"][0]))
    victim.unlink()
    with pytest.raises(SegRefineError, match="1 tile result\\(s\\) missing .*forcerun segment_shard"):
        stitch(
            tmp_path / "tiles.tsv",
            tmp_path / "tiles",
            [tmp_path / "s0.json"],
            slide_path,
            tmp_path / "l2.tif",
            tmp_path / "c2.csv",
        )
    assert not (tmp_path / "l2.tif").exists() and not (tmp_path / "c2.csv").exists()


def test_inner_boundaries_equal_scikit_image_find_boundaries():
    from skimage.segmentation import find_boundaries

    from segrefine.stitch import inner_boundaries

    rng = np.random.default_rng(8)
    lab = np.repeat(np.repeat(rng.integers(0, 6, (30, 41)), 3, 0), 2, 1).astype(np.uint32)
    lab[rng.random(lab.shape) < 0.05] = 7
    assert (inner_boundaries(lab) == find_boundaries(lab, mode="inner")).all()
