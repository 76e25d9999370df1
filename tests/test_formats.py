"""TFLite and ONNX conversions of a tiny trained model, loaded back and compared."""

import json

import numpy as np
import pytest

from conftest import TINY_SIZE
from transfer import calibrate, formats
from transfer.calibrate import Calibration
from transfer.check import list_images
from transfer.cli import main
from transfer.export import export_savedmodel
from transfer.images import load_image
from transfer.model import load_model, scored

CALIBRATION = Calibration(temperature=2.0)  # the SavedModel and every format apply it


@pytest.fixture(scope="module")
def converted(trained_run, tmp_path_factory):
    run_dir, dataset = trained_run
    model = load_model(run_dir / "model.keras")
    version = export_savedmodel(model, ["horizontal", "vertical"],
                                tmp_path_factory.mktemp("formats") / "stripes", CALIBRATION)
    files = list_images(dataset / "validation").images
    images = np.stack([load_image(f, TINY_SIZE) for f in files]).astype("float32")
    labels = np.array([0 if "horizontal" in f.name else 1 for f in files])
    representative = np.stack([load_image(f, TINY_SIZE) for f in
                               list_images(dataset / "train").images]).astype("float32")
    written = formats.convert(model, ["tflite", "onnx"], version / "assets.extra",
                              representative, CALIBRATION)
    reports = formats.evaluate({"savedmodel": version, **written}, images, labels, latency_runs=3)
    return model, images, {"savedmodel": version, **written}, {r.format: r for r in reports}


def test_every_format_is_written_and_loads(converted):
    _, images, written, reports = converted
    assert sorted(written) == ["onnx", "savedmodel", "tflite_float16", "tflite_float32",
                               "tflite_int8"]
    assert sorted(reports) == sorted(written)
    for name, path in written.items():
        outputs = formats.runner(name, path)(images[:3])
        assert outputs["probabilities"].shape == (3, 2) and outputs["score"].shape == (3,)
        np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1, atol=0.02)
        assert reports[name].size_mb > 0 and reports[name].latency_ms > 0


def test_float_formats_match_the_savedmodel(converted):
    model, images, written, reports = converted
    for name in ("savedmodel", "tflite_float32", "onnx"):
        assert reports[name].ok(), reports[name]
        assert reports[name].max_probability_difference < 1e-4
    assert reports["tflite_float16"].max_probability_difference < 0.05
    # What they match is the calibrated SavedModel: softmax(logits / 2), and its scores.
    logits = np.asarray(scored(model, raw=True)(images)["logits"])
    reference = formats.runner("savedmodel", written["savedmodel"])(images)
    np.testing.assert_allclose(reference["probabilities"], calibrate.softmax(logits, 2.0),
                               atol=1e-5)
    uncalibrated = model.predict(images, verbose=0)
    assert np.abs(reference["probabilities"] - uncalibrated).max() > 10 * formats.FLOAT_TOLERANCE
    for name in ("tflite_float32", "onnx"):
        got = formats.runner(name, written[name])(images)
        np.testing.assert_allclose(got["probabilities"], reference["probabilities"],
                                   atol=formats.FLOAT_TOLERANCE)
        np.testing.assert_allclose(got["score"], reference["score"], rtol=1e-4, atol=1e-4)
    expected = (model.predict(images, verbose=0).argmax(axis=1) ==
                np.array([0] * 4 + [1] * 4)).mean()
    assert reports["savedmodel"].val_accuracy == pytest.approx(expected)


def test_int8_model_takes_raw_uint8_pixels(converted):
    import tensorflow as tf

    _, _, written, reports = converted
    interpreter = tf.lite.Interpreter(model_path=str(written["tflite_int8"]))
    details = interpreter.get_input_details()[0]
    assert details["dtype"] == np.uint8 and list(details["shape"]) == [1, TINY_SIZE, TINY_SIZE, 3]
    outputs = interpreter.get_signature_runner().get_output_details()
    assert sorted(outputs) == ["probabilities", "score"]  # calibrated, quantized too
    assert {output["dtype"] for output in outputs.values()} == {np.uint8}
    assert 0 <= reports["tflite_int8"].top1_agreement <= 1


def test_report_table_and_json(converted, tmp_path):
    _, _, _, reports = converted
    formats.write_report(list(reports.values()), tmp_path / "formats.json")
    rows = json.loads((tmp_path / "formats.json").read_text())
    assert {row["format"] for row in rows} == set(reports)
    assert formats.table(list(reports.values())).splitlines()[0].split()[:3] == [
        "format", "size", "MB"]


