"""Training a classifier in its run directory: fit_phases() over Phase objects, resumably.

After each epoch the history, the best weights so far and Keras's BackupAndRestore checkpoint
are on disk, so an interrupted run loses at most the epoch it was in; calling fit_run() again
on the same run directory continues it.
"""

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from transfer.board import Board
from transfer.files import atomic_path, write_json, write_npz
from transfer.runs import read_history, write_history

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best.weights.npz"
STATE = "state.json"
IMAGE_CACHE = "image_cache"  # decoded images that exceed the memory budget, during training
ADAM_INSTEAD = "Phase %s is fitted by Adam: solving it needs the cached features."
NOT_SOLVED = "Phase %s skipped: solving it needs the cached features."


def devices(cfg):
    """(the tf.distribute strategy, compile()'s jit_compile), with the precision policy set."""
    from transfer.distribute import make_strategy, set_precision

    strategy = make_strategy(cfg.strategy)  # first: a multi-worker one must precede any op
    jit = set_precision(cfg.precision, cfg.jit)
    if strategy.num_replicas_in_sync > 1:
        log.info("%d replicas (%s): global batch %d, learning rates x%d (linear scaling rule)",
                 strategy.num_replicas_in_sync,
                 "MultiWorkerMirroredStrategy" if cfg.strategy == "multiworker"
                 else type(strategy).__name__,
                 cfg.batch_size * strategy.num_replicas_in_sync, strategy.num_replicas_in_sync)
    return strategy, jit


def build(cfg, spec, num_classes, image_size):
    """The classifier `cfg` describes, seeded; a fine-tuning cut that names no layer, or a
    deeper cut that is not below phase 2's, fails here."""
    from transfer.backbones import cut_index
    from transfer.model import backbone_of, build_classifier

    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(spec, num_classes, image_size, cfg.weights, cfg.dropout,
                             bool(cfg.multi_label))
    cuts = {phase.name: phase.unfreeze_from for phase in cfg.phases(spec) if phase.unfreeze_from}
    options = {"fine_tune": "--fine-tune-from", "deeper": "--deeper-from"}  # each phase's cut
    index = {name: cut_index(backbone_of(model), prefix, spec.name, options[name])
             for name, prefix in cuts.items()}
    if "deeper" in index and index["deeper"] >= index["fine_tune"]:
        raise ValueError(f"--deeper-from {cuts['deeper']} starts at layer {index['deeper']} of "
                         f"backbone {spec.name!r}, not below phase 2's cut {cuts['fine_tune']} "
                         f"(layer {index['fine_tune']}). Give the prefix of an earlier block "
                         f"(`transfer backbones --layers {spec.name}`), or leave --deeper-from "
                         "out.")
    return model


def fit_run(model, cfg, spec, run_dir, classes, train_split, val_split, verbose, jit="auto"):
    """Fit the phases with model.fit inside the current tf.distribute strategy's scope and
    save model.keras; returns (the history of every epoch, the trained model's raw outputs
    for the validation images from the caches: CachedFeeds.validation_outputs, or None where
    they must be predicted from the images). (Several machines train in transfer.multiworker's
    own loop.)"""
    import tensorflow as tf

    from transfer import data
    from transfer.cache import CachedFeeds

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    image_size = model.input_shape[1]
    weights = class_weights(cfg, classes, train_split)
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

    phases = scaled_phases(cfg, spec, replicas)
    if cfg.cache and replicas > 1:
        log.info("Not caching: the feature caches are per process and %d replicas share this "
                 "run; the frozen layers run in every step.", replicas)
    feeds = CachedFeeds(model, cfg, phases, train_split, val_split, images, verbose) \
        if cfg.cache and replicas == 1 else uncached
    try:
        with decode_failures_reported(run_dir):
            history = fit_phases(model, phases, feeds, run_dir, cfg.patience, verbose,
                                 class_weight=weights, jit_compile=jit)
    except KeyboardInterrupt:
        log.warning("Interrupted. Continue with: python -m transfer train --resume %s", run_dir)
        raise

    with atomic_path(run_dir / "model.keras") as temporary:
        model.save(temporary)
    shutil.rmtree(run_dir / IMAGE_CACHE, ignore_errors=True)
    # with test-time augmentation the mirror images count too, and they are not cached
    cached = (feeds.validation_outputs() if isinstance(feeds, CachedFeeds) and not cfg.tta
              else None)
    return history, cached


