"""The evaluation report of a multi-label model: scikit-learn's figures on the calibrated
probabilities, each label decided by its own threshold, and the pages and pictures of it.

No training: a tiny backbone at random weights whose head is rescaled so that the
probabilities spread out, and made-up multi-hot labels. The expected figures are computed
here from the plain model's sigmoids, not by transfer's scoring path."""

import json

import numpy as np
import pytest

from conftest import TINY_BACKBONE, TINY_SIZE, write_image

LABELS = ("animal", "outdoor", "night")  # "night": no image carries it
TEMPERATURE = 2.0
CARRIED = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0],
                    [0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def _between(values, rank):
    """A threshold halfway between the rank-th and the next largest of values: no decision
    is a rounding error from it."""
    ordered = np.sort(values)[::-1]
    assert ordered[rank] - ordered[rank + 1] > 1e-3, ordered
    return float((ordered[rank] + ordered[rank + 1]) / 2)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The model, its images' files, their logits at temperature 1 (from model.predict), and
    a run directory whose calibration divides them by TEMPERATURE, decides each label at a
    threshold between its probabilities and rejects half of the images by joint energy."""
    import keras

    from transfer import calibrate
    from transfer.backbones import BACKBONES
    from transfer.images import load_image
    from transfer.model import build_classifier

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("evaluate_multilabel")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(CARRIED)):
        write_image(root / "images" / f"image{i:02d}.png", i % 2, rng)
        paths.append(str(root / "images" / f"image{i:02d}.png"))
    for i in range(4):
        write_image(root / "others" / f"other{i}.png", i % 2, rng)
    model = build_classifier(BACKBONES[TINY_BACKBONE], len(LABELS), TINY_SIZE, weights="none",
                             multi_label=True)
    images = np.stack([load_image(p, TINY_SIZE) for p in paths]).astype("float32")
    dense = model.get_layer("probabilities")
    kernel, bias = (np.asarray(w) for w in dense.get_weights())
    raw = _logit(np.clip(model.predict(images, verbose=0), 1e-6, 1 - 1e-6)) - bias
    scale = 3 / np.maximum(raw.std(axis=0), 1e-6)  # logits of spread 3, centred per label
    dense.set_weights([kernel * scale, -raw.mean(axis=0) * scale])
    logits = _logit(np.clip(model.predict(images, verbose=0).astype(np.float64), 1e-9,
                            1 - 1e-9))
    probabilities = _sigmoid(logits / TEMPERATURE)
    thresholds = tuple(_between(probabilities[:, c], rank)
                       for c, rank in enumerate((4, 6, 2)))
    energy = np.logaddexp(0, logits).sum(axis=1)
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(
        {"backbone": TINY_BACKBONE, "image_size": TINY_SIZE, "weights": "none"}))
    calibration = calibrate.Calibration(TEMPERATURE, "joint_energy",
                                        _between(energy, len(paths) // 2 - 1), 0.5,
                                        multi_label=True, thresholds=thresholds)
    calibrate.write(run_dir, calibration, {})
    return dict(model=model, paths=paths, logits=logits, probabilities=probabilities,
                thresholds=np.array(thresholds), energy=energy, run_dir=run_dir, root=root,
                calibration=calibration)


@pytest.fixture(scope="module")
def report(setting, tmp_path_factory):
    """evaluate()'s metrics and output folder, Grad-CAM's class indices and the galleries'
    titles as evaluate() asked for them."""
    import transfer.evaluate as evaluate_module
    import transfer.explain as explain

    drawn, explained = {}, []
    gradcam, plot_gallery = explain.gradcam, evaluate_module.plot_gallery

    def recording_gradcam(model, images, class_indices, layer=None):
        explained.append(np.asarray(class_indices).tolist())
        return gradcam(model, images, class_indices, layer)

    def recording_gallery(images, titles, path, columns=6):
        drawn[path.name] = list(titles)
        return plot_gallery(images, titles, path, columns)

    output = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(explain, "gradcam", recording_gradcam)
        patch.setattr(evaluate_module, "plot_gallery", recording_gallery)
        metrics = evaluate_module.evaluate(
            setting["model"], list(LABELS), setting["paths"], CARRIED.tolist(), output,
            run_dir=setting["run_dir"], unknown=evaluate_module.other_images(
                setting["root"] / "others"))
    return dict(metrics=metrics, output=output, explained=explained, drawn=drawn)


def test_per_label_and_summary_figures_are_sklearns_at_each_labels_threshold(setting, report):
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score,
                                 hamming_loss, precision_score, recall_score)

    metrics = report["metrics"]
    probabilities, thresholds = setting["probabilities"], setting["thresholds"]
    decided = (probabilities >= thresholds).astype(int)
    assert decided.sum(axis=0).tolist() == [5, 7, 3]  # the thresholds' ranks, not 0.5's
    assert metrics["multi_label"] is True and metrics["images"] == len(CARRIED)
    assert metrics["roc_auc"] is None and "confusion_matrix" not in metrics
    for c, name in enumerate(LABELS):
        figures = metrics["per_label"][name]
        assert figures["threshold"] == pytest.approx(thresholds[c])
        assert figures["support"] == CARRIED[:, c].sum()
        for key, score in (("precision", precision_score), ("recall", recall_score),
                           ("f1-score", f1_score)):
            assert figures[key] == pytest.approx(score(CARRIED[:, c], decided[:, c],
                                                       zero_division=0)), (name, key)
    for c, name in enumerate(LABELS[:2]):
        assert metrics["per_label"][name]["average_precision"] == pytest.approx(
            average_precision_score(CARRIED[:, c], probabilities[:, c]), abs=1e-6)
    assert metrics["per_label"]["night"]["average_precision"] is None  # no positives
    assert metrics["mean_average_precision"] == pytest.approx(np.mean(
        [average_precision_score(CARRIED[:, c], probabilities[:, c]) for c in (0, 1)]),
        abs=1e-6)
    assert metrics["micro_f1"] == pytest.approx(f1_score(CARRIED, decided, average="micro"))
    # "night" is predicted, so it counts in the macro average, with its F1 of 0
    assert metrics["macro_f1"] == pytest.approx(f1_score(CARRIED, decided, average="macro",
                                                         zero_division=0))
    assert metrics["subset_accuracy"] == metrics["accuracy"] == pytest.approx(
        accuracy_score(CARRIED, decided))
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(CARRIED, decided))
    saved = json.loads((report["output"] / "metrics.json").read_text())
    assert saved["per_label"] == metrics["per_label"] and saved["micro_f1"] == metrics["micro_f1"]


def test_the_most_confidently_wrong_labels_are_ranked_by_their_distance_from_the_truth(
        setting, report):
    from transfer.evaluate import GALLERY

    probabilities, thresholds = setting["probabilities"], setting["thresholds"]
    decided = probabilities >= thresholds
    wrong = report["metrics"]["most_confidently_wrong"]
    everything = {(i, c): abs(CARRIED[i, c] - probabilities[i, c])
                  for i, c in np.argwhere(decided != (CARRIED > 0))}
    assert len(everything) > GALLERY and len(wrong) == GALLERY
    index = {path: i for i, path in enumerate(setting["paths"])}
    distances = []
    for row in wrong:
        i, c = index[row["path"]], LABELS.index(row["label"])
        assert (i, c) in everything  # a wrong decision
        assert row["truth"] == bool(CARRIED[i, c])
        assert row["probability"] == pytest.approx(probabilities[i, c], abs=1e-5)
        assert row["predicted"] == [LABELS[k] for k in np.flatnonzero(decided[i])]
        distances.append(everything[i, c])
    assert distances == sorted(distances, reverse=True)
    left_out = sorted(everything.values(), reverse=True)[GALLERY:]
    assert min(distances) >= max(left_out) - 1e-6
    titles = report["drawn"]["top_losses.png"]
    assert [title.split()[0] for title in titles] == [row["label"] for row in wrong]


def test_gradcam_shows_each_label_above_its_threshold_once(setting, report):
    from transfer.evaluate import GRADCAM_SAMPLES

    probabilities, thresholds = setting["probabilities"], setting["thresholds"]
    decided = probabilities >= thresholds
    shown = np.flatnonzero(decided.any(axis=1))[:GRADCAM_SAMPLES]
    expected = [c for i in shown
                for c in sorted(np.flatnonzero(decided[i]), key=lambda c: -probabilities[i, c])]
    assert report["explained"] == [expected]
    titles = report["drawn"]["gradcam.png"]
    pairs = [(i, c) for i in shown for c in np.flatnonzero(decided[i])]
    assert len(titles) == len(pairs) == len(expected)
    assert sorted(titles) == sorted(
        f"{LABELS[c]} {probabilities[i, c]:.2f}\n"
        f"{'carried' if CARRIED[i, c] else 'WRONG: not carried'}" for i, c in pairs)


def test_calibration_and_unknown_figures_use_the_sigmoids(setting, report):
    from transfer import calibrate

    figures = report["metrics"]["calibration"]
    logits = setting["logits"]
    assert figures["multi_label"] is True and figures["temperature"] == TEMPERATURE
    assert figures["ece_before"] == pytest.approx(calibrate.expected_calibration_error(
        _sigmoid(logits), CARRIED), abs=1e-5)
    assert figures["ece_after"] == pytest.approx(calibrate.expected_calibration_error(
        setting["probabilities"], CARRIED), abs=1e-5)
    assert figures["nll_after"] == pytest.approx(calibrate.log_loss(logits, CARRIED,
                                                                    TEMPERATURE), abs=1e-4)
    kept = setting["energy"] >= setting["calibration"].threshold
    assert figures["rejected"] == pytest.approx(0.5)
    right = ((setting["probabilities"] >= setting["thresholds"]) == (CARRIED > 0)).all(axis=1)
    assert figures["accuracy_kept"] == pytest.approx(right[kept].mean())
    unknown = report["metrics"]["unknown"]
    assert unknown["score"] == "joint_energy" and unknown["images"] == 4
    assert set(unknown["by_score"]) == set(calibrate.MULTI_LABEL_SCORES)
    assert 0 <= unknown["auroc"] <= 1


def test_the_report_shows_the_per_label_table_and_figures(setting, report):
    output, metrics = report["output"], report["metrics"]
    for name in ("per_label.png", "gradcam.png", "top_losses.png", "reliability.png",
                 "feature_maps.png", "unknown_scores.png"):
        assert (output / name).read_bytes()[:4] == b"\x89PNG", name
    assert not (output / "confusion_matrix.png").exists()
    page = (output / "report.html").read_text()
    assert 'id="per-label"' in page and 'id="per-class"' not in page
    for c, name in enumerate(LABELS):
        figures = metrics["per_label"][name]
        assert (f"<tr><td>{name}</td><td>{setting['thresholds'][c]:.3f}</td>"
                f"<td>{figures['precision']:.3f}</td><td>{figures['recall']:.3f}</td>"
                f"<td>{figures['f1-score']:.3f}</td>") in page, name
    assert "<td>night</td>" in page and "&ndash;" in page  # its undefined AP
    assert f"subset accuracy (every label right) <b>{metrics['accuracy']:.4f}</b>" in page
    assert f"micro F1 <b>{metrics['micro_f1']:.4f}</b>" in page
    assert f"mean average precision <b>{metrics['mean_average_precision']:.3f}</b>" in page
    for section, title in (("per-label", "Per label"),
                           ("top-losses", "Most confidently wrong labels"),
                           ("gradcam", "Grad-CAM per predicted label"),
                           ("reliability", "Calibration"), ("feature-maps", "Feature maps")):
        assert f'<section id="{section}"><h2>{title}</h2>' in page, section
    assert 'src="per_label.png"' in page and "confusion-matrix" not in page


def test_thresholds_decide_the_labels(setting, tmp_path):
    """Every label above 0 is predicted and none above 1: recall 1 and 0 whatever the
    model's probabilities, and the third label at its threshold as before."""
    from transfer import calibrate
    from transfer.evaluate import evaluate

    thresholds = (0.0, 1.5, float(setting["thresholds"][2]))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text((setting["run_dir"] / "config.json").read_text())
    calibrate.write(run_dir, calibrate.Calibration(TEMPERATURE, "joint_energy",
                                                   multi_label=True, thresholds=thresholds), {})
    metrics = evaluate(setting["model"], list(LABELS), setting["paths"], CARRIED,
                       tmp_path / "report", run_dir=run_dir)
    animal, outdoor, night = (metrics["per_label"][name] for name in LABELS)
    assert animal["recall"] == 1 and animal["precision"] == pytest.approx(CARRIED[:, 0].mean())
    assert outdoor["recall"] == 0 and outdoor["precision"] == 0
    assert night["precision"] == 0 and night["threshold"] == pytest.approx(thresholds[2])
    assert all(row["predicted"][0] == "animal" and "outdoor" not in row["predicted"]
               for row in metrics["most_confidently_wrong"])


def test_accuracy_is_the_subset_accuracy_at_the_calibrations_thresholds(setting):
    import dataclasses

    from transfer.evaluate import accuracy

    model, paths = setting["model"], setting["paths"]
    decided = setting["probabilities"] >= setting["thresholds"]
    expected = (decided == (CARRIED > 0)).all(axis=1).mean()
    assert accuracy(model, paths, CARRIED.tolist(), calibration=setting["calibration"]) == (
        pytest.approx(expected))
    at_half = (_sigmoid(setting["logits"]) >= 0.5) == (CARRIED > 0)
    assert accuracy(model, paths, tuple(map(tuple, CARRIED))) == pytest.approx(
        at_half.all(axis=1).mean())
    # "animal" on every image, nothing else: right on exactly the images of animal alone
    only_animal = dataclasses.replace(setting["calibration"], thresholds=(0.0, 1.5, 1.5))
    assert accuracy(model, paths, CARRIED, calibration=only_animal) == pytest.approx(
        (CARRIED == [1, 0, 0]).all(axis=1).mean())
    assert (CARRIED == [1, 0, 0]).all(axis=1).mean() == pytest.approx(3 / 12)
    with pytest.raises(ValueError, match="multi-hot rows"):
        accuracy(model, paths, [0] * len(paths))


def test_labels_that_do_not_fit_the_model_are_clear_errors(setting, tmp_path):
    from transfer.backbones import BACKBONES
    from transfer.evaluate import evaluate
    from transfer.model import build_classifier

    with pytest.raises(ValueError, match=r"one column per label \(3\); received an array "
                                         r"of shape \(12, 2\)"):
        evaluate(setting["model"], list(LABELS), setting["paths"], CARRIED[:, :2], tmp_path)
    single = build_classifier(BACKBONES[TINY_BACKBONE], 3, TINY_SIZE, weights="none")
    with pytest.raises(ValueError, match="Multi-hot labels need a model trained with "
                                         "--multi-label"):
        evaluate(single, list(LABELS), setting["paths"], CARRIED, tmp_path)
    with pytest.raises(ValueError, match="calibration.json belongs to another run"):
        evaluate(single, list(LABELS), setting["paths"], [0] * len(CARRIED), tmp_path,
                 run_dir=setting["run_dir"])


def test_label_scores_leave_out_a_label_never_carried_nor_predicted():
    from sklearn.metrics import f1_score

    from transfer.evaluate import label_scores

    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    decided = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])
    probabilities = np.array([[0.9, 0.1, 0.2], [0.4, 0.8, 0.1], [0.2, 0.7, 0.3],
                              [0.6, 0.3, 0.1]])
    per_label, summary = label_scores(labels, decided, probabilities, ["a", "b", "c"],
                                      [0.5, 0.5, 0.5])
    assert per_label["c"] == {"precision": None, "recall": None, "f1-score": None,
                              "support": 0, "average_precision": None, "threshold": 0.5}
    assert per_label["a"]["precision"] == pytest.approx(0.5)
    assert per_label["a"]["recall"] == pytest.approx(0.5)
    assert per_label["b"]["f1-score"] == 1 and per_label["b"]["average_precision"] == 1
    assert summary["macro_f1"] == pytest.approx(f1_score(labels[:, :2], decided[:, :2],
                                                         average="macro"))
    assert summary["macro_f1"] != pytest.approx(f1_score(labels, decided, average="macro",
                                                         zero_division=0))
    assert summary["subset_accuracy"] == pytest.approx(0.5)
    assert summary["hamming_loss"] == pytest.approx(2 / 12)
    assert summary["mean_average_precision"] == pytest.approx(
        (per_label["a"]["average_precision"] + 1) / 2)


def test_evaluate_command_reads_a_label_file_with_several_labels_a_row(setting, tmp_path):
    import csv

    from transfer.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    setting["model"].save(run_dir / "model.keras")
    (run_dir / "classes.json").write_text(json.dumps(list(LABELS)))
    for name in ("config.json", "calibration.json"):
        (run_dir / name).write_text((setting["run_dir"] / name).read_text())
    folder = setting["root"] / "images"
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label"))
        writer.writerows((f"image{i:02d}.png", " ".join(
            name for name, on in zip(LABELS, row) if on)) for i, row in enumerate(CARRIED))
    assert main(["evaluate", "--model", str(run_dir), "--labels", str(folder / "labels.csv"),
                 "--output", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["multi_label"] and metrics["images"] == len(CARRIED)
    assert [metrics["per_label"][name]["support"] for name in LABELS] == (
        CARRIED.sum(axis=0).tolist())
    assert (tmp_path / "report" / "per_label.png").is_file()
