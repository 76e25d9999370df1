"""tf.distribute on this CPU: two logical devices mirrored, two workers as two local processes
on 127.0.0.1 (MultiWorkerMirroredStrategy through the real CLI, preempted and killed), and the
GPU switches' fallbacks."""

import csv
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import REPO, TINY_BACKBONE, TINY_CUT, TINY_SIZE, make_dataset

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
cfg = resolve(None, dict(data=data, backbone={backbone!r}, weights="none", image_size={size},
                         batch_size=int(batch), learning_rate=float(rate), head="adam",
                         epochs=2, fine_tune_epochs=0, dropout=0.0, augment=False,
                         evaluate=False, strategy=strategy, runs_dir=runs))
run_dir = train(cfg, verbose=0)
np.savez(run_dir / "final.npz", *load_model(run_dir / "model.keras").get_weights())
print(run_dir)
""".format(backbone=TINY_BACKBONE, size=TINY_SIZE)


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

    for key, wrong, valid in (("strategy", "ring", "auto, none, mirrored, multiworker"),
                              ("precision", "bfloat16", "float32, mixed")):
        try:
            resolve(None, {key: wrong})
        except ValueError as error:
            assert valid in str(error) and wrong in str(error)
        else:
            raise AssertionError(f"{key}={wrong!r} was accepted")


# Several machines: each worker a process of the real CLI, with TF_CONFIG on loopback ports.
WORKER_ARGS = ("--backbone", TINY_BACKBONE, "--weights", "none", "--image-size", str(TINY_SIZE),
               "--batch-size", "4", "--epochs", "2", "--fine-tune-epochs", "1",
               "--fine-tune-from", TINY_CUT, "--no-evaluate")
WORKER_TIMEOUT = 240  # seconds: a run here takes about 30
RESTART_STATUS = 75


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


class Cluster:
    """`count` workers of one `transfer train --strategy multiworker` run, each in its own
    folder (its working directory and TMPDIR), logging to a file; the runs directory is shared."""

    def __init__(self, tmp_path, dataset, count=2, args=()):
        self.tmp_path, self.count = tmp_path, count
        self.runs = tmp_path / "runs"
        self.command = [sys.executable, "-m", "transfer", "train", "--data", str(dataset),
                        "--runs-dir", str(self.runs), *WORKER_ARGS, "--strategy", "multiworker",
                        *args]
        self.processes, self.starts = [], 0

    def start(self):
        self.starts += 1
        ports = _free_ports(self.count)
        self.processes = []
        for index in range(self.count):
            home = self.tmp_path / f"worker{index}"
            for folder in ("cwd", "tmp"):
                (home / folder).mkdir(parents=True, exist_ok=True)
            env = os.environ | {
                "PYTHONPATH": str(REPO), "TMPDIR": str(home / "tmp"),
                "TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}"
                                                                for port in ports]},
                                         "task": {"type": "worker", "index": index}})}
            log = open(self.log_file(index), "w")
            self.processes.append(subprocess.Popen(self.command, cwd=home / "cwd", env=env,
                                                   stdout=log, stderr=subprocess.STDOUT))
            log.close()
        return self

    def log_file(self, index):
        return self.tmp_path / f"worker{index}" / f"start{self.starts}.log"

    def log(self, index):
        return self.log_file(index).read_text()

    def wait_for(self, index, pattern):
        deadline = time.monotonic() + WORKER_TIMEOUT
        while not re.search(pattern, self.log(index), re.MULTILINE):
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.log(index)[-3000:]}"
            assert all(p.poll() is None for p in self.processes), self.log(index)[-3000:]
            time.sleep(0.05)

    def finish(self):
        """Every worker's exit status."""
        try:
            return [process.wait(timeout=WORKER_TIMEOUT) for process in self.processes]
        finally:
            self.kill()

    def kill(self, index=None, sig=signal.SIGKILL):
        for process in self.processes if index is None else [self.processes[index]]:
            if process.poll() is None:
                process.send_signal(sig)
                if sig == signal.SIGKILL:
                    process.wait()

    def run_dir(self):
        (run_dir,) = (self.runs / "stripes").iterdir()
        return run_dir


