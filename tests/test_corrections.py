"""Corrections counted: a pre-annotation edited programmatically (delete, move a vertex, add a polygon) comes back
through the intake as exactly the edited polygons, and the id diff counts exactly those edits; bad corrected files
(no pre-annotation, objects outside the patch, duplicated ids, detections, ids renewed) are still used."""

import copy
import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import tifffile
from matplotlib.path import Path as MplPath

from conftest import run_step
from segrefine import SegRefineError
from segrefine.annotations import convert_annotation, dump_geojson, read_cell_objects
from segrefine.corrections import NO_PREANNOTATION, corrections, count_corrections, diff_cells, minutes, round_table
from segrefine.preannotations import preannotation_geojson

PATCH = "S1-x256_y512_w64_h48"
SHA = "ab" * 32


def _labels():
    lab = np.zeros((48, 64), np.uint32)
    lab[4:14, 4:16] = 1
    lab[4:14, 16:30] = 2
    lab[25:45, 10:40] = 3
    lab[38:48, 50:64] = 4
    lab[20:24, 50:58] = 5
    return lab


def _pre(tmp_path, sha=SHA, written="2026-12-01T10:00:00Z", f1=0.8):
    """The pre-annotation, written into an archive as preannotations.write_preannotations does."""
    doc = json.loads(
        dump_geojson(
            preannotation_geojson(PATCH, _labels(), sha, None, {"written": written, "model": "m", "f1_finetuned": f1})
        )
    )
    arch = tmp_path / "archive" / PATCH
    arch.mkdir(parents=True, exist_ok=True)
    (arch / f"{sha[:12]}.geojson").write_text(json.dumps(doc))
    return doc


