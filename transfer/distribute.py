"""Several devices through tf.distribute, mixed precision and XLA: all of it TensorFlow's own.

Several machines are not: Keras 3's fit fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585).

With N replicas the global batch is N times --batch-size (each replica keeps the batch it would
have alone) and both learning rates are multiplied by N: the linear scaling rule (Goyal et al.
2017, "Accurate, Large Minibatch SGD"). The feature caches are per process, so with more than
one replica they are turned off, with a log line.
"""

import logging

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "none", "mirrored")
PRECISIONS = ("float32", "mixed")


def make_strategy(name):
    """The tf.distribute strategy called `name` (one of STRATEGIES, as TrainConfig checks).

    auto: mirrored when more than one GPU is visible, else none. mirrored: every GPU, or
    every logical CPU device when there is no GPU.
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "none"
    if name == "none":
        return tf.distribute.get_strategy()
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


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
