"""Bad inputs, one row each: the input (tiny, seeded, written by the row), the step that reads it, and the message it
must produce, or the correct result it must give. The next kind of bad input is one more row.

Each row: (id, make(tmp_path) -> zero-argument callable that runs a segrefine step on the input, expected), where
expected is a regular expression the ``SegRefineError`` must match (it must also name the input file, which is
checked for every error row), or a function checking the step's result.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import tifffile

from segrefine import SegRefineError
from segrefine.annotations import convert_annotation
from segrefine.cli import main as cli_main
from segrefine.intensity import intensity_reference
from segrefine.io import Slide
from segrefine.tiling import make_plan

RNG_SEED = 14


# --- inputs -------------------------------------------------------------------------------------------------------
def blobs(shape=(96, 128), n=12, seed=RNG_SEED, radius=(4, 7)):
    """(uint8 intensity image of n bright discs on a dark noisy background, their instance labels)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.uint16)
    yy, xx = np.mgrid[:h, :w]
    k = 0
    for _ in range(200):
        r = int(rng.integers(*radius))
        cy, cx = int(rng.integers(r + 1, h - r - 1)), int(rng.integers(r + 1, w - r - 1))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2) ** 2
        if labels[grown].any():
            continue  # keep the cells apart: each is one 4-connected component of the foreground
        k += 1
        labels[disc] = k
        if k == n:
            break
    img = (rng.normal(20, 4, shape) + 160 * (labels > 0)).clip(0, 255).astype(np.uint8)
    return img, labels


def gray_slide(tmp_path, name="slide.tif", dtype=np.uint8, **kw):
    img = blobs()[0].astype(dtype)
    path = tmp_path / name
    tifffile.imwrite(path, img, **kw)
    return path


def stacked(axes, n):
    img = blobs()[0]
    return np.stack([np.roll(img, 3 * i, axis=1) for i in range(n)]), axes


def write_stack(tmp_path, name, axes, n, ome=False):
    arr, axes = stacked(axes, n)
    path = tmp_path / name
    tifffile.imwrite(path, arr, metadata={"axes": axes}, ome=ome, photometric="minisblack")
    return path


def forged_size(tmp_path, **kw):
    """A small TIFF whose header claims 1e6 x 1e6 px."""
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, blobs()[0][:64, :64], **kw)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(1_000_000)
        tif.pages[0].tags["ImageLength"].overwrite(1_000_000)
    return path


def float_slide_with_nan(tmp_path):
    img = blobs()[0].astype(np.float32)
    img[40, 70] = np.nan
    img[5, 6] = np.inf
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, img)
    return path


def rgb_and_rgba(tmp_path):
    """The same RGB slide twice: plain, and with an alpha channel whose values are unrelated to the image."""
    img, _ = blobs((160, 192), n=30)
    rgb = np.stack([img, (img * 0.8).astype(np.uint8), (img * 0.5).astype(np.uint8)], axis=-1)
    alpha = np.random.default_rng(RNG_SEED).integers(0, 256, img.shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", tile=(64, 64))
    tifffile.imwrite(
        tmp_path / "rgba.tif", np.dstack([rgb, alpha]), photometric="rgb", extrasamples=["unassalpha"], tile=(64, 64)
    )
    return tmp_path / "rgb.tif", tmp_path / "rgba.tif"


def mask_file(tmp_path, mask, name="S-x0_y0_w128_h96-mask.tif", **kw):
    path = tmp_path / name
    tifffile.imwrite(path, mask, **kw)
    return path


def anti_aliased(tmp_path):
    """A binary mask 0/255 whose cell edges are 128 (anti-aliased): 12 cells, not 2."""
    _, labels = blobs()
    from scipy import ndimage

    fg = labels > 0
    edge = fg & ~ndimage.binary_erosion(fg)
    mask = np.where(edge, 128, np.where(fg, 255, 0)).astype(np.uint8)
    return mask_file(tmp_path, mask)


def classes(tmp_path):
    """A semantic mask: class 1 = cell interior, class 2 = its rim (0 background): 12 cells, not 2."""
    _, labels = blobs()
    from scipy import ndimage

    fg = labels > 0
    rim = fg & ~ndimage.binary_erosion(fg, iterations=2)
    return mask_file(tmp_path, np.where(rim, 2, np.where(fg, 1, 0)).astype(np.uint8))


def ambiguous_mask(tmp_path):
    """12 labels of which 8 come in two pieces (20 pieces, 1.67 per value): neither one piece per label nor a few
    values in many pieces."""
    _, labels = blobs()
    mask = labels.astype(np.uint16)
    for lab in range(1, 9):  # each of these labels reappears as a second spot in an empty corner
        assert not labels[94:96, 8 * lab : 8 * lab + 3].any()
        mask[94:96, 8 * lab : 8 * lab + 3] = lab
    return mask_file(tmp_path, mask)


def geojson(tmp_path, features, name="S-x0_y0_w128_h96.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def polygon(coords, cls="Nucleus", otype="annotation", fid=None):
    feat = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [coords]},
        "properties": {"objectType": otype},
    }
    if cls:
        feat["properties"]["classification"] = {"name": cls}
    if fid:
        feat["id"] = fid
    return feat


