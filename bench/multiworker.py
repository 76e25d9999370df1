"""Training on several workers: the time per epoch of one worker against two, one JSON line.

`transfer train --strategy multiworker` runs as a user runs it, once as a cluster of one worker
and once as two workers (two processes of this machine, TF_CONFIG on 127.0.0.1 ports, one
shared runs folder), on the same subset of ../shared/datasets/cats_dogs (the first --per-class
training and half as many validation images of each class, linked into a scratch folder),
from the same ImageNet checkpoint, at the same --batch-size per replica. With two workers the
global batch is twice as large and an epoch half as many steps, so the time per epoch shows
what the second worker buys: on one machine the two share its cores. The seconds per epoch are
the chief's log lines ("Epoch N (phase): ...; S s"), the first epoch of each phase left out
(it compiles the step).

    .venv/bin/python bench/multiworker.py --per-class 500
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accuracy import keras_home, log  # noqa: E402  (the same set-up)

EPOCH_LINE = re.compile(r"^Epoch (\d+) \((\w+)\): .*val_accuracy ([\d.]+); ([\d.]+) s$",
                        re.MULTILINE)


def subset(source, target, per_class):
    """train/ and validation/ of `source`, the first per_class (half as many to validate)
    images of each class, linked."""
    for split, count in (("train", per_class), ("validation", per_class // 2)):
        for folder in sorted((source / split).iterdir()):
            (target / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                (target / split / folder.name / image.name).symlink_to(image.resolve())
    return target


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


def train(workers, data, runs, arguments, scratch):
    """(the chief's log, the wall time) of one run on `workers` local workers."""
    ports = free_ports(workers)
    command = [sys.executable, "-m", "transfer", "train", "--data", str(data), "--runs-dir",
               str(runs), "--strategy", "multiworker", "--no-evaluate", *arguments]
    processes, logs = [], []
    started = time.perf_counter()
    for index in range(workers):
        logs.append(scratch / f"{runs.name}-worker{index}.log")
        env = os.environ | {"TF_CONFIG": json.dumps(
            {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
             "task": {"type": "worker", "index": index}})}
        with open(logs[-1], "w") as output:
            processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=output,
                                              stderr=subprocess.STDOUT))
    statuses = [process.wait() for process in processes]
    wall = time.perf_counter() - started
    if any(statuses):
        raise SystemExit(f"{workers} worker(s) failed ({statuses}):\n"
                         f"{logs[0].read_text()[-3000:]}")
    return logs[0].read_text(), wall


def epochs(chief_log):
    """{phase: [seconds of each epoch but its first]} and the last validation accuracy."""
    rows = EPOCH_LINE.findall(chief_log)
    seconds = {}
    for _, phase, _, time_s in rows:
        seconds.setdefault(phase, []).append(float(time_s))
    return {phase: times[1:] for phase, times in seconds.items()}, float(rows[-1][2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=500,
                        help="training images per class (validation: half as many)")
    parser.add_argument("--backbone", default="mobilenet_025")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="of each phase")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    source = args.shared / "datasets" / "cats_dogs"
    if not source.is_dir():
        raise SystemExit(f"{source} is missing; see ../shared/README.md, or give --shared.")
    arguments = ["--backbone", args.backbone, "--batch-size", str(args.batch_size),
                 "--epochs", str(args.epochs), "--fine-tune-epochs", str(args.epochs),
                 "--head", "adam", "--patience", str(args.epochs)]
    with tempfile.TemporaryDirectory(prefix="multiworker-") as scratch:
        scratch = Path(scratch)
        os.environ["KERAS_HOME"] = str(keras_home(scratch, args.shared))
        data = subset(source, scratch / "cats_dogs", args.per_class)
        result = {"bench": "multiworker", "backbone": args.backbone,
                  "images": {"train": 2 * args.per_class, "validation": args.per_class},
                  "batch_size_per_replica": args.batch_size, "epochs_per_phase": args.epochs,
                  "cpus": os.cpu_count()}
        for workers in (1, 2):
            chief_log, wall = train(workers, data, scratch / f"runs{workers}", arguments,
                                    scratch)
            seconds, accuracy = epochs(chief_log)
            result[f"workers_{workers}"] = {
                "epoch_s": {phase: round(statistics.median(times), 2)
                            for phase, times in seconds.items()},
                "epoch_s_each": seconds, "val_accuracy": accuracy, "wall_s": round(wall, 1)}
            log(f"{workers} worker(s): {json.dumps(result[f'workers_{workers}'])}")
        result["two_over_one"] = {
            phase: round(result["workers_2"]["epoch_s"][phase] / one, 2)
            for phase, one in result["workers_1"]["epoch_s"].items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
