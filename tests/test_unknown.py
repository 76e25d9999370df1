"""predict's score and unknown columns, and --reject."""

import csv
import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer import calibrate
from transfer.export import IMAGES_INPUT, SIGNATURE
from transfer.files import write_json
from transfer.model import load_model
from transfer.predict import Predictor


def test_predict_writes_scores_and_reject_labels_low_scores_unknown(trained_run, tmp_path):
    from transfer.cli import main

    source, dataset = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    folder = dataset / "validation"

    def predicted(*flags):
        out = tmp_path / f"predictions{len(flags)}.csv"
        assert main(["predict", "--model", str(run_dir), str(folder), "--output", str(out),
                     *flags]) == 0
        with open(out, newline="") as handle:
            return list(csv.DictReader(handle))

    plain = predicted()
    scores = np.array([float(row["score"]) for row in plain])
    # A threshold between the scores: the images below it are unknown, and only those.
    stored = json.loads((run_dir / calibrate.CALIBRATION).read_text())
    stored["threshold"] = float(np.median(scores))
    (run_dir / calibrate.CALIBRATION).write_text(json.dumps(stored))
    flagged = predicted()
    assert [row["unknown"] == "true" for row in flagged] == list(scores < np.median(scores))
    assert {row["label"] for row in flagged} <= {"horizontal", "vertical"}  # not rejected
    rejected = predicted("--reject")
    for before, after in zip(flagged, rejected):
        assert after["label"] == ("unknown" if before["unknown"] == "true" else before["label"])
        assert after["probability"] == before["probability"]  # the classes' probabilities
    assert any(row["label"] == "unknown" for row in rejected)


def test_an_export_from_before_calibration_asks_to_be_exported_again(trained_run, tmp_path):
    run_dir, _ = trained_run
    model = load_model(run_dir / "model.keras")
    archive = keras.export.ExportArchive()  # the signature as exports had it before
    archive.track(model)
    archive.add_endpoint(SIGNATURE, lambda images: {"probabilities": model(images)},
                         input_signature=[tf.TensorSpec([None, *model.input_shape[1:]],
                                                        tf.float32, name=IMAGES_INPUT)])
    archive.write_out(str(tmp_path / "1"), verbose=False)
    (tmp_path / "1" / "assets.extra").mkdir()
    write_json(tmp_path / "1" / "assets.extra" / "classes.json", ["horizontal", "vertical"])
    with pytest.raises(ValueError, match="has no score or unknown output. Export the run again"):
        Predictor(tmp_path / "1")
