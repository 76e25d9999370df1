import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SIZE, write_image
from transfer.check import list_images
from transfer.images import load_image
from transfer.cli import main
from transfer.export import decode_and_resize, export_savedmodel, next_version, read_asset
from transfer.model import load_model
from transfer.predict import Predictor, expand_paths, predict_paths


def test_export_round_trip_and_versions_never_overwrite(trained_run, tmp_path):
    run_dir, dataset = trained_run
    model = load_model(run_dir / "model.keras")
    images = np.stack([load_image(p, TINY_SIZE) for p in
                       list_images(dataset / "validation").images]).astype("float32")
    first = export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes",
                              sample_images=images)
    second = export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes",
                               sample_images=images)
    assert (first.name, second.name) == ("1", "2")
    assert next_version(tmp_path / "stripes") == 3
    assert read_asset(second) == ["horizontal", "vertical"]
    assert not [p for p in (tmp_path / "stripes").iterdir() if p.name.startswith(".tmp")]

    import tensorflow as tf

    served = tf.saved_model.load(str(first)).signatures["serving_default"](
        images=tf.constant(images))
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    names = [name.decode() for name in served["class_name"].numpy()]
    assert names == [["horizontal", "vertical"][i] for i in expected.argmax(axis=1)]
    assert served["score"].dtype == tf.float32 and served["score"].shape == (len(images),)
    assert served["unknown"].dtype == tf.bool and not served["unknown"].numpy().any()

    cli = shutil.which("saved_model_cli", path=str(Path(sys.executable).parent))
    shown = subprocess.run([cli, "show", "--dir", str(first), "--all"], capture_output=True,
                           text=True, check=True).stdout
    assert "serving_default" in shown and "images" in shown and "probabilities" in shown
    assert "score" in shown and "unknown" in shown and "DT_BOOL" in shown
    assert "serve_bytes" in shown and "image_bytes" in shown and "DT_STRING" in shown


def test_bytes_signature_matches_the_image_signature_on_the_same_pictures(trained_run, tmp_path):
    import io

    import tensorflow as tf
    from PIL import Image

    run_dir, dataset = trained_run
    model = load_model(run_dir / "model.keras")
    version = export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes")
    signatures = tf.saved_model.load(str(version)).signatures
    files = list_images(dataset / "validation").images
    rng = np.random.default_rng(3)
    blobs = [path.read_bytes() for path in files]  # JPEGs as clients send them
    for kind in ("PNG", "GIF", "BMP"):  # other encodings, and a photo-sized, transparent PNG
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(buffer, kind)
        blobs.append(buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (60, 80, 4), dtype=np.uint8), "RGBA").save(buffer, "PNG")
    blobs.append(buffer.getvalue())
    keyed = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    keyed[:30] = (10, 20, 30)
    buffer = io.BytesIO()  # one colour marked transparent (tRNS), not an alpha channel
    Image.fromarray(keyed).save(buffer, "PNG", transparency=(10, 20, 30))
    blobs.append(buffer.getvalue())
    buffer = io.BytesIO()  # 16-bit grey whose values all fit in 8 bits: scaled all the same
    Image.fromarray(np.full((60, 80), 200, np.uint16)).save(buffer, "PNG")
    blobs.append(buffer.getvalue())
    transparent = Image.fromarray(rng.integers(0, 255, (60, 80, 4), dtype=np.uint8), "RGBA")
    for image, options in ((transparent.convert("RGB"), {}), (transparent, {"lossless": True}),
                           (transparent, {"save_all": True,  # animated: the first frame
                                          "append_images": [transparent.rotate(90)]})):
        buffer = io.BytesIO()
        image.save(buffer, "WEBP", **options)
        blobs.append(buffer.getvalue())
    for i, blob in enumerate(blobs):
        (tmp_path / f"{i}.img").write_bytes(blob)
    images = np.stack([load_image(tmp_path / f"{i}.img", TINY_SIZE)
                       for i in range(len(blobs))]).astype("float32")

    # The graph decodes and resizes as training does (TensorFlow's decoders, not Pillow's).
    decoded = np.stack([decode_and_resize(tf.constant(blob), TINY_SIZE).numpy() for blob in blobs])
    difference = np.abs(decoded - images)
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 12

    by_bytes = signatures["serve_bytes"](image_bytes=tf.constant(blobs))
    by_images = signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(by_bytes["probabilities"].numpy(),
                               by_images["probabilities"].numpy(), atol=0.02)
    np.testing.assert_allclose(by_bytes["score"].numpy(), by_images["score"].numpy(),
                               rtol=0.02, atol=0.02)
    np.testing.assert_array_equal(by_bytes["class_index"].numpy(),
                                  by_bytes["probabilities"].numpy().argmax(axis=1))

    # What TensorFlow's decoders would read wrong (a BMP palette's indices as grey levels) or
    # not at all fails with a message saying what to send instead.
    picture = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    for image, kind, options, message in (
            (picture.convert("P"), "BMP", {}, "24- and 32-bit BMPs only"),
            (picture.convert("1"), "BMP", {}, "24- and 32-bit BMPs only"),
            (picture, "WEBP", {"save_all": True, "append_images": [picture.rotate(90)]},
             "animated WebP without alpha")):
        buffer = io.BytesIO()
        image.save(buffer, kind, **options)
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signatures["serve_bytes"](image_bytes=tf.constant([buffer.getvalue()]))


