"""Calibration and unknown images: a cats_dogs model shown flowers, one JSON line per backbone.

For each backbone and each of --seeds, `transfer train --data ../shared/datasets/cats_dogs
--test-split 0.2 --backbone B --seed S` runs in a subprocess as a user runs it (defaults
otherwise, a cold cache), which fits the temperature and the unknown threshold on the
validation images (calibration.json). The seed draws the test split (400 of train/'s 2,000
images) and everything else random. Then, with each run's own model as `transfer predict`
loads it:

- calibration: the 15-bin expected calibration error before (temperature 1) and after
  scaling, on the validation images the temperature was fitted on and on the test images it
  never saw. The target (at most 0.02 after scaling) is judged on the test images of all the
  seeds pooled, each scored by its own run: 400 images alone put a perfectly calibrated
  model's ECE at about 0.019 (median; `noise_floor_test`, drawn from its own confidences),
  so one seed's figure cannot tell 0.02 from 0.01.
- unknown images: every photo of ../shared/datasets/flowers (none of them a cat or a dog)
  against the cats_dogs test images: AUROC and the false-positive rate at 95% true positives
  of each score (mahalanobis, energy, max_probability), and the share of each set the stored
  threshold rejects. Target: AUROC at least 0.95 for mobilenetv2, for the score the tool uses.
- what --reject costs, on the validation and on the test images: accuracy without rejecting,
  the share rejected, the accuracy on the images kept, and the accuracy when each rejected
  image counts as wrong. The Mahalanobis score's statistics are fitted on the validation
  images, which therefore score higher than new ones: the test images' figures are the
  honest ones.

Prints one JSON line per backbone: each seed's figures, their medians, and the pooled ECE.

    .venv/bin/python bench/unknown.py --backbone mobilenet_025
    .venv/bin/python bench/unknown.py --backbone mobilenetv2 --run runs/cats_dogs/<run> ...
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accuracy import bench_space, log, train_as_a_user  # noqa: E402  (the same set-up)

BACKBONES = ("mobilenet_025", "mobilenetv2")
TEST_SPLIT = 0.2
ECE_TARGET = 0.02
AUROC_TARGET = {"mobilenetv2": 0.95}


def train(backbone, seed, shared, scratch):
    """A finished run directory of `transfer train` on cats_dogs, and its wall time."""
    work = Path(tempfile.mkdtemp(prefix=f"unknown-{backbone}-{seed}-", dir=scratch))
    return train_as_a_user(["--data", str(shared / "datasets" / "cats_dogs"), "--backbone",
                            backbone, "--test-split", str(TEST_SPLIT), "--seed", str(seed)],
                           work)


def noise_floor(probabilities, draws=1000, seed=0):
    """The median and 90% range of the ECE of a perfectly calibrated model with these
    confidences: each image's label drawn from its own predicted probabilities."""
    import numpy as np

    from transfer import calibrate

    rng = np.random.default_rng(seed)
    cumulative = probabilities.cumsum(axis=1)
    eces = [calibrate.expected_calibration_error(probabilities, (
        rng.random((len(probabilities), 1)) > cumulative).sum(axis=1)) for _ in range(draws)]
    return {"median": float(np.median(eces)),
            "p05_p95": [float(np.quantile(eces, 0.05)), float(np.quantile(eces, 0.95))]}


def measure(run_dir, flowers):
    """(the figures of one run, its test logits and labels)."""
    import numpy as np

    from transfer import calibrate
    from transfer.check import list_images
    from transfer.evaluate import predict_files
    from transfer.model import scored
    from transfer.runs import load_run_model, read_split, tta_flip

    if not (Path(run_dir) / calibrate.CALIBRATION).is_file():
        raise SystemExit(f"{run_dir} has no {calibrate.CALIBRATION}: it was trained before "
                         "transfer calibrated its runs; train it again.")
    model, classes, _ = load_run_model(run_dir)
    calibration = calibrate.read(run_dir)
    raw_model = scored(model, flip=tta_flip(run_dir), raw=True)
    _, splits = read_split(run_dir)

    def outputs_of(paths):
        return predict_files(raw_model, list(paths))[1]

    figures = {"run": str(run_dir), "classes": classes,
               "temperature": calibration.temperature, "score": calibration.score,
               "keep": calibration.keep, "threshold": calibration.to_dict()["threshold"]}
    outputs, logits, labels = {}, {}, {}
    for name in ("validation", "test"):
        outputs[name], labels[name] = outputs_of(splits[name].paths), np.asarray(
            splits[name].labels)
        logits[name] = outputs[name]["logits"]
        figures[f"{name}_images"] = len(labels[name])
        figures[f"ece_before_{name}"] = calibrate.expected_calibration_error(
            calibrate.softmax(logits[name]), labels[name])
        figures[f"ece_after_{name}"] = calibrate.expected_calibration_error(
            calibrate.softmax(logits[name], calibration.temperature), labels[name])
    figures["noise_floor_test"] = noise_floor(
        calibrate.softmax(logits["test"], calibration.temperature))
    other = [str(path) for cls in sorted(p for p in flowers.iterdir() if p.is_dir())
             for path in list_images(cls).images]
    outputs["flowers"] = outputs_of(other)
    logits["flowers"] = outputs["flowers"]["logits"]
    figures["flowers_images"] = len(other)

    def score(name, kind):
        return calibrate.score_of(calibration, outputs[name], kind)

    figures["separation"] = {kind: calibrate.separation(score("test", kind),
                                                        score("flowers", kind))
                             for kind in calibrate.available_scores(calibration)}
    for name in ("test", "flowers"):
        figures[f"rejected_{name}"] = float(
            (score(name, calibration.score) < calibration.threshold).mean())
    for name in ("validation", "test"):  # the Mahalanobis statistics were fitted on the first
        kept = score(name, calibration.score) >= calibration.threshold
        correct = logits[name].argmax(axis=1) == labels[name]
        figures[f"reject_cost_{name}"] = {
            "accuracy": float(correct.mean()), "rejected": float(1 - kept.mean()),
            "accuracy_of_kept": float(correct[kept].mean()),
            "accuracy_rejected_counted_wrong": float((correct & kept).mean())}
    predicted = logits["flowers"].argmax(axis=1)
    figures["flowers_called"] = {cls: int((predicted == i).sum()) for i, cls in enumerate(classes)}
    return figures, logits["test"], labels["test"]


