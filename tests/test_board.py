"""TensorBoard: every run's epochs of both phases, read back with TensorBoard's own reader."""

import csv

import numpy as np
import pytest

from conftest import TINY_BACKBONE, TINY_CUT, TINY_SIZE
from transfer.config import PHASES


def _accumulated(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    return events


def _scalars(events, tag):
    """{step: value} of a tf.summary.scalar tag (TF2 writes them as tensors)."""
    return {event.step: float(np.asarray(events_tensor_value(event)))
            for event in events.Tensors(tag)}


def events_tensor_value(event):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(event.tensor_proto)


@pytest.mark.parametrize("head", ["lbfgs", "adam"])
def test_a_run_writes_both_phases_and_its_report_images_for_tensorboard(dataset, tmp_path,
                                                                        head):
    from transfer.config import resolve
    from transfer.pipeline import train

    cfg = resolve(None, dict(data=str(dataset), backbone=TINY_BACKBONE, weights="none",
                             image_size=TINY_SIZE, batch_size=4, epochs=2, fine_tune_epochs=2,
                             fine_tune_learning_rate=1e-3, fine_tune_from=TINY_CUT,
                             runs_dir=str(tmp_path / "runs"), head=head, patience=5))
    run_dir = train(cfg, verbose=0)
    with open(run_dir / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    epochs = [int(row["epoch"]) for row in history]
    phases = [row["phase"] for row in history]
    assert phases == (["head"] + ["fine_tune"] * 2 + ["refit"] if head == "lbfgs"
                      else ["head", "head"] + ["fine_tune"] * 2)

    board = run_dir / "tensorboard"
    trained, validated = _accumulated(board / "train"), _accumulated(board / "validation")
    for key in ("loss", "accuracy", "learning_rate"):
        assert _scalars(trained, f"epoch_{key}") == pytest.approx(
            {epoch: float(row[key]) for epoch, row in zip(epochs, history)}, rel=1e-6)
    for key in ("loss", "accuracy"):
        assert _scalars(validated, f"epoch_{key}") == pytest.approx(
            {epoch: float(row[f"val_{key}"]) for epoch, row in zip(epochs, history)}, rel=1e-6)
    # Where each phase begins: a step in "epoch_phase" and one text line per phase.
    assert _scalars(trained, "epoch_phase") == {
        epoch: float(PHASES.index(phase)) for epoch, phase in zip(epochs, phases)}
    texts = {event.step: events_tensor_value(event).item().decode()
             for event in trained.Tensors("phase")}
    starts = {epochs[phases.index(phase)]: phase for phase in dict.fromkeys(phases)}
    assert texts == {epoch: f"phase {phase} begins at epoch {epoch}"
                     for epoch, phase in starts.items()}

    report = _accumulated(board / "report")
    assert set(report.Tags()["tensors"]) >= {"learning_curves", "confusion_matrix"}
    (image,) = report.Tensors("confusion_matrix")
    assert image.step == epochs[-1]
    width, height = (int(value) for value in events_tensor_value(image)[:2])
    assert width > 100 and height > 100  # the PNG's own size: the picture, not a placeholder
