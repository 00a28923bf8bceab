"""Check SegRefine's `paper` evaluation mode against the paper's own evaluator on real published predictions.

The CSRefiner paper's numbers come from STOmics/cs-benchmark (`src/eval/metrics.py`, DeepCell's object
metrics). This script imports that file from a checkout you provide (it is not part of SegRefine), runs it
the way `cell_eval_multi.py` does (8-connectivity labelling, cutoff1 = 0.55, cutoff2 = 0.1) on every
published prediction of the repository's demo (`demo/<stain>/output/<method>/*-img.tif` against
`demo/<stain>/gt/*-mask.tif`), and compares precision, recall, F1, Jaccard, Dice, PQ, merges, splits,
catastrophes and correct detections with `segrefine.metrics.evaluate_pair(mode="paper")`.

Two known defects of the evaluator are not reproduced by SegRefine, so the script removes them on its
side before comparing: masks are labelled from the full integer image (it copies them into uint8 first,
so labels >= 256 wrap around), and its PQ reads the matched pairs' IoUs with the right indices (it
subtracts 1 from 0-based indices). Modules the evaluator imports but never uses here (scikit-learn,
tqdm, pyximport, cv2) are replaced by empty stand-ins.

    git clone https://github.com/STOmics/cs-benchmark /tmp/cs-benchmark
    PYTHONPATH=workflow_scripts .envs/core/bin/python bench/paper_evaluator_check.py /tmp/cs-benchmark
"""

import glob
import json
import logging
import os
import sys
import types

import numpy as np
import tifffile
from skimage.measure import label
from skimage.segmentation import relabel_sequential

PAIRS = {
    "precision": "precision",
    "recall": "recall",
    "f1": "f1",
    "jaccard": "jaccard",
    "dice": "dice",
    "PQ": "pq",
    "merge": "merges",
    "split": "splits",
    "catastrophe": "catastrophes",
    "correct_detections": "tp",
    "n_true": "n_true",
    "n_pred": "n_pred",
}


def load_reference(checkout):
    for name, attrs in {
        "sklearn": {},
        "sklearn.metrics": {"confusion_matrix": None},
        "tqdm": {"tqdm": lambda x, **k: x},
        "pyximport": {"install": lambda: None},
        "cv2": {},
    }.items():
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m
    sys.path.insert(0, os.path.join(checkout, "src", "eval"))
    import metrics as ref

    def pq_right_indices(self, iou_threshold=0.5):
        tp, total = 0, 0.0
        for d in self._correct:
            if isinstance(d.true_index, tuple):  # catastrophe groups carry 1-based indices
                t, p = d.true_index[0] - 1, d.pred_index[0] - 1
            else:  # matched pairs carry 0-based indices
                t, p = d.true_index, d.pred_index
            if self.iou[t, p] >= iou_threshold:
                tp += 1
                total += self.iou[t, p]
        den = tp + 0.5 * self.gained_detections + 0.5 * self.missed_detections
        return (total / tp if tp else 0.0) * (tp / den if den else 0.0), None, None

    ref.ObjectMetrics.compute_pq = pq_right_indices
    return ref


def main(checkout):
    from segrefine.metrics import evaluate_pair

    logging.disable(logging.WARNING)  # the binary-mask notes, expected here
    ref = load_reference(checkout)
    worst, n = {}, 0
    print("stain\tmethod\tF1 evaluator\tF1 segrefine\tcatastrophes\tPQ evaluator\tPQ segrefine")
    for gt_path in sorted(glob.glob(os.path.join(checkout, "demo", "*", "gt", "*-mask.tif"))):
        stain_dir = os.path.dirname(os.path.dirname(gt_path))
        for dt_path in sorted(glob.glob(os.path.join(stain_dir, "output", "*", "*-img.tif"))):
            gt, dt = tifffile.imread(gt_path, key=0), tifffile.imread(dt_path, key=0)
            if gt.shape != dt.shape:
                continue
            t = relabel_sequential(label(gt.astype(np.int64), connectivity=2))[0]
            p = relabel_sequential(label(dt.astype(np.int64), connectivity=2))[0]
            r = ref.ObjectMetrics(t, p, cutoff1=0.55, cutoff2=0.1).to_dict()
            ours = evaluate_pair(gt.astype(np.int64), dt.astype(np.int64), mode="paper")
            for k, v in PAIRS.items():
                worst[k] = max(worst.get(k, 0.0), abs(float(r[k]) - float(ours[v])))
            n += 1
            print(
                f"{os.path.basename(stain_dir)}\t{os.path.basename(os.path.dirname(dt_path))}\t{r['f1']:.4f}\t"
                f"{ours['f1']:.4f}\t{r['catastrophe']}\t{r['PQ']:.4f}\t{ours['pq']:.4f}"
            )
    print(f"{n} published predictions compared; worst absolute difference per metric:")
    print(json.dumps(worst, indent=1))
    return 0 if n and max(worst.values()) <= 1e-9 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
