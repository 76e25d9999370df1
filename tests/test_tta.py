"""Test-time augmentation: each image's logits averaged with its mirror images', the same
everywhere."""

import json

import keras
import numpy as np
import pytest
from conftest import TINY_SIZE

from transfer import calibrate
from transfer.calibrate import Calibration
from transfer.model import scored


@pytest.mark.parametrize("flip, views", [
    ("horizontal", lambda x: [x, x[:, :, ::-1]]), ("vertical", lambda x: [x, x[:, ::-1]]),
    ("horizontal_and_vertical", lambda x: [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]])])
def test_tta_averages_the_image_and_its_mirror_images(flip, views):
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax",
                                                   name="probabilities")(
        keras.layers.Flatten()(inputs)))
    dense = model.get_layer("probabilities")
    x = np.random.default_rng(0).uniform(0, 255, (4, 6, 6, 3)).astype("float32")
    logits = np.mean([view.reshape(4, -1) @ dense.kernel.numpy() + dense.bias.numpy()
                      for view in views(x)], axis=0)
    out = scored(model, Calibration(2.0), flip)(x)
    np.testing.assert_allclose(np.asarray(out["probabilities"]),
                               calibrate.softmax(logits, 2.0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["score"]), calibrate.scores(logits),
                               rtol=1e-4, atol=1e-3)


def test_tta_in_the_export_equals_tta_in_predict(trained_run, tmp_path):
    from transfer.pipeline import export_run
    from transfer.predict import Predictor

    run_dir, _ = trained_run
    target, _ = export_run(run_dir, output=tmp_path / "models", tta=True)
    assert json.loads((target / "assets.extra" / "config.json").read_text())["tta"] is True
    images = np.random.default_rng(1).uniform(0, 255, (5, TINY_SIZE, TINY_SIZE, 3))
    exported = Predictor(target).predict(images)  # the signatures average in the graph
    keras_tta = Predictor(run_dir, tta=True).predict(images)
    plain = Predictor(run_dir, tta=False).predict(images)
    for key in ("probabilities", "score"):
        np.testing.assert_allclose(exported[key], keras_tta[key], rtol=1e-4, atol=1e-5)
    # The mirror images do change the answer (seen in the score: the tiny run's fitted
    # temperature makes its probabilities 0 or 1).
    assert np.abs(keras_tta["score"] - plain["score"]).max() > 1e-3
    with pytest.raises(ValueError, match="exported with test-time augmentation; drop --no-tta"):
        Predictor(target, tta=False)
    plain_export, _ = export_run(run_dir, output=tmp_path / "models", tta=False)
    np.testing.assert_allclose(Predictor(plain_export).predict(images)["probabilities"],
                               plain["probabilities"], atol=1e-5)
    with pytest.raises(ValueError, match="--format tflite converts the model without"):
        export_run(run_dir, output=tmp_path / "models", formats=["tflite"], tta=True)


def test_evaluate_with_tta_says_so_and_uses_it(trained_run, tmp_path, capsys):
    from transfer.cli import main

    run_dir, dataset = trained_run
    for flag, expected in (("--tta", "horizontal"), ("--no-tta", "none")):
        out = tmp_path / flag
        assert main(["evaluate", "--model", str(run_dir), str(dataset / "validation"),
                     "--output", str(out), flag]) == 0
        assert json.loads((out / "metrics.json").read_text())["tta"] == expected
    capsys.readouterr()
