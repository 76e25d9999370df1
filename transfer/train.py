"""train() and resume(): a run directory, checked data, and fit_phases() over Phase objects.

Every file in a run directory is written atomically. After each epoch the history, the best
weights so far and Keras's BackupAndRestore checkpoint are on disk, so an interrupted run
loses at most the epoch it was in; resume() continues it with the same split and config.
"""

import csv
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from transfer.files import atomic_path, write_csv, write_json

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
                  "learning_rate")
BEST_WEIGHTS = "best.weights.npz"
STATE = "state.json"
IMAGE_CACHE = "image_cache"  # decoded images that exceed the memory budget, during training


def train(cfg, verbose="auto"):
    """Train a classifier as `cfg` says in a new run directory, which it returns."""
    from transfer import check, data
    from transfer.backbones import get_spec

    spec = get_spec(cfg.backbone)
    image_size = cfg.image_size or spec.default_size
    data_name, data_dir = data.resolve_dataset(cfg.data)
    classes = check.class_names(data_dir / "train")
    # Built before anything is written: missing ImageNet weights or a wrong cut stop it here.
    strategy, jit = _devices(cfg)
    with strategy.scope():
        model = _build(cfg, spec, len(classes), image_size)

    started = time.time()
    reports = check.check_dataset(data_dir, classes)
    log.info("%s (checked in %.1f s)", check.summary_line(data_name, classes, reports),
             time.time() - started)
    for message in check.warnings_for(reports):
        log.warning("Warning: %s", message)
    for path, reason in (item for report in reports for item in report.bad):
        log.warning("Set aside %s: %s", path, reason)

    train_split = _split(reports[0], classes)
    if len(reports) == 2:
        val_split = _split(reports[1], classes)
        if not val_split:
            raise ValueError(f"{data_dir / 'validation'} holds no usable images; add some, or "
                             "remove the folder to validate on a seeded --validation-split of "
                             "train/.")
    else:
        single = [cls for cls, count in reports[0].counts().items() if count < 2]
        if single:
            raise ValueError(f"Class(es) {', '.join(single)} have one image in train/, too few "
                             "to be both trained and validated on; add images, or add a "
                             "validation/<class>/ folder.")
        train_split, val_split = data.stratified_split(train_split, cfg.validation_split, cfg.seed)
        log.info("No validation/ folder: a seeded stratified %.0f%% of train/ validates "
                 "(%d images)", 100 * cfg.validation_split, len(val_split))

    run_dir = new_run_dir(Path(cfg.runs_dir) / data_name, cfg.backbone)
    log.info("Run directory: %s", run_dir)
    saved = cfg.to_dict() | {"image_size": image_size, "data_dir": os.path.abspath(data_dir),
                             "data_name": data_name}
    if cfg.weights_file() is not None:  # found again from any folder
        saved["weights"] = os.path.abspath(cfg.weights_file())
    write_json(run_dir / "config.json", saved)
    write_json(run_dir / "classes.json", classes)
    write_json(run_dir / "versions.json", library_versions())
    write_csv(run_dir / "bad_files.csv", ("path", "reason"),
              [(path, reason) for report in reports for path, reason in report.bad])
    write_csv(run_dir / "split.csv", ("split", "path", "label"),
              [("train", p, classes[l]) for p, l in zip(train_split.paths, train_split.labels)]
              + [("validation", p, classes[l]) for p, l in zip(val_split.paths, val_split.labels)])
    with strategy.scope():
        return _run(model, cfg, spec, run_dir, classes, train_split, val_split, verbose, jit)


def resume(run_dir, verbose="auto"):
    """Continue an interrupted run from its last completed epoch; returns the run directory."""
    from transfer.backbones import get_spec
    from transfer.config import field_names, resolve

    run_dir = Path(run_dir)
    if not (run_dir / "split.csv").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory that can be resumed; expected "
                                f"{run_dir}/config.json and split.csv from `transfer train`.")
    if (run_dir / "summary.json").is_file():
        raise ValueError(f"{run_dir} has finished (it has summary.json); nothing to resume.")
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = resolve(None, {key: value for key, value in saved.items() if key in field_names()})
    classes, splits = read_split(run_dir)
    missing = [path for split in splits.values() for path in split.paths
               if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) of this run's split are gone, e.g. "
                                f"{missing[0]}; restore them or start a new run.")
    spec = get_spec(cfg.backbone)
    log.info("Resuming %s: %s on %s, %d training and %d validation images", run_dir,
             cfg.backbone, saved["data_dir"], len(splits["train"]), len(splits["validation"]))
    strategy, jit = _devices(cfg)
    with strategy.scope():
        model = _build(cfg, spec, len(classes), cfg.image_size)
        return _run(model, cfg, spec, run_dir, classes, splits["train"], splits["validation"],
                    verbose, jit)


