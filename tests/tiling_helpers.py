"""What the tests of the whole-slide engine share: a translation-local classical model, one plan-shards-stitch
run, and the check that the stitched outputs agree with the stitched labels."""

import json

import numpy as np
import pandas as pd
import tifffile

from segrefine.models.classical_adapter import DEFAULTS, segment
from segrefine.outlines import cell_outlines
from segrefine.stitch import stitch
from segrefine.tiling import make_plan, run_shard, write_plan


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
        return segment(
            img,
            p["sigma"],
            p["threshold_scale"],
            p["min_distance"],
            p["min_size"],
            p["invert"],
            threshold=self.threshold,
        )


def run_all(tmp, slide_path, card, model, tile=96, halo=24, shards=2, **kw):
    tmp.mkdir(parents=True, exist_ok=True)
    plan, meta = make_plan(slide_path, tile, halo, shards=shards, tissue_downsample=4, **kw)
    write_plan(plan, meta, tmp / "tiles.tsv", tmp / "tiles.json")
    jsons = [tmp / f"s{k}.json" for k in range(shards)]
    for k, j in enumerate(jsons):
        run_shard(tmp / "tiles.tsv", k, card, slide_path, tmp / "tiles", j, model=model)
    rep = stitch(
        tmp / "tiles.tsv",
        tmp / "tiles",
        jsons,
        slide_path,
        tmp / "labels.tif",
        tmp / "cells.csv",
        tmp / "cells.parquet",
        tmp / "cells.geojson",
        tmp / "overlay.png",
        tmp / "report.json",
        pixel_size_um=0.5,
        probability_map_out=tmp / "probability_map.png",
    )
    return plan, meta, rep


def _expected_table(tiled):
    from skimage.measure import regionprops

    rows = [
        (r.label, r.centroid[1], r.centroid[0], int(r.area), r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2])
        for r in regionprops(tiled.astype(np.int64))
    ]
    return pd.DataFrame(
        rows, columns=["cell_id", "centroid_x", "centroid_y", "area_px", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]
    )


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
    assert f == {
        "type": "Feature",
        "id": f"cell-{cid}",
        "geometry": {"type": "Polygon", "coordinates": [rings[cid]]},
        "properties": {
            "objectType": "detection",
            "name": f"cell {cid}",
            "classification": {"name": "Nucleus", "color": [255, 0, 0]},
            "measurements": {"cell_id": cid},
        },
    }
