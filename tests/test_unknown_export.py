"""Calibrated probabilities, scores and unknown flags: the same from the export as from the
Keras model (issue 18)."""

import shutil

import numpy as np
import pytest

from conftest import TINY_SIZE, median_calibration
from transfer import calibrate
from transfer.calibrate import Calibration
from transfer.check import list_images
from transfer.export import CONFIG_ASSET, export_savedmodel, read_asset, verify_export
from transfer.files import write_json
from transfer.images import load_image
from transfer.model import load_model, scored
from transfer.predict import Predictor, predict_paths


@pytest.fixture(scope="module")
def calibrated_run(trained_run, tmp_path_factory):
    """A copy of the trained run with a temperature of 2 and half its validation images
    unknown: (run_dir, validation files, their images, the Calibration)."""
    run_dir, dataset = trained_run
    copy = shutil.copytree(run_dir, tmp_path_factory.mktemp("calibrated") / run_dir.name)
    files = list_images(dataset / "validation").images
    images = np.stack([load_image(f, TINY_SIZE) for f in files]).astype("float32")
    calibration = median_calibration(load_model(copy / "model.keras"), images)
    write_json(copy / calibrate.CALIBRATION, calibration.to_dict())
    return copy, files, images, calibration


def test_the_export_and_predict_give_the_same_probabilities_scores_and_flags(calibrated_run,
                                                                            tmp_path):
    import tensorflow as tf

    from transfer.pipeline import export_run

    run_dir, files, images, calibration = calibrated_run
    target, _ = export_run(run_dir, output=tmp_path / "models")
    assert read_asset(target, CONFIG_ASSET)["calibration"] == calibration.to_dict()

    from_keras = Predictor(run_dir).predict(images)
    from_export = Predictor(target).predict(images)
    np.testing.assert_allclose(from_export["probabilities"], from_keras["probabilities"],
                               atol=1e-5)
    np.testing.assert_allclose(from_export["score"], from_keras["score"], rtol=1e-5, atol=1e-5)
    assert from_export["unknown"].dtype == bool
    np.testing.assert_array_equal(from_export["unknown"], from_keras["unknown"])
    assert sorted(set(from_export["unknown"].tolist())) == [False, True]

    # Applied in the graph, not only carried along: softmax(logits / 2), the logits' energy.
    logits = np.asarray(scored(load_model(run_dir / "model.keras"), raw=True)(images)["logits"])
    np.testing.assert_allclose(from_export["probabilities"], calibrate.softmax(logits, 2.0),
                               atol=1e-5)
    assert np.abs(calibrate.softmax(logits, 2.0) - calibrate.softmax(logits)).max() > 1e-2
    np.testing.assert_allclose(from_export["score"], calibrate.scores(logits), rtol=1e-5)
    np.testing.assert_array_equal(from_export["unknown"],
                                  calibrate.scores(logits) < calibration.threshold)

    # serve_bytes returns them too, by the same threshold.
    by_bytes = tf.saved_model.load(str(target)).signatures["serve_bytes"](
        image_bytes=tf.constant([f.read_bytes() for f in files]))
    assert by_bytes["unknown"].dtype == tf.bool and by_bytes["score"].shape == (len(files),)
    np.testing.assert_array_equal(by_bytes["unknown"].numpy(),
                                  by_bytes["score"].numpy() < np.float32(calibration.threshold))
    np.testing.assert_allclose(by_bytes["probabilities"].numpy(), from_export["probabilities"],
                               atol=0.02)

    # And predict's rows, from either model, say the same of each file.
    rows = {name: list(predict_paths(Predictor(model), files, reject=True))
            for name, model in (("keras", run_dir), ("export", target))}
    for keras_row, export_row in zip(rows["keras"], rows["export"]):
        assert keras_row["unknown"] == export_row["unknown"]
        assert keras_row["label"] == export_row["label"]
        assert keras_row["score"] == pytest.approx(export_row["score"], rel=1e-5)
    assert "unknown" in [row["label"] for row in rows["export"]]


def test_training_scores_by_mahalanobis_and_the_export_computes_it_in_the_graph(trained_run,
                                                                              tmp_path):
    from transfer.pipeline import export_run

    run_dir, dataset = trained_run
    calibration = calibrate.read(run_dir)
    assert calibration.score == "mahalanobis" and (run_dir / calibrate.STATISTICS).is_file()
    files = list_images(dataset / "validation").images
    images = np.stack([load_image(f, TINY_SIZE) for f in files]).astype("float32")
    raw = {key: np.asarray(value) for key, value in
           scored(load_model(run_dir / "model.keras"), raw=True)(images).items()}
    expected = calibrate.score_of(calibration, raw)  # NumPy, from the pooled features
    assert np.ptp(expected) > 0
    target, _ = export_run(run_dir, output=tmp_path / "models")
    from_keras, from_export = Predictor(run_dir).predict(images), Predictor(target).predict(images)
    for scores in (from_keras["score"], from_export["score"]):
        np.testing.assert_allclose(scores, expected, rtol=1e-4)
    np.testing.assert_array_equal(from_export["unknown"], from_keras["unknown"])
    np.testing.assert_array_equal(from_export["unknown"], expected < calibration.threshold)


def test_an_export_whose_calibration_differs_from_the_model_is_refused(calibrated_run,
                                                                       tmp_path):
    run_dir, _, images, calibration = calibrated_run
    model = load_model(run_dir / "model.keras")
    target = export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes",
                               calibration, sample_images=images)
    assert verify_export(scored(model, calibration), target, images,
                         calibration.threshold) < 1e-4
    with pytest.raises(ValueError, match="largest probability difference"):  # temperature 1
        verify_export(scored(model), target, images, calibration.threshold)
    with pytest.raises(ValueError, match=r"4 of 8 images flagged unknown wrongly"):
        verify_export(scored(model, calibration), target, images)  # nothing unknown


def test_an_uncalibrated_export_flags_nothing_unknown(trained_run, tmp_path):
    import tensorflow as tf

    run_dir, _ = trained_run
    model = load_model(run_dir / "model.keras")
    target = export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes")
    images = np.random.default_rng(2).uniform(0, 255, (6, TINY_SIZE, TINY_SIZE, 3))
    served = tf.saved_model.load(str(target)).signatures["serving_default"](
        images=tf.constant(images, tf.float32))
    assert not served["unknown"].numpy().any()
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               model.predict(images, verbose=0), atol=1e-5)
