"""Metrics on hand-built label images whose answers are known."""

import numpy as np
import pytest

from segrefine import SegRefineError
from segrefine.metrics import evaluate_pair


def _truth():
    t = np.zeros((40, 40), np.int32)
    t[2:12, 2:12] = 1
    t[2:12, 20:30] = 2
    t[20:30, 2:12] = 3
    t[20:30, 12:22] = 4  # touches cell 3
    return t


def test_perfect_prediction_with_other_label_values():
    t = _truth()
    p = t * 7
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 0, 0)
    assert m["f1"] == m["precision"] == m["recall"] == m["ap"] == m["jaccard"] == m["dice"] == 1.0


def test_split_cell_counts_one_match_at_most():
    t = _truth()
    p = t.copy()
    p[2:12, 2:6] = 9  # cell 1 split 40/60: the 60% half still matches (IoU 0.6)
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 1, 0)
    assert m["precision"] == pytest.approx(4 / 5) and m["recall"] == 1.0
    p[2:12, 2:7] = 9  # 50/50: IoU exactly 0.5 matches (>= threshold)
    assert evaluate_pair(t, p)["tp"] == 4
    p[2:12, 2:5] = 9  # 30/30/40: no piece reaches IoU 0.5 -> cell 1 unmatched
    p[2:12, 5:8] = 8
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 3, 1)


def test_merged_touching_pair_matches_neither():
    t = _truth()
    p = t.copy()
    p[p == 4] = 3  # 3 and 4 merged: IoU 0.5 with each... exactly at the threshold
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 1)  # IoU >= 0.5 matches one of them, once
    p[20:30, 22:25] = 3  # a larger merged blob: IoU < 0.5 with both
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 2)


def test_empty_prediction_and_empty_truth():
    t = _truth()
    m = evaluate_pair(t, np.zeros_like(t))
    assert (m["tp"], m["fp"], m["fn"], m["f1"], m["recall"], m["jaccard"], m["dice"]) == (0, 0, 4, 0, 0, 0, 0)
    m = evaluate_pair(np.zeros_like(t), t)
    assert (m["fp"], m["precision"], m["f1"]) == (4, 0.0, 0.0)
    m = evaluate_pair(np.zeros_like(t), np.zeros_like(t))
    assert m["f1"] == 1.0 and m["dice"] == 1.0


def test_pixel_jaccard_and_dice():
    t = np.zeros((10, 10), np.int32)
    t[0:5, :] = 1
    p = np.zeros_like(t)
    p[0:5, 0:5] = 1
    p[5:10, 0:5] = 2
    m = evaluate_pair(t, p)
    assert m["jaccard"] == pytest.approx(25 / 75) and m["dice"] == pytest.approx(50 / 100)


def test_shape_mismatch_and_float_labels_are_refused():
    with pytest.raises(SegRefineError, match="differ in shape"):
        evaluate_pair(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32))
    with pytest.raises(SegRefineError, match="integer label image"):
        evaluate_pair(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32))


# --- AP sweep, panoptic quality, options ----------------------------------------------------------------------------
def test_ap_at_every_threshold_and_panoptic_quality():
    t = _truth()
    p = t.copy()
    p[2:12, 10:12] = 0  # cell 1 shrunk to 80 px: IoU 0.8, the others perfect
    m = evaluate_pair(t, p)
    assert m["mode"] == "standard"
    assert [m[f"ap_{k}"] for k in (50, 55, 60, 65, 70, 75, 80)] == [1.0] * 7
    assert [m[f"ap_{k}"] for k in (85, 90, 95)] == pytest.approx([3 / 5] * 3)  # 3 TP, 1 FP, 1 FN
    assert m["ap_mean"] == pytest.approx((7 + 3 * 0.6) / 10)
    assert m["pq"] == pytest.approx((0.8 + 3) / 4)
    assert m["mean_matched_iou"] == pytest.approx(3.8 / 4)


def test_minimum_object_size_drops_specks_from_both_sides():
    t = _truth()
    p = t.copy()
    p[35:37, 35:37] = 9  # a 4-pixel speck: one false positive
    assert evaluate_pair(t, p)["fp"] == 1
    m = evaluate_pair(t, p, min_size=5)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 0, 0)


def test_partial_annotation_scores_only_annotated_cells():
    full = _truth()
    t = np.where(full <= 2, full, 0)  # only cells 1 and 2 annotated
    p = full.copy()
    p[35:38, 35:38] = 9  # unannotated cells 3, 4 and a speck: not penalized
    m = evaluate_pair(t, p, mode="partial")
    assert (m["mode"], m["n_true"], m["tp"], m["fp"], m["fn"]) == ("partial", 2, 2, 0, 0)
    assert m["precision"] == m["recall"] == m["f1"] == m["jaccard"] == 1.0
    assert evaluate_pair(t, p)["fp"] == 3  # the standard mode counts them
    p[2:12, 2:6] = 7  # cell 1 split 40/60: its best match (IoU 0.6) still counts
    p[2:12, 20:30] = 0  # cell 2 missed
    m = evaluate_pair(t, p, mode="partial")
    assert (m["tp"], m["fn"], m["recall"], m["f1"]) == (1, 1, 0.5, pytest.approx(2 / 3))
    assert m["mean_best_iou"] == pytest.approx(0.3)
    assert m["ap_65"] == 0.0 and m["ap_60"] == 0.5