SQUARE = [[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]
BOWTIE = [[40, 40], [60, 60], [60, 40], [40, 60], [40, 40]]  # self-intersecting at (50, 50): two triangles
# one object as QuPath may write it: a point, the bowtie (180 px) and a 10x10 square, one cell of 280 px
COLLECTION = {
    "type": "Feature",
    "properties": {"objectType": "annotation"},
    "geometry": {
        "type": "GeometryCollection",
        "geometries": [
            {"type": "Point", "coordinates": [5, 5]},
            {"type": "Polygon", "coordinates": [BOWTIE]},
            {"type": "Polygon", "coordinates": [[[70, 10], [80, 10], [80, 20], [70, 20], [70, 10]]]},
        ],
    },
}


# --- steps ----------------------------------------------------------------------------------------------------------
def open_slide(path, **kw):
    def run():
        with Slide(path, **kw) as s:
            return s.read(0, 0, *s.shape[::-1])

    return run


def tile_plan(path):
    return lambda: make_plan(path, 64, 8)


def patches(path, tmp_path):
    """`segrefine patches` as the command line runs it: its one printed error line becomes the error (nothing may
    be left in its output folder)."""

    def run():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli_main(
                ["patches", "--slide", str(path), "--out-dir", str(tmp_path / "out"), "--grid", "32", "32", "--sn", "S"]
            )
        if rc:
            assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("segrefine patches: error: ")]
            assert len(lines) == 1, err.getvalue()
            raise SegRefineError(lines[0])
        return rc

    return run


def convert(path, shape=(96, 128)):
    return lambda: convert_annotation(path, shape)


# --- checks of correct results --------------------------------------------------------------------------------------
def cells(n):
    def check(labels):
        ids = np.unique(labels[labels > 0])
        assert int(labels.max()) == n == len(ids), f"{labels.max()} cells, not {n}"

    return check


def bowtie_kept_whole(labels):
    # one cell covering both triangles (x 40..50 and 50..60: 90 pixel centres each), not one lobe (half of it)
    assert int(labels.max()) == 2
    ys, xs = np.nonzero(labels == 2)
    assert (xs < 50).sum() == (xs >= 50).sum() == 90, ((xs < 50).sum(), (xs >= 50).sum())


def rgba_equals_rgb(tmp_path):
    from segrefine.models.classical_adapter import ClassicalAdapter
    from segrefine.segment import segment_whole

    rgb, rgba = rgb_and_rgba(tmp_path)

    def run():
        out = {}
        for name, path in (("rgb", rgb), ("rgba", rgba)):
            with Slide(path) as s:
                out[name] = (
                    s.channels,
                    s.read(10, 20, 50, 40),
                    intensity_reference(s),
                    segment_whole(None, path, model=ClassicalAdapter({})),
                    s.thumbnail(4)[0],
                )
        return out

    return run


def same_as_rgb(out):
    (c1, r1, ref1, cells1, th1), (c2, r2, ref2, cells2, th2) = out["rgb"], out["rgba"]
    assert c1 == c2 == 3
    np.testing.assert_array_equal(r1, r2)
    assert ref1 == ref2
    assert int(cells1.max()) >= 25
    np.testing.assert_array_equal(cells1, cells2)
    np.testing.assert_array_equal(th1, th2)


