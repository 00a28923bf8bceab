"""Our object metrics equal the reference implementations on real data:
stardist.matching (tensorflow env) and cellpose.metrics.average_precision (cellpose env),
at IoU thresholds 0.50 ... 0.95. Predictions are real: the classical model's output on
real images, compared with their manual ground truth."""

import json
import os
import subprocess

import numpy as np
import pytest
import tifffile

from conftest import SCRIPTS
from segrefine.annotations import mask_to_instances
from segrefine.envs import env_python
from segrefine.models.classical_adapter import ClassicalAdapter

THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]

STARDIST = (
    """
import json, sys, numpy as np
from stardist.matching import matching
from segrefine.metrics import object_metrics
d = np.load(sys.argv[1]); worst = 0.0; worst_iou = 0.0
for k in range(len(d.files) // 2):
    t, p = d[f"t{k}"], d[f"p{k}"]
    for th in %r:
        ref, ours = matching(t, p, thresh=th), object_metrics(t, p, th)
        pairs = [("tp", "tp"), ("fp", "fp"), ("fn", "fn"), ("precision", "precision"), ("recall", "recall"),
                 ("f1", "f1"), ("accuracy", "ap")]
        worst = max([worst] + [abs(float(getattr(ref, a)) - float(ours[b])) for a, b in pairs])
        worst_iou = max(worst_iou, abs(float(ref.mean_matched_score) - ours["mean_matched_iou"]))
print(json.dumps({"worst": worst, "worst_iou": worst_iou}))
"""
    % THRESHOLDS
)

CELLPOSE = """
import json, sys, numpy as np
from cellpose.metrics import average_precision
from segrefine.metrics import object_metrics
d = np.load(sys.argv[1]); worst = 0.0
for k in range(len(d.files) // 2):
    t, p = d[f"t{k}"], d[f"p{k}"]
    ap, tp, fp, fn = average_precision([t], [p], threshold=%r)
    for j, th in enumerate(%r):
        ours = object_metrics(t, p, th)
        worst = max(worst, abs(ap[0, j] - ours["ap"]), abs(tp[0, j] - ours["tp"]), abs(fp[0, j] - ours["fp"]),
                    abs(fn[0, j] - ours["fn"]))
print(json.dumps({"worst": float(worst)}))
""" % (THRESHOLDS, THRESHOLDS)


@pytest.fixture(scope="module")
def real_pairs(realdata, tmp_path_factory):
    pairs = {}
    model = ClassicalAdapter.from_pretrained(None, {})
    sources = [
        ("stardist-dsb2018", "img2d_256.tif", "mask2d_256.tif"),
        ("stardist-dsb2018", "img2d_512.tif", "mask2d_512.tif"),
    ]
    sources += [("cellbindb-demo", f"{s}_img.tif", f"{s}_mask.tif") for s in ("ssDNA", "DAPI", "mIF", "10xDAPI")]
    for k, (folder, img, mask) in enumerate(sources):
        truth = mask_to_instances(tifffile.imread(realdata / folder / mask)).astype(np.int32)
        pairs[f"t{k}"] = truth
        pairs[f"p{k}"] = model.predict(tifffile.imread(realdata / folder / img)).astype(np.int32)
    path = tmp_path_factory.mktemp("ref") / "pairs.npz"
    np.savez(path, **pairs)
    return path


@pytest.mark.integration
@pytest.mark.parametrize("env,code", [("tensorflow", STARDIST), ("cellpose", CELLPOSE)], ids=["stardist", "cellpose"])
def test_metrics_equal_the_reference_implementation(env, code, real_pairs):
    out = subprocess.run(
        [str(env_python(env)), "-c", code, str(real_pairs)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SCRIPTS), TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["worst"] <= 1e-9  # counts, precision, recall, F1, AP: identical
    # stardist computes its IoU matrix in float32 (ours is float64): the mean matched IoU agrees to float32 precision
    assert result.get("worst_iou", 0.0) <= 1e-6