@contextlib.contextmanager
def decode_failures_reported(run_dir, again=None):
    """An image that no longer decodes (raised inside tf.data) as a ValueError that names it
    and says how to continue (`again`: the command; by default --resume of run_dir)."""
    import tensorflow as tf

    from transfer.data import DECODE_FAILURE

    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        line = next((line for line in error.message.splitlines() if DECODE_FAILURE in line),
                    None)
        if line is None:
            raise
        again = again or f"python -m transfer train --resume {run_dir}"
        raise ValueError(f"{line.split('ValueError: ', 1)[-1].strip()} Restore it and continue "
                         f"with: {again}; or remove it and train again.") from None


def read_state(run_dir):
    """state.json: the phases finished and their timings ({} before the first finishes)."""
    return json.loads((run_dir / STATE).read_text()) if (run_dir / STATE).is_file() else {}


def class_weights(cfg, classes, train_split):
    """{label: weight} for the loss as cfg.class_weights says (empty: unweighted), logged; for
    a multi-label run, the positives' weight of each label [C] (data.positive_weights)."""
    from transfer import data

    if cfg.multi_label:
        weights = data.positive_weights(train_split.labels, cfg.class_weights)
        if weights:
            log.info("Positive weights (rare labels): %s",
                     ", ".join(f"{name} {w:.2f}" for name, w in zip(classes, weights)
                               if w != 1))
        return weights
    weights = data.class_weights(train_split.labels, len(classes), cfg.class_weights)
    if weights:
        log.info("Class weights (imbalanced classes): %s",
                 ", ".join(f"{classes[label]} {w:.2f}" for label, w in weights.items()))
    return weights


def objective(model, class_weight):
    """(loss, metrics, class_weight for fit) of a classifier: sparse categorical
    cross-entropy weighted by class through fit, or for a multi-label model the binary
    cross-entropy with `class_weight` as its positives' weights, and accuracy per label."""
    from transfer.layers import LabelCrossentropy
    from transfer.model import is_multi_label

    if is_multi_label(model):
        return (LabelCrossentropy(class_weight),
                [keras.metrics.BinaryAccuracy(name="accuracy")], None)
    return "sparse_categorical_crossentropy", ["accuracy"], class_weight


def scaled_phases(cfg, spec, replicas):
    """cfg's phases with their learning rates times the replicas (the linear scaling rule)."""
    return [dataclasses.replace(phase, learning_rate=phase.learning_rate * replicas)
            for phase in cfg.phases(spec)]


def write_summary(run_dir, history, seconds, test_accuracy=None):
    """summary.json, which marks a run finished: the best epoch of all, per phase its
    seconds, what it trained on and its best validation figures, and the test accuracy."""
    best = min(history, key=lambda row: row["val_loss"])
    phases = json.loads((run_dir / STATE).read_text()).get("phases", {})
    for name, phase in phases.items():
        phase_best = min((row for row in history if row["phase"] == name),
                         key=lambda row: row["val_loss"])
        phase.update(val_accuracy=phase_best["val_accuracy"], val_loss=phase_best["val_loss"])
    summary = {"val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
               "best_epoch": best["epoch"], "best_phase": best["phase"],
               "epochs": len(history), "seconds": round(seconds, 1), "phases": phases}
    if test_accuracy is not None:
        summary["test_accuracy"] = test_accuracy
    write_json(run_dir / "summary.json", summary)
    log.info("Done in %.0f s: best val_accuracy %.4f (val_loss %.4f, %s epoch %d)%s. Model: %s",
             summary["seconds"], best["val_accuracy"], best["val_loss"], best["phase"],
             best["epoch"], "" if test_accuracy is None else f"; test accuracy {test_accuracy:.4f}",
             run_dir / "model.keras")
    return summary


