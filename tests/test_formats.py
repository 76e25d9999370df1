"""TFLite and ONNX conversions of a tiny trained model, loaded back and compared."""

import json

import numpy as np
import pytest

from conftest import TINY_SIZE
from transfer import formats
from transfer.check import list_images
from transfer.cli import main
from transfer.export import export_savedmodel
from transfer.images import load_image
from transfer.model import load_model


@pytest.fixture(scope="module")
def converted(trained_run, tmp_path_factory):
    run_dir, dataset = trained_run
    model = load_model(run_dir / "model.keras")
    version = export_savedmodel(model, ["horizontal", "vertical"],
                                tmp_path_factory.mktemp("formats") / "stripes")
    files = list_images(dataset / "validation").images
    images = np.stack([load_image(f, TINY_SIZE) for f in files]).astype("float32")
    labels = np.array([0 if "horizontal" in f.name else 1 for f in files])
    calibration = np.stack([load_image(f, TINY_SIZE) for f in
                            list_images(dataset / "train").images]).astype("float32")
    written = formats.convert(model, ["tflite", "onnx"], version / "assets.extra", calibration)
    reports = formats.evaluate({"savedmodel": version, **written}, images, labels, latency_runs=3)
    return model, images, written, {r.format: r for r in reports}


def test_every_format_is_written_and_loads(converted):
    _, images, written, reports = converted
    assert sorted(written) == ["onnx", "tflite_float16", "tflite_float32", "tflite_int8"]
    assert sorted(reports) == ["onnx", "savedmodel", "tflite_float16", "tflite_float32",
                               "tflite_int8"]
    for name, path in written.items():
        probabilities = formats.runner(name, path)(images[:3])
        assert probabilities.shape == (3, 2)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=0.02)
        assert reports[name].size_mb > 0 and reports[name].latency_ms > 0


def test_float_formats_match_the_savedmodel(converted):
    model, images, _, reports = converted
    for name in ("savedmodel", "tflite_float32", "onnx"):
        assert reports[name].ok(), reports[name]
        assert reports[name].max_probability_difference < 1e-4
    assert reports["tflite_float16"].max_probability_difference < 0.05
    expected = (model.predict(images, verbose=0).argmax(axis=1) ==
                np.array([0] * 4 + [1] * 4)).mean()
    assert reports["savedmodel"].val_accuracy == pytest.approx(expected)


def test_int8_model_takes_raw_uint8_pixels(converted):
    import tensorflow as tf

    _, _, written, reports = converted
    interpreter = tf.lite.Interpreter(model_path=str(written["tflite_int8"]))
    details = interpreter.get_input_details()[0]
    assert details["dtype"] == np.uint8 and list(details["shape"]) == [1, TINY_SIZE, TINY_SIZE, 3]
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
