"""Cell outlines (segrefine.outlines): marching-squares rings per cell and their GeoJSON text for all cells at
once."""

import json

import numpy as np

from segrefine.demo import make_slide
from segrefine.outlines import cell_outlines
from tiling_helpers import LocalClassical


def test_cell_outlines_follow_pixel_edges():
    lab = np.zeros((10, 10), np.uint32)
    lab[2:5, 3:7] = 42
    [(cid, ring)] = cell_outlines(lab, origin=(100, 200))
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert cid == 42 and ring[0] == ring[-1]
    assert (min(xs), max(xs), min(ys), max(ys)) == (103, 107, 202, 205)


def _reference_outlines(labels, origin):
    """The outlines as first written: skimage's find_contours on each cell's padded mask."""
    from scipy import ndimage
    from skimage.measure import find_contours

    ids = np.unique(labels)
    ids = ids[ids > 0]
    dense = np.searchsorted(ids, labels).astype(np.int32) + 1
    dense[labels == 0] = 0
    out = []
    for k, sl in enumerate(ndimage.find_objects(dense), 1):
        if sl is None:
            continue
        c = max(find_contours(np.pad(dense[sl] == k, 1).astype(np.uint8), 0.5), key=len)
        xs = np.round(c[:, 1] - 1 + sl[1].start + origin[0] + 0.5, 2)
        ys = np.round(c[:, 0] - 1 + sl[0].start + origin[1] + 0.5, 2)
        ring = np.stack([xs, ys], axis=1).tolist()
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        out.append((int(ids[k - 1]), ring))
    return out


def test_cell_outlines_equal_find_contours_of_each_cell():
    img, _, _ = make_slide(256, seed=2)
    labels = LocalClassical().predict(img).astype(np.uint32)
    labels[100:120, 100:130] = 999_999  # sparse id; a cell with a hole and one in two pieces (diagonal touch)
    labels[108:112, 110:115] = 0
    labels[200:205, 10:15] = labels[205:210, 15:20] = 77_777
    for lab in (labels, np.where(labels > 0, labels * 3 + 5, 0).astype(np.uint32)):
        assert cell_outlines(lab, (1000, 50)) == _reference_outlines(lab, (1000, 50))


def test_outline_texts_of_all_cells_at_once_equal_the_per_cell_contours():
    """The vectorised marching squares (shard and stitch) give the text of exactly the per-cell rings, also on
    fragmented labels: holes, cells in pieces, saddles, ties between equally long pieces, sparse ids."""
    from segrefine.outlines import outline_texts

    rng = np.random.default_rng(1)
    img, _, _ = make_slide(256, seed=4)
    cases = [LocalClassical().predict(img).astype(np.uint32)]
    cases += [(rng.integers(0, 2 + k, (20 + k, 33)) * (1 + 1000 * (k % 2))).astype(np.uint32) for k in range(12)]
    cases += [np.zeros((5, 5), np.uint32), np.pad(np.ones((3, 3), np.uint32), 1)]
    for k, lab in enumerate(cases):
        ids, texts = outline_texts(lab, (k, 3 * k))
        ref = cell_outlines(lab, (k, 3 * k))
        assert ids.tolist() == [cid for cid, _ in ref] and texts == [json.dumps(r) for _, r in ref], k
