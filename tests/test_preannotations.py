"""Pre-annotations: QuPath's object format (checked against its serialisation), stable ids, the model's
measurements, and the intake taking the file back as it is; QuPath-written files read back."""

import json
import logging
import math
import re
import uuid

import numpy as np
import pytest

from segrefine import SegRefineError
from segrefine.annotations import convert_annotation, dump_geojson, read_cell_objects, read_measurements
from segrefine.preannotations import (
    MEASUREMENTS,
    cell_measurements,
    cell_uuid,
    patches_to_preannotate,
    preannotation_geojson,
)

PATCH = "S1-x256_y512_w64_h48"
SHA = "ab" * 32


def _labels():
    lab = np.zeros((48, 64), np.uint32)
    lab[4:14, 4:16] = 1
    lab[4:14, 16:30] = 2  # touches cell 1
    lab[25:45, 10:40] = 3
    lab[30:35, 20:25] = 0  # a hole
    lab[38:48, 50:64] = 4  # at the patch border
    return lab


class Model:
    """A model with a per-pixel probability: cells 1, 2 sure (0.95), cell 3 unsure (0.55), cell 4 none (0.5)."""

    def __init__(self, labels):
        self.labels = labels

    def predict(self, image):
        return self.labels.copy()

    def predict_with_probability(self, image):
        p = np.full(self.labels.shape, 0.1, np.float32)
        p[np.isin(self.labels, [1, 2])] = 0.95
        p[self.labels == 3] = 0.55
        p[self.labels == 4] = 0.5
        return self.labels.copy(), p


def test_measurements_come_from_the_model_and_the_pretrained_stage():
    lab = _labels()
    pretrained = np.zeros_like(lab)
    pretrained[lab == 1] = 7  # the same cell
    pretrained[4:14, 16:23] = 8  # half of cell 2
    labels, m = cell_measurements(Model(lab), np.zeros(lab.shape, np.float32), pretrained, tta=0)
    np.testing.assert_array_equal(labels, lab)
    assert sorted(m) == [1, 2, 3, 4] and all(set(v) == set(MEASUREMENTS) for v in m.values())
    assert m[1]["probability"] == pytest.approx(0.95) and m[3]["probability"] == pytest.approx(0.55)
    assert m[1]["other_iou"] == 1.0 and m[2]["other_iou"] == pytest.approx(0.5) and m[3]["other_iou"] == 0.0
    assert m[3]["area_px"] == 20 * 30 - 25 and math.isnan(m[1]["tta_agreement"])
    assert m[1]["uncertainty"] < m[2]["uncertainty"] < m[3]["uncertainty"]  # sure and agreeing cells first


def _doc(measure=True):
    lab = _labels()
    m = cell_measurements(Model(lab), np.zeros(lab.shape, np.float32), None, tta=0)[1] if measure else None
    return lab, json.loads(dump_geojson(preannotation_geojson(PATCH, lab, SHA, m, {"model": "m"})))


