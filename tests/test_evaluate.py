"""The evaluation report: numbers that match the model, pictures, and a page a browser shows."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SIZE
from transfer.cli import main
from transfer.explain import gradcam
from transfer.images import load_image
from transfer.model import backbone_of, image_model, load_model

FIGURES = ("confusion_matrix.png", "reliability.png", "learning_curves.png", "gradcam.png",
           "filters.png", "feature_maps.png")


def _validation(dataset):
    files = sorted((dataset / "validation").rglob("*.jpg"))
    images = np.stack([load_image(f, TINY_SIZE) for f in files]).astype("float32")
    return files, images, np.array([0 if f.parent.name == "horizontal" else 1 for f in files])


def test_training_ends_with_a_report_whose_numbers_match_the_model(trained_run):
    run_dir, dataset = trained_run
    for name in ("report.html", "metrics.json", *FIGURES):
        assert (run_dir / name).is_file(), name
    for name in FIGURES:
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    files, images, labels = _validation(dataset)
    predicted = load_model(run_dir / "model.keras").predict(images, verbose=0).argmax(axis=1)
    assert metrics["images"] == len(files)
    assert metrics["accuracy"] == pytest.approx((predicted == labels).mean())
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == len(files) and np.trace(matrix) == (predicted == labels).sum()
    assert metrics["per_class"]["horizontal"]["support"] == (labels == 0).sum()
    assert (metrics["roc_auc"] is None) or 0 <= metrics["roc_auc"] <= 1
    wrong = metrics["most_confidently_wrong"]
    assert len(wrong) == (predicted != labels).sum() and all(
        row["true"] != row["predicted"] for row in wrong)
    page = (run_dir / "report.html").read_text()
    assert f"accuracy <b>{metrics['accuracy']:.4f}</b>" in page
    assert "http" not in page  # nothing fetched from the network


def test_gradcam_is_cam_for_a_pooled_linear_head(trained_run):
    """Through global average pooling into a linear layer, Grad-CAM equals CAM (Selvaraju et
    al. 2017): the map is relu(sum_k w_kc A_k), w the Dense kernel's column for class c."""
    run_dir, dataset = trained_run
    model = load_model(run_dir / "model.keras")
    _, images, _ = _validation(dataset)
    # The backbone table's Grad-CAM layer for VGG16 is block5_conv3, before a last pooling:
    # compare at the backbone's output instead, where the identity holds exactly.
    backbone = backbone_of(model)
    features = np.asarray(image_model(model, backbone.output)(images))
    kernel = np.asarray(model.get_layer("probabilities").kernel)
    for target in (0, 1):
        cam = np.maximum(features @ kernel[:, target], 0)
        peaks = cam.max(axis=(1, 2), keepdims=True)
        expected = cam / np.where(peaks > 0, peaks, 1)
        found = gradcam(model, images, np.full(len(images), target),
                        layer=backbone.layers[-1].name)
        np.testing.assert_allclose(found, expected, atol=1e-4)
    at_layer = gradcam(model, images, np.zeros(len(images), dtype=int))
    assert at_layer.shape[1:] == tuple(backbone.get_layer("block5_conv3").output.shape[1:3])
    assert at_layer.min() >= 0 and at_layer.max() <= 1