def read_split(run_dir):
    """(class names, {"train": Split, "validation": Split}) as a run recorded them."""
    from transfer.data import Split

    classes = json.loads((Path(run_dir) / "classes.json").read_text())
    with open(Path(run_dir) / "split.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return classes, {name: Split(tuple(r["path"] for r in rows if r["split"] == name),
                                 tuple(classes.index(r["label"]) for r in rows
                                       if r["split"] == name))
                     for name in ("train", "validation")}


def _devices(cfg):
    """(the tf.distribute strategy, compile()'s jit_compile), with the precision policy set."""
    from transfer.distribute import make_strategy, set_precision

    jit = set_precision(cfg.precision, cfg.jit)
    strategy = make_strategy(cfg.strategy)
    if strategy.num_replicas_in_sync > 1:
        log.info("%d replicas (%s): global batch %d, learning rates x%d (linear scaling rule)",
                 strategy.num_replicas_in_sync, type(strategy).__name__,
                 cfg.batch_size * strategy.num_replicas_in_sync, strategy.num_replicas_in_sync)
    return strategy, jit


def _build(cfg, spec, num_classes, image_size):
    from transfer.backbones import cut_index
    from transfer.model import backbone_of, build_classifier

    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(spec, num_classes, image_size, cfg.weights, cfg.dropout)
    for phase in cfg.phases(spec.cut):
        if phase.unfreeze_from:
            cut_index(backbone_of(model), phase.unfreeze_from)
    return model


def _split(report, classes):
    from transfer.data import Split

    pairs = [(os.path.abspath(path), label)  # the run can then be resumed from any folder
             for label, cls in enumerate(classes) for path in report.good[cls]]
    return Split(tuple(p for p, _ in pairs), tuple(l for _, l in pairs))


