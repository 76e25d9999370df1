"""Training on several machines: both phases as one custom loop under MultiWorkerMirroredStrategy.

Keras 3's model.fit fails under that strategy (keras-team/keras#20585), so each phase runs here
as TensorFlow's multi-worker guide writes such a loop: every worker reads its own shard of the
files (distribute_datasets_from_function), each step's loss is averaged over the global batch
(tf.nn.compute_average_loss) and the gradients are all-reduced, so every worker holds the same
weights. The rules are model.fit's in transfer.train: the same augmentation, class weights,
learning rates, early stopping on the validation loss, best weights, a history row per epoch.

Only the chief writes the run directory: the history, the best weights, the model. The chief
decides when a phase stops, and every worker follows. A checkpoint of the whole training state
(weights, both phases' optimizers, where it stands) is saved after every epoch; on SIGTERM,
PreemptionCheckpointHandler has every worker save one at the same step and stop with
distribute.RESTART_STATUS. The chief saves into the run directory, the others into a temporary
folder removed when they stop, and all of them restore the chief's: the runs directory must be
on storage that every worker sees at the same path.
"""

import hashlib
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from transfer import distribute
from transfer.files import atomic_path, write_json
from transfer.runs import read_history
from transfer.train import (ADAM_INSTEAD, BEST_WEIGHTS, IMAGE_CACHE, STATE, PhaseTracker,
                            class_weights, decode_failures_reported, learning_rate,
                            load_weights, phase_optimizer, scaled_phases)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # in the run directory: the chief's; every worker restores it


