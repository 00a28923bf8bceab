"""The slide-level intensity reference (segrefine.intensity): exact histogram percentiles, the tissue pixels' reference,
and tiled classical inference equal to whole-image inference with it."""

import json

import numpy as np
import pytest
import tifffile

from segrefine import SegRefineError
from segrefine.demo import make_slide
from segrefine.io import Slide, write_tiff
from segrefine.metrics import object_metrics
from segrefine.stitch import seam_report
from segrefine.tiling import make_plan, read_plan
from tiling_helpers import run_all


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

    _, meta, rep = run_all(
        tmp_path, slide_path, card, ClassicalAdapter({"invert": invert}), tile=tile, halo=halo, shards=2, tissue=False
    )
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
    windows = [img[t.wy0 : t.wy1, t.wx0 : t.wx1] for t in plan]
    assert any((per_window.predict(w) > 0).sum() != (slide_level.predict(w) > 0).sum() for w in windows)


@pytest.mark.parametrize(
    "name,tile,halo,invert", [("mIF", 96, 24, False), ("DAPI", 96, 24, False), ("HE", 96, 40, True)]
)
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
        refs = [
            intensity_reference(img, block=64, tissue=(mask, f)),
            intensity_reference(s, block=128, tissue=(mask, f)),
        ]
    for ref in refs:
        assert ref["pixels"] == "tissue" and ref["n_pixels"] == int(want.sum())
        for q in PERCENTILES:
            assert abs(percentile(ref, q, 0) - np.percentile(img[want], q)) <= 1e-9, q
    assert refs[0] == refs[1]
    everything = intensity_reference(img)
    assert everything["pixels"] == "all" and everything["gray"]["otsu"] < refs[0]["gray"]["otsu"]
    assert intensity_reference(img, tissue=(np.zeros_like(mask), f)) == everything


@pytest.mark.integration
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
    outside[720 - 32 : 816 + 32, 720 - 32 : 816 + 32] = False
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