# --- the paper's evaluator (compatibility mode) --------------------------------------------------------------------
def test_paper_mode_matches_above_iou_045():
    t = np.zeros((20, 20), np.int32)
    t[2:12, 2:12] = 1  # 100 px
    p = np.zeros_like(t)
    p[2:12, 2:6] = 5  # 40 px + 7 px inside the cell: IoU 0.47
    p[2:9, 6] = 5
    assert evaluate_pair(t, p)["tp"] == 0
    m = evaluate_pair(t, p, mode="paper")
    assert (m["mode"], m["tp"], m["precision"], m["recall"], m["f1"]) == ("paper", 1, 1.0, 1.0, 1.0)
    assert m["mean_matched_iou"] == pytest.approx(0.47)


def test_paper_mode_relabels_by_8_connectivity_but_keeps_distinct_labels():
    t = np.zeros((10, 10), np.uint8)
    t[0:5, 0:5] = 255  # a binary mask whose two cells touch at a corner
    t[5:10, 5:10] = 255
    p = np.zeros((10, 10), np.int32)
    p[0:5, 0:5] = 1
    p[5:10, 5:10] = 2
    m = evaluate_pair(t, p)  # standard: binary truth labelled by 4-connectivity, with a note
    assert (m["n_true"], m["tp"]) == (2, 2) and "looks binary" in m["notes"]
    m = evaluate_pair(t, p, mode="paper")  # the evaluator: one 8-connected object; the prediction keeps 2
    assert (m["n_true"], m["n_pred"], m["tp"], m["precision"], m["recall"]) == (1, 2, 1, 0.5, 1.0)


def test_paper_mode_counts_a_catastrophe_as_one_correct_detection():
    t = np.zeros((10, 20), np.int32)
    t[:, 0:10], t[:, 10:20] = 1, 2  # two cells side by side
    p = np.zeros_like(t)
    p[0:5, :], p[5:10, :] = 1, 2  # cut the other way: every IoU 1/3
    assert evaluate_pair(t, p)["tp"] == 0
    m = evaluate_pair(t, p, mode="paper")
    assert (m["catastrophes"], m["merges"], m["splits"], m["tp"]) == (1, 0, 0, 1)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    assert m["pq"] == 0.0  # no matched pair: the credit is the evaluator's count, not a match


def test_paper_mode_classifies_merges_and_splits():
    t = np.zeros((10, 30), np.int32)
    t[:, 0:10], t[:, 10:20] = 1, 2
    p = np.zeros_like(t)
    p[:, 0:25] = 1  # one blob over both cells: IoU 0.4 with each
    m = evaluate_pair(t, p, mode="paper")
    assert (m["merges"], m["splits"], m["catastrophes"], m["tp"], m["fp"], m["fn"]) == (1, 0, 0, 0, 1, 2)
    p = np.zeros_like(t)
    p[:, 0:3], p[:, 3:6], p[:, 6:10] = 1, 2, 3  # cell 1 in three pieces (IoU 0.3, 0.3, 0.4)
    m = evaluate_pair(t, p, mode="paper")
    assert (m["splits"], m["merges"], m["tp"], m["n_pred"]) == (1, 0, 0, 3)


def test_paper_mode_keeps_labels_above_255():
    t = np.zeros((10, 10), np.int32)
    t[0:4, 0:4], t[6:10, 6:10] = 256, 512  # the evaluator's uint8 copy would make both background
    m = evaluate_pair(t, t.copy(), mode="paper")
    assert (m["n_true"], m["tp"], m["f1"]) == (2, 2, 1.0)


def test_touching_cells_stay_apart_in_every_mode():
    t = _truth()  # cells 3 and 4 touch along an edge
    for mode in ("standard", "partial", "paper"):
        m = evaluate_pair(t, t.copy(), mode=mode)
        assert (m["n_true"], m["tp"], m["f1"]) == (4, 4, 1.0), mode


# --- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_names_the_file():
    t = _truth()
    bad = t.astype(np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(SegRefineError, match=r"P1-mask.tif: prediction contains 1 NaN pixels"):
        evaluate_pair(t, bad, source="P1-mask.tif")
    with pytest.raises(SegRefineError, match=r"P1-mask.tif: ground truth is empty"):
        evaluate_pair(np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32), source="P1-mask.tif")
    with pytest.raises(SegRefineError, match=r"P1-mask.tif: ground truth \(40, 40\) and prediction \(40, 30\)"):
        evaluate_pair(t, t[:, :30], source="P1-mask.tif")
    with pytest.raises(SegRefineError, match="unknown evaluation mode 'deepcell'"):
        evaluate_pair(t, t, mode="deepcell")


def test_binary_prediction_is_labelled_with_a_warning(caplog):
    t = _truth()
    m = evaluate_pair(t, (t > 0).astype(np.uint8) * 255, source="P2")
    # 4-connectivity: touching cells 3 and 4 become one object (IoU 0.5 with one of them)
    assert (m["n_pred"], m["tp"], m["fn"]) == (3, 3, 1)
    assert "prediction looks binary (one foreground value, 3 separate objects)" in m["notes"]
    assert "P2: prediction looks binary" in caplog.text


def test_empty_ground_truth_is_scored_and_noted():
    t = _truth()
    m = evaluate_pair(np.zeros_like(t), t, mode="paper")
    assert (m["fp"], m["precision"], m["f1"]) == (4, 0.0, 0.0)
    assert m["notes"] == "ground truth has no cell"