def fit_phases(model, phases, feeds, run_dir, patience, verbose="auto", class_weight=None,
               jit_compile="auto"):
    """Fit each phase in turn, resumably, and return the per-epoch history of all of them.

    class_weight: {label: weight}, or for a multi-label model the positives' weights [C].
    Each phase sets what is trainable, asks feeds(phase) for (the model to fit, training
    data, validation data, a description): the classifier itself on images, or a model
    sharing its layers on cached features. It recompiles (trainable changes apply only at
    compile), and stops after `patience` epochs without a better validation loss. Each phase
    starts, and the model ends, with the best weights seen so far, of any phase.
    Progress lives in run_dir (history.csv, best weights, state.json and a BackupAndRestore
    checkpoint), so calling this again on the same run_dir continues where it stopped.
    """
    from transfer.cache import Views
    from transfer.head import solve_head
    from transfer.model import backbone_of, count_trainable, set_trainable

    run_dir = Path(run_dir)
    history = read_history(run_dir / "history.csv")
    state = read_state(run_dir)
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
        solved = phase.solver == "lbfgs" and isinstance(train_data, Views)
        if phase.solver == "lbfgs" and not solved:
            if not phase.epochs:  # nothing to step instead
                log.info(NOT_SOLVED, phase.name)
                completed.append(phase.name)
                write_json(run_dir / STATE, {"completed": completed, "phases": timings})
                continue
            log.info(ADAM_INSTEAD, phase.name)
        steps = _steps_per_epoch(train_data) if phase.schedule == "cosine" else None
        loss, metrics, fit_weights = objective(model, class_weight)  # new metrics per compile
        fit_model.compile(optimizer=phase_optimizer(phase, steps), loss=loss, metrics=metrics,
                          jit_compile=jit_compile)
        # Kept until state.json says the phase is done, so no moment loses a finished phase.
        backup = keras.callbacks.BackupAndRestore(run_dir / "backup" / phase.name,
                                                  double_checkpoint=True, delete_checkpoint=False)
        resumed = _backed_up_epoch(run_dir / "backup" / phase.name)
        history = [row for row in history if row["phase"] != phase.name
                   or (resumed is not None and row["epoch"] <= resumed)]
        tracker = PhaseTracker(model, phase, history, run_dir, patience)
        log.info("Phase %s: %s trainable weights (%s), %s, on %s%s",
                 phase.name, f"{count_trainable(model):,}",
                 f"from {phase.unfreeze_from}" if phase.unfreeze_from else "backbone frozen",
                 "solved by L-BFGS" if solved else
                 f"{phase.epochs} epochs at learning rate {phase.learning_rate:g}", fed,
                 f"; resuming after epoch {resumed}" if resumed is not None else "")
        extra = {}
        if solved:
            tracker.set_model(fit_model)
            if not tracker.finished(offset + 1):
                before = tracker.best_loss
                logs = solve_head(model.get_layer("probabilities"), train_data, val_data,
                                  class_weight)
                extra["l2_c"] = logs.pop("l2_c")
                tracker.on_epoch_end(offset, logs)
                if tracker.best_loss == before:
                    log.info("Phase %s not kept: val_loss %.4f, not below %.4f", phase.name,
                             logs["val_loss"], before)
        elif not tracker.finished(offset + phase.epochs):
            # BackupAndRestore sets this private start epoch and nothing resets it: clear it so
            # only this phase's own checkpoint can move the start past `offset`.
            fit_model._initial_epoch = None
            fit_model.fit(train_data, validation_data=val_data, epochs=offset + phase.epochs,
                          initial_epoch=offset, verbose=verbose,
                          # the averaged weights in the model from each epoch's end: validated,
                          # tracked and backed up
                          callbacks=[*([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)]
                                       if phase.ema else []), tracker, backup],
                          class_weight=fit_weights,
                          shuffle=False)  # the data shuffles itself
        history = tracker.history
        epochs_run = len([row for row in history if row["phase"] == phase.name])
        offset += epochs_run
        if not (run_dir / BEST_WEIGHTS).is_file():
            raise ValueError(f"Training diverged: the validation loss of phase {phase.name} was "
                             f"never a number. Lower the learning rate ({phase.learning_rate:g}).")
        completed.append(phase.name)
        timings[phase.name] = {"seconds": round(time.time() - started, 1), "fed": fed, **extra}
        write_json(run_dir / STATE, {"completed": completed, "phases": timings})
        shutil.rmtree(run_dir / "backup" / phase.name, ignore_errors=True)
        log.info("Phase %s: %d epochs in %.0f s, best val_loss so far %.4f", phase.name,
                 epochs_run, time.time() - started, tracker.best_loss)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)  # every phase has finished
    if (run_dir / BEST_WEIGHTS).is_file():  # also when they had all finished before a resume
        load_weights(model, run_dir / BEST_WEIGHTS)
    return history


