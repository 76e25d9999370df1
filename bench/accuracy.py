"""Accuracy of `transfer`'s defaults against two peers, on the same split, in one run.

For each data set and backbone, every system reads the same files at the backbone's input size
from the same ImageNet checkpoint, and is judged by one function (the images decoded as
`transfer` decodes them, then the system's prediction on each):

- transfer: `transfer train --labels LABELS.csv --backbone B --seed S --no-evaluate` in a
  subprocess, as a user runs it, with every other setting at its default (or as
  --transfer-options sets it, to measure a setting against the defaults) and a cold
  $TRANSFER_CACHE_HOME (a new folder per run, so its file checks and feature caches are made
  anew). Its train wall time is the subprocess's, start-up and file checks included; its
  accuracies are its saved model.keras's, not summary.json's best epoch.
- probe: scikit-learn's LogisticRegression (default settings, max_iter raised so it
  converges) on the frozen backbone's global-average-pooled features of the training images,
  no augmentation. lbfgs is deterministic: its seeds differ only in wall time.
- guide: the keras.io "Transfer learning & fine-tuning" recipe: RandomFlip("horizontal") and
  RandomRotation(0.1) on the training images, the frozen backbone called with training=False,
  pooling, Dropout(0.2), a softmax Dense head, Adam 1e-3 for 10 epochs; then unfrozen from the
  backbone table's cut with BatchNormalization kept frozen, recompiled, Adam 1e-4 for 10
  epochs. model.fit on uncached tf.data pipelines of batches of 32, shuffled every epoch; no
  early stopping: the model at the end of training is judged. It runs the backbone on every
  image in every epoch, which makes it most of the bench's time; it runs on every seed, as the
  others do, so every system's figures are medians on equal terms (one run of the same seed
  differs from the next by a few images: its data pipeline is not deterministic).
  --guide-seeds 1 runs it on the first seed only, in a third of the time.

The split is made once per data set with its seed (1337, the README's runs'; --split-seed S for
another split, to judge on other test images), seeded and stratified as `transfer` makes
splits: cats_dogs is train/ less a 20% test set, with validation/ as given; flowers is
70/10/20. `transfer` reads it from a label file with a split column (a temporary folder holding
a link to the data set and labels.csv), and the bench checks that the run's split.csv holds
exactly those files. `split_sha256` names the split, so lines from separate parts of a run can
be seen to share it.

Prints one JSON line per data set and backbone: validation and test accuracy and train wall
time per system (medians over the seeds), the best peer, and the targets:
transfer at least as accurate as the best peer on validation and on test, and its train wall
time below the guide's.

    .venv/bin/python bench/accuracy.py --data cats_dogs --backbone mobilenet_025
    .venv/bin/python bench/accuracy.py --data flowers --backbone mobilenetv2 --system guide
"""

