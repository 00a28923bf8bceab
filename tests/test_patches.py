import numpy as np
import pytest
import tifffile

from segrefine import SegRefineError
from segrefine.io import Slide, read_tiff, write_tiff
from segrefine.patches import PatchBox, grid_boxes, parse_patch_name, reflect_pad


def test_patch_names_round_trip():
    box = PatchBox("SS200000135TL_D1", 512, 768, 256, 128)
    assert box.name == "SS200000135TL_D1-x512_y768_w256_h128"
    for suffix in ("", "-img", "-mask"):
        assert parse_patch_name(box.name + suffix) == box


@pytest.mark.parametrize("bad", ["DEMO01", "DEMO01-x1_y2_w3", "DEMO01-x1_y2_w0_h4", "x1_y2_w3_h4"])
def test_bad_patch_names_are_refused(bad):
    with pytest.raises(SegRefineError):
        parse_patch_name(bad)


def test_grid_stays_inside_the_slide():
    boxes = grid_boxes("S", (600, 1000), 256, 256)
    assert len(boxes) == 2 * 3
    assert all(b.x + b.w <= 1000 and b.y + b.h <= 600 for b in boxes)


@pytest.mark.parametrize("shape", [(256, 256), (200, 130), (256, 256, 3), (5, 7)])
def test_reflect_pad_keeps_original_pixels(shape):
    img = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    out = reflect_pad(img, 512)
    assert out.shape[:2] == (512, 512)
    np.testing.assert_array_equal(out[: shape[0], : shape[1]], img)


def test_slide_reads_regions_of_a_tiled_tiff(tmp_path):
    img = np.random.default_rng(1).integers(0, 65535, (700, 900), dtype=np.uint16)
    write_tiff(tmp_path / "s.tif", img, tiled=True)
    with Slide(tmp_path / "s.tif") as s:
        assert s.shape == (700, 900) and s.channels == 1 and s.dtype == np.uint16
        np.testing.assert_array_equal(s.read(100, 513, 300, 187), img[513:700, 100:400])
        with pytest.raises(SegRefineError, match="outside the slide"):
            s.read(800, 0, 200, 10)


def test_slide_reads_rgb_regions(tmp_path):
    img = np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", img, photometric="rgb", tile=(128, 128))
    with Slide(tmp_path / "rgb.tif") as s:
        assert s.channels == 3
        np.testing.assert_array_equal(s.read(10, 20, 150, 100), img[20:120, 10:160])


def test_slide_reads_real_pyramidal_files(realdata):
    """A real QuPath-written tiled OME-TIFF and a real pyramidal NDPI: level-0 regions."""
    ome = realdata / "he-omeTiff-qupath" / "OS-1-detail.ome.tif"
    full = tifffile.imread(ome, series=0, level=0)
    with Slide(ome) as s:
        region = s.read(300, 200, 257, 129)
        expected = full[200:329, 300:557] if full.shape[-1] in (3, 4) else np.moveaxis(full, 0, -1)[200:329, 300:557]
        np.testing.assert_array_equal(region, expected)
    ndpi = realdata / "dapi-wsi-ndpi" / "test3-DAPI-2-387.ndpi"
    with Slide(ndpi) as s:
        assert s.shape == (4864, 3968) and s.channels == 3
        d = s.describe()
        assert (d["axes"], d["photometric"], d["file_channels"], d["alpha_dropped"], d["channel"]) == (
            "YXS",
            "YCBCR",
            3,
            [],
            None,
        )
        assert d["levels"] == [[4864, 3968], [2432, 1984], [1216, 992], [608, 496]]
        level0 = tifffile.imread(ndpi, series=0, level=0)
        np.testing.assert_array_equal(s.read(2000, 1500, 256, 300), level0[1500:1800, 2000:2256])


def test_truncated_tiff_is_a_clear_error(tmp_path):
    img = np.random.default_rng(3).integers(0, 255, (512, 512), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "full.tif", img, tile=(128, 128), compression="zlib")
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(SegRefineError, match="cut.tif"):
        read_tiff(tmp_path / "cut.tif")
    (tmp_path / "text.tif").write_text("not an image")
    with pytest.raises(SegRefineError, match="text.tif: not a readable TIFF"):
        Slide(tmp_path / "text.tif")


def test_write_tiff_is_atomic(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises((KeyError, TypeError, ValueError)):  # tifffile has no TIFF type for object arrays
        write_tiff(target, np.zeros((4, 4), dtype=object))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no leftover temporary file either


def test_padded_masks_give_mirrored_cells_their_own_ids():
    from segrefine.patches import reflect_pad_labels

    lab = np.zeros((256, 256), np.uint16)
    lab[10:20, 240:256] = 1  # touches the right edge: mirrored next to itself
    lab[100:110, 100:110] = 2
    out = reflect_pad_labels(lab, 512)
    np.testing.assert_array_equal(out[:256, :256], lab)
    assert out.shape == (512, 512)
    # 2 cells x 4 copies (original, right, bottom, corner), every copy its own id
    assert len(np.unique(out)) - 1 == 8
    assert out[15, 255] != out[15, 256] and out[15, 256] > 0


def test_listed_patch_coordinates(tmp_path):
    from segrefine.patches import boxes_from_table

    (tmp_path / "c.tsv").write_text("sample\tx\ty\tw\th\nS1\t0\t10\t64\t64\nS2\t5\t5\t32\t32\n")
    assert boxes_from_table(tmp_path / "c.tsv", "S1") == [PatchBox("S1", 0, 10, 64, 64)]
    (tmp_path / "bad.csv").write_text("x,y,w\n1,2,3\n")
    with pytest.raises(SegRefineError, match=r"bad.csv:2: need integer columns x, y, w, h"):
        boxes_from_table(tmp_path / "bad.csv", "S1")
