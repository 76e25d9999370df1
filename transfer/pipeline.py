"""The steps of a run, in order: check the data, train, evaluate; and export a finished run.

The one module that calls the others in sequence; none of them reaches back up into it or
into each other's steps. The command line (transfer.cli) calls these functions.
"""

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from transfer.files import write_atomic, write_json

log = logging.getLogger(__name__)


def train(cfg, verbose="auto"):
    """Train a classifier as `cfg` says in a new run directory, which it returns."""
    from transfer import check, data, distribute, layouts, runs
    from transfer.backbones import get_spec
    from transfer.train import build, devices

    spec = get_spec(cfg.backbone)
    image_size = cfg.image_size or spec.default_size
    data_name, data_dir, labels = layouts.resolve(cfg.data, cfg.labels)
    layout = layouts.find_layout(data_dir, labels, cfg.label_pattern, multi_label=cfg.multi_label)
    cfg = dataclasses.replace(cfg, multi_label=layout.multi_label).validate()  # as detected
    classes = layout.classes
    # Built before anything is written: missing ImageNet weights or a wrong cut stop it here.
    strategy, jit = devices(cfg)
    with strategy.scope():
        model = build(cfg, spec, len(classes), image_size)
    if not distribute.is_chief(strategy):  # another worker of a multi-worker run: the chief's
        run_dir = _shared_run_dir(strategy, None)
        classes, splits = runs.read_split(run_dir)
        return _train_and_evaluate(model, cfg, spec, run_dir, classes, splits, verbose,
                                   strategy, jit)

    started = time.time()
    reports = layouts.check_layout(layout)
    log.info("%s (checked in %.1f s)", check.summary_line(data_name, classes, reports,
                                                          layout.describe()),
             time.time() - started)
    for message in check.warnings_for(reports):
        log.warning("Warning: %s", message)
    for path, reason in (item for report in reports for item in report.bad):
        log.warning("Set aside %s: %s", path, reason)
    splits = data.assign_splits(reports, classes, cfg.validation_split, cfg.test_split,
                                cfg.seed, cfg.multi_label)

    saved = cfg.to_dict() | {"image_size": image_size, "data_dir": os.path.abspath(data_dir),
                             "data_name": data_name, "layout": layout.kind}
    if cfg.weights_file() is not None:  # found again from any folder
        saved["weights"] = os.path.abspath(cfg.weights_file())
    if labels is not None:
        saved["labels"] = os.path.abspath(labels)
    parent = Path(cfg.runs_dir) / data_name
    # Restarted workers run the same command again: it continues their unfinished run.
    run_dir = _unfinished_run(parent, saved) if cfg.strategy == "multiworker" else None
    if run_dir is not None:
        log.info("Continuing the unfinished multi-worker run with the same settings: %s",
                 run_dir)
        classes, splits = runs.read_split(run_dir)
    else:
        run_dir = runs.new_run_dir(parent, cfg.backbone)
        log.info("Run directory: %s", run_dir)
        write_json(run_dir / "config.json", saved)
        write_json(run_dir / "classes.json", classes)
        write_json(run_dir / "versions.json", runs.library_versions())
        runs.write_bad_files(run_dir, [item for report in reports for item in report.bad])
        runs.write_split(run_dir, classes, splits)
    if cfg.strategy == "multiworker":
        _shared_run_dir(strategy, run_dir)
    return _train_and_evaluate(model, cfg, spec, run_dir, classes, splits, verbose, strategy,
                               jit)


def resume(run_dir, verbose="auto"):
    """Continue an interrupted run from its last completed epoch; returns the run directory."""
    from transfer.backbones import get_spec
    from transfer.config import field_names, resolve
    from transfer.runs import read_split
    from transfer.train import build, devices

    run_dir = Path(run_dir)
    if not (run_dir / "split.csv").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory that can be resumed; expected "
                                f"{run_dir}/config.json and split.csv from `transfer train`.")
    if (run_dir / "summary.json").is_file():
        raise ValueError(f"{run_dir} has finished (it has summary.json); nothing to resume.")
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = resolve(None, {key: value for key, value in saved.items() if key in field_names()})
    classes, splits = read_split(run_dir)
    missing = [path for split in splits.values() for path in split.paths
               if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) of this run's split are gone, e.g. "
                                f"{missing[0]}; restore them or start a new run.")
    spec = get_spec(cfg.backbone)
    log.info("Resuming %s: %s on %s, %s images", run_dir, cfg.backbone, saved["data_dir"],
             ", ".join(f"{len(split)} {name}" for name, split in splits.items()))
    strategy, jit = devices(cfg)
    with strategy.scope():
        model = build(cfg, spec, len(classes), cfg.image_size)
    return _train_and_evaluate(model, cfg, spec, run_dir, classes, splits, verbose, strategy,
                               jit)