import argparse
import contextlib
import csv
import hashlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = ("cats_dogs", "flowers")
BACKBONES = ("mobilenet_025", "mobilenetv2")
SYSTEMS = ("transfer", "probe", "guide")
PEERS = ("probe", "guide")
CHECKPOINTS = ("mobilenet_2_5_224_tf_no_top.h5",
               "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
SPLIT_SEED = 1337  # the README's runs: one split for every system and seed
TEST_SPLIT = 0.2  # of train/ for cats_dogs, of all images for flowers
FLOWERS_VALIDATION_SPLIT = 0.1  # flowers: 70/10/20
PROBE_MAX_ITER = 10_000  # lbfgs stops well before this on these features
GUIDE = {"batch_size": 32, "flip": "horizontal", "rotation": 0.1, "dropout": 0.2,
         "head_epochs": 10, "head_learning_rate": 1e-3,
         "fine_tune_epochs": 10, "fine_tune_learning_rate": 1e-4}
ACCURACIES = ("val_accuracy", "test_accuracy")


def log(message):
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


# The split ---------------------------------------------------------------------------------

def pool_of(folder, classes):
    """A data.Split of folder/<class>/ images, class by class, sorted by path within each (as
    `transfer` orders them before it splits)."""
    from transfer.check import list_images
    from transfer.data import Split

    pairs = [(str(path), label) for label, cls in enumerate(classes)
             for path in sorted(os.path.abspath(p) for p in list_images(folder / cls).images)]
    return Split(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


def capped(split, limit):
    """The first `limit` images of each class, in the split's (seeded) order."""
    from transfer.data import Split

    if limit is None:
        return split
    kept, seen = [], {}
    for path, label in zip(split.paths, split.labels):
        if seen.get(label, 0) < limit:
            seen[label] = seen.get(label, 0) + 1
            kept.append((path, label))
    return Split(tuple(p for p, _ in kept), tuple(label for _, label in kept))


def make_split(name, folder, limit, split_seed):
    """(classes, {"train", "validation", "test": Split}) for a data set, seeded and stratified
    by transfer's own function; --limit caps each split after splitting, so a capped test
    set is a subset of the full one."""
    from transfer.check import class_names
    from transfer.data import stratified_split

    if name == "cats_dogs":
        classes = class_names(folder / "train")
        train, test = stratified_split(pool_of(folder / "train", classes), TEST_SPLIT,
                                       split_seed, "test")
        validation = pool_of(folder / "validation", classes)
    else:
        classes = class_names(folder)
        rest, test = stratified_split(pool_of(folder, classes), TEST_SPLIT, split_seed, "test")
        train, validation = stratified_split(
            rest, FLOWERS_VALIDATION_SPLIT / (1 - TEST_SPLIT), split_seed)
    splits = {"train": train, "validation": validation, "test": test}
    return classes, {key: capped(split, limit) for key, split in splits.items()}


def split_rows(folder, classes, splits):
    """(split, path relative to the data set's folder, class name), sorted."""
    return sorted((key, os.path.relpath(path, folder), classes[label])
                  for key, split in splits.items() for path, label in zip(split.paths,
                                                                          split.labels))


def write_label_file(scratch, name, folder, classes, splits):
    """scratch/<name>/labels.csv over a link to the data set: header path,label,split, paths
    relative to the file's folder."""
    root = scratch / name
    root.mkdir(parents=True)
    (root / "images").symlink_to(folder.resolve(), target_is_directory=True)
    labels = root / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "split"))
        for key, path, label in split_rows(folder, classes, splits):
            writer.writerow((f"images/{Path(path).as_posix()}", label, key))
    return labels


# One judge for every system ---------------------------------------------------------------

def images(split, size, batch_size=32, cache=True):
    """Batches of (float32 0-255 images, labels), decoded as `transfer` decodes them."""
    from transfer.data import batched, decoded

    return batched(decoded(split, size, memory_budget=2 * 1024**3 if cache else 0), batch_size)


def keras_predictions(model, split):
    return model.predict(images(split, model.input_shape[1]), verbose=0).argmax(axis=1)


def accuracy(predicted, split):
    import numpy as np

    return float((np.asarray(predicted) == np.asarray(split.labels)).mean())


def judged(predict, splits, row):
    """row with val_accuracy and test_accuracy of predict(split) -> labels."""
    return row | {"val_accuracy": accuracy(predict(splits["validation"]), splits["validation"]),
                  "test_accuracy": accuracy(predict(splits["test"]), splits["test"])}


# The systems --------------------------------------------------------------------------------

