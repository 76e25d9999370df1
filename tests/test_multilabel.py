"""Multi-label data sets: a label file whose cells hold several labels, trained with a sigmoid
per label, decided by a threshold per label, exported, predicted and served."""

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_BACKBONE, TINY_CUT, TINY_SIZE
from transfer import data
from transfer.cli import main
from transfer.layouts import check_dataset, find_layout

LABELS = ("horizontal", "red")  # two independent visual features: stripes and colour


def write_picture(path, red, horizontal, rng, size=40):
    """Stripes across (horizontal) or down, in red or in blue, plus noise."""
    stripes = (np.arange(size) // 4 % 2).astype(np.float64)
    pattern = (np.tile(stripes[:, None], (1, size)) if horizontal
               else np.tile(stripes[None, :], (size, 1)))
    colour = np.array([200, 40, 40]) if red else np.array([40, 40, 200])
    pixels = pattern[..., None] * colour + rng.integers(0, 50, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def make_multilabel(root, count=64, seed=0, separator=" "):
    """count pictures, a quarter of each combination of the two features, and labels.csv
    naming the features each shows (none for blue vertical stripes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        red, horizontal = i % 2, i // 2 % 2
        write_picture(root / f"picture{i:03d}.png", red, horizontal, rng)
        rows.append((f"picture{i:03d}.png", separator.join(
            name for name, on in zip(LABELS, (horizontal, red)) if on)))
    return write_rows(root / "labels.csv", rows)


def write_rows(path, rows, header=("path", "label")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def carried(split, classes):
    """{path: the set of labels} of a data.Split of multi-hot rows."""
    return {Path(path).name: {cls for cls, on in zip(classes, row) if on}
            for path, row in zip(split.paths, split.labels)}


@pytest.mark.parametrize("separator", [" ", ";", " ; "])
def test_several_labels_in_a_cell_are_detected_and_logged(tmp_path, caplog, separator):
    labels = make_multilabel(tmp_path / "pictures", count=8, separator=separator)
    with caplog.at_level(logging.INFO, logger="transfer"):
        layout, reports = check_dataset(tmp_path / "pictures", labels=labels)
    assert layout.multi_label and layout.classes == list(LABELS)
    assert "training multi-label" in caplog.text and "labels.csv line 5 holds 2 labels" in caplog.text
    assert reports[0].images() == 8 and len(reports[0].unlabelled) == 2  # blue, vertical
    assert reports[0].counts() == {"horizontal": 4, "red": 4}
    split = data.as_split(reports[0], layout.classes, multi_label=True)
    assert carried(split, layout.classes)["picture003.png"] == {"horizontal", "red"}
    assert carried(split, layout.classes)["picture000.png"] == set()
    assert "no label 2" in main_output(["check", "--labels", str(labels)])


def main_output(argv):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


def test_multi_label_can_be_forced_either_way(tmp_path):
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for i in range(4):
        write_picture(root / f"p{i}.png", i % 2, 0, rng)
    labels = write_rows(root / "labels.csv", [("p0.png", "golden retriever"), ("p1.png", "cat"),
                                              ("p2.png", "golden retriever"), ("p3.png", "cat")])
    assert find_layout(root, labels).multi_label  # detected: "golden" and "retriever"
    single = find_layout(root, labels, multi_label=False)
    assert not single.multi_label and single.classes == ["cat", "golden retriever"]
    one_each = write_rows(root / "one.csv", [("p0.png", "cat"), ("p1.png", "dog")])
    assert find_layout(root, one_each, multi_label=True).multi_label
    assert not find_layout(root, one_each).multi_label
    with pytest.raises(ValueError, match="--multi-label needs a label file"):
        find_layout(root, multi_label=True)


@pytest.mark.parametrize("cell, mark", [("horizontal,red", ","), ("horizontal|red", "|"),
                                        ("red/horizontal", "/")])
def test_labels_joined_by_another_separator_are_a_clear_error(tmp_path, capsys, cell, mark):
    root = tmp_path / "pictures"
    make_multilabel(root, count=8)
    rows = list(csv.reader(open(root / "labels.csv")))[1:]
    rows[3][1] = cell
    labels = write_rows(root / "labels.csv", rows)
    with pytest.raises(ValueError, match=f"joined by '\\{mark}'|joined by '{mark}'"):
        find_layout(root, labels)
    assert main(["check", "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert "labels.csv line 5" in err and "spaces or ';'" in err and "Traceback" not in err


def test_a_label_on_one_image_is_a_warning_and_the_image_is_kept(tmp_path, caplog):
    root = tmp_path / "pictures"
    make_multilabel(root, count=12)
    rows = list(csv.reader(open(root / "labels.csv")))[1:]
    rows[5][1] += " rare"
    labels = write_rows(root / "labels.csv", rows)
    layout, reports = check_dataset(root, labels=labels)
    with caplog.at_level(logging.WARNING, logger="transfer"):
        splits = data.assign_splits(reports, layout.classes, 0.25, 0.0, 1, multi_label=True)
    assert "label(s) rare are on one image" in caplog.text
    assert sum(len(split) for split in splits.values()) == 12


def test_iterative_stratification_keeps_every_label_on_both_sides():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 6)) < [0.5, 0.3, 0.1, 0.05, 0.02, 0.01]).astype(int)
    labels[:2, 5] = 1  # the rarest label: two images
    split = data.Split(tuple(f"f{i}" for i in range(200)), tuple(map(tuple, labels)))
    rest, part = data.iterative_split(split, 0.2, seed=3)
    assert len(part) == 40 and len(rest) == 160
    assert not set(rest.paths) & set(part.paths)
    carried_rest, carried_part = np.asarray(rest.labels), np.asarray(part.labels)
    assert (carried_part.sum(axis=0) > 0).all() and (carried_rest.sum(axis=0) > 0).all()
    # Each label's share on the small side is near the fraction, common labels most closely.
    share = carried_part.sum(axis=0) / labels.sum(axis=0)
    assert abs(share[0] - 0.2) < 0.03 and abs(share[1] - 0.2) < 0.03
    assert data.iterative_split(split, 0.2, seed=3) == (rest, part)  # seeded
    assert data.iterative_split(split, 0.2, seed=4) != (rest, part)


def test_positive_weights_weigh_the_rare_labels():
    labels = np.array([[1, 1, 0]] * 5 + [[1, 0, 0]] * 4 + [[0, 0, 1]])
    assert data.positive_weights(labels, "auto") == [1.0, 1.0, 9.0]  # 9 negatives to 1
    assert data.positive_weights(labels, "balanced") == pytest.approx([1 / 9, 1.0, 9.0])
    assert data.positive_weights(labels, "none") is None
    assert data.positive_weights(np.array([[1, 0], [0, 1]]), "auto") is None


def test_each_threshold_maximises_its_labels_f1():
    from sklearn.metrics import f1_score

    from transfer.calibrate import DEFAULT_THRESHOLD, f1_thresholds

    rng = np.random.default_rng(1)
    labels = (rng.random((60, 3)) < 0.4).astype(int)
    labels[:, 2] = 0  # no image carries the third label
    probabilities = np.clip(0.35 * labels + rng.random((60, 3)) * 0.65, 0, 1)
    thresholds = f1_thresholds(probabilities, labels)
    assert thresholds[2] == DEFAULT_THRESHOLD
    for c in range(2):
        best = max(f1_score(labels[:, c], probabilities[:, c] >= t)
                   for t in np.unique(probabilities[:, c]))
        assert f1_score(labels[:, c], probabilities[:, c] >= thresholds[c]) == pytest.approx(best)
        assert not np.isclose(probabilities[:, c], thresholds[c]).any()  # never on a value


def test_the_solved_head_matches_the_loss_keras_computes():
    import keras

    from transfer.cache import Views
    from transfer.head import solve_head
    from transfer.layers import LabelCrossentropy

    rng = np.random.default_rng(0)
    labels = (rng.random((80, 3)) < [0.5, 0.3, 0.1]).astype(np.int32)
    features = (labels @ rng.normal(size=(3, 16)) + rng.normal(size=(80, 16))).astype("float32")
    dense = keras.layers.Dense(3, activation="sigmoid")
    dense.build((None, 16))
    weights = [1.0, 2.0, 9.0]
    train = Views(np.stack([features[:60], features[:60] + 0.1]), labels[:60], 16)
    validation = Views(features[None, 60:], labels[60:], 16)
    logs = solve_head(dense, train, validation, weights)
    keras_loss = float(LabelCrossentropy(weights)(labels[60:], dense(features[60:])))
    assert logs["val_loss"] == pytest.approx(keras_loss, rel=1e-4)
    decided = np.asarray(dense(features[60:])) >= 0.5
    assert logs["val_accuracy"] == pytest.approx((decided == labels[60:]).mean())
    assert logs["val_accuracy"] > 0.8


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    """A finished multi-label run of the tiny backbone on the stripes-and-colours pictures,
    with a test split: (run_dir, data folder)."""
    from transfer.config import resolve
    from transfer.pipeline import train

    root = tmp_path_factory.mktemp("multilabel")
    labels = make_multilabel(root / "pictures", count=80)
    cfg = resolve(None, dict(labels=str(labels), backbone=TINY_BACKBONE, weights="none",
                             image_size=TINY_SIZE, batch_size=8, fine_tune_epochs=2,
                             fine_tune_learning_rate=1e-4, fine_tune_from=TINY_CUT,
                             test_split=0.2, runs_dir=str(root / "runs")))
    return train(cfg, verbose=0), root / "pictures"


def test_a_multi_label_run_learns_both_features(multilabel_run):
    from transfer.model import is_multi_label, load_model
    from transfer.runs import read_split

    run_dir, _ = multilabel_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["multi_label"] is True and config["layout"] == "label file"
    assert is_multi_label(load_model(run_dir / "model.keras"))
    classes, splits = read_split(run_dir)
    assert classes == list(LABELS) and [len(splits[s]) for s in ("train", "validation",
                                                                 "test")] == [48, 16, 16]
    for split in splits.values():  # iterative stratification: each label on every side
        assert (np.asarray(split.labels).sum(axis=0) > 0).all()
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert metrics["multi_label"] and metrics["images"] == 16
    for label in LABELS:  # both features are learnt, on images nothing was chosen on
        assert metrics["per_label"][label]["f1-score"] >= 0.8, metrics["per_label"]
    assert metrics["mean_average_precision"] >= 0.9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] == metrics["accuracy"] == metrics["subset_accuracy"]
    calibration = json.loads((run_dir / "calibration.json").read_text())
    assert calibration["multi_label"] and calibration["score"] == "joint_energy"
    assert len(calibration["thresholds"]) == 2
    page = (run_dir / "test" / "report.html").read_text()
    assert 'id="per-label"' in page and "Grad-CAM per predicted label" in page
    assert f"mean average precision <b>{metrics['mean_average_precision']:.3f}</b>" in page
    for picture in ("per_label.png", "gradcam.png", "reliability.png"):
        assert (run_dir / "test" / picture).stat().st_size > 1000
    wrong = metrics["most_confidently_wrong"]  # furthest from the truth first
    distance = [p["probability"] if not p["truth"] else 1 - p["probability"] for p in wrong]
    assert distance == sorted(distance, reverse=True)


def test_thresholds_are_each_labels_best_f1_on_the_validation_images(multilabel_run):
    from sklearn.metrics import f1_score

    from transfer import calibrate
    from transfer.evaluate import predict_files
    from transfer.model import load_model, scored
    from transfer.runs import read_split

    run_dir, _ = multilabel_run
    calibration = calibrate.read(run_dir)
    validation = read_split(run_dir)[1]["validation"]
    probabilities = predict_files(scored(load_model(run_dir / "model.keras"), calibration),
                                  validation.paths)[1]["probabilities"]
    labels = np.asarray(validation.labels)
    for c, threshold in enumerate(calibration.thresholds):
        best = max(f1_score(labels[:, c], probabilities[:, c] >= t, zero_division=0)
                   for t in np.unique(probabilities[:, c]))
        assert f1_score(labels[:, c], probabilities[:, c] >= threshold) == pytest.approx(best)


def test_export_predict_and_serve_agree_on_the_labels(multilabel_run, tmp_path):
    from transfer.export import CONFIG_ASSET, read_asset
    from transfer.pipeline import export_run
    from transfer.predict import Predictor, predict_paths

    run_dir, pictures = multilabel_run
    version, _ = export_run(run_dir, output=tmp_path / "saved_models")
    thresholds = read_asset(version, CONFIG_ASSET)["calibration"]["thresholds"]
    assert thresholds == json.loads((run_dir / "calibration.json").read_text())["thresholds"]
    paths = sorted(pictures.glob("*.png"))[:12]
    rows = {}
    for model in (run_dir, version):
        predictor = Predictor(model)
        assert predictor.multi_label
        rows[model] = list(predict_paths(predictor, paths))
    for keras_row, exported in zip(rows[run_dir], rows[version]):
        assert keras_row["labels"] == exported["labels"]
        assert keras_row["label"] == ";".join(keras_row["labels"])
        for label in LABELS:
            assert keras_row["probabilities"][label] == pytest.approx(
                exported["probabilities"][label], abs=1e-4)
            assert (label in keras_row["labels"]) == (
                keras_row["probabilities"][label] >= thresholds[LABELS.index(label)])
    learnt = sum(set(row["labels"]) == {name for name, on in zip(
        LABELS, (i // 2 % 2, i % 2)) if on} for i, row in enumerate(rows[version]))
    assert learnt >= 10  # of 12 pictures, every label right

    out = tmp_path / "predictions.json"
    assert subprocess.run([sys.executable, "predict.py", "--model", str(version), "--output",
                           str(out), *map(str, paths[:3])], cwd=REPO).returncode == 0
    written = json.loads(out.read_text())
    assert [row["labels"] for row in written] == [row["labels"] for row in rows[version][:3]]
    assert set(written[0]["probabilities"]) == set(LABELS)

    from test_serve import b64, call, start_server

    process, base, _ = start_server(version.parent, tmp_path / "server.log")
    try:
        status, body = call(f"{base}:predict", {"signature_name": "serve_bytes", "instances": [
            {"image_bytes": b64(path)} for path in paths[:4]]})
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert status == 200
    served = [[name for name, on in zip(LABELS, p["decisions"]) if on]
              for p in body["predictions"]]
    assert served == [row["labels"] for row in rows[version][:4]]


def test_a_multi_label_run_resumes(multilabel_run, tmp_path):
    import shutil

    from transfer.pipeline import resume
    from transfer.runs import read_history

    source, _ = multilabel_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    (run_dir / "summary.json").unlink()  # as if stopped before the fine-tuning
    history = read_history(run_dir / "history.csv")
    head = [row for row in history if row["phase"] == "head"]
    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({"completed": ["head"], "phases": {
        "head": state["phases"]["head"]}}))
    from transfer.runs import write_history

    write_history(run_dir / "history.csv", head)
    resume(run_dir, verbose=0)
    rows = read_history(run_dir / "history.csv")
    assert [row["phase"] for row in rows] == ["head"] + ["fine_tune"] * 2 + ["refit"]
    assert json.loads((run_dir / "summary.json").read_text())["test_accuracy"] >= 0.5