def _train_and_evaluate(model, cfg, spec, run_dir, classes, splits, verbose, strategy, jit):
    """Fit in the strategy's scope; then, outside it (one device predicts: Keras's
    predict_on_batch repeats a dict of outputs per replica), the calibration, the learning
    curves, the reports on the test images (test/) and on the validation images, and
    summary.json, which marks the run finished: on the chief alone, while the other workers
    of a multi-worker run wait."""
    from transfer import calibrate, distribute, multiworker, tracking
    from transfer.board import Board
    from transfer.evaluate import accuracy, evaluate, plot_learning_curves
    from transfer.model import load_model
    from transfer.runs import read_bad_files, tta_flip
    from transfer.train import fit_run, write_summary

    started = time.time()
    with strategy.scope(), distribute.restart_on_lost_worker(strategy):
        if cfg.strategy == "multiworker":
            history = multiworker.fit_run(model, cfg, spec, run_dir, classes, splits["train"],
                                          splits["validation"], verbose)
            cached = None
        else:
            history, cached = fit_run(model, cfg, spec, run_dir, classes, splits["train"],
                                      splits["validation"], verbose, jit)
    several = distribute.worker_count(strategy) > 1
    if not distribute.is_chief(strategy):
        log.info("Trained; waiting for the chief to write the model and its reports.")
        with distribute.restart_on_lost_worker(strategy):
            distribute.from_chief(strategy, [0])
        return run_dir
    if cfg.strategy == "multiworker":  # predicting on the chief alone: no collective ops
        model = load_model(run_dir / "model.keras")
    plot_learning_curves(history, run_dir / "learning_curves.png")
    seconds = time.time() - started  # training's; the reports after it are not counted
    validated = calibrate_run(model, run_dir, splits["validation"], cfg.keep, cached)
    test = splits.get("test")
    test_accuracy = None
    flips = tta_flip(run_dir)
    if cfg.evaluate:
        if test:
            test_accuracy = evaluate(model, classes, test.paths, test.labels, run_dir / "test",
                                     run_dir=run_dir, split="test", flips=flips)["accuracy"]
        evaluate(model, classes, splits["validation"].paths, splits["validation"].labels,
                 run_dir, run_dir=run_dir, set_aside=read_bad_files(run_dir),
                 split="validation", test_accuracy=test_accuracy, flips=flips,
                 predictions=validated)
    elif test:
        test_accuracy = accuracy(model, test.paths, test.labels, flips,
                                 calibrate.read(run_dir))
    write_summary(run_dir, history, seconds, test_accuracy)
    Board(run_dir).images({"learning_curves": run_dir / "learning_curves.png",
                           "confusion_matrix": run_dir / "confusion_matrix.png",
                           "per_label": run_dir / "per_label.png"},  # whichever the run has
                          step=history[-1]["epoch"])
    if tracking.wanted(cfg):
        tracking.log_run(run_dir)
    if several:  # the other workers wait for this
        distribute.from_chief(strategy, [0])
    return run_dir


def _unfinished_run(parent, saved):
    """The newest unfinished run under parent whose config.json is `saved`, or None."""
    candidates = sorted((run for run in Path(parent).glob("*")
                         if (run / "split.csv").is_file() and not (run / "summary.json").is_file()),
                        key=lambda run: (run / "split.csv").stat().st_mtime, reverse=True)
    for run in candidates:
        try:
            if json.loads((run / "config.json").read_text()) == saved:
                return run
        except (OSError, ValueError):  # not a run of this tool's: not ours to continue
            continue
    return None


def _shared_run_dir(strategy, run_dir):
    """The chief's run directory (`run_dir` on the chief, None on the others), on every worker
    of a multi-worker run; FileNotFoundError on all of them unless all see it."""
    from transfer import distribute

    run_dir = Path(distribute.text_from_chief(strategy, str(Path(run_dir).resolve())
                                              if run_dir else ""))
    unseen = distribute.total(strategy, [not (run_dir / "split.csv").is_file()])[0]
    if unseen:
        raise FileNotFoundError(
            f"{unseen:.0f} worker(s) cannot see the chief's run directory {run_dir}: with "
            "--strategy multiworker, put --runs-dir on storage that every worker sees at the "
            "same path, as every worker reads the split and restores the chief's checkpoints "
            "there.")
    return run_dir


