"""fit_phases(): one loop over Phase objects, and the run directory it writes."""

import csv
import json
import logging
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy",
                  "learning_rate")


def train(cfg, verbose="auto"):
    """Train a classifier as `cfg` says; returns the run directory."""
    import keras

    from transfer import data
    from transfer.backbones import cut_index, get_spec
    from transfer.model import backbone_of, build_classifier

    spec = get_spec(cfg.backbone)
    image_size = cfg.image_size or spec.default_size
    data_name, data_dir = data.resolve_dataset(cfg.data)
    classes = data.class_names(data_dir / "train")
    train_split = data.scan_split(data_dir / "train", classes)
    if (data_dir / "validation").is_dir():
        val_split = data.scan_split(data_dir / "validation", classes)
        split_source = "validation/ folder"
    else:
        train_split, val_split = data.stratified_split(train_split, cfg.validation_split, cfg.seed)
        split_source = f"seeded stratified {cfg.validation_split:.0%} of train/"

    # Built first: missing ImageNet weights stop the run before it writes anything.
    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(spec, len(classes), image_size, cfg.weights, cfg.dropout)
    phases = cfg.phases(spec.cut)
    for phase in phases:  # a wrong --fine-tune-from fails now, not after phase 1
        if phase.unfreeze_from:
            cut_index(backbone_of(model), phase.unfreeze_from)
    run_dir = new_run_dir(Path(cfg.runs_dir) / data_name, cfg.backbone)
    log.info("Run directory: %s", run_dir)
    started = time.time()
    train_split, bad_train = _drop_bad(train_split, image_size)
    val_split, bad_val = _drop_bad(val_split, image_size)
    bad = bad_train + bad_val
    log.info("Data %s: %d classes (%s); %d training and %d validation images (%s); "
             "%d unreadable file(s) set aside, checked in %.1f s",
             data_dir, len(classes), ", ".join(classes), len(train_split), len(val_split),
             split_source, len(bad), time.time() - started)
    for path, reason in bad:
        log.warning("Set aside %s: %s", path, reason)

    resolved = cfg.to_dict() | {"image_size": image_size, "data_dir": str(data_dir)}
    _write_json(run_dir / "config.json", resolved)
    _write_json(run_dir / "classes.json", classes)
    _write_json(run_dir / "versions.json", library_versions())
    _write_rows(run_dir / "split.csv", ("split", "path", "label"),
                [("train", p, classes[l]) for p, l in zip(train_split.paths, train_split.labels)]
                + [("validation", p, classes[l]) for p, l in zip(val_split.paths, val_split.labels)])
    _write_rows(run_dir / "bad_files.csv", ("path", "reason"), bad)

    train_ds = data.pipeline(train_split, image_size, cfg.batch_size,
                             augment=data.augmentation(cfg), shuffle_seed=cfg.seed)
    val_ds = data.pipeline(val_split, image_size, cfg.batch_size)
    history = fit_phases(model, phases, train_ds, val_ds, cfg.patience, verbose)

    model.save(run_dir / "model.keras")
    _write_rows(run_dir / "history.csv", HISTORY_FIELDS,
                [[row.get(field, "") for field in HISTORY_FIELDS] for row in history])
    plot_learning_curves(history, run_dir / "learning_curves.png")
    best = min(history, key=lambda row: row["val_loss"])
    summary = {"val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
               "best_epoch": best["epoch"], "best_phase": best["phase"],
               "seconds": round(time.time() - started, 1)}
    _write_json(run_dir / "summary.json", summary)
    log.info("Done in %.0f s: best val_accuracy %.4f (val_loss %.4f, %s epoch %d). Model: %s",
             summary["seconds"], best["val_accuracy"], best["val_loss"], best["phase"],
             best["epoch"], run_dir / "model.keras")
    return run_dir


def fit_phases(model, phases, train_ds, val_ds, patience, verbose="auto"):
    """Fit each phase in turn and return the per-epoch history of all of them.

    Each phase sets what is trainable and recompiles (trainable changes apply only at
    compile), stops early on validation loss and restores its best epoch. If a later phase
    never beats an earlier phase's best validation loss, the earlier weights are restored.
    """
    import keras

    from transfer.model import backbone_of, count_trainable, set_trainable

    history, best_loss, best_weights, epoch = [], float("inf"), None, 0
    for phase in phases:
        set_trainable(backbone_of(model), phase.unfreeze_from)
        model.compile(optimizer=keras.optimizers.Adam(phase.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        log.info("Phase %s: %s trainable weights (%s), %d epochs at learning rate %g",
                 phase.name, f"{count_trainable(model):,}",
                 f"from {phase.unfreeze_from}" if phase.unfreeze_from else "backbone frozen",
                 phase.epochs, phase.learning_rate)
        started = time.time()
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                restore_best_weights=True)
        fitted = model.fit(train_ds, validation_data=val_ds, epochs=epoch + phase.epochs,
                           initial_epoch=epoch, callbacks=[stopper], verbose=verbose,
                           shuffle=False)  # the pipeline shuffles; Keras cannot shuffle tf.data
        epochs_run = len(fitted.history["loss"])
        for i in range(epochs_run):
            row = {key: float(values[i]) for key, values in fitted.history.items()}
            history.append({"epoch": epoch + i + 1, "phase": phase.name, **row,
                            "learning_rate": phase.learning_rate})
        epoch += epochs_run
        phase_best = min(fitted.history["val_loss"])
        log.info("Phase %s: %d epochs in %.0f s, best val_loss %.4f", phase.name, epochs_run,
                 time.time() - started, phase_best)
        if phase_best < best_loss:
            best_loss, best_weights = phase_best, model.get_weights()
        else:
            log.info("Phase %s did not beat val_loss %.4f; keeping the earlier weights",
                     phase.name, best_loss)
            model.set_weights(best_weights)
    return history


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


def latest_run(parent):
    """The newest run directory under `parent` that holds a model.keras."""
    runs = sorted(p.parent for p in Path(parent).glob("*/model.keras"))
    if not runs:
        raise FileNotFoundError(f"No trained run under {parent}; expected {parent}/<run>/model.keras. "
                                "Train first: make train DATA=<name>.")
    return max(runs, key=lambda p: (p / "model.keras").stat().st_mtime)


def plot_learning_curves(history, path):
    """Loss and accuracy of both phases on one figure, the phase boundary marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, [row[metric] for row in history], "o-", label=f"train {metric}")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], "o-",
                  label=f"validation {metric}")
        for before, after in zip(history, history[1:]):
            if before["phase"] != after["phase"]:
                axis.axvline(before["epoch"] + 0.5, color="gray", linestyle="--")
                axis.annotate(f"{after['phase']} →", (before["epoch"] + 0.6, 0.02),
                              xycoords=("data", "axes fraction"), color="gray")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def library_versions():
    import importlib.metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("tensorflow", "keras", "numpy", "pillow", "scikit-learn", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _drop_bad(split, image_size):
    from transfer.data import Split, check_images

    good, bad = check_images(split.paths, image_size)
    return Split(tuple(split.paths[i] for i in good), tuple(split.labels[i] for i in good)), bad


def _write_json(path, value):
    path.write_text(json.dumps(value, indent=2) + "\n")


def _write_rows(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
