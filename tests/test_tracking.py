"""MLflow, the optional extra: a finished run and its export logged to a real local store,
read back with MlflowClient; an unreachable server is a warning and the run goes on."""

import csv
import json
import logging
import socket
import time

import pytest

from conftest import TINY_BACKBONE, TINY_SIZE

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed: pip install '.[mlflow]'")


def _config(dataset, tmp_path, **overrides):
    from transfer.config import resolve

    return resolve(None, dict(data=str(dataset), backbone=TINY_BACKBONE, weights="none",
                              image_size=TINY_SIZE, batch_size=4, epochs=2, fine_tune_epochs=1,
                              head="adam", test_split=0.25, runs_dir=str(tmp_path / "runs"))
                   | overrides)


def test_a_run_and_its_export_are_logged_to_mlflow(dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from transfer.pipeline import export_run, train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # which also turns it on
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlruns
    run_dir = train(_config(dataset, tmp_path), verbose=0)
    record = json.loads((run_dir / "mlflow.json").read_text())

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("stripes")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == record["run_id"] and found.info.run_name == run_dir.name
    saved = json.loads((run_dir / "config.json").read_text())
    assert found.data.params["backbone"] == TINY_BACKBONE
    assert found.data.params["epochs"] == "2" and found.data.params["image_size"] == "32"
    assert set(found.data.params) == set(saved)
    with open(run_dir / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    for key in ("loss", "val_loss", "val_accuracy", "learning_rate"):
        logged = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        assert logged == pytest.approx({int(r["epoch"]): float(r[key]) for r in history})
    phases = client.get_metric_history(found.info.run_id, "phase")
    assert [(m.step, m.value) for m in sorted(phases, key=lambda m: m.step)] == [
        (1, 0), (2, 0), (3, 1)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert found.data.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert found.data.metrics["best_val_loss"] == pytest.approx(summary["val_loss"])
    artifacts = {item.path for item in client.list_artifacts(found.info.run_id)}
    assert {"model.keras", "report.html", "history.csv", "config.json", "report"} <= artifacts
    pictures = {item.path for item in client.list_artifacts(found.info.run_id, "report")}
    assert "report/confusion_matrix.png" in pictures

    version, _ = export_run(run_dir, output=tmp_path / "saved_models")
    exported = {item.path for item in client.list_artifacts(found.info.run_id, "export/1")}
    assert "export/1/saved_model.pb" in exported and version.name == "1"


def test_an_unreachable_tracking_server_is_a_warning_and_the_run_finishes(dataset, tmp_path,
                                                                         monkeypatch, caplog):
    from transfer.pipeline import train

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="transfer"):
        run_dir = train(_config(dataset, tmp_path, evaluate=False), verbose=0)
    assert (run_dir / "summary.json").is_file() and not (run_dir / "mlflow.json").exists()
    assert f"the MLflow tracking server http://127.0.0.1:{port} cannot be reached" in caplog.text
    assert time.monotonic() - started < 120  # not MLflow's minutes of retries


def test_mlflow_is_off_without_the_option_or_a_tracking_uri(dataset, tmp_path, monkeypatch):
    from transfer.tracking import wanted

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not wanted(_config(dataset, tmp_path))
    assert wanted(_config(dataset, tmp_path, mlflow=True))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert wanted(_config(dataset, tmp_path))
