"""Training on several machines: the phases as one custom loop under MultiWorkerMirroredStrategy.

Keras 3's model.fit fails under that strategy (keras-team/keras#20585), so each phase runs here
as TensorFlow's multi-worker guide writes such a loop: every worker reads its own shard of the
files (distribute_datasets_from_function), each step's loss is averaged over the global batch
(tf.nn.compute_average_loss) and the gradients are all-reduced, so every worker holds the same
weights. The rules are model.fit's in transfer.train: the same augmentation, class weights,
learning rates, early stopping on the validation loss, best weights, a history row per epoch.

Only the chief writes the run directory: the history, the best weights, the model. The chief
decides when a phase stops, and every worker follows. A checkpoint of the whole training state
(weights, every phase's optimizer, where it stands) is saved after every epoch; on SIGTERM,
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
from transfer.train import (ADAM_INSTEAD, BEST_WEIGHTS, IMAGE_CACHE, NOT_SOLVED, STATE,
                            PhaseTracker, class_weights, decode_failures_reported,
                            learning_rate, load_weights, phase_optimizer, read_state,
                            scaled_phases)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # in the run directory: the chief's; every worker restores it


def fit_run(model, cfg, spec, run_dir, classes, train_split, val_split, verbose):
    """Fit the phases on every worker of the current MultiWorkerMirroredStrategy, resuming
    from the chief's checkpoint where there is one; the chief saves model.keras. Returns the
    history (the chief's; the other workers keep none)."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    scratch = run_dir if chief else Path(tempfile.mkdtemp(prefix="transfer-worker-"))
    shutil.rmtree(scratch / IMAGE_CACHE, ignore_errors=True)  # left by an interrupted run
    (scratch / IMAGE_CACHE).mkdir()
    try:
        with decode_failures_reported(run_dir, "every worker's command again"):
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

    from transfer.model import backbone_of, set_trainable

    workers = distribute.worker_count(strategy)
    phases = scaled_phases(cfg, spec, strategy.num_replicas_in_sync)
    if cfg.cache:
        log.info("Not caching: the feature caches are per process and %d workers share this "
                 "run; the frozen layers run in every step.", workers)
    for phase in phases:
        if not phase.epochs:  # solved only, which needs the caches
            log.info(NOT_SOLVED, phase.name)
    phases = [phase for phase in phases if phase.epochs]
    feed = Feed(strategy, cfg, model, train_split, val_split,
                class_weights(cfg, classes, train_split), len(classes), scratch)
    optimizers = {}
    for phase in phases:  # all built now, so that one checkpoint holds every phase's state
        set_trainable(backbone_of(model), phase.unfreeze_from)
        optimizer = phase_optimizer(phase, feed.steps)
        if model.dtype_policy.name == "mixed_float16":  # as compile() wraps it for fit
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        optimizers[phase.name] = optimizer
    # (phase, epochs done in it, steps done in the epoch), and the epoch's sums so far
    position = tf.Variable([0, 0, 0], dtype=tf.int64, name="position")
    sums = tf.Variable(tf.zeros(3, tf.float64), name="sums")
    checkpoint = tf.train.Checkpoint(model=model, position=position, sums=sums, **optimizers)
    latest = tf.train.latest_checkpoint(run_dir / CHECKPOINTS)
    if latest:  # every worker: the chief's
        checkpoint.restore(latest).assert_existing_objects_matched()

    def preempted():
        phase, epoch, step = (int(value) for value in position.numpy())
        raise distribute.RestartNeeded(
            f"Preempted (SIGTERM): every worker saved a checkpoint in phase "
            f"{phases[phase].name}'s epoch {epoch + 1} of {phases[phase].epochs}, after step "
            f"{step} of {feed.steps}. "
            "Start every worker again with the same command and the run continues there.")

    # The chief's manager writes into the run directory, the others' into their scratch.
    manager = tf.train.CheckpointManager(checkpoint, scratch / CHECKPOINTS, max_to_keep=1)
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, manager,
        termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=preempted))
    loop = Loop(strategy, chief, model, feed, run_dir, position, sums, manager, handler,
                verbose)
    state = read_state(run_dir) if chief else {}
    completed, timings = state.get("completed", []), state.get("phases", {})
    start = loop.agreed_start(len(completed))
    history = read_history(run_dir / "history.csv") if chief else []
    offset = 0
    for index, phase in enumerate(phases):
        if index < start:
            offset += len([row for row in history if row["phase"] == phase.name])
            continue
        started = time.time()
        history = loop.phase(index, phase, optimizers[phase.name], offset, history,
                             cfg.patience)
        if chief:
            rows = len([row for row in history if row["phase"] == phase.name])
            offset += rows
            completed.append(phase.name)
            timings[phase.name] = {"seconds": round(time.time() - started, 1),
                                   "fed": f"images ({workers} workers)"}
            write_json(run_dir / STATE, {"completed": completed, "phases": timings})
            log.info("Phase %s: %d epochs in %.0f s, best val_loss so far %.4f", phase.name,
                     rows, time.time() - started,
                     min(row["val_loss"] for row in history))
        position.assign([index + 1, 0, 0])
        manager.save()
    if chief:
        load_weights(model, run_dir / BEST_WEIGHTS)
    return history