def pooled(measured):
    """The ECE over every run's test images: before scaling, after (each run's logits at its
    own temperature), and, as a diagnostic the tool cannot use, at the temperature each run's
    own test images would have chosen (`oracle_*`: what scaling could give at best)."""
    import numpy as np

    from transfer import calibrate

    oracle = [calibrate.fit_temperature(logits, run_labels) for _, logits, run_labels in measured]
    labels = np.concatenate([run_labels for _, _, run_labels in measured])

    def ece(temperatures):
        probabilities = np.concatenate([calibrate.softmax(logits, temperature) for
                                        (_, logits, _), temperature in zip(measured, temperatures)])
        return calibrate.expected_calibration_error(probabilities, labels), probabilities

    after, probabilities = ece([figures["temperature"] for figures, _, _ in measured])
    return {"test_images": len(labels), "ece_before_test": ece([1.0] * len(measured))[0],
            "ece_after_test": after, "noise_floor_test": noise_floor(probabilities),
            "oracle_temperatures": oracle, "oracle_ece_test": ece(oracle)[0]}


def medians(figures):
    """The median over runs of every number the runs' figures share at the top level (their
    seeds aside), and of the separation figures."""
    numbers = [key for key, value in figures[0].items() if key != "seed"
               and isinstance(value, (int, float)) and not isinstance(value, bool)]
    middle = {key: statistics.median(figure[key] for figure in figures) for key in numbers}
    middle["separation"] = {kind: {key: statistics.median(f["separation"][kind][key]
                                                          for f in figures)
                                   for key in separation}
                            for kind, separation in figures[0]["separation"].items()}
    return middle


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=(*BACKBONES, "all"), default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339],
                        help="one run per seed; the ECE target is judged on their test "
                             "images pooled")
    parser.add_argument("--run", type=Path, nargs="+",
                        help="measure these finished cats_dogs runs instead of training "
                             "(one backbone)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    backbones = BACKBONES if args.backbone == "all" else (args.backbone,)
    if args.run and len(backbones) != 1:
        raise SystemExit("--run measures runs of one backbone: give its --backbone too.")
    with bench_space("unknown", args.shared, ("cats_dogs", "flowers")) as (scratch, stdout):
        for backbone in backbones:
            runs = ([(run, None, None) for run in args.run] if args.run
                    else [(*train(backbone, seed, args.shared, scratch), seed)
                          for seed in args.seeds])
            measured = []
            for run_dir, wall, seed in runs:
                log(f"{backbone}: measuring {run_dir}")
                figures, logits, labels = measure(run_dir, args.shared / "datasets" / "flowers")
                measured.append(({"seed": seed, "train_wall_s": wall, **figures}, logits,
                                 labels))
            per_run = [figures for figures, _, _ in measured]
            middle, pool = medians(per_run), pooled(measured)
            auroc = middle["separation"][per_run[0]["score"]]["auroc"]
            targets = {"ece_after_test_pooled_at_most_0.02": pool["ece_after_test"] <= ECE_TARGET,
                       "median_auroc_at_least_0.95": (auroc >= AUROC_TARGET[backbone]
                                                      if backbone in AUROC_TARGET else None)}
            line = {"bench": "unknown", "backbone": backbone, "score": per_run[0]["score"],
                    "pooled": pool, "median": middle, "targets_met": targets, "runs": per_run}
            print(json.dumps(line), file=stdout, flush=True)


if __name__ == "__main__":
    main()
