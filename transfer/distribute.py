"""Several devices and machines through tf.distribute, mixed precision and XLA: all of it
TensorFlow's own.

With N replicas the global batch is N times --batch-size (each replica keeps the batch it would
have alone) and both learning rates are multiplied by N: the linear scaling rule (Goyal et al.
2017, "Accurate, Large Minibatch SGD"). The feature caches are per process, so with more than
one replica they are turned off, with a log line.

Several machines (`multiworker`) train in transfer.multiworker's own loop: Keras 3's fit fails
under MultiWorkerMirroredStrategy (keras-team/keras#20585). The helpers here let its workers
agree: the chief's values sent to every worker, which also makes a barrier.
"""

import contextlib
import functools
import json
import logging
import os
import shutil

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "none", "mirrored", "multiworker")
PRECISIONS = ("float32", "mixed")
# The exit status of a worker that stopped for a restart: preempted (SIGTERM) after saving a
# checkpoint, or having lost another worker. A launcher restarts every worker on it; the run
# continues from the checkpoint. 75 is sysexits.h's EX_TEMPFAIL ("try again later").
RESTART_STATUS = 75
TEXT_LIMIT = 4096  # bytes of a path sent from the chief


class RestartNeeded(Exception):
    """The run stopped so that every worker can be started again, and it continues."""


def make_strategy(name):
    """The tf.distribute strategy called `name` (one of STRATEGIES, as TrainConfig checks).

    auto: mirrored when more than one GPU is visible, else none. mirrored: every GPU, or
    every logical CPU device when there is no GPU. multiworker: every worker of the cluster
    that TF_CONFIG or Slurm describes, each with its GPUs (or its CPU); it must be made before
    TensorFlow runs anything, which is why this comes first in a run.
    """
    import tensorflow as tf

    if name == "multiworker":
        resolver = cluster_resolver()
        spec = resolver.cluster_spec().as_dict()
        log.info("Joining a cluster of %d workers as %s %s; waiting for all of them to start",
                 sum(len(tasks) for tasks in spec.values()), resolver.task_type,
                 resolver.task_id)
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "none"
    if name == "none":
        return tf.distribute.get_strategy()
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def cluster_resolver():
    """The cluster from TF_CONFIG (as Kubernetes' TFJob sets it) or, without it, from Slurm's
    variables (srun); ValueError when neither describes one."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        try:
            config = json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as error:
            raise ValueError(f"TF_CONFIG is not valid JSON ({error}); expected e.g. "
                             '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                             '"task": {"type": "worker", "index": 0}}.') from None
        task = config.get("task", {}) if isinstance(config, dict) else {}
        cluster = config.get("cluster") if isinstance(config, dict) else None
        if not cluster or task.get("type") not in (cluster or {}) or "index" not in task:
            raise ValueError("TF_CONFIG must name the cluster and this worker's place in it, "
                             'e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                             f'"task": {{"type": "worker", "index": 0}}}}; received '
                             f"{os.environ['TF_CONFIG'][:200]}.")
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "SLURM_PROCID" in os.environ:
        if shutil.which("nvidia-smi"):
            return tf.distribute.cluster_resolver.SlurmClusterResolver()
        # A CPU node: the resolver would count GPUs with nvidia-smi, and it hands out GPU slots
        # to tasks even so: one unused slot per task, and CUDA_VISIBLE_DEVICES left alone.
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
                    or 1)
        return tf.distribute.cluster_resolver.SlurmClusterResolver(
            gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False)
    raise ValueError("--strategy multiworker needs the cluster's description: set TF_CONFIG "
                     "on every worker (see README, Several machines) or start the workers "
                     "with Slurm's srun; neither is set here.")


@contextlib.contextmanager
def restart_on_lost_worker(strategy):
    """A worker lost during a multi-worker run as RestartNeeded: MultiWorkerMirroredStrategy
    cannot go on with fewer workers, and cannot take one back in."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError) as error:
        if worker_count(strategy) == 1:
            raise
        lines = [line.strip() for line in error.message.splitlines() if line.strip()]
        reason = next((line for line in lines if "aborted" in line), type(error).__name__)
        raise RestartNeeded(f"Lost contact with another worker ({reason[:300]}). The workers "
                            "cannot go on with one missing: start every worker again with the "
                            "same command and the run continues from its last checkpoint (the "
                            "end of its last finished epoch).") from None


def is_chief(strategy):
    """Whether this process writes the run: the only one, or the cluster's chief (its
    "chief" task, else worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not spec:
        return True
    if "chief" in spec:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def worker_count(strategy):
    """The number of processes training together: 1 unless several machines do."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(tasks) for tasks in spec.values()) or 1


def from_chief(strategy, values):
    """`values` (numbers or arrays) as the chief holds them, on every worker, as NumPy arrays.

    A collective, as is total(): every worker must call it with values of the same shapes, and
    none returns before all have called it.
    """
    return _summed(strategy, values, is_chief(strategy))


def total(strategy, values):
    """The sums over the workers of each of `values`, on every worker."""
    return _summed(strategy, values, True)


def _summed(strategy, values, send):
    """The sums over the workers of `values`, counting this worker's where `send` (its first
    replica's, once), as float64 NumPy arrays."""
    import numpy as np

    arrays = [np.asarray(value, dtype=np.float64) for value in values]
    flat = np.concatenate([array.ravel() for array in arrays]) * send
    summed = _reducer(strategy)(flat).numpy()
    ends = np.cumsum([array.size for array in arrays])
    return [part.reshape(array.shape)
            for part, array in zip(np.split(summed, ends[:-1]), arrays)]


@functools.cache
def _reducer(strategy):
    """An all-reduce of a float64 vector from each worker's first replica, compiled once for
    every length (strategy.run called eagerly compiles a function on every call)."""
    import tensorflow as tf

    local = strategy.num_replicas_in_sync // worker_count(strategy)

    def reduce(vector):
        context = tf.distribute.get_replica_context()
        first = tf.cast(tf.equal(context.replica_id_in_sync_group % local, 0), tf.float64)
        return context.all_reduce(tf.distribute.ReduceOp.SUM, vector * first)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float64)])
    def run(vector):
        return strategy.experimental_local_results(strategy.run(reduce, args=(vector,)))[0]

    return run


def text_from_chief(strategy, text):
    """The chief's `text` (a path) on every worker."""
    import numpy as np

    codes = np.zeros(TEXT_LIMIT)
    encoded = os.fsencode(text)
    if len(encoded) > TEXT_LIMIT:
        raise ValueError(f"The run directory's path is over {TEXT_LIMIT} bytes; give a shorter "
                         "--runs-dir.")
    codes[:len(encoded)] = list(encoded)
    received = from_chief(strategy, [codes])[0].astype(np.int64)
    return os.fsdecode(bytes(received[received > 0].tolist()))


def set_precision(precision, jit):
    """Set Keras's global dtype policy (precision: one of PRECISIONS, as TrainConfig checks);
    returns the jit_compile value for compile().

    Mixed precision (float16 compute, float32 weights) and XLA pay off on GPUs; on a CPU
    both are slower, so they warn and fall back to float32 and Keras's "auto".
    """
    import keras
    import tensorflow as tf

    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if precision == "mixed" and not on_gpu:
        log.warning("--precision mixed needs a GPU (on a CPU float16 is slower); training in "
                    "float32.")
    keras.mixed_precision.set_global_policy("mixed_float16" if precision == "mixed" and on_gpu
                                            else "float32")
    if jit and not on_gpu:
        log.warning("--jit needs a GPU (XLA is slower on this CPU); using Keras's default.")
    return True if jit and on_gpu else "auto"