def calibrate_run(model, run_dir, validation, keep, outputs=None):
    """Fit the temperature and the unknown-image threshold on the validation images (as the
    run predicts them: with its test-time augmentation) and write calibration.json.
    outputs: model.scored's raw {"logits", "features"} for them, where training has them
    (from its caches); else they are predicted from the images.

    Returns (the decoded images, model.scored's calibrated outputs for them, raw=True), which
    the validation report takes instead of predicting them again."""
    from transfer import calibrate
    from transfer.evaluate import load_images, predict_files
    from transfer.model import scored
    from transfer.runs import tta_flip

    if outputs is None:
        images, outputs = predict_files(scored(model, flip=tta_flip(run_dir), raw=True),
                                        validation.paths)
    else:
        images = load_images(validation.paths, model.input_shape[1])
    calibration, figures = calibrate.calibrate(outputs, validation.labels, keep)
    calibrate.write(run_dir, calibration, figures)
    if "score_fallback" in figures:
        log.warning("Warning: unknown images are scored by %s.", figures["score_fallback"])
    log.info("Calibrated on %d validation images: temperature %.3f (log loss %.4f -> %.4f, "
             "ECE %.4f -> %.4f); %s score below %.4g is unknown (keeps %.0f%%)",
             len(validation.paths), calibration.temperature, figures["nll_before"],
             figures["nll_after"], figures["ece_before"], figures["ece_after"],
             calibration.score, calibration.threshold, 100 * keep)
    if calibration.multi_label:
        classes = json.loads((Path(run_dir) / "classes.json").read_text())
        log.info("Decision thresholds, each label's best F1 on the validation images: %s",
                 ", ".join(f"{name} {threshold:.3f}"
                           for name, threshold in zip(classes, calibration.decision_thresholds(
                               len(classes)))))
    return images, calibrate.apply(calibration, outputs)


def export_run(run_dir, name=None, output="saved_models", formats=(), eval_images=1000,
               calibration_images=200, tta=None):
    """Export a finished run as saved_models/<name>/<next version>/, checked against the
    model; with formats ("tflite", "onnx") also those, each measured against it. With
    test-time augmentation (`tta`, default: the run's setting) the signatures average each
    image with its mirror images inside the graph. Every format applies the run's
    calibration (calibration.json) and returns the in-class score beside the probabilities.

    Returns (the version folder, the formats' reports or None); a format that misses its bar
    is kept, and its report (formats.json) says so.
    """
    from transfer import calibrate, tracking
    from transfer.data import dataset_name
    from transfer.export import export_savedmodel
    from transfer.model import load_model
    from transfer.runs import sample_images, tta_flip

    run_dir = Path(run_dir)
    model_file = run_dir / "model.keras"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} does not exist; expected a run directory of "
                                "`transfer train`.")
    run_config = json.loads((run_dir / "config.json").read_text())
    classes = json.loads((run_dir / "classes.json").read_text())
    name = (name or run_config.get("data_name")  # older runs: their data folder's name
            or Path(dataset_name(run_config["data_dir"])).name)
    model = load_model(model_file)
    flips = tta_flip(run_dir, tta)
    if flips != "none" and formats:
        raise ValueError(f"--format {' '.join(formats)} converts the model without test-time "
                         "augmentation; export those with --no-tta.")
    run_config = run_config | {"tta": flips != "none"}
    size = model.input_shape[1]
    # Conversions are measured on eval_images; the SavedModel alone is checked on a few.
    check_images, check_labels = sample_images(run_dir, "validation", size,
                                               eval_images if formats else 8)
    calibration = calibrate.read(run_dir)
    run_config = run_config | {"calibration": calibration.to_dict()}
    target = export_savedmodel(model, classes, Path(output) / name, calibration, flips,
                               sample_images=check_images[:8], config=run_config)
    tracking.log_export(run_dir, target)
    if not formats:
        return target, None
    from transfer import formats as conversions

    representative, _ = sample_images(run_dir, "train", size, calibration_images)  # for int8
    extra = target / "assets.extra"
    write_atomic(extra / "labels.txt", "\n".join(classes) + "\n")
    written = conversions.convert(model, formats, extra, representative, calibration)
    reports = conversions.evaluate({"savedmodel": target, **written}, check_images, check_labels)
    conversions.write_report(reports, extra / "formats.json")
    return target, reports
