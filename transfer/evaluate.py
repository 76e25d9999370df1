"""The evaluation report: how good the model is, where it fails, and what it looks at.

evaluate() writes, into one folder: metrics.json, report.html and the PNGs the page shows
(confusion matrix, learning curves, the most confidently wrong images, Grad-CAM heatmaps,
the first layer's filters and feature maps at three depths before and after fine-tuning).
The page needs no network: its images are files beside it.
"""

import concurrent.futures
import json
import logging
from pathlib import Path

import keras
import numpy as np

from transfer.files import atomic_path, write_atomic, write_json

log = logging.getLogger(__name__)

GALLERY = 12  # images in the gallery of confident mistakes
GRADCAM_SAMPLES = 6  # correct and wrong images each, with Grad-CAM


def evaluate_folder(model_path, folder, output=None, labels=None, label_pattern=None, tta=None):
    """Evaluate on a folder's images: <class>/ folders, a label file or file-name labels;
    returns the output folder (default: the run directory, or the .keras file's folder)."""
    from transfer.layouts import check_layout, find_layout, resolve
    from transfer.runs import load_run_model, tta_flip

    model, classes, run_dir = load_run_model(model_path)
    if folder is None and labels is None:
        raise ValueError("Give the images to evaluate: a folder of <class>/ folders, or "
                         "--labels FILE.")
    _, folder, labels = resolve(folder, labels) if labels else (None, Path(folder), None)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; expected {folder}/<class>/*.jpg with "
                                f"the model's classes ({', '.join(classes)}).")
    reports = check_layout(find_layout(folder, labels, label_pattern, classes), False)
    paths = [(str(p), classes.index(c)) for report in reports for c in classes
             for p in report.good[c]]
    set_aside = [item for report in reports for item in report.bad]
    for path, reason in set_aside:
        log.warning("Set aside %s: %s", path, reason)
    model_path = Path(model_path)
    target = (Path(output) if output
              else run_dir or (model_path if model_path.is_dir() else model_path.parent))
    evaluate(model, classes, [p for p, _ in paths], [l for _, l in paths], target,
             run_dir=run_dir, set_aside=set_aside, split=f"{folder.resolve().name}/",
             flips=tta_flip(run_dir, tta))
    return target


def predict_files(model, paths, batch_size=32):
    """(uint8 images [N, H, W, 3], class probabilities [N, C]) of image files."""
    from transfer.images import load_image

    size = model.input_shape[1]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # uint8: a quarter of float32
        images = np.stack(list(pool.map(lambda path: load_image(path, size), paths)))
    probabilities = np.concatenate([
        model.predict_on_batch(images[i:i + batch_size].astype("float32"))
        for i in range(0, len(images), batch_size)])
    return images, probabilities


def accuracy(model, paths, labels, flips="none"):
    from transfer.model import with_tta

    probabilities = predict_files(with_tta(model, flips), paths)[1]
    return float((probabilities.argmax(axis=1) == np.asarray(labels)).mean())


def evaluate(model, classes, paths, labels, output, run_dir=None, set_aside=(),
             split="validation", test_accuracy=None, flips="none"):
    """Write metrics.json, report.html and its PNGs into output; returns the metrics.

    split names the images on the page ("validation", "test", a folder's name); test_accuracy,
    when given, is shown beside them, with a link to the test images' report in output/test/.
    flips: the probabilities average each image with its mirror images of these flips
    (model.with_tta); "none", the image alone.
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    from transfer.explain import gradcam, overlay
    from transfer.runs import read_history

    if not paths:
        raise ValueError("No readable images to evaluate on; expected <folder>/<class>/*.jpg.")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    from transfer.model import with_tta

    images, probabilities = predict_files(with_tta(model, flips), paths)
    labels = np.asarray(labels)
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
        "split": split, "images": len(paths), "accuracy": float((predicted == labels).mean()),
        "roc_auc": auc, "test_accuracy": test_accuracy, "tta": flips,
        "classes": classes, "per_class": per_class, "macro_avg": macro,
        "confusion_matrix": matrix.tolist(),
        "most_confidently_wrong": [
            {"path": paths[i], "true": classes[labels[i]], "predicted": classes[predicted[i]],
             "probability": float(confidence[i])} for i in wrong[:GALLERY]],
        "set_aside": [[str(path), reason] for path, reason in set_aside],
    }
    write_json(output / "metrics.json", metrics)

    figures = {}
    figures["confusion_matrix"] = plot_confusion_matrix(matrix, classes,
                                                        output / "confusion_matrix.png")
    if run_dir is not None and (run_dir / "history.csv").is_file():
        figures["learning_curves"] = plot_learning_curves(read_history(run_dir / "history.csv"),
                                                          output / "learning_curves.png")
    if len(wrong):
        figures["top_losses"] = plot_gallery(
            images[wrong[:GALLERY]],
            [f"true {classes[labels[i]]}\npredicted {classes[predicted[i]]} "
             f"{confidence[i]:.2f}" for i in wrong[:GALLERY]], output / "top_losses.png")
    samples = np.concatenate([right[:GRADCAM_SAMPLES], wrong[:GRADCAM_SAMPLES]])
    heatmaps = gradcam(model, images[samples].astype("float32"), predicted[samples])
    figures["gradcam"] = plot_gallery(
        overlay(images[samples], heatmaps),
        [f"{'right' if labels[i] == predicted[i] else 'WRONG'}: {classes[predicted[i]]} "
         f"{confidence[i]:.2f}\ntrue {classes[labels[i]]}" for i in samples],
        output / "gradcam.png")
    filters = plot_filters(model, output / "filters.png")
    if filters is not None:
        figures["filters"] = filters
    before = _original_backbone(model, run_dir)
    example = images[right[0] if len(right) else 0].astype("float32")
    figures["feature_maps"] = plot_feature_maps(model, before, example,
                                                output / "feature_maps.png")
    write_report(metrics, figures, output / "report.html",
                 before_note=None if before is not None else
                 "the backbone's original weights could not be loaded, so only the trained "
                 "model's feature maps are shown")
    log.info("Evaluation on %d %s images: accuracy %.4f%s. Report: %s", len(paths), split,
             metrics["accuracy"], f", ROC AUC {auc:.4f}" if auc is not None else "",
             output / "report.html")
    return metrics


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
    """Loss and accuracy of both phases on one figure, the phase boundary marked."""
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

    sections = {
        "confusion_matrix": ("Confusion matrix", "Where it fails: counts, and each true class's "
                                                 "row as rates."),
        "learning_curves": ("Learning curves", "Both phases; the dashed line is where "
                                               "fine-tuning starts."),
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
    shown = [{"id": key.replace("_", "-"), "title": title, "text": text,
              "image": Path(figures[key]).name if key in figures else None}
             for key, (title, text) in sections.items() if key in figures or key == "top_losses"]
    environment = jinja2.Environment(loader=jinja2.PackageLoader("transfer"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    page = environment.get_template("report.html").render(metrics=metrics, sections=shown)
    write_atomic(path, page)
    return path