def fit_run(model, cfg, spec, run_dir, classes, train_split, val_split, verbose):
    """Fit both phases on every worker of the current MultiWorkerMirroredStrategy, resuming
    from the chief's checkpoint where there is one; the chief saves model.keras. Returns the
    history (the chief's; the other workers keep none)."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    scratch = run_dir if chief else Path(tempfile.mkdtemp(prefix="transfer-worker-"))
    shutil.rmtree(scratch / IMAGE_CACHE, ignore_errors=True)  # left by an interrupted run
    (scratch / IMAGE_CACHE).mkdir()
    try:
        with decode_failures_reported(run_dir):
            history = _fit(strategy, chief, model, cfg, spec, run_dir, scratch, classes,
                           train_split, val_split, verbose)
        if chief:
            with atomic_path(run_dir / "model.keras") as temporary:
                model.save(temporary)
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    finally:
        shutil.rmtree(scratch / IMAGE_CACHE if chief else scratch, ignore_errors=True)
    return history


def _fit(strategy, chief, model, cfg, spec, run_dir, scratch, classes, train_split, val_split,
         verbose):
    import tensorflow as tf

    from transfer.model import backbone_of, count_trainable, set_trainable

    workers = distribute.worker_count(strategy)
    where = f"worker {strategy.cluster_resolver.task_id} of {workers}"
    phases = scaled_phases(cfg, spec, strategy.num_replicas_in_sync)
    if cfg.cache:
        log.info("Not caching: the feature caches are per process and %d workers share this "
                 "run; the frozen layers run in every step.", workers)
    feed = Feed(strategy, cfg, model, train_split, val_split,
                class_weights(cfg, classes, train_split), len(classes), scratch)
    optimizers = {}
    for phase in phases:  # all built now, so that one checkpoint holds every phase's state
        set_trainable(backbone_of(model), phase.unfreeze_from)
        optimizers[phase.name] = phase_optimizer(phase, feed.steps)
        optimizers[phase.name].build(model.trainable_variables)
    # (phase, epochs done in it, steps done in the epoch), and the epoch's sums so far
    position = tf.Variable([0, 0, 0], dtype=tf.int64, name="position")
    sums = tf.Variable(tf.zeros(3, tf.float64), name="sums")
    checkpoint = tf.train.Checkpoint(model=model, position=position, sums=sums, **optimizers)
    latest = tf.train.latest_checkpoint(run_dir / CHECKPOINTS)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()

    def preempted():
        phase, epoch, step = (int(value) for value in position.numpy())
        raise distribute.RestartNeeded(
            f"Preempted (SIGTERM): every worker saved a checkpoint at phase "
            f"{phases[phase].name}, epoch {epoch + 1}, after step {step} of {feed.steps}. "
            "Start every worker again with the same command and the run continues there.")

    # The chief's manager writes into the run directory, the others' into their scratch.
    manager = tf.train.CheckpointManager(checkpoint, scratch / CHECKPOINTS, max_to_keep=1)
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, manager,
        termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=preempted))
    state = _read_state(run_dir) if chief else {}
    completed = state.get("completed", [])
    chief_position, done_phases = distribute.from_chief(
        strategy, [position.numpy(), len(completed)])
    if distribute.total(strategy, [np.any(chief_position != position.numpy())])[0]:
        raise ValueError(f"The workers restored different checkpoints ({where}: position "
                         f"{position.numpy().tolist()}, the chief: {chief_position.tolist()}). "
                         "Every worker restores the chief's checkpoint from "
                         f"{run_dir / CHECKPOINTS}: put --runs-dir on storage that every "
                         "worker sees at the same path.")
    history = read_history(run_dir / "history.csv") if chief else []
    timings = state.get("phases", {})
    offset = 0
    for index, phase in enumerate(phases):
        if index < max(int(position[0]), int(done_phases)):
            offset += len([row for row in history if row["phase"] == phase.name])
            continue
        started = time.time()
        set_trainable(backbone_of(model), phase.unfreeze_from)
        if index != int(position[0]) or not np.any(position.numpy()[1:]):
            # each phase starts from the best weights so far, the chief's
            if chief and (run_dir / BEST_WEIGHTS).is_file():
                load_weights(model, run_dir / BEST_WEIGHTS)
            _weights_from_chief(strategy, model)
            position.assign([index, 0, 0])
            sums.assign(tf.zeros(3, tf.float64))
        epoch = int(position[1])
        history = [row for row in history if row["phase"] != phase.name
                   or row["epoch"] <= offset + epoch]
        tracker = PhaseTracker(model, phase.name, phase.learning_rate, history, run_dir,
                               cfg.patience) if chief else None
        if phase.solver == "lbfgs":
            log.info(ADAM_INSTEAD, phase.name)
        log.info("Phase %s: %s trainable weights (%s), %d epochs at learning rate %g, on "
                 "images, %d steps of %d per epoch over %d workers%s", phase.name,
                 f"{count_trainable(model):,}",
                 f"from {phase.unfreeze_from}" if phase.unfreeze_from else "backbone frozen",
                 phase.epochs, phase.learning_rate, feed.steps, feed.global_batch, workers,
                 f"; resuming at epoch {offset + epoch + 1}, step {int(position[2]) + 1}"
                 if epoch or int(position[2]) else "")
        optimizer = optimizers[phase.name]
        train_step = feed.train_step(optimizer)
        stop = bool(distribute.from_chief(
            strategy, [chief and tracker.finished(offset + phase.epochs)])[0])
        while not stop and epoch < phase.epochs:
            epoch_started = time.time()
            progress = keras.utils.Progbar(feed.steps, verbose=1) \
                if chief and verbose == 1 else None
            batches = iter(feed.train)  # each epoch newly shuffled, as model.fit's
            for step in range(int(position[2]), feed.steps):
                sums.assign_add(handler.run(train_step, batches))
                position.assign([index, epoch, step + 1])
                if progress is not None:
                    progress.update(step + 1, [("loss", float(sums[0] / sums[2]))])
            loss, correct, count = sums.numpy()
            logs = {"loss": loss / count, "accuracy": correct / count,
                    **feed.validate()}
            position.assign([index, epoch + 1, 0])
            sums.assign(tf.zeros(3, tf.float64))
            if chief:
                stop = tracker.record(offset + epoch, logs, learning_rate(optimizer))
                log.info("Epoch %d (%s): %s; %.1f s", offset + epoch + 1, phase.name,
                         ", ".join(f"{key} {value:.4f}" for key, value in logs.items()),
                         time.time() - epoch_started)
            stop = bool(distribute.from_chief(strategy, [stop])[0])
            manager.save()
            epoch += 1
        log.info("Phase %s on %s: weights sha256 %s", phase.name, where, _fingerprint(model))
        if distribute.from_chief(strategy, [chief and not (run_dir / BEST_WEIGHTS).is_file()])[0]:
            raise ValueError(f"Training diverged: the validation loss of phase {phase.name} was "
                             f"never a number. Lower the learning rate ({phase.learning_rate:g}).")
        if chief:
            history = tracker.history
            rows = len([row for row in history if row["phase"] == phase.name])
            offset += rows
            completed.append(phase.name)
            timings[phase.name] = {"seconds": round(time.time() - started, 1),
                                   "fed": f"images ({workers} workers)"}
            write_json(run_dir / STATE, {"completed": completed, "phases": timings})
            log.info("Phase %s: %d epochs in %.0f s, best val_loss so far %.4f", phase.name,
                     rows, time.time() - started, tracker.best_loss)
        position.assign([index + 1, 0, 0])
        manager.save()
    if chief:
        load_weights(model, run_dir / BEST_WEIGHTS)
    return history


def _read_state(run_dir):
    import json

    return json.loads((run_dir / STATE).read_text()) if (run_dir / STATE).is_file() else {}


def _weights_from_chief(strategy, model):
    """Every worker's model set to the chief's weights."""
    model.set_weights([value.astype(weight.dtype) for value, weight in
                       zip(distribute.from_chief(strategy, model.get_weights()),
                           model.get_weights())])


def _fingerprint(model):
    """The sha256 of the model's weights, the same on workers that trained in step."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