@pytest.fixture
def cluster(tmp_path):
    dataset = make_dataset(tmp_path / "stripes", per_class=32, validation=5)
    cluster = Cluster(tmp_path, dataset)
    yield cluster
    cluster.kill()


def _fingerprints(log):
    """{(phase, worker): the sha256 of its weights at the phase's end}."""
    return {(phase, int(worker)): digest for phase, worker, digest in
            re.findall(r"Phase (\w+) on worker (\d+) of \d+: weights sha256 (\w+)", log)}


def _history(run_dir):
    with open(run_dir / "history.csv", newline="") as handle:
        return [(int(row["epoch"]), row["phase"]) for row in csv.DictReader(handle)]


def test_two_workers_train_in_step_and_only_the_chief_writes(cluster, tmp_path):
    from transfer.model import load_model
    from transfer.pipeline import export_run
    from transfer.predict import Predictor, predict_paths

    assert cluster.start().finish() == [0, 0], cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    chief, other = cluster.log(0), cluster.log(1)
    assert "2 replicas (MultiWorkerMirroredStrategy): global batch 8" in chief
    assert "Not caching: the feature caches are per process and 2 workers" in chief
    assert "8 steps of 8 per epoch over 2 workers" in chief  # 64 images, half on each
    # Both workers end each phase with the same weights, bit for bit.
    prints = _fingerprints(chief) | _fingerprints(other)
    assert set(prints) == {(phase, worker) for phase in ("head", "fine_tune")
                           for worker in (0, 1)}
    for phase in ("head", "fine_tune"):
        assert prints[phase, 0] == prints[phase, 1]
    assert prints["head", 0] != prints["fine_tune", 0]
    assert "waiting for the chief to write the model" in other

    run_dir = cluster.run_dir()
    assert _history(run_dir) == [(1, "head"), (2, "head"), (3, "fine_tune")]
    assert (run_dir / "summary.json").is_file()
    # No checkpoint is left once the model is saved, and nothing of the other worker's.
    assert not (run_dir / "checkpoints").exists()
    assert not [path for path in run_dir.rglob("*") if "workertemp" in path.name]
    for folder in ("cwd", "tmp"):
        assert not list((tmp_path / "worker1" / folder).iterdir())

    # The chief's model and its export load and predict alike.
    version, _ = export_run(run_dir, output=tmp_path / "saved_models")
    paths = sorted((tmp_path / "stripes" / "validation").rglob("*.jpg"))
    from_keras = list(predict_paths(Predictor(run_dir), paths))
    from_export = list(predict_paths(Predictor(version.parent), paths))
    assert [row["label"] for row in from_keras] == [row["label"] for row in from_export]
    assert all(not row["error"] for row in from_keras) and len(from_keras) == 10
    assert load_model(run_dir / "model.keras").count_params() > 0


def test_sigterm_saves_on_every_worker_and_a_restart_continues(cluster):
    cluster.start()
    cluster.wait_for(0, r"^Epoch 1 \(head\)")
    cluster.kill(1, signal.SIGTERM)  # the preemption notice, mid-way through epoch 2
    assert cluster.finish() == [RESTART_STATUS, RESTART_STATUS]
    for index in (0, 1):
        assert re.search(r"Preempted \(SIGTERM\): every worker saved a checkpoint in phase "
                         r"head's epoch 2 of 2, after step \d of 8", cluster.log(index))
    run_dir = cluster.run_dir()
    assert (run_dir / "checkpoints" / "checkpoint").is_file()
    assert _history(run_dir) == [(1, "head")]

    assert cluster.start().finish() == [0, 0], cluster.log(0)[-3000:]
    assert "Continuing the unfinished multi-worker run with the same settings" in cluster.log(0)
    assert re.search(r"resuming at epoch 2, step \d", cluster.log(0))
    assert cluster.run_dir() == run_dir  # the same run, finished: one unbroken history
    assert _history(run_dir) == [(1, "head"), (2, "head"), (3, "fine_tune")]
    assert (run_dir / "summary.json").is_file()