def _run(model, cfg, spec, run_dir, classes, train_split, val_split, verbose, jit="auto"):
    """Train inside the current tf.distribute strategy's scope."""
    import tensorflow as tf

    from transfer import data
    from transfer.cache import CachedFeeds

    started = time.time()
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    image_size = model.input_shape[1]
    weights = data.class_weights(train_split.labels, len(classes), cfg.class_weights)
    if weights:
        log.info("Class weights (imbalanced classes): %s",
                 ", ".join(f"{classes[label]} {w:.2f}" for label, w in weights.items()))
    shutil.rmtree(run_dir / IMAGE_CACHE, ignore_errors=True)  # left by an interrupted run
    (run_dir / IMAGE_CACHE).mkdir()
    decoded = {name: data.decoded(split, image_size, cfg.cache_memory_mb * 2**20,
                                  run_dir / IMAGE_CACHE / name)
               for name, split in (("train", train_split), ("validation", val_split))}
    augmentation = data.augmentation(cfg)

    def images(split, augment=False, shuffle=False):
        return data.batched(decoded[split], cfg.batch_size * replicas,
                            augmentation if augment else None, cfg.seed if shuffle else None)

    def uncached(phase):
        return (model, images("train", augment=True, shuffle=True), images("validation"),
                "images (--no-cache)")

    phases = [dataclasses.replace(phase, learning_rate=phase.learning_rate * replicas)
              for phase in cfg.phases(spec.cut)]
    if cfg.cache and replicas > 1:
        log.info("Not caching: the feature caches are per process and %d replicas share this "
                 "run; the frozen layers run in every step.", replicas)
    feeds = CachedFeeds(model, cfg, phases, train_split, val_split, images, verbose) \
        if cfg.cache and replicas == 1 else uncached
    try:
        history = fit_phases(model, phases, feeds, run_dir, cfg.patience, verbose,
                             class_weight=weights, jit_compile=jit)
    except KeyboardInterrupt:
        log.warning("Interrupted. Continue with: python -m transfer train --resume %s", run_dir)
        raise
    except tf.errors.InvalidArgumentError as error:  # raised inside tf.data's decoding
        line = next((line for line in error.message.splitlines()
                     if data.DECODE_FAILURE in line), None)
        if line is None:
            raise
        raise ValueError(f"{line.split('ValueError: ', 1)[-1].strip()} Restore it and continue "
                         f"with: python -m transfer train --resume {run_dir}; or remove it and "
                         "train again.") from None

    with atomic_path(run_dir / "model.keras") as temporary:
        model.save(temporary)
    shutil.rmtree(run_dir / IMAGE_CACHE, ignore_errors=True)
    from transfer.evaluate import evaluate, plot_learning_curves

    plot_learning_curves(history, run_dir / "learning_curves.png")
    best = min(history, key=lambda row: row["val_loss"])
    phases = json.loads((run_dir / STATE).read_text()).get("phases", {})
    for name, phase in phases.items():
        phase_best = min((row for row in history if row["phase"] == name),
                         key=lambda row: row["val_loss"])
        phase.update(val_accuracy=phase_best["val_accuracy"], val_loss=phase_best["val_loss"])
    summary = {"val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
               "best_epoch": best["epoch"], "best_phase": best["phase"],
               "epochs": len(history), "seconds": round(time.time() - started, 1),
               "phases": phases}
    write_json(run_dir / "summary.json", summary)
    log.info("Done in %.0f s: best val_accuracy %.4f (val_loss %.4f, %s epoch %d). Model: %s",
             summary["seconds"], best["val_accuracy"], best["val_loss"], best["phase"],
             best["epoch"], run_dir / "model.keras")
    if cfg.evaluate:
        with open(run_dir / "bad_files.csv", newline="", encoding="utf-8") as handle:
            set_aside = [(row["path"], row["reason"]) for row in csv.DictReader(handle)]
        evaluate(model, classes, val_split.paths, val_split.labels, run_dir, run_dir=run_dir,
                 set_aside=set_aside)
    return run_dir


def fit_phases(model, phases, feeds, run_dir, patience, verbose="auto", class_weight=None,
               jit_compile="auto"):
    """Fit each phase in turn, resumably, and return the per-epoch history of all of them.

    Each phase sets what is trainable, asks feeds(phase) for (the model to fit, training
    data, validation data, a description): the classifier itself on images, or a model
    sharing its layers on cached features. It recompiles (trainable changes apply only at
    compile), and stops after `patience` epochs without a better validation loss. Each phase
    starts, and the model ends, with the best weights seen so far, of any phase.
    Progress lives in run_dir (history.csv, best weights, state.json and a BackupAndRestore
    checkpoint), so calling this again on the same run_dir continues where it stopped.
    """
    from transfer.model import backbone_of, count_trainable, set_trainable

    run_dir = Path(run_dir)
    history = read_history(run_dir / "history.csv")
    state = json.loads((run_dir / STATE).read_text()) if (run_dir / STATE).is_file() else {}
    completed = state.get("completed", [])
    timings = state.get("phases", {})
    offset = 0
    for phase in phases:
        phase_rows = [row for row in history if row["phase"] == phase.name]
        if phase.name in completed:
            offset += len(phase_rows)
            continue
        if (run_dir / BEST_WEIGHTS).is_file():
            load_weights(model, run_dir / BEST_WEIGHTS)
        started = time.time()
        set_trainable(backbone_of(model), phase.unfreeze_from)
        fit_model, train_data, val_data, fed = feeds(phase)
        fit_model.compile(optimizer=keras.optimizers.Adam(phase.learning_rate),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                          jit_compile=jit_compile)
        # Kept until state.json says the phase is done, so no moment loses a finished phase.
        backup = keras.callbacks.BackupAndRestore(run_dir / "backup" / phase.name,
                                                  double_checkpoint=True, delete_checkpoint=False)
        resumed = _backed_up_epoch(run_dir / "backup" / phase.name)
        history = [row for row in history if row["phase"] != phase.name
                   or (resumed is not None and row["epoch"] <= resumed)]
        tracker = PhaseTracker(model, phase.name, phase.learning_rate, history, run_dir,
                               patience)
        log.info("Phase %s: %s trainable weights (%s), %d epochs at learning rate %g, on %s%s",
                 phase.name, f"{count_trainable(model):,}",
                 f"from {phase.unfreeze_from}" if phase.unfreeze_from else "backbone frozen",
                 phase.epochs, phase.learning_rate, fed,
                 f"; resuming after epoch {resumed}" if resumed is not None else "")
        if not tracker.finished(offset + phase.epochs):
            # BackupAndRestore sets this private start epoch and nothing resets it: clear it so
            # only this phase's own checkpoint can move the start past `offset`.
            fit_model._initial_epoch = None
            fit_model.fit(train_data, validation_data=val_data, epochs=offset + phase.epochs,
                          initial_epoch=offset, callbacks=[tracker, backup], verbose=verbose,
                          class_weight=class_weight,
                          shuffle=False)  # the data shuffles itself
        history = tracker.history
        epochs_run = len([row for row in history if row["phase"] == phase.name])
        offset += epochs_run
        if not (run_dir / BEST_WEIGHTS).is_file():
            raise ValueError(f"Training diverged: the validation loss of phase {phase.name} was "
                             f"never a number. Lower the learning rate ({phase.learning_rate:g}).")
        completed.append(phase.name)
        timings[phase.name] = {"seconds": round(time.time() - started, 1), "fed": fed}
        write_json(run_dir / STATE, {"completed": completed, "phases": timings})
        shutil.rmtree(run_dir / "backup" / phase.name, ignore_errors=True)
        log.info("Phase %s: %d epochs in %.0f s, best val_loss so far %.4f", phase.name,
                 epochs_run, time.time() - started, tracker.best_loss)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)  # every phase has finished
    if (run_dir / BEST_WEIGHTS).is_file():  # also when they had all finished before a resume
        load_weights(model, run_dir / BEST_WEIGHTS)
    return history


