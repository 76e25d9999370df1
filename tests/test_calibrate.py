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


def gaussian_classes(count, classes=3, dimensions=16, shift=0.0, seed=0):
    """(features, labels): `count` draws of `classes` Gaussians with one shared, correlated
    covariance; `shift` moves every draw that far along one axis (images of none of them)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(0, 1, (dimensions, dimensions))
    centers = np.random.default_rng(98).normal(0, 3, (classes, dimensions))
    labels = rng.integers(0, classes, count)
    features = centers[labels] + rng.normal(0, 1, (count, dimensions)) @ mixing
    features[:, 0] += shift
    return features.astype(np.float32), labels


def test_scaling_lowers_the_calibration_error_and_never_changes_the_class():
    logits, labels = overconfident()
    calibration, figures = calibrate.calibrate({"logits": logits}, labels, 0.95,
                                               kind="energy")
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
    calibration, _ = calibrate.calibrate({"logits": logits}, labels, keep, kind="energy")
    kept = calibrate.scores(logits, calibration.temperature) >= calibration.threshold
    assert keep <= kept.mean() < keep + 2 / len(logits)


@pytest.mark.parametrize("keep", [0.9, 0.95, 0.99])
def test_the_mahalanobis_threshold_keeps_the_asked_share_of_new_in_class_images(keep):
    # Fitted on the validation images, its threshold comes from cross-fitted halves: new
    # images of the same classes are kept at the asked rate (in-sample scores would set it
    # too high and reject more of them), and images of none of the classes are not.
    features, labels = gaussian_classes(600)
    logits = np.zeros((len(labels), 3))
    calibration, _ = calibrate.calibrate({"logits": logits, "features": features}, labels,
                                         keep)
    assert calibration.score == "mahalanobis" and calibration.means.shape == (3, 16)
    new, _ = gaussian_classes(5000, seed=1)
    others, _ = gaussian_classes(1000, shift=40.0, seed=2)
    kept = calibrate.score_of(calibration, {"features": new}) >= calibration.threshold
    assert keep - 0.02 <= kept.mean() <= keep + 0.02
    assert (calibrate.score_of(calibration, {"features": others})
            >= calibration.threshold).mean() < 0.05


def test_mahalanobis_is_the_squared_distance_to_the_nearest_class_mean():
    features, labels = gaussian_classes(800, classes=2, dimensions=4)
    means, whitening = calibrate.fit_mahalanobis(features, labels, 2)
    np.testing.assert_allclose(means[1], features[labels == 1].mean(axis=0), rtol=1e-5)
    from sklearn.covariance import LedoitWolf

    precision = LedoitWolf().fit(features - means[labels]).precision_
    point = features[0].astype(np.float64)
    expected = -min(float((point - m) @ precision @ (point - m)) for m in means)
    assert calibrate.mahalanobis(point[None], means, whitening)[0] == pytest.approx(expected,
                                                                          rel=1e-4)


def test_too_few_validation_images_per_class_fall_back_to_energy():
    features, labels = gaussian_classes(10, classes=2)
    labels[:] = 0
    labels[0] = 1  # one image of class 1: no half can hold it
    calibration, figures = calibrate.calibrate(
        {"logits": np.random.default_rng(0).normal(0, 1, (10, 2)), "features": features},
        labels, 0.9)
    assert calibration.score == "energy" and calibration.means is None
    assert "class 1 has 1 validation image(s)" in figures["score_fallback"]


def test_scores_are_higher_for_confident_logits():
    confident, unsure = [[8.0, 0.0, 0.0]], [[0.1, 0.0, 0.05]]
    for kind in calibrate.LOGIT_SCORES:
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


def test_the_mahalanobis_statistics_are_stored_beside_calibration_json(tmp_path):
    features, labels = gaussian_classes(300)
    calibration, figures = calibrate.calibrate(
        {"logits": np.zeros((300, 3)), "features": features}, labels, 0.95)
    calibrate.write(tmp_path, calibration, figures)
    assert json.loads((tmp_path / calibrate.CALIBRATION).read_text())["score"] == "mahalanobis"
    read = calibrate.read(tmp_path)
    assert read == calibration and read.whitening.shape == (16, 16)
    (tmp_path / calibrate.STATISTICS).unlink()
    with pytest.raises(FileNotFoundError, match="calibration.npz is missing"):
        calibrate.read(tmp_path)


@pytest.mark.parametrize("kind", calibrate.SCORES)
def test_the_graph_computes_what_numpy_computes(kind):
    inputs = keras.Input((4, 4, 3), name="images")
    features = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax",
                                                   name="probabilities")(features))
    images = np.random.default_rng(0).uniform(0, 255, (5, 4, 4, 3)).astype("float32")
    dense = model.get_layer("probabilities")
    flat = images.reshape(5, -1)
    logits = flat @ dense.kernel.numpy() + dense.bias.numpy()
    statistics = ()
    if kind == "mahalanobis":  # fitted on other images of the same kind
        others = np.random.default_rng(1).uniform(0, 255, (80, 48))
        statistics = calibrate.fit_mahalanobis(others, np.arange(80) % 3, 3)
    calibration = Calibration(3.0, kind, -math.inf, None, *statistics)
    out = scored(model, calibration, raw=True)(images)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(out["features"]), flat)
    np.testing.assert_allclose(np.asarray(out["probabilities"]),
                               calibrate.softmax(logits, 3.0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["score"]),
                               calibrate.score_of(calibration, {"logits": logits,
                                                                "features": flat}),
                               rtol=1e-4, atol=1e-4)
    # apply() turns the uncalibrated outputs into those same outputs (training's validation
    # report takes them instead of predicting the images again).
    raw = {key: np.asarray(value) for key, value in scored(model, raw=True)(images).items()}
    applied = calibrate.apply(calibration, raw)
    for key in ("logits", "probabilities", "score"):
        np.testing.assert_allclose(applied[key], np.asarray(out[key]), rtol=1e-5, atol=1e-5)
    # Temperature 1 gives the classifier's own probabilities.
    np.testing.assert_allclose(np.asarray(scored(model)(images)["probabilities"]),
                               np.asarray(model(images)), atol=1e-6)
