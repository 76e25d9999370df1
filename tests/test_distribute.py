"""tf.distribute on this CPU: two logical devices mirrored, and the GPU switches' fallbacks."""

import json
import logging
import subprocess
import sys

import keras
import numpy as np

from conftest import REPO, TINY_SIZE, make_dataset

# Logical devices must be set before TensorFlow starts, so this runs in a fresh process: one
# training per strategy at the same global batch (8) and learning rate, the final weights saved.
MIRRORED_SCRIPT = """
import logging
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from transfer.config import resolve
from transfer.model import load_model
from transfer.pipeline import train
logging.basicConfig(level=logging.INFO, format="%(message)s")
data, runs, strategy, batch, rate = sys.argv[1:6]
cfg = resolve(None, dict(data=data, backbone="vgg16", weights="none", image_size={size},
                         batch_size=int(batch), learning_rate=float(rate), head="adam",
                         epochs=2, fine_tune_epochs=0, dropout=0.0, augment=False,
                         evaluate=False, strategy=strategy, runs_dir=runs))
run_dir = train(cfg, verbose=0)
np.savez(run_dir / "final.npz", *load_model(run_dir / "model.keras").get_weights())
print(run_dir)
""".format(size=TINY_SIZE)


def _train_in_process(dataset, tmp_path, strategy, batch, rate):
    """(final weights, per-epoch history rows, the log) of one training in a new process."""
    import csv

    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(dataset), str(tmp_path / strategy),
         strategy, str(batch), str(rate)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = result.stdout.strip().splitlines()[-1]
    with np.load(f"{run_dir}/final.npz") as stored:
        weights = [stored[name] for name in stored.files]
    with open(f"{run_dir}/history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    return weights, history, result.stderr


def test_mirrored_on_two_logical_cpus_matches_no_strategy(tmp_path):
    dataset = make_dataset(tmp_path / "stripes", per_class=16, validation=4)
    alone, alone_history, _ = _train_in_process(dataset, tmp_path, "none", 8, 2e-3)
    # Two replicas of batch 4 make the same global batch of 8; the rule doubles the rate.
    mirrored, mirrored_history, log = _train_in_process(dataset, tmp_path, "mirrored", 4, 1e-3)
    assert "2 replicas (MirroredStrategy): global batch 8, learning rates x2" in log
    assert "Not caching: the feature caches are per process and 2 replicas" in log
    assert [row["learning_rate"] for row in mirrored_history] == ["0.002", "0.002"]
    # The frozen backbone is untouched and identical; the head follows the same path. Adam
    # turns float-summation differences in near-zero gradients into steps of about the
    # learning rate, so the head is compared by its losses and direction, not bit for bit.
    for a, b in zip(alone[:-2], mirrored[:-2]):
        np.testing.assert_array_equal(a, b)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose([float(r[key]) for r in mirrored_history],
                                   [float(r[key]) for r in alone_history], atol=0.02)
    kernel, other = alone[-2].ravel(), mirrored[-2].ravel()
    assert np.corrcoef(kernel, other)[0, 1] > 0.98
    assert np.abs(kernel).max() > 0  # trained, not both untouched


def test_mixed_precision_and_jit_warn_and_fall_back_on_the_cpu(tiny_config, caplog):
    from transfer.pipeline import train

    with caplog.at_level(logging.INFO, logger="transfer"):
        run_dir = train(tiny_config(precision="mixed", jit=True, epochs=1, fine_tune_epochs=0),
                        verbose=0)
    assert "--precision mixed needs a GPU" in caplog.text
    assert "--jit needs a GPU" in caplog.text
    assert keras.mixed_precision.global_policy().name == "float32"
    assert json.loads((run_dir / "config.json").read_text())["precision"] == "mixed"


def test_unknown_strategy_or_precision_names_the_valid_ones():
    from transfer.config import resolve

    for key, wrong, valid in (("strategy", "ring", "auto, none, mirrored"),
                              ("precision", "bfloat16", "float32, mixed")):
        try:
            resolve(None, {key: wrong})
        except ValueError as error:
            assert valid in str(error) and wrong in str(error)
        else:
            raise AssertionError(f"{key}={wrong!r} was accepted")
