"""The classical baseline adapter (it runs in the core env, so it is tested in-process)."""

import json

import numpy as np
import pytest

from segrefine import SegRefineError
from segrefine.demo import make_slide
from segrefine.metrics import object_metrics
from segrefine.models.classical_adapter import ClassicalAdapter


@pytest.fixture(scope="module")
def demo_pairs():
    img, labels, band = make_slide(384, seed=5)
    return [
        (img[y : y + 128, x : x + 128], labels[y : y + 128, x : x + 128]) for y in (0, 128, 256) for x in (0, 128, 256)
    ]


def _f1(model, pairs):
    return np.mean([object_metrics(m.astype(np.int64), model.predict(i).astype(np.int64))["f1"] for i, m in pairs])


def test_separates_isolated_blobs():
    img = np.zeros((64, 64), np.float32)
    truth = np.zeros((64, 64), np.int32)
    yy, xx = np.mgrid[:64, :64]
    for k, (cy, cx) in enumerate([(10, 10), (10, 40), (40, 20), (50, 50)], 1):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        img[disk] = 1.0
        truth[disk] = k
    pred = ClassicalAdapter.from_pretrained(None, {}).predict(img)
    assert object_metrics(truth, pred.astype(np.int64))["f1"] == 1.0
    assert ClassicalAdapter.from_pretrained(None, {}).predict(np.zeros((8, 8))).max() == 0


def test_calibration_never_does_worse_on_train_and_round_trips(demo_pairs, tmp_path):
    train, test = demo_pairs[:6], demo_pairs[6:]
    model = ClassicalAdapter.from_pretrained(None, {})
    before = _f1(model, train)
    curve = model.fine_tune(train, test[:1], {}, 0, tmp_path)
    assert len(curve["train_loss"]) == 3 * 3 * 4 and len(curve["val_loss"]) == 1
    assert _f1(model, train) >= before
    weights = model.save(tmp_path)
    again = ClassicalAdapter.from_pretrained(weights, {})
    assert again.params == model.params
    for img, _ in test:
        np.testing.assert_array_equal(again.predict(img), model.predict(img))


def test_foreign_parameter_files_and_unknown_parameters_are_refused(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"framework": "stardist"}))
    with pytest.raises(SegRefineError, match="not a classical-model parameter file"):
        ClassicalAdapter.from_pretrained(tmp_path / "w.json", {})
    with pytest.raises(SegRefineError, match=r"unknown classical-model parameters \['sigmaa'\]"):
        ClassicalAdapter.from_pretrained(None, {"sigmaa": 2})


def test_slide_intensity_reference_sets_the_threshold(demo_pairs):
    """With no reference the model thresholds an image by its own histogram, which is the same as giving it that
    image's reference; a window given the slide's reference uses the slide's threshold (inverted for H&E too)."""
    from segrefine.intensity import intensity_reference
    from segrefine.models.classical_adapter import reference_threshold

    img, _ = demo_pairs[4]
    own, slide_level = ClassicalAdapter({}), ClassicalAdapter({})
    assert slide_level.set_intensity_reference(intensity_reference(img)) is True
    assert (own.predict(img) == slide_level.predict(img)).all()
    whole = np.concatenate([img, np.zeros_like(img)], axis=1)  # a "slide" with a dark half: a lower threshold
    ref = intensity_reference(whole)
    assert reference_threshold(ref, False)[0] != reference_threshold(intensity_reference(img), False)[0]
    assert slide_level.set_intensity_reference(ref) is True
    assert (slide_level.predict(img) != own.predict(img)).any()
    he = ClassicalAdapter({"invert": True})
    he.set_intensity_reference(ref)
    t, gmax = reference_threshold(ref, True)
    assert gmax == ref["gray"]["max"] and t == gmax - ref["gray"]["otsu"]
    with pytest.raises(SegRefineError, match="not an intensity reference"):
        he.set_intensity_reference({"otsu": 3})
