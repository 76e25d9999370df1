"""Test-time augmentation: each image averaged with its mirror images, the same everywhere."""

import json

import keras
import numpy as np
import pytest
from conftest import TINY_SIZE

from transfer.model import with_tta


@pytest.mark.parametrize("flip, views", [
    ("horizontal", lambda x: [x, x[:, :, ::-1]]), ("vertical", lambda x: [x, x[:, ::-1]]),
    ("horizontal_and_vertical", lambda x: [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]])])
def test_tta_averages_the_image_and_its_mirror_images(flip, views):
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(
        keras.layers.Flatten()(inputs)))
    x = np.random.default_rng(0).uniform(0, 255, (4, 6, 6, 3)).astype("float32")
    expected = np.mean([np.asarray(model(view)) for view in views(x)], axis=0)
    np.testing.assert_allclose(np.asarray(with_tta(model, flip)(x)), expected, atol=1e-6)
    assert with_tta(model, "none") is model


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
    np.testing.assert_allclose(exported, keras_tta, atol=1e-5)
    assert np.abs(keras_tta - plain).max() > 1e-4  # the mirror images do change the answer
    with pytest.raises(ValueError, match="exported with test-time augmentation; drop --no-tta"):
        Predictor(target, tta=False)
    plain_export, _ = export_run(run_dir, output=tmp_path / "models", tta=False)
    np.testing.assert_allclose(Predictor(plain_export).predict(images), plain, atol=1e-5)
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