def tiled_segment(tmp_path):
    """The tiled path (`segrefine segment`: plan, shards, stitch) on the RGBA slide and its RGB version, and on a
    2-channel slide (channel 1) and that channel as a gray slide: labels.tif of each."""
    rgb, rgba = rgb_and_rgba(tmp_path)
    mif = write_stack(tmp_path, "mif.tif", "CYX", 2)
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, stacked("CYX", 2)[0][1])

    def run():
        assert (
            cli_main(
                [
                    "pretrained-card",
                    "--framework",
                    "classical",
                    "--name",
                    "b",
                    "--source",
                    "none",
                    "--out-dir",
                    str(tmp_path / "card"),
                ]
            )
            == 0
        )
        out = {}
        for name, path, extra in (
            ("rgb", rgb, []),
            ("rgba", rgba, []),
            ("gray", gray, []),
            ("mif", mif, ["--channel", "1"]),
        ):
            assert (
                cli_main(
                    [
                        "segment",
                        "--card",
                        str(tmp_path / "card" / "card.json"),
                        "--slide",
                        str(path),
                        "--out-dir",
                        str(tmp_path / name),
                        "--no-tissue",
                        "--tile-size",
                        "64",
                        *extra,
                    ]
                )
                == 0
            )
            out[name] = tifffile.imread(tmp_path / name / "labels.tif")
        return out

    return run


def same_tiled_labels(out):
    assert int(out["rgb"].max()) >= 25 and int(out["gray"].max()) >= 10
    np.testing.assert_array_equal(out["rgba"], out["rgb"])
    np.testing.assert_array_equal(out["mif"], out["gray"])


def channel_through_the_plan(tmp_path):
    """A 2-channel slide with channel 1 chosen, through tile-plan and the whole-image path: the same reference
    and cells as the grayscale slide of that channel; the plan records the channel for the shards and the stitch."""
    from segrefine.models.classical_adapter import ClassicalAdapter
    from segrefine.segment import segment_whole

    mif = write_stack(tmp_path, "mif.ome.tif", "CYX", 2, ome=True)
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, stacked("CYX", 2)[0][1])

    def run():
        plans = [make_plan(mif, 64, 8, tissue=False, channel=1)[1], make_plan(gray, 64, 8, tissue=False)[1]]
        cells = [
            segment_whole(None, mif, model=ClassicalAdapter({}), channel=1),
            segment_whole(None, gray, model=ClassicalAdapter({})),
        ]
        return plans, cells

    return run


def same_as_gray(out):
    (plan_mif, plan_gray), (cells_mif, cells_gray) = out
    assert plan_mif["channel"] == 1 and plan_gray["channel"] is None
    assert plan_mif["slide_description"]["file_channels"] == 2 and plan_mif["slide_description"]["channels"] == 1
    assert plan_mif["intensity_reference"] == plan_gray["intensity_reference"]
    assert plan_mif["plan_id"] != plan_gray["plan_id"]
    assert int(cells_gray.max()) >= 10
    np.testing.assert_array_equal(cells_mif, cells_gray)


def gray_alpha(tmp_path):
    img = blobs()[0]
    tifffile.imwrite(
        tmp_path / "ga.tif", np.dstack([img, 255 - img]), photometric="minisblack", extrasamples=["unassalpha"]
    )
    return lambda: (open_slide(tmp_path / "ga.tif")(), img)


def chosen_channel(region):
    arr, _ = stacked("CYX", 2)
    np.testing.assert_array_equal(region, arr[1])


def shifted_matrix(tmp_path, shift=(40, -35), size=320, n_cells=150, radius=6, seed=RNG_SEED, no_cells=False):
    """Round cells, and a matrix of UMIs around their centres (90 %) or anywhere, its coordinates moved by ``shift``
    but every record still inside the label image: the alignment check that ``segrefine cgef`` runs
    (``expression.alignment_report``: ``sample_windows`` with its defaults, then ``shift_scan``)."""
    from segrefine.frame_check import describe, sample_windows, shift_scan

    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.uint32)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.integers(radius + 50, size - radius - 50, (n_cells, 2))
    for k, (cy, cx) in enumerate(centres):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k + 1
    n = 12000
    pick = centres[rng.integers(0, n_cells, n)]
    y = np.round(pick[:, 0] + rng.normal(0, radius / 2, n)).astype(np.int64) + shift[1]
    x = np.round(pick[:, 1] + rng.normal(0, radius / 2, n)).astype(np.int64) + shift[0]
    bg = rng.random(n) < 0.1
    y[bg], x[bg] = rng.integers(0, size, bg.sum()), rng.integers(0, size, bg.sum())
    keep = (x >= 0) & (x < size) & (y >= 0) & (y < size)
    if no_cells:  # a model that found no cell: the matrix cannot be judged
        lab[:] = 0
    x, y, c = x[keep], y[keep], np.ones(keep.sum(), np.int64)

    def records_in_rows(a, b):
        sel = (y >= a) & (y < b)
        return x[sel], y[sel], c[sel]

    def run():
        scan = shift_scan(sample_windows(records_in_rows, lambda a, b: lab[a:b], (int(y.min()), int(y.max())), size))
        return scan, describe(scan, "chip.gem.gz", "labels.tif", (0, 0))

    return run