def train_as_a_user(arguments, work):
    """(the finished run directory, the wall time) of `transfer train ARGUMENTS --no-evaluate`
    in a subprocess, its runs and a cold $TRANSFER_CACHE_HOME (made anew) in `work`."""
    executable = REPO / ".venv/bin/transfer"
    command = ([str(executable)] if executable.is_file() else [sys.executable, "-m", "transfer"])
    command += ["train", *arguments, "--runs-dir", str(work / "runs"), "--no-evaluate"]
    env = os.environ | {"TRANSFER_CACHE_HOME": str(work / "cache")}
    with open(work / "train.log", "w") as output:
        started = time.perf_counter()
        status = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=output).returncode
        wall = time.perf_counter() - started
    if status != 0:
        tail = (work / "train.log").read_text()[-3000:]
        raise SystemExit(f"{' '.join(command)} failed ({status}):\n{tail}")
    return next((work / "runs").glob("*/*/summary.json")).parent, wall


def run_transfer(labels, backbone, seed, scratch, splits, size, options):
    """One `transfer train` run as a user runs it, with `options` beside the defaults; its
    figures, judged on its model.keras."""
    from transfer.model import load_model
    from transfer.runs import read_split

    work = Path(tempfile.mkdtemp(prefix=f"transfer-{backbone}-{seed}-", dir=scratch))
    run_dir, wall = train_as_a_user(["--labels", str(labels), "--backbone", backbone,
                                     "--seed", str(seed), *options], work)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    if config["image_size"] != size:
        raise SystemExit(f"{run_dir} trained at {config['image_size']} px, not {size}.")
    _, used = read_split(run_dir)
    for key, split in splits.items():
        ours = {os.path.realpath(p) for p in split.paths}
        theirs = {os.path.realpath(p) for p in (used[key].paths if key in used else ())}
        if ours != theirs:
            raise SystemExit(f"{run_dir}/split.csv's {key} split is not the bench's: "
                             f"{len(theirs - ours)} extra, {len(ours - theirs)} missing, e.g. "
                             f"{sorted(theirs ^ ours)[:3]}")
    model = load_model(run_dir / "model.keras")
    return judged(lambda split: keras_predictions(model, split), splits, {
        "seed": seed, "train_wall_s": wall, "summary_val_accuracy": summary.get("val_accuracy"),
        "summary_test_accuracy": summary.get("test_accuracy"),
        "summary_seconds": summary.get("seconds"),
        "best_phase": summary.get("best_phase")})  # "refit" where the refitted head was kept


def run_probe(spec, classes, splits, size, seed):
    """Logistic regression on the frozen backbone's pooled features of the training images."""
    import keras
    from sklearn.linear_model import LogisticRegression

    from transfer.model import build_classifier

    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    classifier = build_classifier(spec, len(classes), size, "imagenet", 0.2)
    pooled = keras.Model(classifier.input, classifier.get_layer("pool").output)
    features = pooled.predict(images(splits["train"], size), verbose=0)
    probe = LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed)
    probe.fit(features, splits["train"].labels)
    wall = time.perf_counter() - started
    iterations = int(max(probe.n_iter_))
    return judged(lambda split: probe.predict(pooled.predict(images(split, size), verbose=0)),
                  splits, {"seed": seed, "train_wall_s": wall, "iterations": iterations,
                           "converged": iterations < PROBE_MAX_ITER})