class Loop:
    """The phases' epochs and steps, on every worker in step: the chief decides (its history
    and best weights), and the others follow."""

    def __init__(self, strategy, chief, model, feed, run_dir, position, sums, manager, handler,
                 verbose):
        self.strategy, self.chief, self.model, self.feed = strategy, chief, model, feed
        self.run_dir, self.position, self.sums = run_dir, position, sums
        self.manager, self.handler, self.verbose = manager, handler, verbose
        resolver = strategy.cluster_resolver
        self.where = (f"{resolver.task_type} {resolver.task_id} of "
                      f"{distribute.worker_count(strategy)}")

    def agreed_start(self, completed):
        """The first phase to train, with every worker's checkpoint found to be the chief's
        (ValueError on all of them otherwise); `completed`: the phases the chief's state.json
        says are done, which may be ahead of its last checkpoint."""
        here = self.position.numpy()
        chief, done = distribute.from_chief(self.strategy, [here, completed])
        if distribute.total(self.strategy, [np.any(chief != here)])[0]:
            raise ValueError(f"The workers restored different checkpoints ({self.where}: "
                             f"position {here.tolist()}, the chief: {chief.tolist()}). Every "
                             "worker restores the chief's checkpoint from "
                             f"{self.run_dir / CHECKPOINTS}: put --runs-dir on storage that "
                             "every worker sees at the same path.")
        return max(int(here[0]), int(done))

    def phase(self, index, phase, optimizer, offset, history, patience):
        """Train phase number `index` until it ends or stops early; returns the history."""
        import tensorflow as tf

        from transfer.model import backbone_of, count_trainable, set_trainable

        model, chief, run_dir = self.model, self.chief, self.run_dir
        set_trainable(backbone_of(model), phase.unfreeze_from)
        if index != int(self.position[0]) or not np.any(self.position.numpy()[1:]):
            # a phase begun afresh starts from the best weights so far, the chief's
            if chief and (run_dir / BEST_WEIGHTS).is_file():
                load_weights(model, run_dir / BEST_WEIGHTS)
            _weights_from_chief(self.strategy, model)
            self.position.assign([index, 0, 0])
            self.sums.assign(tf.zeros(3, tf.float64))
        epoch, step = int(self.position[1]), int(self.position[2])
        history = [row for row in history if row["phase"] != phase.name
                   or row["epoch"] <= offset + epoch]
        tracker = PhaseTracker(model, phase, history, run_dir, patience) if chief else None
        if phase.solver == "lbfgs":
            log.info(ADAM_INSTEAD, phase.name)
        log.info("Phase %s: %s trainable weights (%s), %d epochs at learning rate %g, on "
                 "images, %d steps of %d per epoch over %d workers%s", phase.name,
                 f"{count_trainable(model):,}",
                 f"from {phase.unfreeze_from}" if phase.unfreeze_from else "backbone frozen",
                 phase.epochs, phase.learning_rate, self.feed.steps, self.feed.global_batch,
                 distribute.worker_count(self.strategy),
                 f"; resuming at epoch {offset + epoch + 1}, step {step + 1}"
                 if epoch or step else "")
        train_step = self.feed.train_step(optimizer)
        stop = self._chief_says(chief and tracker.finished(offset + phase.epochs))
        while not stop and epoch < phase.epochs:
            started = time.time()
            logs = self._epoch(index, epoch, train_step)
            if chief:
                stop = tracker.record(offset + epoch, logs, learning_rate(optimizer))
                log.info("Epoch %d (%s): %s; %.1f s", offset + epoch + 1, phase.name,
                         ", ".join(f"{key} {value:.4f}" for key, value in logs.items()),
                         time.time() - started)
            stop = self._chief_says(stop)
            self.manager.save()  # every epoch, on every worker
            epoch += 1
        log.info("Phase %s on %s: weights sha256 %s", phase.name, self.where,
                 _fingerprint(model))
        if self._chief_says(chief and not (run_dir / BEST_WEIGHTS).is_file()):
            raise ValueError(f"Training diverged: the validation loss of phase {phase.name} was "
                             f"never a number. Lower the learning rate ({phase.learning_rate:g}).")
        return tracker.history if chief else []

    def _epoch(self, index, epoch, train_step):
        """The rest of one epoch's steps, then validation: the epoch's figures."""
        import tensorflow as tf

        steps = self.feed.steps
        progress = keras.utils.Progbar(steps) if self.chief and self.verbose == 1 else None
        for step in range(int(self.position[2]), steps):
            # The handler saves a checkpoint here when a worker has had SIGTERM, and stops.
            self.sums.assign_add(self.handler.run(train_step, self.feed.train))
            self.position.assign([index, epoch, step + 1])
            if progress is not None:
                progress.update(step + 1, [("loss", float(self.sums[0] / self.sums[2]))])
        loss, correct, count = self.sums.numpy()
        logs = {"loss": loss / count, "accuracy": correct / count, **self.feed.validate()}
        self.position.assign([index, epoch + 1, 0])
        self.sums.assign(tf.zeros(3, tf.float64))
        return logs

    def _chief_says(self, flag):
        return bool(distribute.from_chief(self.strategy, [flag])[0])


