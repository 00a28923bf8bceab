import numpy as np
import tifffile

from segrefine.annotations import convert_annotation, relabel_sequential
from segrefine.demo import generic_nuclei, make_demo, make_slide
from segrefine.patches import parse_patch_name


def test_slide_is_a_pure_function_of_the_seed():
    a = make_slide(256, seed=3)
    b = make_slide(256, seed=3)
    c = make_slide(256, seed=4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])


def test_dense_band_is_denser_than_the_rest():
    img, labels, band = make_slide(768, seed=1)
    in_band = len(np.unique(labels[band])) / band.sum()
    outside = len(np.unique(labels[~band])) / (~band).sum()
    assert in_band > 3 * outside
    assert labels.dtype == np.uint32 and img.dtype == np.uint8


def test_demo_annotations_are_the_truth_of_their_patches(tmp_path):
    info = make_demo(tmp_path, sn="T1", size=512, n_patches=4, patch_size=128, seed=2)
    truth = tifffile.imread(tmp_path / "T1-truth.tif")
    files = sorted((tmp_path / "annotations").glob("*.geojson"))
    assert len(files) == info["patches"] == 4
    for f in files:
        box = parse_patch_name(f.stem)
        crop = relabel_sequential(truth[box.y : box.y + box.h, box.x : box.x + box.w].astype(np.int64))
        np.testing.assert_array_equal(convert_annotation(f, (box.h, box.w)), crop)
    gem = (tmp_path / "T1.gem.gz").read_bytes()
    assert len(gem) > 1000


def test_generic_nuclei_are_isolated():
    from scipy import ndimage

    imgs, masks = generic_nuclei(2, 128, seed=0)
    for m in masks:
        comps, n = ndimage.label(m > 0)
        assert n == len(np.unique(m)) - 1  # no two nuclei touch
