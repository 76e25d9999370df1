"""TensorBoard's view of a run: <run>/tensorboard/, read by `tensorboard --logdir runs`.

Laid out and named as Keras's TensorBoard callback lays out its logs (train/ and validation/,
"epoch_loss", "epoch_accuracy", "epoch_learning_rate"), so that runs of this tool and of a
plain model.fit compare on one chart. It is written here, from each epoch's history row,
rather than by that callback, because two of the three ways a phase trains never call fit
(the solved head, the multi-worker loop) and the cached phases fit a model that is not the
classifier, whose optimizer the callback would read the rate from. Steps are the history's
epochs (1, 2, ...); "epoch_phase" (0 for the head, 1 for fine-tuning) and a text line mark
where each phase begins. At the end of a run, report/ holds the learning curves and the
confusion matrix as images.
"""

from pathlib import Path

from transfer.config import PHASES

BOARD = "tensorboard"


class Board:
    """The writers of one run's tensorboard/ folder, made when first written to."""

    def __init__(self, run_dir):
        self.folder = Path(run_dir) / BOARD
        self.writers = {}

    def writer(self, name):
        import tensorflow as tf

        if name not in self.writers:
            self.writers[name] = tf.summary.create_file_writer(str(self.folder / name))
        return self.writers[name]

    def epoch(self, row, first=False):
        """One history row (transfer.runs.HISTORY_FIELDS) as scalars at step row["epoch"];
        `first`: the first epoch of its phase, which the text line marks."""
        import tensorflow as tf

        step = row["epoch"]
        with self.writer("train").as_default():
            for key in ("loss", "accuracy", "learning_rate"):
                tf.summary.scalar(f"epoch_{key}", row[key], step=step)
            tf.summary.scalar("epoch_phase", PHASES.index(row["phase"]), step=step)
            if first:
                tf.summary.text("phase", f"phase {row['phase']} begins at epoch {step}",
                                step=step)
        with self.writer("validation").as_default():
            for key in ("loss", "accuracy"):
                tf.summary.scalar(f"epoch_{key}", row[f"val_{key}"], step=step)
        self.flush()

    def images(self, pictures, step):
        """{name: a PNG file} as images at `step`, for those files that exist."""
        import tensorflow as tf

        with self.writer("report").as_default():
            for name, path in pictures.items():
                if Path(path).is_file():
                    image = tf.io.decode_png(Path(path).read_bytes(), channels=3)
                    tf.summary.image(name, image[None], step=step)
        self.flush()

    def flush(self):
        for writer in self.writers.values():
            writer.flush()