def test_evaluate_command_on_a_folder_sets_bad_files_aside(trained_run, tmp_path, capsys):
    run_dir, dataset = trained_run
    folder = tmp_path / "holdout"
    shutil.copytree(dataset / "validation", folder)
    (folder / "vertical" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    shutil.copy(next((folder / "vertical").glob("*.jpg")), folder / "loose.jpg")
    assert main(["evaluate", "--model", str(run_dir), str(folder), "--output",
                 str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report" / "report.html")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["images"] == 8
    assert {Path(row[0]).name: row[1].split(":")[0] for row in metrics["set_aside"]} == {
        "broken.jpg": "not an image", "loose.jpg": "outside any class folder"}
    assert main(["evaluate", "--model", str(run_dir), str(dataset)]) == 2  # not its validation/
    assert ("train, validation that are not classes of the model (horizontal, vertical)"
            in capsys.readouterr().err)
    assert main(["evaluate", "--model", str(tmp_path), str(folder)]) == 2
    assert "not a trained Keras model" in capsys.readouterr().err


def test_averages_leave_out_a_class_the_images_lack_and_the_model_never_predicts():
    from transfer.evaluate import class_scores

    per_class, macro = class_scores([1, 1, 1, 2], [1, 1, 2, 2], ["cat", "dog", "fox"])
    assert per_class["cat"] == {"precision": None, "recall": None, "f1-score": None,
                                "support": 0}
    assert per_class["dog"]["recall"] == pytest.approx(2 / 3) and per_class["fox"]["support"] == 1
    assert macro["f1-score"] == pytest.approx((per_class["dog"]["f1-score"]
                                               + per_class["fox"]["f1-score"]) / 2)
    per_class, macro = class_scores([1, 1], [0, 1], ["cat", "dog"])  # predicted: it counts
    assert per_class["cat"]["precision"] == 0 and macro["precision"] == pytest.approx(0.5)


def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    run_dir, _ = trained_run
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
               "--window-size=1280,900", "--dump-dom", (run_dir / "report.html").as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    for section in ("confusion-matrix", "reliability", "learning-curves", "top-losses", "gradcam",
                    "filters", "feature-maps"):
        assert f'id="{section}"' in dom, section
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images="(\d+)"', dom)
    assert loaded and total and int(total.group(1)) >= 5
    assert loaded.group(1) == total.group(1)  # every picture found and decoded, offline


def test_predict_explain_writes_a_gradcam_overlay_per_image(trained_run, tmp_path, capsys):
    import csv
    import io

    from PIL import Image

    run_dir, dataset = trained_run
    folder = dataset / "validation"
    assert main(["predict", "--model", str(run_dir), str(folder), "--explain",
                 str(tmp_path / "why")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 8 and len({row["explanation"] for row in rows}) == 8
    for row in rows:
        picture = Image.open(row["explanation"])
        assert picture.size == (TINY_SIZE, TINY_SIZE) and picture.mode == "RGB"
        assert Path(row["explanation"]).name.startswith(Path(row["path"]).stem)
    image = str(sorted(folder.rglob("*.jpg"))[0])
    for _ in range(3):  # one image again and again into one folder: new files, none overwritten
        assert main(["predict", "--model", str(run_dir), image, "--explain",
                     str(tmp_path / "again")]) == 0
    assert len(list((tmp_path / "again").glob("*.gradcam.png"))) == 3
    export_dir = tmp_path / "exported"
    assert main(["export", "--run", str(run_dir), "--output", str(export_dir)]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(export_dir / "stripes"), str(folder), "--explain",
                 str(tmp_path / "no")]) == 2
    assert "--explain needs the Keras model" in capsys.readouterr().err


def test_the_report_after_training_lists_the_files_set_aside(dataset, tiny_config):
    broken = dataset / "validation" / "vertical" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    from transfer.pipeline import train

    run_dir = train(tiny_config(epochs=1, fine_tune_epochs=0, evaluate=True), verbose=0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [Path(path).name for path, _ in metrics["set_aside"]] == ["broken.jpg"]


def test_the_confusion_matrix_stays_a_readable_size_with_many_classes(tmp_path):
    from PIL import Image

    from transfer.evaluate import plot_confusion_matrix

    rng = np.random.default_rng(0)
    for count in (3, 300):
        matrix = rng.integers(0, 20, (count, count))
        path = plot_confusion_matrix(matrix, [f"class {i}" for i in range(count)],
                                     tmp_path / f"{count}.png")
        width, height = Image.open(path).size
        assert width <= 4200 and height <= 2200, (count, width, height)
