"""The evaluation report: how good the model is, where it fails, and what it looks at.

evaluate() writes, into one folder: metrics.json, report.html and the PNGs the page shows
(confusion matrix, reliability diagram before and after calibration, learning curves, the most
confidently wrong images, Grad-CAM heatmaps, the first layer's filters and feature maps at three
depths before and after fine-tuning; with images of none of the classes, how the in-class score
tells them apart). The page needs no network: its images are files beside it.

A multi-label model (a sigmoid per label) is judged by each label's decision, its calibrated
probability at or above the label's threshold: per-label precision, recall, F1 and average
precision, micro and macro F1, mean average precision, subset accuracy and Hamming loss, a
per-label chart in place of the confusion matrix, the most confidently wrong labels and
Grad-CAM per predicted label.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
from pathlib import Path

import keras
import numpy as np

from transfer.files import atomic_path, write_atomic, write_json

log = logging.getLogger(__name__)

GALLERY = 12  # images in the gallery of confident mistakes
GRADCAM_SAMPLES = 6  # correct and wrong images each, with Grad-CAM
SCORE_BINS = 30  # of the histogram of in-class scores


@dataclasses.dataclass(frozen=True)
class Others:
    """Images of none of the model's classes: how well the in-class score tells them from the
    images evaluated, and how many of them the run's threshold rejects."""

    folder: str
    paths: tuple
    set_aside: tuple = ()  # (path, reason): files and folders that could not be used


def other_images(folder):
    """Others of every image under `folder`, searched recursively; files that do not decode,
    links not followed and folders that cannot be read are set aside."""
    from transfer.check import check_files, list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; --unknown expects a folder of images "
                                "of none of the model's classes (searched recursively).")
    listing = list_images(folder)
    verdicts = check_files(listing.images)
    set_aside = [*listing.problems,
                 *((path, verdicts[path]) for path in listing.images if verdicts[path])]
    for path, reason in set_aside:
        log.warning("Set aside %s: %s", path, reason)
    paths = tuple(str(path) for path in listing.images if verdicts[path] is None)
    if not paths:
        raise ValueError(f"{folder} has no readable images ({len(set_aside)} set aside, "
                         f"{len(listing.skipped)} without an image extension); --unknown "
                         "expects a folder of images of none of the model's classes.")
    return Others(str(folder), paths, tuple(set_aside))


