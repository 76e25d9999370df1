"""Calibration and unknown images: a cats_dogs model shown flowers, one JSON line per backbone.

For each backbone, `transfer train --data ../shared/datasets/cats_dogs --test-split 0.2
--backbone B` runs in a subprocess as a user runs it (defaults otherwise, a cold cache), which
fits the temperature and the unknown threshold on the validation images
(calibration.json). Then, with the run's own model as `transfer predict` loads it:

- calibration: the 15-bin expected calibration error before (temperature 1) and after
  scaling, on the validation images the temperature was fitted on and on the test images it
  never saw; the target (at most 0.02 after scaling) is judged on the test images.
- unknown images: every photo of ../shared/datasets/flowers (none of them a cat or a dog)
  against the cats_dogs test images: AUROC and the false-positive rate at 95% true positives
  of each score (energy, max_probability), and the share of each set the stored threshold
  rejects. Target: AUROC at least 0.95 for mobilenetv2, for the score the tool uses.
- what --reject costs: validation accuracy without rejecting, the share rejected, the
  accuracy on the images kept, and the accuracy when each rejected image counts as wrong.

    .venv/bin/python bench/unknown.py --backbone mobilenet_025
    .venv/bin/python bench/unknown.py --backbone mobilenetv2 --run runs/cats_dogs/<run>
"""

import argparse
import json
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


def train(backbone, shared, scratch):
    """A finished run directory of `transfer train` on cats_dogs, and its wall time."""
    work = Path(tempfile.mkdtemp(prefix=f"unknown-{backbone}-", dir=scratch))
    return train_as_a_user(["--data", str(shared / "datasets" / "cats_dogs"), "--backbone",
                            backbone, "--test-split", str(TEST_SPLIT)], work)


def measure(run_dir, flowers):
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
    logits_model = scored(model, flip=tta_flip(run_dir), logits=True)
    _, splits = read_split(run_dir)

    def logits_of(paths):
        return predict_files(logits_model, list(paths))[1]["logits"]

    figures = {"run": str(run_dir), "classes": classes,
               "temperature": calibration.temperature, "score": calibration.score,
               "keep": calibration.keep, "threshold": calibration.to_dict()["threshold"]}
    logits, labels = {}, {}
    for name in ("validation", "test"):
        logits[name], labels[name] = logits_of(splits[name].paths), np.asarray(
            splits[name].labels)
        figures[f"{name}_images"] = len(labels[name])
        figures[f"ece_before_{name}"] = calibrate.expected_calibration_error(
            calibrate.softmax(logits[name]), labels[name])
        figures[f"ece_after_{name}"] = calibrate.expected_calibration_error(
            calibrate.softmax(logits[name], calibration.temperature), labels[name])
    other = [str(path) for cls in sorted(p for p in flowers.iterdir() if p.is_dir())
             for path in list_images(cls).images]
    logits["flowers"] = logits_of(other)
    figures["flowers_images"] = len(other)

    def score(name, kind):
        return calibrate.scores(logits[name], calibration.temperature, kind)

    figures["separation"] = {kind: calibrate.separation(score("test", kind),
                                                        score("flowers", kind))
                             for kind in calibrate.SCORES}
    for name in ("test", "flowers"):
        figures[f"rejected_{name}"] = float(
            (score(name, calibration.score) < calibration.threshold).mean())
    kept = score("validation", calibration.score) >= calibration.threshold
    correct = logits["validation"].argmax(axis=1) == labels["validation"]
    figures["reject_cost_validation"] = {
        "accuracy": float(correct.mean()), "rejected": float(1 - kept.mean()),
        "accuracy_of_kept": float(correct[kept].mean()),
        "accuracy_rejected_counted_wrong": float((correct & kept).mean())}
    predicted = logits["flowers"].argmax(axis=1)
    figures["flowers_called"] = {cls: int((predicted == i).sum()) for i, cls in enumerate(classes)}
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=(*BACKBONES, "all"), default="all")
    parser.add_argument("--run", type=Path, help="measure this finished cats_dogs run instead "
                                                 "of training one (one backbone)")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    backbones = BACKBONES if args.backbone == "all" else (args.backbone,)
    if args.run and len(backbones) != 1:
        raise SystemExit("--run measures one run: give its --backbone too.")
    with bench_space("unknown", args.shared, ("cats_dogs", "flowers")) as (scratch, stdout):
        for backbone in backbones:
            run_dir, wall = (args.run, None) if args.run else train(backbone, args.shared,
                                                                     scratch)
            log(f"{backbone}: measuring {run_dir}")
            figures = measure(run_dir, args.shared / "datasets" / "flowers")
            auroc = figures["separation"][figures["score"]]["auroc"]
            targets = {"ece_after_test_at_most_0.02":
                       figures["ece_after_test"] <= ECE_TARGET,
                       "auroc_at_least_0.95": (auroc >= AUROC_TARGET[backbone]
                                               if backbone in AUROC_TARGET else None)}
            line = {"bench": "unknown", "backbone": backbone, "train_wall_s": wall,
                    **figures, "targets_met": targets}
            print(json.dumps(line), file=stdout, flush=True)


if __name__ == "__main__":
    main()
