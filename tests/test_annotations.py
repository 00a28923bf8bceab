import json

import numpy as np
import pytest
import tifffile

from segrefine import SegRefineError
from segrefine.annotations import (
    convert_annotation,
    dump_geojson,
    labels_to_geojson,
    mask_to_instances,
    rasterize_polygons,
)


def _labels():
    lab = np.zeros((64, 80), np.uint16)
    lab[5:20, 5:25] = 1
    lab[5:20, 25:40] = 2  # touches cell 1
    lab[30:60, 10:50] = 3
    lab[40:50, 20:30] = 0  # a hole in cell 3
    lab[50:60, 60:80] = 4  # at the patch border
    lab[0:3, 70:73] = 5
    lab[3:6, 73:76] = 5  # diagonal pieces: one cell made of two parts (MultiPolygon)
    return lab


def _write(tmp_path, doc, name="S1-x0_y0_w80_h64.geojson"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_qupath_geojson_round_trip_is_exact(tmp_path):
    lab = _labels()
    p = _write(tmp_path, json.loads(dump_geojson(labels_to_geojson(lab))))
    back = convert_annotation(p, lab.shape)
    np.testing.assert_array_equal(back, lab)


def test_detections_and_cells_count_regions_and_points_do_not(tmp_path):
    def sq(x, y):
        return {"type": "Polygon", "coordinates": [[[x, y], [x + 10, y], [x + 10, y + 10], [x, y + 10], [x, y]]]}

    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": sq(0, 0), "properties": {"objectType": "detection"}},
            {
                "type": "Feature",
                "geometry": sq(20, 0),
                "nucleusGeometry": sq(22, 2),
                "properties": {"objectType": "cell"},
            },
            {
                "type": "Feature",
                "geometry": sq(0, 0) | {"coordinates": [[[0, 0], [80, 0], [80, 64], [0, 64], [0, 0]]]},
                "properties": {"objectType": "annotation", "classification": {"name": "Region"}},
            },
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
        ],
    }
    p = _write(tmp_path, doc)
    lab = convert_annotation(p, (64, 80))
    assert lab.max() == 2 and (lab == 1).sum() == 100 and (lab == 2).sum() == 100
    nuc = convert_annotation(p, (64, 80), use_nucleus=True)
    assert (nuc == 2).sum() == 100 and nuc[2, 22] == 2 and nuc[0, 20] == 0


def test_annotation_outside_its_patch_is_refused(tmp_path):
    doc = {
        "type": "Feature",
        "properties": {"objectType": "annotation"},
        "geometry": {"type": "Polygon", "coordinates": [[[70, 50], [95, 50], [95, 60], [70, 60], [70, 50]]]},
    }
    p = _write(tmp_path, doc)
    with pytest.raises(SegRefineError, match=r"S1-x0_y0_w80_h64.geojson: feature 0 .* outside its 80x64 px patch"):
        convert_annotation(p, (64, 80))


def test_empty_and_malformed_annotations_name_the_file(tmp_path):
    p = _write(tmp_path, {"type": "FeatureCollection", "features": []})
    with pytest.raises(SegRefineError, match="S1-x0_y0_w80_h64.geojson: no cell polygons"):
        convert_annotation(p, (64, 80))
    bad = tmp_path / "S1-x0_y0_w80_h64.json"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(SegRefineError, match=r"S1-x0_y0_w80_h64.json: not valid JSON \(line 1"):
        convert_annotation(bad, (64, 80))


@pytest.mark.parametrize("fg", [1, 255])
def test_binary_masks_split_into_4_connected_cells(tmp_path, fg):
    m = np.zeros((10, 10), np.uint8)
    m[1:4, 1:4] = fg
    m[4:7, 4:7] = fg  # touches the first block only diagonally: a separate cell
    m[8, 0:10] = fg
    p = tmp_path / "S1-x0_y0_w10_h10-mask.tif"
    tifffile.imwrite(p, m)
    lab = convert_annotation(p, (10, 10))
    assert lab.max() == 3
    assert len(np.unique(lab[1:4, 1:4])) == 1 and lab[1, 1] != lab[5, 5]


def test_instance_masks_are_kept_and_relabelled(tmp_path):
    m = np.zeros((10, 10), np.uint32)
    m[0:5, 0:5] = 70000
    m[0:5, 5:10] = 7  # touching cells with distinct labels stay distinct
    m[6:9, 6:9] = 12
    lab = mask_to_instances(m)
    assert lab.max() == 3 and lab.dtype == np.uint16
    assert lab[0, 0] != lab[0, 9]


def test_mask_of_wrong_size_or_kind_is_refused(tmp_path):
    p = tmp_path / "S1-x0_y0_w10_h10-mask.tif"
    tifffile.imwrite(p, np.ones((12, 10), np.uint8))
    with pytest.raises(SegRefineError, match="mask is 10x12 px but its patch is 10x10 px"):
        convert_annotation(p, (10, 10))
    tifffile.imwrite(p, np.zeros((10, 10), np.uint8))
    with pytest.raises(SegRefineError, match="holds no cell pixels"):
        convert_annotation(p, (10, 10))
    with pytest.raises(SegRefineError, match="whole numbers"):
        mask_to_instances(np.full((4, 4), 0.5, np.float32))


def test_overlapping_polygons_later_wins_and_hidden_cells_vanish():
    import shapely.geometry as g

    geoms = [(0, g.box(0, 0, 10, 10)), (1, g.box(2, 2, 8, 8)), (2, g.box(0, 0, 10, 10))]
    lab = rasterize_polygons(geoms, (12, 12))
    assert lab.max() == 1 and (lab == 1).sum() == 100