class PhaseTracker(keras.callbacks.Callback):
    """History rows (also in TensorBoard), best weights on disk and early stopping for one
    phase, all resumable.

    The best weights saved are the classifier's, whichever model (sharing its layers) is fit.
    """

    def __init__(self, classifier, phase, history, run_dir, patience):
        super().__init__()
        self.classifier = classifier
        self.phase, self.learning_rate = phase.name, phase.learning_rate
        self.stepped = False  # True once model.fit drives this tracker (not a solved head)
        self.history, self.run_dir, self.patience = list(history), run_dir, patience
        self.board = Board(run_dir)
        self.best_loss = min((row["val_loss"] for row in history), default=math.inf)
        losses = [row["val_loss"] for row in history if row["phase"] == phase.name]
        # the loss whose `patience` epochs without a better one stop the phase
        self.phase_best = self.best_loss if phase.beat_best else min(losses, default=math.inf)
        self.wait = (len(losses) - 1 - losses.index(self.phase_best) if self.phase_best in losses
                     else len(losses))

    def finished(self, last_epoch):
        done = [row for row in self.history if row["phase"] == self.phase]
        return self.wait >= self.patience or bool(done and done[-1]["epoch"] >= last_epoch)

    def on_train_begin(self, logs=None):
        self.stepped = True  # by model.fit's optimizer, whose rate may follow a schedule

    def on_epoch_end(self, epoch, logs=None):
        if self.record(epoch, logs, learning_rate(self.model.optimizer) if self.stepped
                       else self.learning_rate):
            self.model.stop_training = True

    def record(self, epoch, logs, rate):
        """Add epoch's row (0-based) to history.csv and keep the weights if they are the best
        yet; returns whether the phase should stop."""
        row = {"epoch": epoch + 1, "phase": self.phase,
               **{key: float(value) for key, value in (logs or {}).items()},
               "learning_rate": rate}
        first = not any(earlier["phase"] == self.phase for earlier in self.history)
        self.history.append(row)
        write_history(self.run_dir / "history.csv", self.history)
        self.board.epoch(row, first)
        if row["val_loss"] < self.best_loss:
            self.best_loss = row["val_loss"]
            save_weights(self.classifier, self.run_dir / BEST_WEIGHTS)
        if row["val_loss"] < self.phase_best:
            self.phase_best, self.wait = row["val_loss"], 0
        else:
            self.wait += 1
        return self.wait >= self.patience


def learning_rate(optimizer):
    """An optimizer's rate now (its schedule's, where it has one), as float32's shortest
    repr: 0.002, not 0.0020000000949949026."""
    return float(str(keras.ops.convert_to_numpy(optimizer.learning_rate)))


def phase_optimizer(phase, steps_per_epoch=None):
    """Adam at the phase's learning rate, constant or on a cosine schedule with one epoch's
    warmup (of steps_per_epoch steps), averaging the weights when the phase says so."""
    rate = phase.learning_rate
    if phase.schedule == "cosine":
        warmup = steps_per_epoch if phase.epochs > 1 else 0
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else rate, max(1, phase.epochs * steps_per_epoch - warmup),
            warmup_target=rate if warmup else None, warmup_steps=warmup)
    return keras.optimizers.Adam(rate, use_ema=phase.ema > 0, ema_momentum=phase.ema or 0.99)


def _steps_per_epoch(data):
    """Batches per epoch of a PyDataset or a tf.data pipeline of known length."""
    if hasattr(data, "__len__"):
        return len(data)
    steps = int(data.cardinality())
    if steps < 1:
        raise ValueError(f"The training data's length is unknown ({steps}); the learning-rate "
                         "schedule needs it. Use --schedule constant.")
    return steps


def save_weights(model, path):
    """Model weights only (not the optimizer), atomically, as .npz."""
    write_npz(path, *model.get_weights())


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