def not_judged(out):
    scan, message = out
    assert not scan["checked"] and not scan["misaligned"] and scan["fraction_in_cells"] == 0, scan
    assert message == "chip.gem.gz: alignment not checked: no cell of labels.tif in the sampled bands", message


def found_shift(dx, dy):
    def check(out):
        scan, message = out
        assert scan["checked"] and scan["best_shift"] == [dx, dy], scan
        if (dx, dy) == (0, 0):
            assert not scan["misaligned"] and scan["fraction_in_cells"] > 0.7 and "frame looks right" in message
        else:
            assert scan["misaligned"]
            assert scan["fraction_in_cells"] < 0.3 < 0.7 < scan["fraction_in_cells_at_best_shift"], scan
            assert re.search(
                r"chip\.gem\.gz: only .* would if the matrix were shifted by "
                + re.escape(f"({dx:+d}, {dy:+d}) px")
                + f".*set expression\\.origin to '{-dx},{-dy}'",
                message,
            ), message

    return check


ROWS = [
    # slides
    ("rgba slide = its rgb version", rgba_equals_rgb, same_as_rgb),
    ("rgba and 2-channel slides through the tiled segment", tiled_segment, same_tiled_labels),
    (
        "z stack",
        lambda t: open_slide(write_stack(t, "z.tif", "ZYX", 3)),
        r"z\.tif: the slide holds more than one image: axes ZYX .*3 focal planes",
    ),
    (
        "z stack ome",
        lambda t: open_slide(write_stack(t, "z.ome.tif", "ZYX", 3, ome=True)),
        r"z\.ome\.tif: .*axes ZYX .*3 focal planes",
    ),
    (
        "time series",
        lambda t: open_slide(write_stack(t, "t.ome.tif", "TYX", 2, ome=True)),
        r"t\.ome\.tif: .*2 time points",
    ),
    (
        "pages of unknown meaning",
        lambda t: open_slide(write_stack(t, "q.tif", "QYX", 4)),
        r"q\.tif: .*4 separate images",
    ),
    (
        "2-channel mIF slide in tile-plan",
        lambda t: tile_plan(write_stack(t, "mif.ome.tif", "CYX", 2, ome=True)),
        r"mif\.ome\.tif: 2 channels \(axes CYX.*choose the channel to segment \(0\.\.1\) with the sample sheet's "
        r"'channel' column",
    ),
    (
        "2-channel mIF slide in patches",
        lambda t: patches(write_stack(t, "mif2.tif", "CYX", 2), t),
        r"^segrefine patches: error: \S*mif2\.tif: 2 channels \(axes CYX.*choose the channel to segment \(0\.\.1\)",
    ),
    (
        "z stack in patches",
        lambda t: patches(write_stack(t, "z.tif", "ZYX", 3), t),
        r"^segrefine patches: error: \S*z\.tif: the slide holds more than one image: axes ZYX .*3 focal planes",
    ),
    (
        "5-channel fluorescence",
        lambda t: open_slide(write_stack(t, "five.ome.tif", "CYX", 5, ome=True)),
        r"five\.ome\.tif: 5 channels .*\(0\.\.4\)",
    ),
    (
        "2-channel mIF slide, channel chosen",
        lambda t: open_slide(write_stack(t, "mif.tif", "CYX", 2), channel=1),
        chosen_channel,
    ),
    ("2-channel mIF slide, channel chosen, tile-plan and cells", channel_through_the_plan, same_as_gray),
    ("gray slide with alpha = the gray slide", gray_alpha, lambda out: np.testing.assert_array_equal(*out)),
    (
        "channel that does not exist",
        lambda t: open_slide(write_stack(t, "mif.tif", "CYX", 2), channel=2),
        r"mif\.tif: channel 2 does not exist: the slide has 2 channel",
    ),
    (
        "float slide with NaN",
        lambda t: open_slide(float_slide_with_nan(t)),
        r"float\.tif: 2 NaN or infinite pixel value\(s\) in the region x=0 y=0 w=128 h=96 \(the first at x=6 y=5\)",
    ),
    (
        "float slide with NaN in tile-plan",
        lambda t: tile_plan(float_slide_with_nan(t)),
        r"float\.tif: 2 NaN or infinite",
    ),
    (
        "float slide with NaN in patches",
        lambda t: patches(float_slide_with_nan(t), t),
        r"^segrefine patches: error: \S*float\.tif: 1 NaN or infinite pixel value\(s\) in the region x=0 y=0 w=32 "
        r"h=32 \(the first at x=6 y=5\)",
    ),
    (
        "header claims 1e6 px, strips",
        lambda t: tile_plan(forged_size(t, rowsperstrip=8)),
        r"huge\.tif: corrupt TIFF header: level 0 claims \(1000000, 1000000\).*needs 125000 strips/tiles, but the "
        r"file lists 8",
    ),
    (
        "header claims 1e6 px, tiles",
        lambda t: open_slide(forged_size(t, tile=(16, 16), compression="zlib")),
        r"huge\.tif: corrupt TIFF header: level 0 claims \(1000000, 1000000\)",
    ),
    ("header claims 1e6 px, one strip", lambda t: open_slide(forged_size(t)), r"huge\.tif: corrupt TIFF header"),
    (
        "header claims 1e6 px, in patches",
        lambda t: patches(forged_size(t, rowsperstrip=8), t),
        r"^segrefine patches: error: \S*huge\.tif: corrupt TIFF header: level 0 claims \(1000000, 1000000\)",
    ),
    ("truncated slide", lambda t: open_slide(truncated(t)), r"cut\.tif: truncated or corrupt TIFF"),
    # masks
    ("anti-aliased binary mask 0/128/255", lambda t: convert(anti_aliased(t)), cells(12)),
    ("semantic mask classes 0/1/2", lambda t: convert(classes(t)), cells(12)),
    ("instance mask", lambda t: convert(mask_file(t, blobs()[1])), cells(12)),
    ("instance mask, 2 cells", lambda t: convert(mask_file(t, np.where(blobs()[1] <= 2, blobs()[1], 0))), cells(2)),
    ("instance mask with a leading axis of 1", lambda t: convert(mask_file(t, blobs()[1][None])), cells(12)),
    (
        "stack of 3 masks",
        lambda t: convert(mask_file(t, np.stack([blobs()[1]] * 3), photometric="minisblack")),
        r"-mask\.tif: a mask must be one 2-D image \(or gray RGB\), got an array of shape \(3, 96, 128\) \(a stack "
        r"of 3 images\?\)",
    ),
    (
        "ambiguous mask",
        lambda t: convert(ambiguous_mask(t)),
        r"S-x0_y0_w128_h96-mask\.tif: cannot tell whether this is an instance mask or a semantic mask",
    ),
    (
        "class mask: one region covers most of the patch",
        lambda t: convert(mask_file(t, np.where(np.arange(128)[None, :] < 100, 1, 2) * np.ones((96, 1), np.uint8))),
        r"-mask\.tif: read as an instance mask .* "
        r"one cell covers 78% of the 128x96 px patch: a class or tissue region, not a cell",
    ),
    # GeoJSON
    ("self-intersecting polygon", lambda t: convert(geojson(t, [polygon(SQUARE), polygon(BOWTIE)])), bowtie_kept_whole),
    (
        "NaN coordinate",
        lambda t: convert(
            geojson(
                t,
                [
                    polygon(SQUARE),
                    polygon(  # json writes NaN, QuPath may too
                        [[40, 40], [float("nan"), 60], [60, 40], [40, 40]], fid="c7"
                    ),
                ],
            )
        ),
        r"S-x0_y0_w128_h96\.geojson: feature 1 \(id 'c7'\) has an invalid coordinate nan",
    ),
    (
        "Infinity coordinate",
        lambda t: convert(geojson(t, [polygon([[40, 40], [float("inf"), 60], [60, 40], [40, 40]])])),
        r"\.geojson: feature 0 has an invalid coordinate inf",
    ),
    (
        "NaN coordinate as a string",
        lambda t: convert(geojson(t, [polygon([[40, 40], ["NaN", 60], [60, 40], [40, 40]])])),
        r"\.geojson: feature 0 has an invalid coordinate 'NaN'",
    ),
    (
        "feature that is not an object",
        lambda t: convert(geojson(t, [polygon(SQUARE), [1, 2, 3]])),
        r"\.geojson: feature 1 is not a GeoJSON object but list \[1, 2, 3\]",
    ),
    (
        "geometry that is not an object",
        lambda t: convert(geojson(t, [{"type": "Feature", "geometry": "Polygon"}])),
        r"\.geojson: feature 0: 'geometry' is not an object but str",
    ),
    (
        "GeometryCollection: its polygons kept, not dropped",
        lambda t: convert(geojson(t, [polygon(SQUARE), COLLECTION])),
        lambda labels: (cells(2)(labels), np.testing.assert_array_equal(np.bincount(labels.ravel())[1:], [400, 280])),
    ),
    (
        "GeometryCollection without a list",
        lambda t: convert(
            geojson(t, [{"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": "Polygon"}}])
        ),
        r"\.geojson: feature 0: a GeometryCollection's 'geometries' must be a list, got str",
    ),
    (
        "unclassified whole-patch rectangle = region of interest",
        lambda t: convert(
            geojson(t, [polygon([[0, 0], [128, 0], [128, 96], [0, 96], [0, 0]], cls=None), polygon(SQUARE)])
        ),
        cells(1),
    ),
    (
        "only a region of interest",
        lambda t: convert(geojson(t, [polygon([[0, 0], [127, 0], [127, 95], [0, 95], [0, 0]], cls=None)])),
        r"\.geojson: no cell polygons found .*region-of-interest rectangle",
    ),
    (
        "classified rectangle over the patch",
        lambda t: convert(
            geojson(t, [polygon(SQUARE), polygon([[0, 0], [128, 0], [128, 96], [0, 96], [0, 0]], cls="Tissue")])
        ),
        r"\.geojson: feature 1 \(annotation, class 'Tissue'\) covers 100% of the 128x96 px patch: a region, not a "
        r"cell; delete it or give it a class in annotations.exclude_classes \(now \['Region'\]\)",
    ),
    (
        "unclassified detection rectangle over the patch",
        lambda t: convert(
            geojson(
                t,
                [
                    polygon([[-1, -1], [129, -1], [129, 97], [-1, 97], [-1, -1]], cls=None, otype="detection"),
                    polygon(SQUARE),
                ],
            )
        ),
        r"\.geojson: feature 0 \(detection, no class\) covers 100% of the 128x96 px patch: a region, not a cell",
    ),
    (
        "unclassified outline over most of the patch",
        lambda t: convert(
            geojson(t, [polygon(SQUARE), polygon([[0, 0], [120, 0], [100, 90], [0, 90], [0, 0]], cls=None, fid="r1")])
        ),
        r"\.geojson: feature 1 \(id 'r1', annotation, no class\) covers \d+% of the 128x96 px patch",
    ),
    (
        "big cell, under half the patch",
        lambda t: convert(geojson(t, [polygon([[0, 0], [64, 0], [64, 90], [0, 90], [0, 0]])])),
        cells(1),
    ),
    # expression
    ("GEM shifted by tens of px, still inside the image", shifted_matrix, found_shift(-40, 35)),
    ("GEM in the image's frame", lambda t: shifted_matrix(t, (0, 0)), found_shift(0, 0)),
    (
        "GEM over a slide without cells: not called aligned",
        lambda t: shifted_matrix(t, (0, 0), no_cells=True),
        not_judged,
    ),
]