def test_preannotation_is_a_qupath_feature_collection_of_annotation_objects():
    lab, doc = _doc()
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 4
    assert doc["segrefine"]["patch"] == PATCH and doc["segrefine"]["card_sha256"] == SHA
    for k, f in enumerate(doc["features"], 1):
        # QuPath 0.4+ (QuPathTypeAdapters.PathObjectTypeAdapter.write): type, id (UUID), geometry, properties
        assert list(f) == ["type", "id", "geometry", "properties"] and f["type"] == "Feature"
        assert str(uuid.UUID(f["id"])) == f["id"] == cell_uuid(PATCH, k, SHA)
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        p = f["properties"]
        assert list(p) == ["objectType", "classification", "measurements"]  # QuPath's order of these keys
        assert p["objectType"] == "annotation"
        assert p["classification"]["name"] == "Cell" and len(p["classification"]["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in p["classification"]["color"])
        # MeasurementListTypeAdapter.write: a {name: number} object, NaN as the string "NaN"
        assert isinstance(p["measurements"], dict) and set(p["measurements"]) == set(MEASUREMENTS)
        assert p["measurements"]["tta_agreement"] == "NaN" and isinstance(p["measurements"]["area_px"], (int, float))
    # the ids are stable: the same model on the same patch gives the same ids; another model other ids
    assert [f["id"] for f in _doc()[1]["features"]] == [f["id"] for f in doc["features"]]
    other = preannotation_geojson(PATCH, lab, "cd" * 32)
    assert not {f["id"] for f in other["features"]} & {f["id"] for f in doc["features"]}
    # JSON without NaN literals: strict parsers (and QuPath) read it
    assert "NaN," not in dump_geojson(doc).replace('"NaN"', "")


def test_the_intake_takes_the_preannotation_as_it_is(tmp_path):
    lab, doc = _doc()
    p = tmp_path / f"{PATCH}.geojson"
    p.write_text(json.dumps(doc))
    np.testing.assert_array_equal(convert_annotation(p, lab.shape), lab)
    cells = read_cell_objects(p, shape=lab.shape)
    assert [c.id for c in cells] == [cell_uuid(PATCH, k, SHA) for k in range(1, 5)]
    assert {c.class_name for c in cells} == {"Cell"} and {c.object_type for c in cells} == {"annotation"}
    assert cells[0].measurements["probability"] == pytest.approx(0.95)
    assert math.isnan(cells[0].measurements["tta_agreement"])


# --- files as QuPath writes them ----------------------------------------------------------------------------------
# QuPath 0.5/0.6 "File > Export objects as GeoJSON", "Export as FeatureCollection" on, "Pretty JSON" off, reproduced
# from qupath-core (tag v0.6.0): PathIO.exportObjectsAsGeoJSON (Gson compact writer),
# QuPathTypeAdapters.PathObjectTypeAdapter.write (keys type, id, geometry, properties{objectType, name, color,
# classification, isLocked only when true, measurements}), ROITypeAdapters.writeGeometry/coordinateToString (each
# vertex "[x, y]" through GeneralTools.formatNumber(Locale.US, v, 2): at most 2 decimals, no trailing zeros),
# GsonTools.PathClassTypeAdapter.write (classification {"name", "color": "[r, g, b]"}), and
# MeasurementListTypeAdapter.write (a {name: value} object, Double.toString values, NaN as the string "NaN").
QUPATH_06_COMPACT = (
    '{"type":"FeatureCollection","features":[{"type":"Feature","id":"3f1d2c4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f",'
    '"geometry":{"type":"Polygon","coordinates":[[[4, 4],[16, 4],[16, 14],[4, 14],[4, 4]]]},'
    '"properties":{"objectType":"annotation","classification":{"name":"Cell","color":[0, 200, 255]},'
    '"measurements":{"probability":0.95,"tta_agreement":"NaN","other_iou":1.0,"uncertainty":0.05,'
    '"area_px":120.0}}},'
    '{"type":"Feature","id":"9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",'
    '"geometry":{"type":"Polygon","coordinates":[[[40.5, 20.25],[52, 20.25],[52, 30.75],[40.5, 30.75],'
    '[40.5, 20.25]]]},"properties":{"objectType":"annotation","name":"drawn by hand","color":[255, 0, 0],'
    '"classification":{"name":"Cell","color":[0, 200, 255]},"isLocked":true}}]}'
)
# the same with "Pretty JSON" on: Gson's setPrettyPrinting (2-space indent; "[x, y]" and colours stay on one line,
# as in qupath-core's test resource data/polygon.geojson and classes/derived-class.json)
QUPATH_06_PRETTY = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "3f1d2c4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [
            [4, 4],
            [16, 4],
            [16, 14],
            [4, 14],
            [4, 4]
          ]
        ]
      },
      "properties": {
        "objectType": "detection",
        "classification": {
          "name": "Cell",
          "color": [0, 200, 255]
        },
        "measurements": {
          "probability": 0.95,
          "area_px": 120.0
        }
      }
    }
  ]
}"""
# QuPath 0.3.2 (PathObjectTypeAdapters.PathObjectTypeAdapter.write at tag v0.3.2): no id, "object_type",
# "isLocked" always written, the class in Gson's default PathClass layout (name, colorRGB), measurements as a list
# of {name, value}; 0.2 wrote the Java class as "id" (LEGACY_TYPE_IDS)
QUPATH_03 = (
    '[{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[4, 4],[16, 4],[16, 14],[4, 14],[4, 4]]]},'
    '"properties":{"object_type":"annotation","classification":{"name":"Cell","colorRGB":-16725761},'
    '"isLocked":false,"measurements":[{"name":"probability","value":0.95},{"name":"area_px","value":120.0}]}},'
    '{"type":"Feature","id":"PathDetectionObject","geometry":{"type":"Polygon","coordinates":[[[20, 20],[30, 20],'
    '[30, 30],[20, 30],[20, 20]]]},"properties":{"classification":{"names":["Cell","Positive"],'
    '"color":[1, 2, 3]}}}]'
)


def test_qupath_written_geojson_is_read_back(tmp_path, caplog):
    p = tmp_path / f"{PATCH}-img.geojson"  # QuPath proposes the image's name: the patch name + -img
    p.write_text(QUPATH_06_COMPACT)
    cells = read_cell_objects(p, shape=(48, 64))
    assert [c.id for c in cells] == ["3f1d2c4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f", "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"]
    assert cells[0].measurements["probability"] == 0.95 and math.isnan(cells[0].measurements["tta_agreement"])
    assert cells[1].measurements == {}
    lab = convert_annotation(p, (48, 64))
    assert lab.max() == 2 and (lab == 1).sum() == 120
    # the second cell: fractional vertices, painted by pixel centres: columns 41..51, rows 20..30 (centres x+0.5)
    assert (lab == 2).sum() == 11 * 11 and lab[20, 41] == 2 and lab[20, 40] == 0 and lab[30, 51] == 2

    p.write_text(QUPATH_06_PRETTY)
    with caplog.at_level(logging.WARNING, logger="segrefine.annotations"):
        cells = read_cell_objects(p, shape=(48, 64))
    assert len(cells) == 1 and cells[0].object_type == "detection"
    assert re.search(
        rf"{re.escape(str(p))}: 1 of 1 cell objects are QuPath detections, not annotations \(e.g. "
        r"feature 0 id '3f1d2c4e",
        caplog.text,
    )

    p.write_text(QUPATH_03)
    cell, det = read_cell_objects(p, shape=(48, 64))
    assert cell.measurements == {"probability": 0.95, "area_px": 120.0} and cell.class_name == "Cell"
    assert (cell.object_type, cell.id) == ("annotation", None) and (det.object_type, det.id) == ("detection", None)
    assert det.class_name == "Cell: Positive"


def test_measurements_in_both_layouts_and_bad_values():
    assert read_measurements({"a": 1, "b": "NaN", "c": "Infinity", "d": "-inf", "e": None}) == {
        "a": 1.0,
        "b": pytest.approx(math.nan, nan_ok=True),
        "c": math.inf,
        "d": -math.inf,
        "e": pytest.approx(math.nan, nan_ok=True),
    }
    assert read_measurements([{"name": "a", "value": 2}, {"name": "b", "value": "NaN"}])["a"] == 2.0
    assert read_measurements({"a": "x", "b": [1], "c": True}) == {}  # not numbers: left out with a warning
    assert read_measurements("nonsense") == {} and read_measurements(None) == {}


def test_patches_to_preannotate_top_n_then_listed_once(tmp_path):
    r = tmp_path / "ranking.csv"
    r.write_text("rank,patch,score\n1,S1-x0_y0_w64_h64,0.9\n2,S1-x64_y0_w64_h64,0.5\n3,S1-x128_y0_w64_h64,0.1\n")
    names = patches_to_preannotate("S1", r, 2, ["S1-x64_y0_w64_h64-img", "S2-x0_y0_w8_h8", "S1-x9_y9_w64_h64"])
    assert names == ["S1-x0_y0_w64_h64", "S1-x64_y0_w64_h64", "S1-x9_y9_w64_h64"]
    with pytest.raises(SegRefineError, match="not a patch name"):
        patches_to_preannotate("S1", None, 0, ["nonsense"])


@pytest.mark.integration
def test_preannotate_by_cli_with_the_classical_model(tmp_path):
    import tifffile

    from segrefine.models import load_model
    from segrefine.preannotations import read_preannotation

    from conftest import run_step

    d = tmp_path
    run_step(
        "core", "demo-data", "--out", d / "demo", "--sn", "TN01", "--size", 256, "--patches", 1, "--patch-size", 64
    )
    for m, params in (("best", {}), ("pre", {"threshold_scale": 1.6, "sigma": 2.0})):
        run_step(
            "core",
            "pretrained-card",
            "--framework",
            "classical",
            "--name",
            m,
            "--source",
            "none",
            "--params",
            json.dumps(params),
            "--out-dir",
            d / m,
        )
    ranking = d / "ranking.csv"
    ranking.write_text("rank,patch,score\n1,TN01-x64_y64_w96_h96,0.9\n2,TN01-x0_y128_w96_h96,0.5\n")
    summary = d / "summary.csv"
    summary.write_text("model,stage,mode,n_images,f1\nbest,pretrained,standard,1,0.5\n")

    def run(out):
        return run_step(
            "core",
            "preannotate",
            "--card",
            d / "best" / "card.json",
            "--pretrained-card",
            d / "pre" / "card.json",
            "--slide",
            d / "demo" / "TN01.tif",
            "--sn",
            "TN01",
            "--ranking",
            ranking,
            "--top-n",
            1,
            "--patches",
            "TN01-x160_y0_w96_h64",
            "OTHER-x0_y0_w8_h8",
            "--summary",
            summary,
            "--tta",
            4,
            "--out-dir",
            out,
            "--archive",
            d / "archive",
        )

    proc = run(d / "out")
    names = ["TN01-x64_y64_w96_h96", "TN01-x160_y0_w96_h64"]
    assert proc.stdout.split() == names
    assert sorted(p.name for p in (d / "out").iterdir()) == sorted(
        [f"{n}.geojson" for n in names] + [f"{n}-img.tif" for n in names] + ["slide_frame"]
    )
    assert sorted(p.name for p in (d / "out" / "slide_frame").iterdir()) == sorted(f"{n}.geojson" for n in names)
    slide = tifffile.imread(d / "demo" / "TN01.tif")
    model, _ = load_model(d / "best" / "card.json")
    for name, (x, y, w, h) in zip(names, [(64, 64, 96, 96), (160, 0, 96, 64)]):
        img = tifffile.imread(d / "out" / f"{name}-img.tif")
        np.testing.assert_array_equal(img, slide[y : y + h, x : x + w])
        doc = json.loads((d / "out" / f"{name}.geojson").read_text())
        assert doc["features"] and {f["properties"]["objectType"] for f in doc["features"]} == {"annotation"}
        m = doc["features"][0]["properties"]["measurements"]
        assert m["probability"] == "NaN" and 0 <= m["tta_agreement"] <= 1 and 0 <= m["other_iou"] <= 1
        # the file, imported as it is, gives back exactly the model's cells
        pred = np.asarray(model.predict(img))
        got = convert_annotation(d / "out" / f"{name}.geojson", (h, w), origin=(x, y))
        assert np.array_equal(got > 0, pred > 0) and got.max() == len(np.unique(pred[pred > 0]))
        # the slide-frame copy: the same objects (same ids) shifted by the patch's origin; the intake moves it back
        sdoc = json.loads((d / "out" / "slide_frame" / f"{name}.geojson").read_text())
        assert [f["id"] for f in sdoc["features"]] == [f["id"] for f in doc["features"]]
        x0, y0 = sdoc["features"][0]["geometry"]["coordinates"][0][0]
        assert [x0 - x, y0 - y] == doc["features"][0]["geometry"]["coordinates"][0][0]
        np.testing.assert_array_equal(
            convert_annotation(d / "out" / "slide_frame" / f"{name}.geojson", (h, w), origin=(x, y)), got
        )
        (kept,) = (d / "archive" / name).iterdir()
        rec = read_preannotation(kept)
        assert rec["patch"] == name and rec["model"] == "best" and rec["f1_pretrained"] == 0.5
        assert kept.read_text() == (d / "out" / f"{name}.geojson").read_text()
    # a rerun of the same model: the same ids, the archive keeps one version
    run(d / "out2")
    for name in names:
        ids = [f["id"] for f in json.loads((d / "out" / f"{name}.geojson").read_text())["features"]]
        assert ids == [f["id"] for f in json.loads((d / "out2" / f"{name}.geojson").read_text())["features"]]
        assert len(list((d / "archive" / name).iterdir())) == 1
    bad = run_step(
        "core",
        "preannotate",
        "--card",
        d / "best" / "card.json",
        "--slide",
        d / "demo" / "TN01.tif",
        "--sn",
        "TN01",
        "--patches",
        "TN01-x200_y200_w96_h96",
        "--out-dir",
        d / "x",
        "--archive",
        d / "y",
        check=False,
    )
    assert bad.returncode == 1 and "outside the slide" in bad.stderr and not (d / "x").exists()
