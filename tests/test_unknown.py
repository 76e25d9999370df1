"""predict's score and unknown columns, and --reject."""

import csv
import json
import shutil

import numpy as np

from transfer import calibrate


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