def evaluate_folder(model_path, folder, output=None, labels=None, label_pattern=None, tta=None,
                    unknown=None):
    """Evaluate on a folder's images: <class>/ folders, a label file or file-name labels (for
    a multi-label model, a label file whose rows may hold several labels); returns the output
    folder (default: the run directory, or the .keras file's folder).

    unknown: a folder of images of none of the classes, to measure the in-class score on."""
    from transfer.layouts import resolve
    from transfer.runs import load_run_model, tta_flip

    model, classes, run_dir = load_run_model(model_path)
    if folder is None and labels is None:
        raise ValueError("Give the images to evaluate: a folder of <class>/ folders, or "
                         "--labels FILE.")
    _, folder, labels = resolve(folder, labels) if labels else (None, Path(folder), None)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; expected {folder}/<class>/*.jpg with "
                                f"the model's classes ({', '.join(classes)}).")
    paths, targets, set_aside = _folder_images(model, classes, folder, labels, label_pattern)
    for path, reason in set_aside:
        log.warning("Set aside %s: %s", path, reason)
    others = other_images(unknown) if unknown is not None else None
    model_path = Path(model_path)
    target = (Path(output) if output
              else run_dir or (model_path if model_path.is_dir() else model_path.parent))
    evaluate(model, classes, paths, targets, target, run_dir=run_dir, set_aside=set_aside,
             split=f"{folder.resolve().name}/", flips=tta_flip(run_dir, tta), unknown=others)
    return target


def _folder_images(model, classes, folder, labels, label_pattern):
    """(paths, their labels, the files set aside) of a folder's checked layout: class indices,
    or for a multi-label model multi-hot rows."""
    from transfer.data import as_split
    from transfer.layouts import check_layout, find_layout
    from transfer.model import is_multi_label

    multi_label = is_multi_label(model)
    reports = check_layout(find_layout(folder, labels, label_pattern, classes,
                                       multi_label=multi_label), False)
    if multi_label:  # each image once, with its multi-hot row
        splits = [as_split(report, classes, multi_label=True) for report in reports]
        pairs = [pair for split in splits for pair in zip(split.paths, split.labels)]
    else:
        pairs = [(str(p), classes.index(c)) for report in reports for c in classes
                 for p in report.good[c]]
    set_aside = [item for report in reports for item in report.bad]
    return [p for p, _ in pairs], [label for _, label in pairs], set_aside


def load_images(paths, size):
    """uint8 images [N, size, size, 3] of image files (a quarter of float32's memory)."""
    from transfer.images import load_image

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return np.stack(list(pool.map(lambda path: load_image(path, size), paths)))


def predict_files(model, paths, batch_size=32):
    """(uint8 images [N, H, W, 3], the model's outputs for them) of image files: for a
    model.scored model, {"probabilities", "score"[, "logits", "features"]: arrays [N, ...]}."""
    images = load_images(paths, model.input_shape[1])
    batches = [model.predict_on_batch(images[i:i + batch_size].astype("float32"))
               for i in range(0, len(images), batch_size)]
    return images, {key: np.concatenate([batch[key] for batch in batches])
                    for key in batches[0]}


def accuracy(model, paths, labels, flips="none", calibration=None):
    """The share of `paths` classified right: the top class is the label, or for a
    multi-label model every label's decision is (subset accuracy; `calibration`'s
    probabilities and thresholds, None: temperature 1 and 0.5 for every label)."""
    from transfer.model import is_multi_label, scored

    if is_multi_label(model):
        calibration = model_calibration(model, calibration)
        probabilities = predict_files(scored(model, calibration, flips),
                                      paths)[1]["probabilities"]
        truth = multi_hot(labels, probabilities.shape[1])
        return float((calibration.decisions(probabilities) == truth).all(axis=1).mean())
    probabilities = predict_files(scored(model, flip=flips), paths)[1]["probabilities"]
    return float((probabilities.argmax(axis=1) == np.asarray(labels)).mean())


def model_calibration(model, calibration):
    """`calibration` (a run's, or None) checked against `model`; a multi-label model's
    uncalibrated one is the sigmoids at temperature 1, scored by the joint energy, every
    label decided at 0.5."""
    from transfer import calibrate
    from transfer.model import is_multi_label

    multi = is_multi_label(model)
    if calibration is None or (multi and calibration == calibrate.Calibration()):
        return (calibrate.Calibration(score=calibrate.MULTI_LABEL_SCORE, multi_label=True)
                if multi else calibrate.Calibration())
    if calibration.multi_label != multi:
        kinds = ("single-label (softmax)", "multi-label (sigmoid)")
        raise ValueError(f"The model is {kinds[multi]} but its calibration is "
                         f"{kinds[calibration.multi_label]}; calibration.json belongs to "
                         "another run. Evaluate the run directory the model came from.")
    return calibration


def multi_hot(labels, count):
    """Multi-hot labels [N, count] as booleans; ValueError unless they have that shape."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != count:
        raise ValueError(f"A multi-label model's labels are multi-hot rows of 0s and 1s, one "
                         f"column per label ({count}); received an array of shape "
                         f"{labels.shape}. Give each image's row of its {count} labels.")
    return labels > 0


def evaluate(model, classes, paths, labels, output, run_dir=None, set_aside=(),
             split="validation", test_accuracy=None, flips="none", unknown=None,
             predictions=None):
    """Write metrics.json, report.html and its PNGs into output; returns the metrics.

    split names the images on the page ("validation", "test", a folder's name); test_accuracy,
    when given, is shown beside them, with a link to the test images' report in output/test/.
    flips: the logits average each image with its mirror images of these flips (model.scored);
    "none", the image alone. The probabilities are calibrated by the run's calibration.json
    (none: temperature 1, nothing rejected). unknown: Others, images of none of the classes.
    For a multi-label model labels are multi-hot rows [N, C], each label decided by its
    calibrated probability at or above the calibration's threshold for it.
    predictions: (images, outputs) of `paths` as predict_files gives them for this scoring,
    when the caller has them already (training's calibration, on the validation images).
    """
    from transfer import calibrate
    from transfer.model import scored

    if not paths:
        raise ValueError("No readable images to evaluate on; expected <folder>/<class>/*.jpg.")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    calibration = model_calibration(model, calibrate.read(run_dir))
    labels = (multi_hot(labels, len(classes)).astype(int) if calibration.multi_label
              else np.asarray(labels))
    if not calibration.multi_label and labels.ndim != 1:
        raise ValueError(f"A single-label model's labels are class indices [images]; received "
                         f"an array of shape {labels.shape}. Multi-hot labels need a model "
                         "trained with --multi-label.")
    scoring = scored(model, calibration, flips, raw=True)
    images, outputs = predictions or predict_files(scoring, paths)
    probabilities = outputs["probabilities"]
    metrics, figures, explained = (
        _label_results(classes, paths, labels, images, probabilities, calibration, output)
        if calibration.multi_label
        else _class_results(classes, paths, labels, images, probabilities, output))
    return _report(model, classes, paths, labels, images, outputs, output, run_dir, set_aside,
                   split, test_accuracy, flips, unknown, scoring, calibration, metrics, figures,
                   explained)


def _class_results(classes, paths, labels, images, probabilities, output):
    """A single-label model's part of evaluate(): (metrics, figures, what Grad-CAM shows),
    the top class the prediction. Per class and their macro average by class_scores, the
    confusion matrix, ROC AUC for two classes, the most confidently wrong images."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    predicted = probabilities.argmax(axis=1)
    per_class, macro = class_scores(labels, predicted, classes)
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    auc = (float(roc_auc_score(labels, probabilities[:, 1]))
           if len(classes) == 2 and len(set(labels.tolist())) == 2 else None)
    confidence = probabilities[np.arange(len(paths)), predicted]
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong])]
    right = np.flatnonzero(predicted == labels)
    right = right[np.argsort(-confidence[right])]
    metrics = {
        "accuracy": float((predicted == labels).mean()), "roc_auc": auc,
        "classes": classes, "per_class": per_class, "macro_avg": macro,
        "confusion_matrix": matrix.tolist(),
        "most_confidently_wrong": [
            {"path": paths[i], "true": classes[labels[i]], "predicted": classes[predicted[i]],
             "probability": float(confidence[i])} for i in wrong[:GALLERY]]}
    figures = {"confusion_matrix": plot_confusion_matrix(matrix, classes,
                                                         output / "confusion_matrix.png")}
    if len(wrong):
        figures["top_losses"] = plot_gallery(
            images[wrong[:GALLERY]],
            [f"true {classes[labels[i]]}\npredicted {classes[predicted[i]]} "
             f"{confidence[i]:.2f}" for i in wrong[:GALLERY]], output / "top_losses.png")
    samples = np.concatenate([right[:GRADCAM_SAMPLES], wrong[:GRADCAM_SAMPLES]])
    explained = (samples, predicted[samples],
                 [f"{'right' if labels[i] == predicted[i] else 'WRONG'}: {classes[predicted[i]]} "
                  f"{confidence[i]:.2f}\ntrue {classes[labels[i]]}" for i in samples],
                 right[0] if len(right) else 0)
    return metrics, figures, explained


def _report(model, classes, paths, labels, images, outputs, output, run_dir, set_aside, split,
            test_accuracy, flips, unknown, scoring, calibration, metrics, figures, explained):
    """evaluate()'s common part, after the classification figures of a single- or
    multi-label model (`metrics`, `figures`; `explained`: the images to show with Grad-CAM,
    the class of each heatmap, their titles, and the image for the feature maps): the
    calibration, unknown images, learning curves, Grad-CAM, filters and feature maps,
    metrics.json and report.html."""
    from transfer.explain import gradcam, overlay
    from transfer.runs import read_history

    metrics = {"split": split, "images": len(paths), "test_accuracy": test_accuracy,
               "tta": flips, **metrics,
               "set_aside": [[str(path), reason] for path, reason in set_aside],
               "calibration": calibration_metrics(calibration, outputs, labels)
               | {"fitted_on": fitted_on(calibration, run_dir, paths)}}
    if unknown is not None:
        metrics["unknown"] = unknown_metrics(calibration, outputs,
                                             predict_files(scoring, unknown.paths)[1], unknown)
    write_json(output / "metrics.json", metrics)
    figures["reliability"] = plot_reliability(metrics["calibration"], output / "reliability.png")
    if unknown is not None:
        figures["unknown"] = plot_scores(metrics["unknown"], calibration.threshold,
                                         output / "unknown_scores.png")
    if run_dir is not None and (run_dir / "history.csv").is_file():
        figures["learning_curves"] = plot_learning_curves(read_history(run_dir / "history.csv"),
                                                          output / "learning_curves.png")
    samples, shown, titles, example = explained
    if len(samples):
        heatmaps = gradcam(model, images[samples].astype("float32"), shown)
        figures["gradcam"] = plot_gallery(overlay(images[samples], heatmaps), titles,
                                          output / "gradcam.png")
    filters = plot_filters(model, output / "filters.png")
    if filters is not None:
        figures["filters"] = filters
    before = _original_backbone(model, run_dir)
    figures["feature_maps"] = plot_feature_maps(model, before, images[example].astype("float32"),
                                                output / "feature_maps.png")
    write_report(metrics, figures, output / "report.html",
                 before_note=None if before is not None else
                 "the backbone's original weights could not be loaded, so only the trained "
                 "model's feature maps are shown")
    log.info("Evaluation on %d %s images: %saccuracy %.4f%s, ECE %.4f -> %.4f%s. Report: %s",
             len(paths), split, "subset " if metrics.get("multi_label") else "",
             metrics["accuracy"], _log_figures(metrics),
             metrics["calibration"]["ece_before"], metrics["calibration"]["ece_after"],
             f"; unknown images: AUROC {metrics['unknown']['auroc']:.4f}" if unknown else "",
             output / "report.html")
    return metrics


def _log_figures(metrics):
    """The log line's figures after the accuracy: ROC AUC, or a multi-label model's F1s and
    mean average precision."""
    if metrics.get("multi_label"):
        average = metrics["mean_average_precision"]
        return (f", micro F1 {metrics['micro_f1']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
                f"mAP {'undefined' if average is None else f'{average:.4f}'}")
    return f", ROC AUC {metrics['roc_auc']:.4f}" if metrics["roc_auc"] is not None else ""


def _label_results(classes, paths, labels, images, probabilities, calibration, output):
    """A multi-label model's part of evaluate(): (metrics, figures, what Grad-CAM shows).

    Each label is decided by its threshold; the figures are label_scores'. The most
    confidently wrong labels are the (image, label) decisions furthest from the truth: labels
    given a high probability that the image lacks, carried ones given a low one."""
    thresholds = calibration.decision_thresholds(len(classes))
    decided = calibration.decisions(probabilities).astype(int)
    per_label, summary = label_scores(labels, decided, probabilities, classes, thresholds)
    distance = np.abs(labels - probabilities)
    wrong = np.argwhere(decided != labels)  # (image, label) pairs
    wrong = wrong[np.argsort(-distance[wrong[:, 0], wrong[:, 1]], kind="stable")][:GALLERY]
    metrics = {
        "multi_label": True, "accuracy": summary["subset_accuracy"], **summary,
        "roc_auc": None, "classes": classes, "per_label": per_label,
        "most_confidently_wrong": [
            {"path": paths[i], "label": classes[c], "truth": bool(labels[i, c]),
             "probability": float(probabilities[i, c]),
             "predicted": [classes[k] for k in np.flatnonzero(decided[i])]} for i, c in wrong]}
    figures = {"per_label": plot_per_label(per_label, output / "per_label.png")}
    if len(wrong):
        figures["top_losses"] = plot_gallery(
            images[wrong[:, 0]],
            [f"{classes[c]} {probabilities[i, c]:.2f}\n"
             f"{'carried, missed' if labels[i, c] else 'not carried'}" for i, c in wrong],
            output / "top_losses.png")
    shown = np.flatnonzero(decided.any(axis=1))[:GRADCAM_SAMPLES]
    pairs = [(i, c) for i in shown  # an image once per label predicted, likeliest first
             for c in sorted(np.flatnonzero(decided[i]), key=lambda c: -probabilities[i, c])]
    right = np.flatnonzero((decided == labels).all(axis=1))
    explained = (np.asarray([i for i, _ in pairs], dtype=int),
                 np.asarray([c for _, c in pairs], dtype=int),
                 [f"{classes[c]} {probabilities[i, c]:.2f}\n"
                  f"{'carried' if labels[i, c] else 'WRONG: not carried'}" for i, c in pairs],
                 right[0] if len(right) else 0)
    return metrics, figures, explained


def label_scores(labels, decided, probabilities, classes, thresholds):
    """({label: precision, recall, f1-score, support, average_precision, threshold}, the
    summary: micro_f1, macro_f1, mean_average_precision, subset_accuracy, hamming_loss) of
    multi-hot labels, 0/1 decisions and probabilities [N, C], by scikit-learn.

    As in class_scores, a label these images lack and that is never predicted has None for
    its scores and is left out of the macro F1. Its average precision is None whenever the
    images lack it (undefined without positives); the mean is over the labels that have one.
    """
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss

    labels, decided = np.asarray(labels), np.asarray(decided)
    per_label = {}
    for c, name in enumerate(classes):
        carried = bool(labels[:, c].any())
        per_label[name] = class_scores(labels[:, c], decided[:, c], ["not", name])[0][name] | {
            "average_precision": float(average_precision_score(labels[:, c],
                                                               probabilities[:, c]))
            if carried else None, "threshold": float(thresholds[c])}
    present = np.flatnonzero(labels.any(axis=0) | decided.any(axis=0))
    precisions = [m["average_precision"] for m in per_label.values()
                  if m["average_precision"] is not None]
    return per_label, {
        "subset_accuracy": float(accuracy_score(labels, decided)),
        "micro_f1": float(f1_score(labels, decided, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(labels[:, present], decided[:, present], average="macro",
                                   zero_division=0)) if len(present) else 0.0,
        "mean_average_precision": float(np.mean(precisions)) if precisions else None,
        "hamming_loss": float(hamming_loss(labels, decided))}


def plot_per_label(per_label, path):
    """Bars of each label's precision, recall, F1 and average precision (none for a figure
    that is None); label names up to 100, the figure never wider than 20 inches."""
    plt = _pyplot()
    names = list(per_label)
    keys = (("precision", "precision"), ("recall", "recall"), ("f1-score", "F1"),
            ("average_precision", "AP"))
    figure, axes = plt.subplots(figsize=(min(max(6, 1.2 * len(names)), 20), 3.5))
    width = 0.8 / len(keys)
    for k, (key, title) in enumerate(keys):
        values = [np.nan if per_label[name][key] is None else per_label[name][key]
                  for name in names]
        axes.bar(np.arange(len(names)) + (k - 1.5) * width, values, width, label=title)
    if len(names) <= 100:
        axes.set_xticks(np.arange(len(names)), names, rotation=30, ha="right",
                        fontsize=10 if len(names) <= 30 else 5)
    axes.set_ylim(0, 1.05)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(loc="lower right", fontsize="small")
    axes.set_title("Per label, each decided by its threshold")
    figure.tight_layout()
    return _save(figure, path)


def calibration_metrics(calibration, outputs, labels):
    """The run's Calibration and what it does on these images (outputs: model.scored's, with
    raw=True): ECE, log loss and the reliability bins at temperature 1 ("before") and at the
    run's ("after"); the share the threshold rejects and the accuracy on the rest."""
    from transfer import calibrate

    logits, probabilities = outputs["logits"], outputs["probabilities"]
    before = calibrate.probabilities_of(logits, calibration.multi_label)
    # The model's own score, so the shares are those predict --reject gives.
    kept = outputs["score"] >= calibration.threshold
    if calibration.multi_label:  # every label right
        correct = (calibration.decisions(probabilities) == (labels > 0)).all(axis=1)
    else:
        correct = probabilities.argmax(axis=1) == labels
    return {**calibration.to_dict(),
            "ece_before": calibrate.expected_calibration_error(before, labels),
            "ece_after": calibrate.expected_calibration_error(probabilities, labels),
            "nll_before": calibrate.log_loss(logits, labels),
            "nll_after": calibrate.log_loss(logits, labels, calibration.temperature),
            "rejected": float(1 - kept.mean()),
            "accuracy_kept": float(correct[kept].mean()) if kept.any() else None,
            "reliability_before": calibrate.reliability(before, labels),
            "reliability_after": calibrate.reliability(probabilities, labels)}


def fitted_on(calibration, run_dir, paths):
    """How many of `paths` the run's Mahalanobis statistics were fitted on (its validation
    images): those score higher than new images would. 0 for the scores of the logits."""
    if (calibration.score != "mahalanobis" or run_dir is None
            or not (Path(run_dir) / "split.csv").is_file()):
        return 0
    from transfer.runs import read_split

    fitted = {os.path.realpath(path) for path in read_split(run_dir)[1]["validation"].paths}
    return sum(os.path.realpath(path) in fitted for path in paths)


def unknown_metrics(calibration, inside, outside, others):
    """How well the in-class scores tell the images evaluated (inside: model.scored's outputs)
    from others' (outside): AUROC and FPR at 95% TPR for each of calibrate.SCORES the run can
    compute (its own at the top level), the shares of each the threshold rejects, the
    histogram's counts."""
    from transfer import calibrate

    by_score = {kind: calibrate.separation(calibrate.score_of(calibration, inside, kind),
                                           calibrate.score_of(calibration, outside, kind))
                for kind in calibrate.available_scores(calibration)}
    both = np.concatenate([inside["score"], outside["score"]]).astype(np.float64)
    low, high = both.min(), both.max()
    if np.isfinite(calibration.threshold):  # the line stays on the chart
        low, high = min(low, calibration.threshold), max(high, calibration.threshold)
    edges = np.histogram_bin_edges(both, SCORE_BINS, range=(low, high))
    return {"folder": others.folder, "images": len(others.paths), "score": calibration.score,
            **by_score[calibration.score], "by_score": by_score,
            "rejected_in": float((inside["score"] < calibration.threshold).mean()),
            "rejected_out": float((outside["score"] < calibration.threshold).mean()),
            "histogram": {"edges": edges.tolist(),
                          "in": np.histogram(inside["score"], edges)[0].tolist(),
                          "out": np.histogram(outside["score"], edges)[0].tolist()},
            "set_aside": [[str(path), reason] for path, reason in others.set_aside]}


def class_scores(labels, predicted, classes):
    """({class: precision, recall, f1-score, support}, their macro average) by scikit-learn.

    The average is over the classes that occur, as true or predicted labels: a class the
    images evaluated lack, and that the model never predicts, has None for its scores rather
    than a 0 that pulls the average down.
    """
    from sklearn.metrics import classification_report

    present = sorted(set(np.asarray(labels).tolist()) | set(np.asarray(predicted).tolist()))
    report = classification_report(labels, predicted, labels=present,
                                   target_names=[classes[i] for i in present], output_dict=True,
                                   zero_division=0)
    absent = {"precision": None, "recall": None, "f1-score": None, "support": 0}
    per_class = {name: {key: float(value) for key, value in report[name].items()}
                 if name in report else absent for name in classes}
    return per_class, {key: float(value) for key, value in report["macro avg"].items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    plt = _pyplot()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png", bbox_inches="tight")
    plt.close(figure)
    return path


def plot_learning_curves(history, path):
    """Loss and accuracy of every phase on one figure, the phase boundaries marked."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, [row[metric] for row in history], "o-", label=f"train {metric}")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], "o-",
                  label=f"validation {metric}")
        for before, after in zip(history, history[1:]):
            if before["phase"] != after["phase"]:
                axis.axvline(before["epoch"] + 0.5, color="gray", linestyle="--")
                axis.annotate(f"{after['phase']} →", (before["epoch"] + 0.6, 0.02),
                              xycoords=("data", "axes fraction"), color="gray")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def plot_reliability(calibration, path):
    """Accuracy against confidence per bin, at temperature 1 and at the run's (calibration:
    calibration_metrics'), the gap to the diagonal hatched, as Guo et al. 2017 draw it."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for axis, stage, title in ((axes[0], "before", "before: T = 1"),
                               (axes[1], "after", f"after: T = {calibration['temperature']:.3g}")):
        bins = [row for row in calibration[f"reliability_{stage}"] if row[2]]
        lows = [low for low, _, _, _, _ in bins]
        widths = [high - low for low, high, _, _, _ in bins]
        accuracies = [accuracy for *_, accuracy in bins]
        gaps = [confidence - accuracy for *_, confidence, accuracy in bins]
        axis.bar(lows, accuracies, widths, align="edge", edgecolor="black", label="accuracy")
        axis.bar(lows, gaps, widths, bottom=accuracies, align="edge", color="red", alpha=0.3,
                 hatch="//", edgecolor="red", label="gap to the mean confidence")
        axis.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("each label's probability" if calibration.get("multi_label")
                        else "confidence (largest probability)")
        axis.set_title(f"{title}: ECE {calibration[f'ece_{stage}']:.3f}")
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("share carried" if calibration.get("multi_label") else "accuracy")
    figure.tight_layout()
    return _save(figure, path)


def plot_scores(unknown, threshold, path):
    """The histograms of the in-class scores of the images evaluated and of the others
    (unknown: unknown_metrics'), each as shares of its images, the threshold a line."""
    plt = _pyplot()
    histogram = unknown["histogram"]
    figure, axis = plt.subplots(figsize=(8, 4))
    others = f"others: {Path(unknown['folder']).name}"
    for key, label in (("in", "images evaluated"), ("out", others)):
        counts = np.asarray(histogram[key], dtype=np.float64)
        axis.stairs(counts / (counts.sum() or 1), histogram["edges"], fill=True, alpha=0.45,
                    label=f"{label} ({int(counts.sum())})")
    if np.isfinite(threshold):
        axis.axvline(threshold, color="black", linestyle="--",
                     label=f"threshold {threshold:.3g}: below it is unknown")
    axis.set_xlabel(f"in-class score ({unknown['score']}; higher: more like the classes)")
    axis.set_ylabel("share of images")
    axis.set_title(f"AUROC {unknown['auroc']:.3f}, FPR at 95% TPR {unknown['fpr_at_95_tpr']:.3f}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_confusion_matrix(matrix, classes, path):
    """Counts and row-normalised rates side by side; each cell annotated up to 30 classes,
    class names up to 100, and the figure never larger than 20 inches a side."""
    plt = _pyplot()
    rows = matrix.sum(axis=1, keepdims=True)
    rates = matrix / np.where(rows > 0, rows, 1)
    count = len(classes)
    side = min(max(4, 0.6 * count + 2), 20)
    figure, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    for axis, values, title, fmt in ((axes[0], matrix, "counts", "d"),
                                     (axes[1], rates, "row-normalised (recall)", ".2f")):
        axis.imshow(values, cmap="Blues", vmin=0, vmax=values.max() or 1)
        if count <= 30:
            for (i, j), value in np.ndenumerate(values):
                axis.text(j, i, format(value, fmt), ha="center", va="center",
                          color="white" if value > 0.6 * (values.max() or 1) else "black")
        if count <= 100:
            size = 10 if count <= 30 else 5
            axis.set_xticks(range(count), classes, rotation=45, ha="right", fontsize=size)
            axis.set_yticks(range(count), classes, fontsize=size)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_gallery(images, titles, path, columns=6):
    plt = _pyplot()
    rows = int(np.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.6 * rows),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        axis.imshow(np.uint8(np.clip(image, 0, 255)))
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_filters(model, path):
    """The first convolution's filters, each scaled to 0-1, as an RGB grid (None when the
    backbone has no convolution on its RGB input)."""
    from transfer.model import all_layers, backbone_of

    first = next((layer for layer in all_layers(backbone_of(model))
                  if isinstance(layer, keras.layers.Conv2D) and layer.kernel.shape[2] == 3), None)
    if first is None:  # no convolution on the RGB input itself
        return None
    kernel = np.asarray(first.kernel)  # [h, w, 3, filters]
    count = kernel.shape[-1]
    columns = min(16, count)
    plt = _pyplot()
    figure, axes = plt.subplots(int(np.ceil(count / columns)), columns,
                                figsize=(columns * 0.7, np.ceil(count / columns) * 0.7),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, axis in zip(range(count), axes.flat):
        weights = kernel[..., index]
        weights = (weights - weights.min()) / (np.ptp(weights) or 1)
        axis.imshow(weights, interpolation="nearest")
    figure.suptitle(f"{first.name}: {count} filters of {kernel.shape[0]}x{kernel.shape[1]}x3",
                    fontsize=9, y=1.0 + 0.35 / axes.shape[0])
    return _save(figure, path)


def _original_backbone(model, run_dir):
    """The backbone as training started (ImageNet or the run's weights), or None."""
    from transfer.backbones import get_spec

    if run_dir is None:
        return None
    config = json.loads((run_dir / "config.json").read_text())
    weights = config.get("weights", "imagenet")
    try:
        return get_spec(config["backbone"]).build(config["image_size"],
                                                  None if weights == "none" else weights)
    except (FileNotFoundError, ValueError) as error:
        log.warning("Feature maps before fine-tuning left out: %s", str(error).splitlines()[0])
        return None


def plot_feature_maps(model, before, image, path, channels=8):
    """One image's feature maps at three depths, after training and (when given) before."""
    from transfer.model import backbone_of, image_model

    backbone = backbone_of(model)
    convolutions = [layer.name for layer in backbone.layers
                    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                          keras.layers.SeparableConv2D))]
    depths = [convolutions[0], convolutions[len(convolutions) // 2], convolutions[-1]]
    after = image_model(model, [backbone.get_layer(n).output for n in depths])(image[None])
    stages = [("after training", [np.asarray(a)[0] for a in after])]
    if before is not None:
        outputs = image_model(model, [before.get_layer(n).output for n in depths],
                              backbone=before)(image[None])
        stages.insert(0, ("before (original weights)", [np.asarray(a)[0] for a in outputs]))
    plt = _pyplot()
    rows = 1 + len(depths) * len(stages)  # the input image, then a row per depth and stage
    figure, axes = plt.subplots(rows, channels + 1, figsize=(1.4 * (channels + 1), 1.5 * rows),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes[0, 1].imshow(np.uint8(image))
    axes[0, 0].text(0, 0.5, "input", fontsize=8, va="center")
    for depth, name in enumerate(depths):
        strongest = np.argsort(-stages[-1][1][depth].mean(axis=(0, 1)))[:channels]
        for stage_index, (label, maps) in enumerate(stages):
            row = 1 + depth * len(stages) + stage_index
            axes[row, 0].text(0, 0.5, f"{name}\n{label}", fontsize=7, va="center")
            for column, channel in enumerate(strongest, start=1):
                axes[row, column].imshow(maps[depth][..., channel], cmap="viridis")
    figure.tight_layout()
    return _save(figure, path)


def write_report(metrics, figures, path, before_note=None):
    """report.html, from the package's template: the numbers of metrics.json and the figures
    (files beside it), each in its section."""
    import jinja2

    calibration = metrics["calibration"]
    multi_label = metrics.get("multi_label", False)
    sections = {
        "confusion_matrix": ("Confusion matrix", "Where it fails: counts, and each true class's "
                                                 "row as rates."),
        "per_label": ("Per label", "Precision, recall, F1 and average precision of each label, "
                                   "decided by its own threshold (chosen for its F1 on the "
                                   "validation images; 0.5 where they lack the label)."),
        "reliability": ("Calibration", ("The share of labels carried against each label's "
                                        "probability" if multi_label else
                                        "Accuracy against confidence")
                        + " in equal-width bins: "
                        f"expected calibration error {calibration['ece_before']:.3f} at "
                        f"temperature 1, {calibration['ece_after']:.3f} at the run's "
                        f"temperature {calibration['temperature']:.3g}. On the diagonal, a "
                        "probability of 0.8 is right 80% of the time."),
        "unknown": ("Images of none of the classes", "The in-class scores of the images "
                                                     "evaluated and of the other images; the "
                                                     "dashed line is the run's threshold."),
        "learning_curves": ("Learning curves", "Every phase; a dashed line is where the "
                                               "next one starts."),
        "top_losses": ("Most confidently wrong", "The mistakes the model was surest of."
                       if "top_losses" in figures else "No image was classified wrongly."),
        "gradcam": ("What it looks at (Grad-CAM)", "Red is where the evidence for the predicted "
                                                   "class is: confident right answers, then "
                                                   "mistakes."),
        "filters": ("First-layer filters", "What the first convolution responds to."),
        "feature_maps": ("Feature maps", "One image at an early, a middle and the last "
                                         "convolution: the strongest channels"
                                         + (f"; {before_note}" if before_note else
                                            ", before and after training (layers below the "
                                            "fine-tuning cut do not change)") + "."),
    }
    if multi_label:  # in the same places
        sections |= {
            "top_losses": ("Most confidently wrong labels",
                           "The label decisions furthest from the truth: labels given a high "
                           "probability that the image does not carry, and carried labels "
                           "given a low one." if "top_losses" in figures
                           else "No label was decided wrongly."),
            "gradcam": ("Grad-CAM per predicted label", "Red is where the evidence for each "
                                                        "label predicted is: an image once per "
                                                        "label above its threshold.")}
    shown = [{"id": key.replace("_", "-"), "title": title, "text": text,
              "image": Path(figures[key]).name if key in figures else None}
             for key, (title, text) in sections.items() if key in figures or key == "top_losses"]
    environment = jinja2.Environment(loader=jinja2.PackageLoader("transfer"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    page = environment.get_template("report.html").render(metrics=metrics, sections=shown)
    write_atomic(path, page)
    return path