class Feed:
    """This worker's shard of the training and validation images as the strategy's
    distributed datasets, and the steps that run on them.

    Every worker runs the same number of steps, as each step is a collective: an epoch is
    ceil(images / global batch) steps on each, with the shards made the same length. Training
    tops a shard up with some of its images a second time (at most a batch per replica);
    validation with images weighted 0, so that its sums are exactly the whole validation set's.
    """

    def __init__(self, strategy, cfg, model, train_split, val_split, class_weight, num_classes,
                 scratch):
        import tensorflow as tf

        from transfer import data

        self.strategy, self.model = strategy, model
        size = model.input_shape[1]
        self.global_batch = cfg.batch_size * strategy.num_replicas_in_sync
        self.steps = math.ceil(len(train_split) / self.global_batch)
        self.validation_steps = math.ceil(len(val_split) / self.global_batch)
        per_worker = self.global_batch // distribute.worker_count(strategy)
        budget = cfg.cache_memory_mb * 2**20
        augmentation = data.augmentation(cfg)
        table = tf.constant([(class_weight or {}).get(label, 1.0)
                             for label in range(num_classes)], tf.float32)

        def train(context):
            # topped up with its own images, which then come twice an epoch
            shard = _padded(_shard(train_split, context), self.steps * per_worker)
            images = data.batched(data.decoded(shard, size, budget,
                                               scratch / IMAGE_CACHE / "train"),
                                  cfg.batch_size, augmentation, cfg.seed)
            return images.map(lambda x, y: (x, y, tf.gather(table, y)))

        def validation(context):
            shard = _shard(val_split, context)
            # topped up with images weighted 0, which count for nothing
            padded = _padded(shard if len(shard) else val_split,
                             self.validation_steps * per_worker)
            images = data.batched(data.decoded(padded, size, budget,
                                               scratch / IMAGE_CACHE / "validation"),
                                  cfg.batch_size)
            mask = np.arange(len(padded)) < len(shard)
            weights = tf.data.Dataset.from_tensor_slices(mask.astype(np.float32))
            return tf.data.Dataset.zip((images, weights.batch(cfg.batch_size))).map(
                lambda xy, weight: (*xy, weight))

        self.train = strategy.distribute_datasets_from_function(train)
        self.validation = strategy.distribute_datasets_from_function(validation)
        self.validation_step = self._validation_step()

    def train_step(self, optimizer):
        """A compiled step: one batch for each replica, the trainable weights moved by the
        average gradient; returns the summed (class-weighted loss, correct, images)."""
        import tensorflow as tf

        model, strategy, global_batch = self.model, self.strategy, self.global_batch
        trainable = model.trainable_variables

        def step(images, labels, weights):
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
                loss = tf.nn.compute_average_loss(losses * weights,
                                                  global_batch_size=global_batch)
                scaled = optimizer.scale_loss(loss)  # mixed precision's loss scale, else loss
            optimizer.apply(tape.gradient(scaled, trainable), trainable)
            return _sums(losses * weights, probabilities, labels, tf.ones_like(weights))

        @tf.function
        def run(iterator):
            return strategy.reduce(tf.distribute.ReduceOp.SUM,
                                   strategy.run(step, args=next(iterator)), axis=None)

        return run

    def _validation_step(self):
        import tensorflow as tf

        model, strategy = self.model, self.strategy

        def step(images, labels, weights):
            probabilities = model(images, training=False)
            losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            return _sums(losses * weights, probabilities, labels, weights)

        @tf.function
        def run(iterator):
            return strategy.reduce(tf.distribute.ReduceOp.SUM,
                                   strategy.run(step, args=next(iterator)), axis=None)

        return run

    def validate(self):
        """{"val_loss", "val_accuracy"} of the whole validation set, the same on every worker."""
        iterator = iter(self.validation)
        loss, correct, count = sum(self.validation_step(iterator).numpy()
                                   for _ in range(self.validation_steps))
        return {"val_loss": loss / count, "val_accuracy": correct / count}


def _shard(split, context):
    """This input pipeline's share of a data.Split: every n-th file, so each shard keeps the
    classes' proportions."""
    from transfer.data import Split

    index, count = context.input_pipeline_id, context.num_input_pipelines
    return Split(split.paths[index::count], split.labels[index::count])


def _padded(split, length):
    """A data.Split of `length` images: split's own, and then as many again as it takes,
    from its first."""
    from transfer.data import Split

    repeats = math.ceil(length / len(split))
    return Split((split.paths * repeats)[:length], (split.labels * repeats)[:length])


def _sums(weighted_losses, probabilities, labels, weights):
    """[the summed losses, the weighted count of correct answers, the weighted count]."""
    import tensorflow as tf

    correct = tf.cast(tf.equal(tf.argmax(probabilities, axis=-1, output_type=labels.dtype),
                               labels), tf.float32)
    return tf.cast(tf.stack([tf.reduce_sum(weighted_losses), tf.reduce_sum(correct * weights),
                             tf.reduce_sum(weights)]), tf.float64)