def test_a_killed_worker_stops_the_others_and_all_restarted_resume(cluster):
    cluster.start()
    cluster.wait_for(0, r"^Epoch 1 \(head\)")
    cluster.kill(1)  # SIGKILL: no checkpoint of its own
    (status,) = [cluster.processes[0].wait(timeout=WORKER_TIMEOUT)]
    assert status == RESTART_STATUS
    assert "Lost contact with another worker" in cluster.log(0)
    assert "start every worker again with the same command" in cluster.log(0)
    run_dir = cluster.run_dir()
    assert _history(run_dir)[:1] == [(1, "head")]

    assert cluster.start().finish() == [0, 0], cluster.log(0)[-3000:]
    assert cluster.run_dir() == run_dir
    assert _history(run_dir) == [(1, "head"), (2, "head"), (3, "fine_tune")]


def test_the_loop_on_one_worker_matches_fit(tmp_path):
    """Same seed, data and batches, no augmentation or dropout: the custom loop of one worker
    (a cluster of one) and model.fit train to the same model."""
    dataset = make_dataset(tmp_path / "stripes", per_class=16, validation=4)
    settings = ("--head", "adam", "--no-augment", "--no-cache", "--dropout", "0",
                "--batch-size", "8")
    results = {}
    for strategy in ("none", "multiworker"):
        runs = tmp_path / strategy
        env = os.environ | {"PYTHONPATH": str(REPO), "TF_CONFIG": json.dumps(
            {"cluster": {"worker": [f"127.0.0.1:{_free_ports(1)[0]}"]},
             "task": {"type": "worker", "index": 0}})}
        command = [sys.executable, "-m", "transfer", "train", "--data", str(dataset),
                   "--runs-dir", str(runs), *WORKER_ARGS, *settings, "--strategy", strategy]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        (run_dir,) = (runs / "stripes").iterdir()
        with open(run_dir / "history.csv", newline="") as handle:
            history = list(csv.DictReader(handle))
        with np.load(run_dir / "best.weights.npz") as stored:
            results[strategy] = history, [stored[name] for name in stored.files]
    (fit_history, fit_weights), (loop_history, loop_weights) = results.values()
    assert [row["phase"] for row in loop_history] == [row["phase"] for row in fit_history]
    # The first epoch sees the batches in the same order: the same losses, to float32's
    # precision. Later epochs are shuffled anew by each pipeline in its own order.
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert float(loop_history[0][key]) == pytest.approx(float(fit_history[0][key]),
                                                            abs=1e-5)
    assert [row["learning_rate"] for row in loop_history] == ["0.001", "0.001", "1e-05"]
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose([float(row[key]) for row in loop_history],
                                   [float(row[key]) for row in fit_history], atol=0.02)
    assert float(loop_history[-1]["loss"]) < float(loop_history[0]["loss"]) - 0.03  # learned
    for fitted, looped in zip(fit_weights, loop_weights):
        np.testing.assert_allclose(looped, fitted, atol=3e-3)


def test_multiworker_needs_a_cluster_and_names_what_describes_one(monkeypatch):
    from transfer.distribute import cluster_resolver

    for key in ("TF_CONFIG", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="set TF_CONFIG on every worker .* Slurm's srun"):
        cluster_resolver()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        cluster_resolver()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}}))
    with pytest.raises(ValueError, match="this worker's place in it"):
        cluster_resolver()


def test_slurm_describes_the_cluster_without_tf_config(monkeypatch):
    from transfer.distribute import cluster_resolver

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # a CPU node: no nvidia-smi
    for key, value in (("SLURM_PROCID", "1"), ("SLURM_STEP_NUM_TASKS", "2"),
                       ("SLURM_STEP_NODELIST", "node[1-2]"),
                       ("SLURM_STEP_TASKS_PER_NODE", "1(x2)")):
        monkeypatch.setenv(key, value)
    resolver = cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:8888", "node2:8888"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


def test_ema_is_refused_on_several_machines():
    from transfer.config import resolve

    with pytest.raises(ValueError, match="--ema .* with --strategy multiworker leave it at 0"):
        resolve(None, {"strategy": "multiworker", "ema": 0.99})