def test_export_cli_exports_the_newest_run_of_a_data_set(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    assert main(["export", "--data", "stripes", "--runs-dir", str(run_dir.parent.parent),
                 "--output", str(tmp_path)]) == 0
    version = tmp_path / "stripes" / "1"
    assert capsys.readouterr().out.strip() == str(version)
    assert json.loads((version / "assets.extra" / "config.json").read_text())["backbone"] == "vgg16"
    (tmp_path / "a_file").write_text("")
    assert main(["export", "--run", str(run_dir), "--output", str(tmp_path / "a_file")]) == 2
    assert "a_file is a file; expected a folder" in capsys.readouterr().err


def test_predict_keras_and_savedmodel_agree_and_report_bad_files(trained_run, tmp_path):
    run_dir, dataset = trained_run
    folder = tmp_path / "mixed"
    shutil.copytree(dataset / "validation", folder)
    (folder / "vertical" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    export = export_savedmodel(load_model(run_dir / "model.keras"), ["horizontal", "vertical"],
                               tmp_path / "models" / "stripes")

    paths, problems, skipped = expand_paths([folder])
    assert len(paths) == 9 and problems == [] and not any(p.name == "notes.txt" for p in paths)
    assert [p.name for p in skipped] == ["notes.txt"]  # counted in the CLI's summary line
    from_keras = list(predict_paths(Predictor(run_dir), paths, batch_size=3))
    from_savedmodel = list(predict_paths(Predictor(export.parent), paths, batch_size=4))
    assert [r["label"] for r in from_keras] == [r["label"] for r in from_savedmodel]
    # Batches decoded ahead keep every row with its own image: the same as one at a time.
    assert [r["path"] for r in from_keras] == [str(p) for p in paths]
    one_by_one = list(predict_paths(Predictor(run_dir), paths, batch_size=1, workers=1))
    for batched_row, single_row in zip(from_keras, one_by_one):
        assert batched_row["error"] == single_row["error"]
        if not single_row["error"]:
            assert batched_row["probability"] == pytest.approx(single_row["probability"],
                                                               abs=1e-5)
    bad = [r for r in from_keras if r["error"]]
    assert [r["path"].endswith("corrupt.jpg") for r in bad] == [True]
    good = [r for r in from_keras if not r["error"]]
    assert len(good) == 8 and all(0.5 <= r["probability"] <= 1 for r in good)
    assert all(len(r["top_k"]) == 2 for r in good)


def test_predict_cli_writes_csv_and_json_and_exit_status(trained_run, tmp_path, capsys):
    run_dir, dataset = trained_run
    good = dataset / "validation" / "vertical" / "vertical_v0.jpg"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    assert main(["predict", "--model", str(run_dir / "model.keras"), str(good)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["path"] for row in rows] == [str(good)] and rows[0]["label"] in ("horizontal", "vertical")

    assert main(["predict", "--model", str(run_dir), str(good), "--output", str(tmp_path)]) == 2
    assert "is a folder; expected a file name ending in .csv or .json" in capsys.readouterr().err
    assert main(["predict", "--model", str(run_dir), str(tmp_path / "typo")]) == 2
    assert "typo does not exist; expected image files or folders" in capsys.readouterr().err
    assert main(["predict", "--model", str(run_dir), str(good), "--explain", str(broken)]) == 2
    assert "broken.png is a file; expected a folder" in capsys.readouterr().err
    out = tmp_path / "new" / "predictions.JSON"  # its folder is made; the suffix in any case
    status = main(["predict", "--model", str(run_dir), str(good), str(broken), "--output", str(out)])
    rows = json.loads(out.read_text())
    assert status == 1  # some file failed
    assert rows[1]["error"] == "zero bytes" and rows[1]["label"] is None
    assert rows[0]["top_k"][0]["label"] == rows[0]["label"]


def test_predict_rejects_things_that_are_not_models(tmp_path, capsys):
    write_image(tmp_path / "a.png", 0, np.random.default_rng(0))
    assert main(["predict", "--model", str(tmp_path), str(tmp_path / "a.png")]) == 2
    assert "is not a model; expected a .keras file" in capsys.readouterr().err


def test_predict_with_classes_that_contradict_the_model_fails_clearly(trained_run, tmp_path,
                                                                      capsys):
    run_dir, dataset = trained_run
    image = str(dataset / "validation" / "vertical" / "vertical_v0.jpg")
    assert main(["predict", "--model", str(run_dir), "--classes", "vertical,horizontal",
                 image]) == 0
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    capsys.readouterr()
    assert main(["predict", "--model", str(run_dir), "--classes", str(labels), image]) == 2
    assert ("was trained on classes horizontal, vertical; --classes gives cat, dog"
            in capsys.readouterr().err)


def test_an_export_that_does_not_reproduce_the_model_is_not_published(trained_run, tmp_path,
                                                                      monkeypatch):
    import keras

    run_dir, _ = trained_run
    model = load_model(run_dir / "model.keras")
    archive_class = type(keras.export.ExportArchive())
    real_write_out = archive_class.write_out

    def write_then_change_the_model(self, path, **kwargs):
        real_write_out(self, path, **kwargs)
        bias = model.get_layer("probabilities").bias
        bias.assign(bias + np.array([5.0, -5.0], dtype="float32"))  # now it differs

    monkeypatch.setattr(archive_class, "write_out", write_then_change_the_model)
    with pytest.raises(ValueError, match=f"The export {re.escape(str(tmp_path / 'stripes' / '1'))} "
                                         r"\(not published\) does not reproduce the model"):
        export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes")
    assert list((tmp_path / "stripes").iterdir()) == []


def test_export_finds_the_newest_run_of_a_data_set_given_as_a_folder(trained_run, tmp_path):
    run_dir, dataset = trained_run  # trained with --data <folder>: filed under its name
    assert main(["export", "--data", str(dataset), "--runs-dir", str(run_dir.parents[1]),
                 "--output", str(tmp_path)]) == 0
    assert (tmp_path / dataset.name / "1" / "saved_model.pb").is_file()
    moved = shutil.copytree(run_dir, tmp_path / "best")  # a run kept elsewhere
    assert main(["export", "--run", str(moved), "--output", str(tmp_path)]) == 0
    assert (tmp_path / dataset.name / "2" / "saved_model.pb").is_file()


def test_an_interrupted_export_leaves_no_version_behind(trained_run, tmp_path, monkeypatch):
    import keras

    run_dir, _ = trained_run
    model = load_model(run_dir / "model.keras")
    archive_class = type(keras.export.ExportArchive())  # the backend's own subclass
    real_write_out = archive_class.write_out

    def write_then_interrupt(self, path, **kwargs):
        real_write_out(self, path, **kwargs)  # the files are on disk, not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(archive_class, "write_out", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes")
    assert list((tmp_path / "stripes").iterdir()) == []
    monkeypatch.undo()
    assert export_savedmodel(model, ["horizontal", "vertical"], tmp_path / "stripes").name == "1"


def test_a_classes_file_holds_one_name_per_line(tmp_path):
    from types import SimpleNamespace

    from transfer.predict import check_classes

    model = SimpleNamespace(classes=["golden retriever", "pug"], path=tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("pug\ngolden retriever\n")
    check_classes(model, labels)
    labels.write_text("pug\ngolden\n")
    with pytest.raises(ValueError, match="--classes gives pug, golden"):
        check_classes(model, labels)