def _paint(polygons, shape):
    """An independent rasterisation (matplotlib's point-in-polygon on pixel centres), later polygons win."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    centres = np.column_stack([xx.ravel() + 0.5, yy.ravel() + 0.5])
    out = np.zeros(shape, np.int64)
    for k, ring in enumerate(polygons, 1):
        out.ravel()[MplPath(ring).contains_points(centres)] = k
    return out


def _same_cells(a, b):
    """Equal label images up to the numbering of the cells."""
    assert np.array_equal(a > 0, b > 0)
    pairs = {(int(x), int(y)) for x, y in zip(a[a > 0], b[b > 0])}
    assert len(pairs) == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


def _edit(doc):
    """Delete cell 2, move the bottom-right vertex of cell 3 by (+6, +2), add a new cell."""
    d = copy.deepcopy(doc)
    feats = d["features"]
    deleted = feats.pop(1)
    ring = feats[1]["geometry"]["coordinates"][0]
    k = ring.index([40, 45])
    ring[k] = [46, 47]
    if k == 0:
        ring[-1] = [46, 47]
    feats.append(
        {
            "type": "Feature",
            "id": "0d5e3a8c-1111-4222-8333-444455556666",
            "geometry": {"type": "Polygon", "coordinates": [[[2, 30], [8, 30], [8, 40], [2, 40], [2, 30]]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Cell"}},
        }
    )
    return d, deleted


def test_edited_preannotation_round_trip_is_exact_and_the_diff_counts_the_edits(tmp_path):
    doc = _pre(tmp_path)
    edited, deleted = _edit(doc)
    f = tmp_path / "ann" / f"{PATCH}.geojson"
    f.parent.mkdir()
    f.write_text(json.dumps(edited))
    lab = convert_annotation(f, (48, 64))
    rings = [feat["geometry"]["coordinates"][0] for feat in edited["features"]]
    _same_cells(lab, _paint(rings, (48, 64)))
    assert lab.max() == 5  # 5 cells - 1 deleted + 1 added
    cells, patches = count_corrections([f], tmp_path / "archive")
    row = patches.iloc[0]
    assert (row.accepted, row.edited, row.deleted, row.added, row.touched) == (3, 1, 1, 1, 3)
    assert (row.n_pre, row.n_post, row.note) == (5, 5, "")
    by = cells.set_index("status")
    assert by.loc["deleted", "pre_id"] == deleted["id"] and by.loc["edited", "match"] == "id"
    assert 0.5 < by.loc["edited", "iou"] < 0.99 and by.loc["added", "post_id"] == "0d5e3a8c-1111-4222-8333-444455556666"
    # minutes: 15 min per 256^2 patch scaled by the area; per cell / 5 cells of the corrected file
    scratch, correcting, saved = minutes({"accepted": 3, "edited": 1, "deleted": 1, "added": 1}, 64 * 48)
    per_cell = 15 * 64 * 48 / 256**2 / 5
    assert correcting == pytest.approx(per_cell * (1 + 0.5 + 0.05 + 3 * 0.05)) and saved == scratch - correcting
    assert row.minutes_saved == pytest.approx(round(saved, 2))


def test_unchanged_file_is_all_accepted_and_renewed_ids_match_by_iou(tmp_path, caplog):
    doc = _pre(tmp_path)
    f = tmp_path / f"{PATCH}-img.geojson"
    f.write_text(json.dumps(doc))
    row = count_corrections([f], tmp_path / "archive")[1].iloc[0]
    assert (row.accepted, row.touched) == (5, 0)
    # QuPath renews the ids ("Update IDs" on import): every cell is matched by IoU instead
    renewed = copy.deepcopy(doc)
    for k, feat in enumerate(renewed["features"]):
        feat["id"] = f"00000000-0000-4000-8000-{k:012d}"
    f.write_text(json.dumps(renewed))
    cells, patches = count_corrections([f], tmp_path / "archive")
    assert (patches.iloc[0].accepted, patches.iloc[0].touched) == (5, 0) and set(cells["match"]) == {"iou"}
    assert "no object id in common" in patches.iloc[0].note


def test_duplicated_ids_and_detections_are_named_and_still_used(tmp_path, caplog):
    doc = _pre(tmp_path)
    d = copy.deepcopy(doc)
    dup = copy.deepcopy(d["features"][0])  # the first cell imported twice, the copy moved a little
    dup["geometry"]["coordinates"][0] = [[x + 30, y + 30] for x, y in dup["geometry"]["coordinates"][0]]
    d["features"].append(dup)
    d["features"][2]["properties"]["objectType"] = "detection"
    f = tmp_path / f"{PATCH}.geojson"
    f.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        cells, patches = count_corrections([f], tmp_path / "archive")
        lab = convert_annotation(f, (48, 64))
    assert f"id {doc['features'][0]['id']!r} is used by an earlier object too" in caplog.text
    assert f"{f}: 1 of 6 cell objects are QuPath detections" in caplog.text
    row = patches.iloc[0]
    assert (row.accepted, row.added, row.deleted) == (5, 1, 0)  # the second use of the id counts as added
    assert lab.max() == 6


def test_objects_outside_the_patch_are_clipped_or_refused_naming_the_object(tmp_path, caplog):
    doc = _pre(tmp_path)
    d = copy.deepcopy(doc)
    ring = d["features"][3]["geometry"]["coordinates"][0]  # cell 4 at the right border: drag it 4 px beyond
    d["features"][3]["geometry"]["coordinates"][0] = [[x + 4 if x == 64 else x, y] for x, y in ring]
    f = tmp_path / f"{PATCH}.geojson"
    f.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        lab = convert_annotation(f, (48, 64), origin=(256, 512))
        row = count_corrections([f], tmp_path / "archive")[1].iloc[0]
    assert f"feature 3 (id {doc['features'][3]['id']!r})" in caplog.text and "clipped to the patch" in caplog.text
    _same_cells(lab, _labels().astype(np.int64))
    assert (row.accepted, row.touched) == (5, 0)
    d["features"][0]["geometry"]["coordinates"][0] = [
        [x + 60, y] for x, y in doc["features"][0]["geometry"]["coordinates"][0]
    ]
    f.write_text(json.dumps(d))
    with pytest.raises(
        SegRefineError,
        match=rf"{PATCH}.geojson: feature 0 \(id '{doc['features'][0]['id']}'\) "
        r"\(bounds x 64.0..76.0.*lies outside its 64x48 px patch",
    ):
        convert_annotation(f, (48, 64), origin=(256, 512))


def test_a_file_drawn_on_the_whole_slide_is_moved_into_the_patch(tmp_path, caplog):
    doc = _pre(tmp_path)
    d = copy.deepcopy(doc)
    for feat in d["features"]:
        feat["geometry"]["coordinates"] = [[[x + 256, y + 512] for x, y in r] for r in feat["geometry"]["coordinates"]]
    f = tmp_path / f"{PATCH}.geojson"
    f.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        lab = convert_annotation(f, (48, 64), origin=(256, 512))
    assert "inside the patch's box in slide coordinates" in caplog.text
    _same_cells(lab, _labels().astype(np.int64))
    assert count_corrections([f], tmp_path / "archive")[1].iloc[0].accepted == 5


def test_a_patch_without_preannotation_is_a_new_annotation(tmp_path):
    f = tmp_path / "S1-x0_y0_w64_h48.geojson"
    f.write_text(json.dumps(preannotation_geojson("S1-x0_y0_w64_h48", _labels(), SHA)))
    row = count_corrections([f], tmp_path / "archive")[1].iloc[0]
    assert (row.added, row.n_pre, row.minutes_saved, row.preannotation) == (5, 0, 0.0, "")
    assert row.note == NO_PREANNOTATION


def test_rounds_pick_their_version_and_link_the_f1(tmp_path):
    d1 = _pre(tmp_path, "11" * 32, "2026-12-01T10:00:00Z", 0.70)
    _pre(tmp_path, "22" * 32, "2026-12-02T10:00:00Z", 0.75)
    f = tmp_path / f"{PATCH}.geojson"
    f.write_text(json.dumps(_edit(d1)[0]))  # corrected from round 1's file, though round 2 wrote a newer one
    cells, patches = count_corrections([f], tmp_path / "archive")
    assert patches.iloc[0].model_sha == "11" * 6 and patches.iloc[0].touched == 3
    rounds = round_table(patches, tmp_path / "archive", current_f1=0.9)
    (r,) = rounds.itertuples()
    assert (r.round, r.f1_before, r.f1_after) == (1, 0.70, 0.75) and r.f1_gain == pytest.approx(0.05)
    assert (r.patches, r.cells_pre, r.touched, r.touched_fraction) == (1, 5, 3, 0.6)


def test_corrections_by_cli_tables_and_plot(tmp_path):
    doc = _pre(tmp_path, f1=0.8)
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / f"{PATCH}.geojson").write_text(json.dumps(_edit(doc)[0]))
    (ann / "S1-x0_y0_w64_h48.geojson").write_text(json.dumps(preannotation_geojson("S1-x0_y0_w64_h48", _labels(), SHA)))
    tifffile.imwrite(ann / "S1-x0_y64_w64_h48.tif", (_labels() > 0).astype(np.uint8) * 255)  # a mask: not compared
    summary = tmp_path / "summary.csv"
    summary.write_text("model,stage,mode,n_images,f1\nm,pretrained,standard,2,0.6\nm,finetuned,standard,2,0.9\n")
    proc = run_step(
        "core",
        "corrections",
        "--annotations",
        *sorted(ann.iterdir()),
        "--archive",
        tmp_path / "archive",
        "--summary",
        summary,
        "--model",
        "m",
        "--out-dir",
        tmp_path / "out",
    )
    per_patch = pd.read_csv(tmp_path / "out" / "per_patch.csv")
    assert list(per_patch["patch"]) == ["S1-x0_y0_w64_h48", PATCH]
    rounds = pd.read_csv(tmp_path / "out" / "per_round.csv")
    assert list(rounds["round"]) == [0, 1] and rounds["f1_after"].iloc[1] == 0.9
    assert rounds["f1_gain"].iloc[1] == pytest.approx(0.1) and math.isnan(rounds["f1_before"].iloc[0])
    assert len(pd.read_csv(tmp_path / "out" / "per_cell.csv")) == 5 + 6
    assert (tmp_path / "out" / "corrections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round" in proc.stdout
    bad = run_step(
        "core",
        "corrections",
        "--annotations",
        ann / "S1-x0_y64_w64_h48.tif",
        "--archive",
        tmp_path / "archive",
        "--out-dir",
        tmp_path / "x",
        check=False,
    )
    assert bad.returncode == 1 and "no GeoJSON annotation files" in bad.stderr


def test_diff_of_nothing():
    assert diff_cells([], []) == []
    with pytest.raises(SegRefineError, match="edit_fraction must be a number >= 0"):
        corrections(["a.geojson"], "x", "y", edit_fraction=-1)


def test_read_cell_objects_keeps_file_order(tmp_path):
    f = tmp_path / f"{PATCH}.geojson"
    f.write_text(json.dumps(_edit(_pre(tmp_path))[0]))
    assert [o.index for o in read_cell_objects(f, shape=(48, 64))] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_the_loop_in_the_workflow(tmp_path):
    """The real workflow with the classical model (fast): pre-annotations of the top 2 and a listed patch, one of
    them corrected into the annotation folder (a cell deleted, one added), the rerun counts exactly that."""
    import os
    import shutil
    import subprocess

    import yaml

    from conftest import REPO, SCRIPTS
    from segrefine.envs import env_python

    d = tmp_path
    shutil.copy(REPO / "config" / "test" / "samples.tsv", d)
    run_step(
        "core", "demo-data", "--out", d / "demo", "--sn", "TINY01", "--size", 384, "--patches", 6, "--patch-size", 96
    )
    c = yaml.safe_load((REPO / "config" / "test" / "config.yaml").read_text())
    c["models"] = {"baseline": c["models"]["baseline"]}
    c.pop("base_models", None)
    c["segmentation"]["model"] = "baseline"
    c["expression"].update(activate=False, qc_before_after=False)
    c["patches"]["candidates"]["activate"] = False
    c["evaluation"]["threshold_grids"] = {}
    listed = "TINY01-x288_y288_w96_h96"
    c["evaluation"]["annotate_next"] = {"activate": True, "top_n": 2, "size": 96, "step": 96, "preannotate": [listed]}
    (d / "config.yaml").write_text(yaml.safe_dump(c))

    def snakemake(*args):
        return subprocess.run(
            [
                str(env_python("core")),
                "-m",
                "snakemake",
                "-s",
                str(REPO / "Snakefile"),
                "--configfile",
                "config.yaml",
                "--cores",
                "2",
                *args,
            ],
            cwd=d,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
        )

    proc = snakemake()
    assert proc.returncode == 0, proc.stdout[-3000:]
    pre = d / "results" / "annotate_next" / "TINY01" / "preannotations"
    names = sorted(p.stem for p in pre.glob("*.geojson"))
    top = list(pd.read_csv(d / "results" / "annotate_next" / "TINY01" / "ranking.csv")["patch"][:2])
    assert names == sorted({*top, listed})
    assert not (d / "results" / "corrections").exists()  # nothing corrected yet
    doc = json.loads((pre / f"{top[0]}.geojson").read_text())
    assert len(doc["features"]) >= 2
    doc["features"].pop(0)
    doc["features"].append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[2, 80], [12, 80], [12, 92], [2, 92], [2, 80]]]},
            "properties": {"objectType": "annotation"},
        }
    )
    (d / "demo" / "annotations" / f"{top[0]}-img.geojson").write_text(json.dumps(doc))
    proc = snakemake()
    assert proc.returncode == 0, proc.stdout[-3000:]
    per_patch = pd.read_csv(d / "results" / "corrections" / "per_patch.csv").set_index("patch")
    row = per_patch.loc[top[0]]
    assert (row.deleted, row.added, row.edited, row.accepted) == (1, 1, 0, len(doc["features"]) - 1)
    assert (per_patch.drop(index=top[0])["note"] == NO_PREANNOTATION).all()  # the demo's hand-drawn patches
    rounds = pd.read_csv(d / "results" / "corrections" / "per_round.csv")
    assert list(rounds["round"]) == [0, 1] and rounds["touched"].iloc[1] == 2
    assert "Nothing to be done" in snakemake("-n").stdout
