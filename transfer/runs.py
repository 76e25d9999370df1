"""The run directory, runs/<data>/<timestamp>-<backbone>/: its files, written and read back.

Training writes a run; evaluation, prediction and export read it. Every file is written
atomically (transfer.files), so none is ever half-written.
"""

import csv
import json
import platform
import time
from pathlib import Path

import numpy as np

from transfer.files import write_csv

HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
                  "learning_rate")
SPLITS = ("train", "validation", "test")


def new_run_dir(parent, backbone):
    """A new, empty runs/<data>/<timestamp>-<backbone>/ directory."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{i}" for i in range(1, 100)]:
        run_dir = parent / f"{stamp}-{backbone}{suffix}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a new run directory under {parent}.")


def latest_run(parent, finished=True):
    """The newest finished (or, with finished=False, unfinished but resumable: it has its
    split.csv) run directory under parent."""
    runs = [p for p in Path(parent).glob("*") if (p / "config.json").is_file()
            and (p / "summary.json").is_file() == finished
            and (finished or (p / "split.csv").is_file())]
    if not runs:
        kind = "finished" if finished else "unfinished"
        raise FileNotFoundError(f"No {kind} run under {parent}; expected {parent}/<run>/ from "
                                "`make train DATA=<name>`.")
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime)


LABEL_JOIN = ";"  # between a multi-label image's labels in split.csv


def write_split(run_dir, classes, splits):
    """split.csv: which file each split ({name: data.Split}) used, with its class name (a
    multi-label image: its labels joined by ';', none for an image of no label)."""
    def named(label):
        if isinstance(label, tuple):
            return LABEL_JOIN.join(cls for cls, carried in zip(classes, label) if carried)
        return classes[label]

    write_csv(Path(run_dir) / "split.csv", ("split", "path", "label"),
              [(name, path, named(label)) for name, split in splits.items()
               for path, label in zip(split.paths, split.labels)])


def is_multi_label(run_dir):
    """Whether a run trained a multi-label model (config.json's multi_label)."""
    config = Path(run_dir) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("multi_label"))


def read_split(run_dir):
    """(class names, {"train": Split, "validation": Split[, "test": Split]}) as a run
    recorded them; "test" only when the run kept test images."""
    from transfer.data import Split

    classes = json.loads((Path(run_dir) / "classes.json").read_text())
    with open(Path(run_dir) / "split.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if is_multi_label(run_dir):
        def label(name):
            carried = set(name.split(LABEL_JOIN)) if name else set()
            return tuple(int(cls in carried) for cls in classes)
    else:
        label = classes.index
    splits = {name: Split(tuple(r["path"] for r in rows if r["split"] == name),
                          tuple(label(r["label"]) for r in rows if r["split"] == name))
              for name in SPLITS}
    return classes, {name: split for name, split in splits.items()
                     if split or name != "test"}


def write_bad_files(run_dir, bad):
    write_csv(Path(run_dir) / "bad_files.csv", ("path", "reason"), bad)


def read_bad_files(run_dir):
    """[(path, reason)] of the files the run set aside."""
    with open(Path(run_dir) / "bad_files.csv", newline="", encoding="utf-8") as handle:
        return [(row["path"], row["reason"]) for row in csv.DictReader(handle)]


def read_history(path):
    """history.csv's rows: epoch (int), phase (str) and the metrics (float)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: (value if key == "phase" else int(value) if key == "epoch" else float(value))
                 for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def write_history(path, history):
    write_csv(path, HISTORY_FIELDS, [[row.get(field, "") for field in HISTORY_FIELDS]
                                     for row in history])


def load_keras(model_file):
    """(the Keras classifier, its class names) from a .keras file and the classes.json that
    its training run wrote beside it."""
    from transfer.model import load_model

    classes_file = Path(model_file).parent / "classes.json"
    if not classes_file.is_file():
        raise FileNotFoundError(f"{classes_file} is missing; a .keras model needs the "
                                "classes.json its training run wrote beside it.")
    return load_model(model_file), json.loads(classes_file.read_text())


def load_run_model(path):
    """(classifier, classes, run directory or None) from a run directory or its model.keras."""
    path = Path(path)
    model_file = path / "model.keras" if path.is_dir() else path
    if model_file.suffix != ".keras" or not model_file.is_file():
        raise FileNotFoundError(f"{path} is not a trained Keras model; expected a run directory "
                                "holding model.keras, or the .keras file (Grad-CAM and feature "
                                "maps need the Keras model, not a SavedModel).")
    run_dir = model_file.parent if (model_file.parent / "config.json").is_file() else None
    return *load_keras(model_file), run_dir


def tta_flip(run_dir, tta=None):
    """The flips test-time augmentation averages over for a run's model: its training flips
    when `tta` (default: the run's own tta setting) is on, else "none"."""
    config = json.loads((Path(run_dir) / "config.json").read_text()) if run_dir else {}
    wanted = config.get("tta", False) if tta is None else tta
    return config.get("flip", "horizontal") if wanted else "none"


def sample_images(run_dir, split, size, count, seed=0):
    """Up to `count` decoded images of a run's split (seeded sample) and their labels."""
    from transfer.images import ImageError, load_image

    files = read_split(run_dir)[1][split]
    picks = range(len(files))
    if len(files) > count:
        picks = sorted(np.random.default_rng(seed).choice(len(files), count, replace=False))
    images, labels = [], []
    for i in picks:
        try:
            images.append(load_image(files.paths[i], size))
            labels.append(files.labels[i])
        except ImageError:
            continue
    if not images:
        raise FileNotFoundError(f"None of the {split} images listed in {run_dir}/split.csv "
                                "can be read; the export cannot be checked.")
    return np.stack(images).astype("float32"), np.asarray(labels)


def library_versions():
    import importlib.metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tensorflow", "keras", "numpy", "pillow", "scikit-learn", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
