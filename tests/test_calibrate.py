"""Temperature scaling, the in-class scores and the unknown threshold (transfer.calibrate),
and their graph versions (model.scored)."""

import json
import math

import keras
import numpy as np
import pytest

from transfer import calibrate
from transfer.calibrate import Calibration
from transfer.model import scored


def overconfident(count=4000, classes=3, true_temperature=2.5, seed=0):
    """Logits whose labels are drawn from softmax(logits / 2.5): a model 2.5x too sure."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (count, classes))
    truth = calibrate.softmax(logits, true_temperature)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    return logits, labels


def test_the_fitted_temperature_is_the_known_one_and_lowers_the_log_loss():
    logits, labels = overconfident()
    temperature = calibrate.fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert calibrate.log_loss(logits, labels, temperature) < calibrate.log_loss(logits, labels)
    for other in (1.0, 2.0, 3.0):  # it is the minimum
        assert (calibrate.log_loss(logits, labels, temperature)
                <= calibrate.log_loss(logits, labels, other) + 1e-9)


def test_scaling_lowers_the_calibration_error_and_never_changes_the_class():
    logits, labels = overconfident()
    calibration, figures = calibrate.calibrate(logits, labels, keep=0.95)
    assert figures["ece_after"] < 0.03 < figures["ece_before"]
    after = calibrate.softmax(logits, calibration.temperature)
    np.testing.assert_array_equal(after.argmax(axis=1), logits.argmax(axis=1))


def test_calibration_error_of_a_known_case():
    # Two images at confidence 0.9, one right: |0.5 - 0.9| in one bin, weighted by all four;
    # two at 0.6, both right: |1 - 0.6|.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    assert calibrate.expected_calibration_error(probabilities, labels) == pytest.approx(
        (2 * 0.4 + 2 * 0.4) / 4)
    rows = calibrate.reliability(probabilities, labels)
    assert len(rows) == calibrate.ECE_BINS and sum(row[2] for row in rows) == 4


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_the_threshold_keeps_the_asked_share_of_validation_images(keep):
    logits, labels = overconfident(count=1000)
    calibration, _ = calibrate.calibrate(logits, labels, keep)
    kept = calibrate.scores(logits, calibration.temperature) >= calibration.threshold
    assert keep <= kept.mean() < keep + 2 / len(logits)


def test_scores_are_higher_for_confident_logits():
    confident, unsure = [[8.0, 0.0, 0.0]], [[0.1, 0.0, 0.05]]
    for kind in calibrate.SCORES:
        assert calibrate.scores(confident, 1.0, kind) > calibrate.scores(unsure, 1.0, kind)
    assert calibrate.scores([[0.0, 0.0]], 1.0, "energy")[0] == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="must be one of energy, max_probability"):
        calibrate.scores(confident, 1.0, "entropy")


def test_separation_of_perfectly_and_not_separated_scores():
    inside = np.linspace(1, 2, 100)
    assert calibrate.separation(inside, inside - 5) == {"auroc": 1.0, "fpr_at_95_tpr": 0.0}
    assert calibrate.separation(inside, inside)["auroc"] == pytest.approx(0.5)


def test_a_run_without_calibration_changes_nothing_and_rejects_nothing(tmp_path):
    assert calibrate.read(tmp_path) == Calibration() == calibrate.read(None)
    stored = Calibration(1.7, "max_probability", 0.42, 0.9)
    (tmp_path / calibrate.CALIBRATION).write_text(json.dumps(stored.to_dict()))
    assert calibrate.read(tmp_path) == stored
    assert Calibration().to_dict()["threshold"] is None  # JSON has no -inf


@pytest.mark.parametrize("kind", calibrate.SCORES)
def test_the_graph_computes_what_numpy_computes(kind):
    inputs = keras.Input((4, 4, 3), name="images")
    features = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax",
                                                   name="probabilities")(features))
    images = np.random.default_rng(0).uniform(0, 255, (5, 4, 4, 3)).astype("float32")
    dense = model.get_layer("probabilities")
    logits = images.reshape(5, -1) @ dense.kernel.numpy() + dense.bias.numpy()
    out = scored(model, Calibration(3.0, kind), logits=True)(images)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(out["probabilities"]),
                               calibrate.softmax(logits, 3.0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["score"]), calibrate.scores(logits, 3.0, kind),
                               rtol=1e-4, atol=1e-4)
    # apply() turns the uncalibrated logits into those same outputs (training's validation
    # report takes them instead of predicting the images again).
    applied = calibrate.apply(Calibration(3.0, kind), np.asarray(scored(model, logits=True)(
        images)["logits"]))
    for key in ("logits", "probabilities", "score"):
        np.testing.assert_allclose(applied[key], np.asarray(out[key]), rtol=1e-5, atol=1e-5)
    # Temperature 1 gives the classifier's own probabilities.
    np.testing.assert_allclose(np.asarray(scored(model)(images)["probabilities"]),
                               np.asarray(model(images)), atol=1e-6)