def test_unknown_format_names_the_valid_ones(trained_run, capsys):
    run_dir, _ = trained_run
    with pytest.raises(SystemExit):
        main(["export", "--run", str(run_dir), "--format", "coreml"])
    assert "invalid choice: 'coreml'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid: savedmodel"):
        formats.convert(None, ["coreml"], ".", None)


def _rounded(model):
    """A copy of model whose convolution kernels are rounded as int8 conversion rounds them."""
    import keras

    from transfer.model import backbone_of

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in backbone_of(copy).layers:
        if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.Conv2D)):
            axes = (0, 1) if isinstance(layer, keras.layers.DepthwiseConv2D) else (0, 1, 2)
            layer.kernel.assign(formats._int8_rounding(np.asarray(layer.kernel), axes))
    return copy


def _outputs(model, images, layer_name):
    """The backbone layer's outputs for 0-255 images."""
    from transfer.model import backbone_of, image_model

    layer = backbone_of(model).get_layer(layer_name)
    return image_model(model, layer.output).predict_on_batch(images)


def _mean_shift(model, images, layer_name):
    """How far int8 weight rounding moves a layer's mean output per channel, without and
    with bias correction: (uncorrected, corrected), each averaged over channels."""
    def means(m):
        return _outputs(m, images, layer_name).mean(axis=(0, 1, 2))

    reference = means(model)
    corrected = means(_rounded(formats.bias_corrected(model, images)))
    return np.abs(means(_rounded(model)) - reference).mean(), np.abs(corrected - reference).mean()


def test_bias_correction_cancels_the_mean_rounding_error_through_biases():
    import keras

    keras.utils.set_random_seed(0)
    inner_input = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, name="first")(inner_input)  # valid padding: exactly linear
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(x)
    x = keras.layers.Conv2D(4, 1, groups=2, name="grouped")(x)  # as ConvNeXt's depthwise
    backbone = keras.Model(inner_input, x, name="backbone")
    inputs = keras.Input((12, 12, 3))
    x = backbone(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D(
        name="pool")(x))
    model = keras.Model(inputs, outputs)
    for layer in backbone.layers[1:]:  # biases far from zero make any mistake visible
        layer.bias.assign(np.random.default_rng(1).normal(size=layer.bias.shape))
    images = np.random.default_rng(0).uniform(0, 255, (16, 12, 12, 3)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    for layer in ("first", "depthwise", "grouped"):
        uncorrected, corrected = _mean_shift(model, images, layer)
        assert uncorrected > 1e-4 and corrected < 0.05 * uncorrected, (layer, uncorrected,
                                                                       corrected)
    for old, new in zip(before, model.get_weights()):  # the exported model is left alone
        np.testing.assert_array_equal(old, new)


@pytest.mark.real
def test_bias_correction_through_batchnorm_on_real_mobilenet(real_weights):
    from transfer.backbones import get_spec
    from transfer.model import build_classifier

    model = build_classifier(get_spec("mobilenet_025"), 2, 224)
    images = np.random.default_rng(0).uniform(0, 255, (8, 224, 224, 3)).astype("float32")
    uncorrected, corrected = _mean_shift(model, images, "conv_pw_13_relu")  # the last layer
    assert corrected < 0.5 * uncorrected, (uncorrected, corrected)


def test_a_quantized_format_must_also_keep_the_probabilities():
    from transfer.formats import FormatReport

    def int8(agreement, mean_difference):
        return FormatReport("tflite_int8", "model_int8.tflite", 0.3, 0.95, agreement, 0.3,
                            mean_difference, 0.6)

    assert int8(0.994, 0.011).ok()  # as measured on mobilenet_025 and cats_dogs
    assert not int8(0.985, 0.011).ok()
    stuck = int8(0.992, 0.4)  # one class everywhere, on data that is nearly all that class
    assert not stuck.ok() and "0.400 on average (allowed: 0.05)" in stuck.describe_failure()


def test_tflite_conversion_prints_nothing_of_its_own(capsys):
    import keras

    inputs = keras.Input((8, 8, 3), name="images")
    outputs = keras.layers.Dense(2, activation="softmax", name="probabilities")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs)))
    model = keras.Model(inputs, outputs)
    converted = formats._tflite(model, "float32", None)
    assert converted[4:8] == b"TFL3"  # the FlatBuffer's identifier: a TFLite model
    out = capsys.readouterr().out  # Keras's export printed each endpoint's TensorSpec here
    assert "TensorSpec" not in out and "Saved artifact" not in out and out == ""
