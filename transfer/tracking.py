"""MLflow, optional (pip install '.[mlflow]'): a finished run, and later its exports, logged to a
tracking store for comparing runs.

On with --mlflow, or whenever MLFLOW_TRACKING_URI is set (MLflow's own default store
otherwise). The MLflow run is named after the run directory, in an experiment named after the
data set: the resolved config as params; every epoch of every phase as metrics at the
history's epochs ("phase": its index in transfer.config.PHASES: 0 for the head, 1 for
fine-tuning, 2 for the deeper phase, 3 for the refit); the final validation and test
figures; the report, the model and the run's records as artifacts. Its id is kept in the run
directory's mlflow.json, so `transfer export` adds each exported version to the same MLflow
run. A store that cannot be reached or written is a warning: the run itself is finished and
kept either way.
"""

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from transfer.config import PHASES
from transfer.runs import read_history

log = logging.getLogger(__name__)

RECORD = "mlflow.json"  # in the run directory: where its MLflow run is
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
ARTIFACTS = ("model.keras", "config.json", "classes.json", "history.csv", "summary.json",
             "split.csv", "calibration.json", "metrics.json", "report.html")
REACH_TIMEOUT = 5  # seconds to wait for an HTTP tracking server before giving up on it


def wanted(cfg):
    return cfg.mlflow or bool(os.environ.get("MLFLOW_TRACKING_URI"))


def log_run(run_dir):
    """Log a finished run directory to MLflow; a warning, never an error, when it cannot."""
    mlflow = _mlflow()
    if mlflow is None or not _reachable(mlflow.get_tracking_uri()):
        return
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    settings = json.loads((run_dir / "config.json").read_text())
    data_name = settings["data_name"]
    history = read_history(run_dir / "history.csv")
    try:
        mlflow.set_experiment(data_name)
        with mlflow.start_run(run_name=run_dir.name) as active:
            mlflow.set_tag("run_dir", str(run_dir.resolve()))
            mlflow.log_params({key: str(value) for key, value in settings.items()})
            for row in history:
                mlflow.log_metrics({key: row[key] for key in METRICS}
                                   | {"phase": PHASES.index(row["phase"])}, step=row["epoch"])
            mlflow.log_metrics({f"best_{key}": summary[key]
                                for key in ("val_accuracy", "val_loss")}
                               | ({"test_accuracy": summary["test_accuracy"]}
                                  if "test_accuracy" in summary else {}))
            for name in ARTIFACTS:
                if (run_dir / name).is_file():
                    mlflow.log_artifact(str(run_dir / name))
            for picture in sorted(run_dir.glob("*.png")):
                mlflow.log_artifact(str(picture), "report")
            if (run_dir / "test").is_dir():
                mlflow.log_artifacts(str(run_dir / "test"), "report/test")
            record = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": active.info.run_id,
                      "experiment": data_name}
    except Exception as error:  # noqa: BLE001  whatever the store raises, the run is kept
        log.warning("Warning: MLflow could not log this run to %s (%s: %s); the run is "
                    "finished and kept in %s.", mlflow.get_tracking_uri(),
                    type(error).__name__, _first_line(error), run_dir)
        return
    from transfer.files import write_json

    write_json(run_dir / RECORD, record)
    log.info("MLflow: run %s in experiment %s at %s", record["run_id"], data_name,
             record["tracking_uri"])


def log_export(run_dir, version_dir):
    """Add an exported version to its run's MLflow run, where the run was logged to one."""
    record_file = Path(run_dir) / RECORD
    if not record_file.is_file():
        return
    mlflow = _mlflow()
    record = json.loads(record_file.read_text())
    if mlflow is None or not _reachable(record["tracking_uri"]):
        return
    try:  # a client of the run's own store: the global tracking URI may be another's now
        mlflow.MlflowClient(record["tracking_uri"]).log_artifacts(
            record["run_id"], str(version_dir), f"export/{Path(version_dir).name}")
    except Exception as error:  # noqa: BLE001  the export itself is done and kept
        log.warning("Warning: MLflow could not add the export to run %s at %s (%s: %s).",
                    record["run_id"], record["tracking_uri"], type(error).__name__,
                    _first_line(error))
        return
    log.info("MLflow: export %s added to run %s", version_dir, record["run_id"])


def _first_line(error):
    return (str(error).splitlines() or [""])[0][:200]


def _mlflow():
    try:
        import mlflow
    except ImportError:
        log.warning("Warning: MLflow is not installed, so this run is not logged to it; "
                    "install it with: pip install '.[mlflow]'.")
        return None
    return mlflow


def _reachable(uri):
    """Whether an http(s) tracking server answers its /health within REACH_TIMEOUT (MLflow
    itself retries for minutes); other stores are tried as they are."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACH_TIMEOUT):
            return True
    except (urllib.error.URLError, OSError) as error:
        log.warning("Warning: the MLflow tracking server %s cannot be reached (%s), so this is "
                    "not logged to it; the run is kept as it is.", uri,
                    getattr(error, "reason", error))
        return False