def truncated(tmp_path):
    path = tmp_path / "full.tif"
    tifffile.imwrite(path, blobs()[0], tile=(32, 32), compression="zlib")
    data = path.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.tif"


@pytest.mark.parametrize("make, expected", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(make, expected, tmp_path):
    run = make(tmp_path)
    if callable(expected):
        expected(run())
        return
    with pytest.raises(SegRefineError) as err:
        run()
    message = str(err.value)
    assert re.search(expected, message), message
    assert re.search(r"[\w.-]+\.(tiff?|geojson)\b", message), f"names no input file: {message}"
    assert "Traceback" not in message


def test_a_rerun_of_h5ad_removes_stereopys_folders_of_killed_runs(tmp_path):
    """A killed `h5ad --writer stereopy` leaves tmp<random>/stereopy.h5ad beside its output; the next run removes
    such folders (and empty ones of that name), nothing else."""
    from segrefine.expression import remove_stereopy_leftovers

    for name, files in [
        ("tmpk1ll3d_x", ["stereopy.h5ad"]),
        ("tmpab12cd34", []),
        ("tmpab12cd35", ["notes.txt"]),
        ("tmp_mine", ["stereopy.h5ad"]),
        ("data", ["stereopy.h5ad"]),
    ]:
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"x" * 64)
    (tmp_path / "tmpzz99yy88").write_text("a file, not a folder")
    remove_stereopy_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tmp_mine", "tmpab12cd35", "tmpzz99yy88"]
