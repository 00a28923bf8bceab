"""Where to annotate next: disagreement ranking on a constructed case, the QuPath GeoJSON, and the
two steps by CLI with the classical model on a small synthetic slide."""

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import run_step
from segrefine import SegRefineError
from segrefine.annotate_next import agreement_f1, regions_geojson, score_candidates
from segrefine.patches import parse_patch_name


def _discs(centers, shape=(64, 64), r=5):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.uint32)
    for k, (cy, cx) in enumerate(centers, 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return lab


def test_the_patch_where_predictions_disagree_ranks_first():
    cells = [(12, 12), (12, 40), (40, 12), (40, 40), (26, 52)]
    same, empty = _discs(cells), np.zeros((64, 64), np.uint32)
    half = _discs(cells[:2])  # the second model finds 2 of 5 cells: F1 = 2 * 2 / (5 + 2)
    a = {"S-x0_y0_w64_h64": same, "S-x64_y0_w64_h64": same, "S-x128_y0_w64_h64": same, "S-x192_y0_w64_h64": empty}
    b = {"S-x0_y0_w64_h64": same, "S-x64_y0_w64_h64": half, "S-x128_y0_w64_h64": empty, "S-x192_y0_w64_h64": empty}
    assert agreement_f1(same, half) == pytest.approx(4 / 7)
    assert agreement_f1(empty, empty) == 1.0 and agreement_f1(same, empty) == 0.0
    table = score_candidates({"m/pretrained": a, "m/finetuned": b}, complexity_weight=0.25)
    assert list(table["patch"]) == ["S-x128_y0_w64_h64", "S-x64_y0_w64_h64", "S-x0_y0_w64_h64", "S-x192_y0_w64_h64"]
    assert list(table["rank"]) == [1, 2, 3, 4]
    d = table.set_index("patch")["disagreement"]
    assert d["S-x128_y0_w64_h64"] == 1.0 and d["S-x64_y0_w64_h64"] == pytest.approx(3 / 7)
    assert d["S-x0_y0_w64_h64"] == 0.0 and d["S-x192_y0_w64_h64"] == 0.0
    # with complexity alone, the same-disagreement patches order by complexity; the empty one is last
    only = score_candidates({"m/pretrained": a, "m/finetuned": b}, complexity_weight=1.0)
    assert only["patch"].iloc[-1] == "S-x192_y0_w64_h64"
    with pytest.raises(SegRefineError, match="at least two predictions"):
        score_candidates({"m/pretrained": a})
    with pytest.raises(SegRefineError, match="different candidate patches"):
        score_candidates({"x": a, "y": {"S-x0_y0_w64_h64": same}})


def test_regions_geojson_names_rectangles_in_slide_pixels():
    doc = json.loads(json.dumps(regions_geojson(["SN1-x512_y256_w128_h64"], [0.5])))
    (f,) = doc["features"]
    assert doc["type"] == "FeatureCollection" and f["geometry"]["type"] == "Polygon"
    assert f["properties"]["objectType"] == "annotation" and f["properties"]["name"] == "SN1-x512_y256_w128_h64"
    assert f["geometry"]["coordinates"] == [[[512, 256], [640, 256], [640, 320], [512, 320], [512, 256]]]
    assert f["properties"]["measurements"] == {"rank": 1, "score": 0.5}


@pytest.mark.integration
def test_annotate_next_steps_by_cli(tmp_path):
    d = tmp_path
    run_step(
        "core", "demo-data", "--out", d / "demo", "--sn", "TN01", "--size", 384, "--patches", 2, "--patch-size", 96
    )
    slide = tifffile.imread(d / "demo" / "TN01.tif")
    slide[192:, 192:] = slide.min()  # a blank quadrant: background, never a candidate
    tifffile.imwrite(d / "slide.tif", slide)
    annotated = "TN01-x0_y0_w96_h96"
    run_step(
        "core", "pretrained-card", "--framework", "classical", "--name", "a", "--source", "none", "--out-dir", d / "a"
    )
    run_step(
        "core",
        "pretrained-card",
        "--framework",
        "classical",
        "--name",
        "b",
        "--source",
        "none",
        "--params",
        json.dumps({"threshold_scale": 1.6, "sigma": 2.0}),
        "--out-dir",
        d / "b",
    )
    for m in "ab":
        run_step(
            "core",
            "annotate-next-predict",
            "--card",
            d / m / "card.json",
            "--slide",
            d / "slide.tif",
            "--sn",
            "TN01",
            "--size",
            96,
            "--step",
            48,
            "--annotated",
            annotated,
            "--out",
            d / f"{m}.npz",
        )
    proc = run_step(
        "core",
        "annotate-next",
        "--slide",
        d / "slide.tif",
        "--sn",
        "TN01",
        "--predictions",
        d / "a.npz",
        d / "b.npz",
        "--names",
        "a/pretrained",
        "b/pretrained",
        "--top-n",
        3,
        "--out",
        d / "ranking.csv",
        "--geojson",
        d / "next.geojson",
        "--out-dir",
        d / "patches",
    )
    table = pd.read_csv(d / "ranking.csv")
    boxes = [parse_patch_name(p) for p in table["patch"]]
    assert boxes and all(b.sn == "TN01" and b.w == b.h == 96 for b in boxes)
    assert all(b.x >= 96 or b.y >= 96 for b in boxes)  # nothing overlapping the annotated patch
    assert not any(b.x >= 192 and b.y >= 192 for b in boxes)  # nothing wholly in the blank quadrant
    assert table["score"].is_monotonic_decreasing and list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["disagreement"].max() > 0  # the two calibrations do disagree somewhere
    doc = json.loads((d / "next.geojson").read_text())
    names = [f["properties"]["name"] for f in doc["features"]]
    assert names == list(table["patch"][:3])
    for name in names:
        b = parse_patch_name(name)
        img = tifffile.imread(d / "patches" / f"{name}-img.tif")
        assert np.array_equal(img, slide[b.y : b.y + b.h, b.x : b.x + b.w])
    assert sorted(p.name for p in (d / "patches").iterdir()) == sorted(f"{n}-img.tif" for n in names)
    assert names[0] in proc.stdout

    bad = run_step(
        "core",
        "annotate-next",
        "--slide",
        d / "slide.tif",
        "--sn",
        "TN01",
        "--predictions",
        d / "a.npz",
        d / "nothere.npz",
        "--names",
        "a",
        "b",
        "--out",
        d / "x.csv",
        "--geojson",
        d / "x.geojson",
        "--out-dir",
        d / "x",
        check=False,
    )
    assert bad.returncode != 0 and "nothere.npz: candidate predictions not found" in bad.stderr