class PhaseTracker(keras.callbacks.Callback):
    """History rows, best weights on disk and early stopping for one phase, all resumable.

    The best weights saved are the classifier's, whichever model (sharing its layers) is fit.
    """

    def __init__(self, classifier, phase, learning_rate, history, run_dir, patience):
        super().__init__()
        self.classifier = classifier
        self.phase, self.learning_rate = phase, learning_rate
        self.history, self.run_dir, self.patience = list(history), run_dir, patience
        self.best_loss = min((row["val_loss"] for row in history), default=math.inf)
        losses = [row["val_loss"] for row in history if row["phase"] == phase]
        self.phase_best = min(losses, default=math.inf)
        self.wait = len(losses) - 1 - losses.index(self.phase_best) if losses else 0

    def finished(self, last_epoch):
        done = [row for row in self.history if row["phase"] == self.phase]
        return self.wait >= self.patience or bool(done and done[-1]["epoch"] >= last_epoch)

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "phase": self.phase,
               **{key: float(value) for key, value in (logs or {}).items()},
               "learning_rate": self.learning_rate}
        self.history.append(row)
        write_csv(self.run_dir / "history.csv", HISTORY_FIELDS,
                  [[r.get(field, "") for field in HISTORY_FIELDS] for r in self.history])
        if row["val_loss"] < self.best_loss:
            self.best_loss = row["val_loss"]
            save_weights(self.classifier, self.run_dir / BEST_WEIGHTS)
        if row["val_loss"] < self.phase_best:
            self.phase_best, self.wait = row["val_loss"], 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True


def save_weights(model, path):
    """Model weights only (not the optimizer), atomically, as .npz."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, *model.get_weights())


def load_weights(model, path):
    with np.load(path) as stored:
        model.set_weights([stored[name] for name in stored.files])


def _backed_up_epoch(backup_dir):
    """The number of epochs a BackupAndRestore checkpoint holds, or None without one."""
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        if (backup_dir / name).is_file():
            try:
                return json.loads((backup_dir / name).read_text())["epoch"]
            except (ValueError, KeyError):
                continue
    return None


def read_history(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: (value if key == "phase" else int(value) if key == "epoch" else float(value))
                 for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


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


def library_versions():
    import importlib.metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tensorflow", "keras", "numpy", "pillow", "scikit-learn", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
