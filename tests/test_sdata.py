"""SpatialData output (segrefine.sdata): stores written by `segrefine spatialdata` in the spatialdata env from inputs
made the way the workflow makes them (pyramidal OME-TIFF labels, the stitch's GeoJSON outlines and cell table, an
AnnData with label_id), read back by `spatialdata.read_zarr` and rendered by spatialdata-plot."""

import contextlib
import json
import subprocess

import numpy as np
import pytest

from conftest import run_step
from segrefine import SegRefineError
from segrefine.envs import env_python

H, W = 200, 260  # not square: a swapped axis would show


def _nuclei(rng) -> np.ndarray:
    """Disks of radius 4..7 on a jittered grid, ids 1..n in raster order, none touching."""
    lab = np.zeros((H, W), np.uint32)
    yy, xx = np.mgrid[0:H, 0:W]
    n = 0
    for cy in range(16, H - 10, 24):
        for cx in range(16, W - 10, 24):
            r = rng.integers(4, 8)
            y, x = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
            n += 1
            lab[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = n
    return lab


def _write_labels(path, lab, work, min_side=64):
    from segrefine.io import label_pyramid_levels, write_pyramid_ome_tiff

    work.mkdir(exist_ok=True)
    write_pyramid_ome_tiff(path, label_pyramid_levels(lab, work, min_side=min_side), pixel_size_um=0.5)


def _write_h5ad(path, ids, centres, genes=8):
    """An AnnData like `segrefine h5ad` writes (obs label_id, obsm spatial in GEM coordinates), made with anndata in
    the spatialdata env (the core env has no anndata)."""
    script = """
import json, sys
import anndata, numpy as np, pandas as pd, scipy.sparse as sp
ids, centres, genes, out = json.loads(sys.argv[1]), np.array(json.loads(sys.argv[2])), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
X = sp.csr_matrix(rng.poisson(2.0, (len(ids), genes)).astype(np.uint32))
obs = pd.DataFrame({"label_id": np.array(ids, np.int64)}, index=[str(i) for i in ids])
a = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{k}" for k in range(genes)]))
a.obsm["spatial"] = np.rint(centres).astype(np.int64)
a.write_h5ad(out)
"""
    subprocess.run(
        [
            str(env_python("spatialdata")),
            "-c",
            script,
            json.dumps([int(i) for i in ids]),
            json.dumps(np.asarray(centres).tolist()),
            str(genes),
            str(path),
        ],
        check=True,
    )


def make_sample(d, rng_seed=0, slide_pyramid=False, rgb=False, drop=(3,)):
    """Slide, nuclei labels (+ cells grown by 3 px), outlines, cell table and h5ad of one synthetic sample in ``d``.
    The h5ad leaves out the cells in ``drop`` (cells without transcripts) and lists the others shuffled."""
    import tifffile

    from segrefine.cells import expand_labels
    from segrefine.stitch import _GeoJSONWriter

    rng = np.random.default_rng(rng_seed)
    lab = _nuclei(rng)
    n = int(lab.max())
    gray = np.clip(40 + 150 * (lab > 0) + rng.normal(0, 10, lab.shape), 0, 255).astype(np.uint8)
    img = np.stack([gray, gray // 2, 255 - gray], axis=-1) if rgb else gray
    if slide_pyramid:
        with tifffile.TiffWriter(d / "slide.tif", ome=True) as tw:
            opts = dict(tile=(64, 64), photometric="rgb" if rgb else "minisblack", compression="zlib")
            tw.write(img, subifds=2, **opts)
            tw.write(img[::2, ::2], subfiletype=1, **opts)
            tw.write(img[::4, ::4], subfiletype=1, **opts)
    else:
        tifffile.imwrite(d / "slide.tif", img, rowsperstrip=16)  # a plain TIFF in strips
    _write_labels(d / "labels.tif", lab, d / "work")
    cells = expand_labels(lab, 3)
    _write_labels(d / "cells.tif", cells, d / "work_cells")
    with contextlib.ExitStack() as stack:
        geo = _GeoJSONWriter(stack, d / "cells.geojson")
        geo.add(lab, (0, 0))
        geo.close()
    yy, xx = np.nonzero(lab)
    ids = lab[yy, xx].astype(np.int64)
    count = np.bincount(ids, minlength=n + 1)[1:]
    cx = np.bincount(ids, xx, minlength=n + 1)[1:] / count
    cy = np.bincount(ids, yy, minlength=n + 1)[1:] / count
    table = "cell_id,centroid_x,centroid_y,area_px\n" + "".join(
        f"{k + 1},{float(cx[k])!r},{float(cy[k])!r},{count[k]}\n" for k in range(n)
    )
    (d / "cells.csv").write_text(table)
    keep = np.array([i for i in range(1, n + 1) if i not in drop])
    rng.shuffle(keep)
    _write_h5ad(d / "cells.h5ad", keep, np.column_stack([cx[keep - 1], cy[keep - 1]]))
    return {"labels": lab, "cells": cells, "centres": np.column_stack([cx, cy]), "h5ad_ids": keep}


def args_of(d, out, **extra):
    args = [
        "--slide",
        d / "slide.tif",
        "--labels",
        d / "labels.tif",
        "--outlines",
        d / "cells.geojson",
        "--cell-table",
        d / "cells.csv",
        "--h5ad",
        d / "cells.h5ad",
        "--out",
        out,
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [v])
    return args


READ_BACK = r"""
import json, sys
import numpy as np, shapely, spatialdata, tifffile
from spatialdata.transformations import get_transformation

sd = spatialdata.read_zarr(sys.argv[1])
labels_tif = tifffile.imread(sys.argv[2])

def levels(e):
    return [next(iter(e[k].data_vars.values())) for k in sorted(e.children, key=lambda s: int(s[5:]))]

out = {"images": sorted(sd.images), "labels": sorted(sd.labels), "shapes": sorted(sd.shapes),
       "tables": sorted(sd.tables), "attrs": sd.attrs.get("segrefine")}
img = levels(sd.images["image"])
out["image_levels"] = [list(a.shape) for a in img]
out["channels"] = [str(c) for c in img[0].coords["c"].values]
out["image_dtype"] = str(img[0].dtype)
for name in sd.labels:
    lv = levels(sd.labels[name])
    out[f"{name}_levels"] = [list(a.shape) for a in lv]
    out[f"{name}_dtype"] = str(lv[0].dtype)
    out[f"{name}_level0_sum"] = int(np.asarray(lv[0].data.compute(), np.int64).sum())
nuclei0 = levels(sd.labels["nuclei"])[0].data.compute()
out["nuclei_equal_labels_tif"] = bool(np.array_equal(nuclei0, labels_tif))
t = {}
for cs, tr in get_transformation(sd.labels["nuclei"], get_all=True).items():
    t[cs] = type(tr).__name__ + (str(np.asarray(tr.scale, float).tolist()) if hasattr(tr, "scale") else "")
out["transformations"] = t
out["image_coordinate_systems"] = sorted(get_transformation(sd.images["image"], get_all=True))
gdf = sd.shapes["nuclei_boundaries"]
out["shape_ids"] = [int(i) for i in gdf.index]
out["geom_types"] = sorted(set(gdf.geom_type))
pts = shapely.get_coordinates(gdf.geometry.representative_point())
out["shape_point_labels"] = [int(nuclei0[int(y), int(x)]) for x, y in pts]
out["shape_areas"] = [float(a) for a in gdf.geometry.area]
table = sd.tables["table"]
attrs = table.uns["spatialdata_attrs"]
out["table_attrs"] = {k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in attrs.items()}
out["table_region_values"] = sorted(set(map(str, table.obs[attrs["region_key"]])))
out["table_ids"] = [int(i) for i in table.obs[attrs["instance_key"]]]
out["table_ids_in_labels"] = bool(np.isin(table.obs[attrs["instance_key"]].to_numpy(), np.unique(nuclei0)).all())
out["spatial"] = np.asarray(table.obsm["spatial"], float).tolist()
out["spatial_cgef"] = "spatial_cgef" in table.obsm
out["X_sum"] = float(table.X.sum())
print(json.dumps(out))
"""


def read_back(store, labels_tif) -> dict:
    proc = subprocess.run(
        [str(env_python("spatialdata")), "-c", READ_BACK, str(store), str(labels_tif)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_store_holds_every_element_linked_and_spatialdata_plot_renders_it(tmp_path):
    s = make_sample(tmp_path)
    out, png = tmp_path / "res" / "S1.zarr", tmp_path / "res" / "S1.png"
    run_step(
        "spatialdata",
        "spatialdata",
        *args_of(
            tmp_path,
            out,
            cells_labels=tmp_path / "cells.tif",
            png=png,
            pixel_size_um=0.5,
            stain="ssDNA",
            sample="S1",
            min_side=64,
        ),
    )
    r = read_back(out, tmp_path / "labels.tif")
    assert (r["images"], r["labels"], r["shapes"], r["tables"]) == (
        ["image"],
        ["cells", "nuclei"],
        ["nuclei_boundaries"],
        ["table"],
    )
    assert r["attrs"]["writer"] == "segrefine spatialdata" and r["attrs"]["sample"] == "S1"
    # image: the plain (strip) TIFF downsampled by 2 until the longer side is <= 64 px: 260 -> 130 -> 65 -> 32
    assert r["image_levels"] == [[1, 200, 260], [1, 100, 130], [1, 50, 65], [1, 25, 32]]
    assert r["channels"] == ["ssDNA"] and r["image_dtype"] == "uint8"
    # labels: the levels of the pyramidal OME-TIFFs as they are; level 0 = the labels exactly
    assert r["nuclei_levels"] == [[200, 260], [100, 130], [50, 65], [25, 33]] == r["cells_levels"]
    assert r["nuclei_dtype"] == "uint32" and r["nuclei_equal_labels_tif"]
    assert r["nuclei_level0_sum"] == int(s["labels"].astype(np.int64).sum())
    assert r["cells_level0_sum"] == int(s["cells"].astype(np.int64).sum())
    assert r["transformations"] == {"global": "Identity", "micron": "Scale[0.5, 0.5]"}
    assert r["image_coordinate_systems"] == ["global", "micron"]
    # shapes: one polygon per cell, indexed by its label id, lying on that label
    n = int(s["labels"].max())
    assert sorted(r["shape_ids"]) == list(range(1, n + 1)) and r["geom_types"] == ["Polygon"]
    assert r["shape_point_labels"] == r["shape_ids"]
    areas = np.bincount(s["labels"].ravel())[np.array(r["shape_ids"])]
    assert np.all(np.abs(np.array(r["shape_areas"]) - areas) <= 0.1 * areas + 4)  # marching squares cuts corners
    # table: every row linked to an existing nuclei label, centres in slide pixels (pixel i spans [i, i+1))
    assert r["table_attrs"]["region"] in ("nuclei", ["nuclei"])
    assert r["table_attrs"]["region_key"] == "region" and r["table_attrs"]["instance_key"] == "label_id"
    assert r["table_region_values"] == ["nuclei"] and r["table_ids_in_labels"]
    assert r["table_ids"] == s["h5ad_ids"].tolist() and 3 not in r["table_ids"]
    np.testing.assert_allclose(r["spatial"], s["centres"][s["h5ad_ids"] - 1] + 0.5)
    assert r["spatial_cgef"] and r["X_sum"] > 0
    # the PNG spatialdata-plot rendered: two panels (slide with labels; close-up with labels and outlines)
    import matplotlib.image

    pic = matplotlib.image.imread(png)
    assert pic.shape[:2] == (600, 1200) and pic[..., :3].std() > 0.05


@pytest.mark.integration
def test_a_slide_pyramid_is_kept_level_by_level_and_rgb_stays_rgb(tmp_path):
    make_sample(tmp_path, rng_seed=1, slide_pyramid=True, rgb=True)
    out = tmp_path / "S2.zarr"
    run_step("spatialdata", "spatialdata", *args_of(tmp_path, out))
    r = read_back(out, tmp_path / "labels.tif")
    assert r["image_levels"] == [[3, 200, 260], [3, 100, 130], [3, 50, 65]]  # the file's own levels
    assert r["channels"] == ["r", "g", "b"]
    assert r["labels"] == ["nuclei"]  # no cell labels given
    assert r["transformations"] == {"global": "Identity"}  # no pixel size: no micron system


@pytest.mark.integration
def test_a_target_that_is_not_ours_is_refused_untouched_and_ours_is_replaced(tmp_path):
    make_sample(tmp_path)
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    proc = run_step("spatialdata", "spatialdata", *args_of(tmp_path, foreign), check=False)
    assert proc.returncode == 1
    assert "foreign.zarr: exists and is not a SpatialData store written by segrefine" in proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["zarr.json"]
    ours = tmp_path / "ours.zarr"
    run_step("spatialdata", "spatialdata", *args_of(tmp_path, ours))
    (ours / "stray.txt").write_text("from the first run")
    run_step("spatialdata", "spatialdata", *args_of(tmp_path, ours))
    assert not (ours / "stray.txt").exists() and (ours / "zarr.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no work folder left


@pytest.mark.integration
@pytest.mark.parametrize("case", ["labels of another size", "h5ad cell not in the cell table"])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, case):
    import tifffile

    make_sample(tmp_path)
    if case == "labels of another size":
        tifffile.imwrite(tmp_path / "labels.tif", np.zeros((H, W + 1), np.uint32))
        expect = "the nuclei labels are 261x200 px but the slide is 260x200 px"
    else:
        _write_h5ad(tmp_path / "cells.h5ad", [1, 2, 999], [[1, 1], [2, 2], [3, 3]])
        expect = "1 row(s) have a label_id that is not a cell of"
    out = tmp_path / "res" / "S.zarr"
    proc = run_step("spatialdata", "spatialdata", *args_of(tmp_path, out), check=False)
    assert proc.returncode == 1 and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "res").exists() or list((tmp_path / "res").iterdir()) == []


# --- the parts that need no spatialdata (core env) --------------------------------------------------------------------
def test_ours_is_known_by_the_segrefine_root_attribute(tmp_path):
    from segrefine.sdata import check_target, is_ours

    v3, v2 = tmp_path / "v3.zarr", tmp_path / "v2.zarr"
    v3.mkdir()
    v2.mkdir()
    (v3 / "zarr.json").write_text(json.dumps({"attributes": {"segrefine": {"writer": "segrefine spatialdata"}}}))
    (v2 / ".zattrs").write_text(json.dumps({"segrefine": {"writer": "someone else"}}))
    assert is_ours(v3) and not is_ours(v2) and not is_ours(tmp_path / "missing.zarr")
    check_target(v3)
    check_target(tmp_path / "missing.zarr")
    with pytest.raises(SegRefineError, match="v2.zarr: exists and is not a SpatialData store written by segrefine"):
        check_target(v2)
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(SegRefineError, match="file.zarr: exists and is not a SpatialData folder"):
        check_target(tmp_path / "file.zarr")


def test_outlines_are_read_from_the_stitch_layout_and_from_any_feature_collection(tmp_path):
    from segrefine.sdata import read_outlines
    from segrefine.stitch import _GeoJSONWriter

    lab = np.zeros((20, 30), np.uint32)
    lab[2:6, 3:9], lab[10:15, 20:26] = 7, 2
    with contextlib.ExitStack() as stack:
        geo = _GeoJSONWriter(stack, tmp_path / "ours.geojson")
        geo.add(lab, (100, 50))
        geo.close()
    ids, polys = read_outlines(tmp_path / "ours.geojson")
    assert sorted(ids.tolist()) == [2, 7]
    by_id = dict(zip(ids.tolist(), polys))
    assert by_id[7].bounds == (103.0, 52.0, 109.0, 56.0)  # pixel i spans [i, i+1): x 3..8 -> [103, 109)
    doc = json.loads((tmp_path / "ours.geojson").read_text())
    (tmp_path / "one_line.geojson").write_text(json.dumps(doc))  # another layout: parsed whole
    ids2, polys2 = read_outlines(tmp_path / "one_line.geojson")
    assert ids2.tolist() == ids.tolist() and all(a.equals(b) for a, b in zip(polys, polys2))
    doc["features"][1]["properties"]["measurements"]["cell_id"] = doc["features"][0]["properties"]["measurements"][
        "cell_id"
    ]
    (tmp_path / "dup.geojson").write_text(json.dumps(doc))
    with pytest.raises(SegRefineError, match="dup.geojson: cell id .* has more than one outline"):
        read_outlines(tmp_path / "dup.geojson")
    (tmp_path / "cut.geojson").write_text((tmp_path / "ours.geojson").read_text()[:300])
    with pytest.raises(SegRefineError, match="cut.geojson: line 2 is not valid JSON"):
        read_outlines(tmp_path / "cut.geojson")