def run_guide(spec, classes, splits, size, seed):
    """The keras.io guide's two phases on uncached image pipelines."""
    import keras
    import tensorflow as tf

    from transfer.data import batched, decoded
    from transfer.model import backbone_of, build_classifier, set_trainable

    class Progress(keras.callbacks.Callback):
        def __init__(self, phase):
            super().__init__()
            self.phase = phase

        def on_epoch_end(self, epoch, logs=None):
            log(f"  guide {self.phase} epoch {epoch + 1}: "
                + ", ".join(f"{key} {value:.4f}" for key, value in (logs or {}).items()))

    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = build_classifier(spec, len(classes), size, "imagenet", GUIDE["dropout"])
    augment = keras.Sequential([keras.layers.RandomFlip(GUIDE["flip"], seed=seed),
                                keras.layers.RandomRotation(GUIDE["rotation"], seed=seed)],
                               name="guide_augmentation")
    train = batched(decoded(splits["train"], size, memory_budget=0), GUIDE["batch_size"],
                    shuffle_seed=seed)
    train = train.map(lambda x, y: (augment(x, training=True), y),
                      num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    validation = images(splits["validation"], size, GUIDE["batch_size"], cache=False)
    history = {}
    phases = (("head", None, GUIDE["head_epochs"], GUIDE["head_learning_rate"]),
              ("fine_tune", spec.cut, GUIDE["fine_tune_epochs"],
               GUIDE["fine_tune_learning_rate"]))
    for phase, cut, epochs, learning_rate in phases:
        set_trainable(backbone_of(model), cut)
        # recompile: a change of trainable applies only at compile
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        # shuffle=False: the pipeline shuffles itself every epoch (Keras ignores it for tf.data)
        fitted = model.fit(train, epochs=epochs, validation_data=validation, verbose=0,
                           shuffle=False, callbacks=[Progress(phase)])
        history[phase] = fitted.history["val_accuracy"][-1]
    wall = time.perf_counter() - started
    return judged(lambda split: keras_predictions(model, split), splits, {
        "seed": seed, "train_wall_s": wall,
        "fit_val_accuracy": {phase: round(value, 4) for phase, value in history.items()}})


# The report ---------------------------------------------------------------------------------

def medians(rows):
    def rounded(key):
        return round(statistics.median(row[key] for row in rows),
                     1 if key == "train_wall_s" else 4)

    per_seed = [{key: round(value, 4 if "accuracy" in key else 1)
                 if isinstance(value, float) else value for key, value in row.items()}
                for row in rows]
    return {key: rounded(key) for key in (*ACCURACIES, "train_wall_s")} | {"per_seed": per_seed}


def targets(systems):
    """The best peer on each accuracy column, and whether transfer meets the targets (None
    where the systems the target compares were not run)."""
    best = {}
    for key in ACCURACIES:
        scores = [(systems[peer][key], peer) for peer in PEERS if peer in systems]
        if scores:
            value, peer = max(scores)
            best[key] = {"system": peer, "value": value}
    ours = systems.get("transfer")
    met = {key: ours[key] >= best[key]["value"] if ours and key in best else None
           for key in ACCURACIES}
    strictly = {key: ours[key] > best[key]["value"] if ours and key in best else None
                for key in ACCURACIES}
    met["train_wall_below_guide"] = (ours["train_wall_s"] < systems["guide"]["train_wall_s"]
                                     if ours and "guide" in systems else None)
    return best or None, met, strictly


def bench(name, folder, backbone, systems, seeds, guide_seeds, split_seed, transfer_options,
          scratch, limit):
    from transfer.backbones import get_spec

    spec = get_spec(backbone)
    size = spec.default_size
    classes, splits = make_split(name, folder, limit, split_seed)
    rows = split_rows(folder, classes, splits)
    digest = hashlib.sha256("\n".join(",".join(row) for row in rows).encode()).hexdigest()
    labels = write_label_file(Path(tempfile.mkdtemp(prefix="split-", dir=scratch)), name,
                              folder, classes, splits)
    log(f"{name} / {backbone}: {', '.join(f'{len(s)} {k}' for k, s in splits.items())}, "
        f"{len(classes)} classes, {size} px")
    results = {}
    for system in systems:
        per_seed = []
        for seed in seeds[:guide_seeds] if system == "guide" else seeds:
            if system == "transfer":
                row = run_transfer(labels, backbone, seed, scratch, splits, size,
                                   transfer_options)
            else:
                import keras

                keras.backend.clear_session()
                runner = run_probe if system == "probe" else run_guide
                row = runner(spec, classes, splits, size, seed)
            log(f"{name} / {backbone} {system} seed {seed}: val {row['val_accuracy']:.4f}, "
                f"test {row['test_accuracy']:.4f}, {row['train_wall_s']:.1f} s")
            per_seed.append(row)
        results[system] = medians(per_seed)
    best, met, strictly = targets(results)
    return {"bench": "accuracy", "data": name, "backbone": backbone, "image_size": size,
            "limit": limit, "seeds": list(seeds), "guide_seeds": list(seeds[:guide_seeds]),
            "split_seed": split_seed, "transfer_options": transfer_options,
            "split": {key: len(split) for key, split in splits.items()},
            "classes": classes, "split_sha256": digest, "guide_settings": GUIDE,
            "systems": results, "best_peer": best, "targets_met": met,
            "strictly_better": strictly}


def keras_home(scratch, shared):
    """A KERAS_HOME whose models/ links the shared checkpoints."""
    models = scratch / "keras" / "models"
    models.mkdir(parents=True)
    for file in CHECKPOINTS:
        source = shared / "keras" / "models" / file
        if not source.is_file():
            raise SystemExit(f"{source} is missing; see ../shared/README.md.")
        (models / file).symlink_to(source.resolve())
    return models.parent


@contextlib.contextmanager
def bench_space(name, shared, datasets):
    """(a scratch folder, the real stdout) for a bench over `datasets` of `shared`: KERAS_HOME
    links the shared checkpoints, TensorFlow is imported quietly, and inside, stdout goes to
    stderr, so the real stdout holds only the JSON lines."""
    for dataset in datasets:
        if not (shared / "datasets" / dataset).is_dir():
            raise SystemExit(f"{shared / 'datasets' / dataset} is missing; see "
                             "../shared/README.md, or give --shared.")
    # `kill` (SIGTERM) unwinds as Ctrl-C does: subprocess.run kills the `transfer train` it is
    # waiting on, and the scratch folder goes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    stdout = sys.stdout
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch:
        scratch = Path(scratch)
        # Keras reads KERAS_HOME once, at import: set before anything imports it;
        # subprocesses inherit it.
        os.environ["KERAS_HOME"] = str(keras_home(scratch, shared))
        from transfer.quiet import import_tensorflow

        import_tensorflow()
        with contextlib.redirect_stdout(sys.stderr):
            yield scratch, stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=(*DATASETS, "all"), default="all")
    parser.add_argument("--backbone", choices=(*BACKBONES, "all"), default="all")
    parser.add_argument("--system", choices=(*SYSTEMS, "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339],
                        help="every system's seeds")
    parser.add_argument("--guide-seeds", type=int,
                        help="how many of --seeds the guide runs (default: all)")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                        help=f"the split's seed (default: {SPLIT_SEED}, the README's runs'); "
                             "others judge on other test images")
    parser.add_argument("--transfer-options", type=shlex.split, default=[],
                        help="`transfer train` options beside its defaults, as one argument, "
                             "to measure a setting on the same split (e.g. "
                             "--transfer-options=\"--deeper-from block_13_\")")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--limit", type=int, help="at most this many images per class in "
                                                  "each split: smoke tests only")
    args = parser.parse_args()
    if args.guide_seeds is None:
        args.guide_seeds = len(args.seeds)
    if not 1 <= args.guide_seeds <= len(args.seeds):
        parser.error(f"--guide-seeds must be 1 to {len(args.seeds)} (the number of --seeds), "
                     f"not {args.guide_seeds}")
    datasets = DATASETS if args.data == "all" else (args.data,)
    backbones = BACKBONES if args.backbone == "all" else (args.backbone,)
    systems = SYSTEMS if args.system == "all" else (args.system,)
    with bench_space("accuracy", args.shared, datasets) as (scratch, stdout):
        os.environ["TRANSFER_CACHE_HOME"] = str(scratch / "cache")  # the subprocesses' own
        for name in datasets:
            for backbone in backbones:
                result = bench(name, args.shared / "datasets" / name, backbone, systems,
                               args.seeds, args.guide_seeds, args.split_seed,
                               args.transfer_options, scratch, args.limit)
                print(json.dumps(result), file=stdout, flush=True)

if __name__ == "__main__":
    main()
