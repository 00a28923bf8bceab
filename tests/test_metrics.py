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
    t[20:30, 12:22] = 4   # touches cell 3
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
    p[2:12, 2:6] = 9                 # cell 1 split 40/60: the 60% half still matches (IoU 0.6)
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 1, 0)
    assert m["precision"] == pytest.approx(4 / 5) and m["recall"] == 1.0
    p[2:12, 2:7] = 9                 # 50/50: IoU exactly 0.5 matches (>= threshold)
    assert evaluate_pair(t, p)["tp"] == 4
    p[2:12, 2:5] = 9                 # 30/30/40: no piece reaches IoU 0.5 -> cell 1 unmatched
    p[2:12, 5:8] = 8
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 3, 1)


def test_merged_touching_pair_matches_neither():
    t = _truth()
    p = t.copy()
    p[p == 4] = 3                    # 3 and 4 merged: IoU 0.5 with each... exactly at the threshold
    m = evaluate_pair(t, p)
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 1)  # IoU >= 0.5 matches one of them, once
    p[20:30, 22:25] = 3              # a larger merged blob: IoU < 0.5 with both
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
