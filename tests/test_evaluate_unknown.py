"""The report's calibration (reliability before and after the temperature) and its measure of
how the in-class score tells the classes' images from others (evaluate --unknown)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer import calibrate
from transfer.cli import main


def _logits_and_scores(run_dir, files):
    """The run's averaged logits and model scores for files, as evaluate computes them."""
    from transfer.evaluate import predict_files
    from transfer.model import load_model, scored
    from transfer.runs import tta_flip

    model = load_model(run_dir / "model.keras")
    outputs = predict_files(scored(model, calibrate.read(run_dir), tta_flip(run_dir),
                                   raw=True), [str(f) for f in files])[1]
    return outputs["logits"], outputs["score"]


def _labels(files):
    return np.array([0 if Path(f).parent.name == "horizontal" else 1 for f in files])


def _others(folder, count=6, seed=1):
    """Pictures of neither class (flat colours with blobs of noise), nested, plus a file that
    does not decode and one that is no image."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.full((40, 40, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        pixels[10:30, 10:30] = rng.integers(0, 255, (20, 20, 3))
        path = folder / ("deep/er" if i % 2 else "") / f"other_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    (folder / "deep" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return sorted(folder.rglob("other_*.png"))


def test_the_report_shows_the_calibration_before_and_after(trained_run):
    run_dir, dataset = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stored = json.loads((run_dir / calibrate.CALIBRATION).read_text())
    found = metrics["calibration"]
    assert found["temperature"] == pytest.approx(stored["temperature"])
    assert found["score"] == stored["score"] and found["threshold"] == pytest.approx(
        stored["threshold"])
    files = sorted((dataset / "validation").rglob("*.jpg"))  # the split the report is on
    logits, scores = _logits_and_scores(run_dir, files)
    labels = _labels(files)
    temperature = stored["temperature"]
    # Training reuses its calibration's predictions for this report: they are the model's.
    assert found["rejected"] == pytest.approx(np.mean(scores < stored["threshold"]))
    assert found["ece_before"] == pytest.approx(
        calibrate.expected_calibration_error(calibrate.softmax(logits), labels), abs=1e-5)
    assert found["ece_after"] == pytest.approx(calibrate.expected_calibration_error(
        calibrate.softmax(logits, temperature), labels), abs=1e-5)
    assert found["nll_after"] == pytest.approx(calibrate.log_loss(logits, labels, temperature),
                                               abs=1e-5)
    assert sum(row[2] for row in found["reliability_after"]) == len(files)
    assert (run_dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    page = (run_dir / "report.html").read_text()
    assert 'src="reliability.png"' in page
    assert (f"<b>{found['ece_before']:.3f}</b> before, <b>{found['ece_after']:.3f}</b> after"
            in page)
    assert "unknown" not in metrics and "unknown_scores.png" not in page
    # The Mahalanobis statistics were fitted on these very images, and the report says so.
    assert found["score"] == "mahalanobis" and found["fitted_on"] == len(files)
    assert f"fitted on {len(files)} of these images" in page


def test_evaluate_unknown_measures_the_score_and_the_threshold(trained_run, tmp_path, capsys):
    run_dir, dataset = trained_run
    run = tmp_path / "run"  # a copy with a threshold of our own: the shares are then known
    shutil.copytree(run_dir, run)
    folder = dataset / "validation"
    files = sorted(folder.rglob("*.jpg"))
    logits, _ = _logits_and_scores(run, files)
    energy = np.sort(calibrate.scores(logits, 1.0, "energy"))
    below = int(np.argmax(np.diff(energy)[:-1])) + 1  # images below the widest gap (1 to 6)
    assert energy[below] - energy[below - 1] > 1e-4  # the threshold is no tie
    threshold = float((energy[below - 1] + energy[below]) / 2)
    calibration = calibrate.Calibration(1.5, "energy", threshold, 0.75)
    (run / calibrate.CALIBRATION).write_text(json.dumps(calibration.to_dict()))
    others = tmp_path / "others"
    other_files = _others(others)

    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(run), str(folder), "--output", str(out),
                 "--unknown", str(others)]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    unknown = metrics["unknown"]
    assert unknown["folder"] == str(others) and unknown["images"] == len(other_files)
    assert [Path(path).name for path, _ in unknown["set_aside"]] == ["broken.jpg"]
    assert unknown["rejected_in"] == pytest.approx(below / 8)
    assert metrics["calibration"]["rejected"] == pytest.approx(below / 8)
    assert metrics["calibration"]["threshold"] == pytest.approx(threshold)
    labels = _labels(files)
    kept = calibrate.scores(logits, 1.0, "energy") >= threshold
    assert metrics["calibration"]["accuracy_kept"] == pytest.approx(
        (calibrate.softmax(logits).argmax(axis=1) == labels)[kept].mean())
    assert metrics["calibration"]["ece_after"] == pytest.approx(
        calibrate.expected_calibration_error(calibrate.softmax(logits, 1.5), labels), abs=1e-5)

    other_logits, _ = _logits_and_scores(run, other_files)
    assert unknown["rejected_out"] == pytest.approx(
        (calibrate.scores(other_logits, 1.0, "energy") < threshold).mean())
    # An energy calibration holds no Mahalanobis statistics: the logits' scores are measured.
    assert set(unknown["by_score"]) == set(calibrate.LOGIT_SCORES)
    for kind in calibrate.LOGIT_SCORES:
        expected = calibrate.separation(calibrate.scores(logits, 1.5, kind),
                                        calibrate.scores(other_logits, 1.5, kind))
        assert unknown["by_score"][kind] == pytest.approx(expected, abs=1e-6), kind
    assert unknown["score"] == "energy"
    assert unknown["auroc"] == pytest.approx(unknown["by_score"]["energy"]["auroc"])
    assert unknown["fpr_at_95_tpr"] == pytest.approx(
        unknown["by_score"]["energy"]["fpr_at_95_tpr"])
    histogram = unknown["histogram"]
    assert sum(histogram["in"]) == 8 and sum(histogram["out"]) == len(other_files)
    assert histogram["edges"][0] <= threshold <= histogram["edges"][-1]

    assert (out / "unknown_scores.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert 'src="unknown_scores.png"' in page and 'id="separation"' in page
    assert f"AUROC <b>{unknown['auroc']:.3f}</b>" in page
    assert f"{100 * below / 8:.1f}% of these images" in page


def test_evaluate_unknown_needs_a_folder_with_readable_images(trained_run, tmp_path, capsys):
    run_dir, dataset = trained_run
    folder = str(dataset / "validation")
    base = ["evaluate", "--model", str(run_dir), folder, "--output", str(tmp_path / "out")]
    assert main(base + ["--unknown", str(tmp_path / "missing")]) == 2
    assert "--unknown expects a folder" in capsys.readouterr().err
    empty = tmp_path / "broken_only"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(base + ["--unknown", str(empty)]) == 2
    assert "has no readable images (1 set aside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # stopped before any report was written


def test_a_run_without_calibration_rejects_nothing(tmp_path):
    from transfer.evaluate import calibration_metrics

    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    outputs = {"logits": logits, "probabilities": calibrate.softmax(logits),
               "score": calibrate.scores(logits)}
    found = calibration_metrics(calibrate.read(tmp_path), outputs, np.array([0, 0, 0]))
    assert found["threshold"] is None and found["temperature"] == 1
    assert found["rejected"] == 0 and found["accuracy_kept"] == pytest.approx(2 / 3)
    assert found["ece_before"] == pytest.approx(found["ece_after"])