def _weights_from_chief(strategy, model):
    """Every worker's model set to the chief's weights."""
    weights = model.get_weights()
    model.set_weights([value.astype(weight.dtype) for value, weight in
                       zip(distribute.from_chief(strategy, weights), weights)])


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
            return images.map(lambda x, y: (x, y, tf.gather(table, y))).repeat()

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
                lambda xy, weight: (*xy, weight)).repeat()

        # One pass of a shard is one epoch. Each pipeline repeats, and is read by one iterator
        # all along: dropping an iterator before its end waits a second for its threads.
        self.train = iter(strategy.distribute_datasets_from_function(train))
        self.validation = iter(strategy.distribute_datasets_from_function(validation))
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

        return _compiled(strategy, step)

    def _validation_step(self):
        model, strategy = self.model, self.strategy

        def step(images, labels, weights):
            probabilities = model(images, training=False)
            losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            return _sums(losses * weights, probabilities, labels, weights)

        return _compiled(strategy, step)

    def validate(self):
        """{"val_loss", "val_accuracy"} of the whole validation set, the same on every worker."""
        loss, correct, count = sum(self.validation_step(self.validation).numpy()
                                   for _ in range(self.validation_steps))
        return {"val_loss": loss / count, "val_accuracy": correct / count}


def _compiled(strategy, step):
    """A compiled function of an iterator: `step` on each replica's next batch, its results
    summed over all of them."""
    import tensorflow as tf

    @tf.function
    def run(iterator):
        return strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(step, args=next(iterator)), axis=None)

    return run


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
