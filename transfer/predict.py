"""Predict: image files and folders in, one row per image out. Knows nothing of training."""

import concurrent.futures
import itertools
import json
from pathlib import Path

import numpy as np

from transfer.check import list_images
from transfer.images import ImageError, decode_workers, load_image

MODEL_FORMATS = ("a .keras file with classes.json beside it", "a run directory holding model.keras",
                 "a SavedModel version folder", "a SavedModel model folder of integer versions")


class Predictor:
    """A trained classifier from a .keras file or an exported SavedModel.

    tta: average each image with its mirror images (model.scored); None: as the run was
    configured, or as the SavedModel was exported (its signatures then average in the graph).
    """

    def __init__(self, path, tta=None):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Model {path} does not exist; expected "
                                    f"{', '.join(MODEL_FORMATS)}.")
        if path.is_dir() and (path / "model.keras").is_file():
            path = path / "model.keras"
        if path.is_dir() and not (path / "saved_model.pb").is_file():
            from transfer.export import versions

            found = versions(path)
            if not found:
                raise ValueError(f"{path} is not a model; expected {', '.join(MODEL_FORMATS)}.")
            path = found[max(found)]
        self.path = path
        self.model = None  # the Keras model, when loaded from one
        self.multi_label = False  # a sigmoid per label, each decided by its threshold
        if path.is_dir():
            self._load_savedmodel(path, tta)
        elif path.suffix == ".keras":
            self._load_keras(path, tta)
        else:
            raise ValueError(f"{path} is not a model; expected {', '.join(MODEL_FORMATS)}.")

    def _load_keras(self, path, tta):
        from transfer import calibrate
        from transfer.model import is_multi_label, scored
        from transfer.runs import load_keras, tta_flip

        model, self.classes = load_keras(path)
        self.model = model
        self.image_size = model.input_shape[1]
        self.multi_label = is_multi_label(model)
        run_dir = path.parent if (path.parent / "config.json").is_file() else None
        calibration = calibrate.read(run_dir)
        predicting = scored(model, calibration, tta_flip(run_dir, tta))

        def predict(images):
            outputs = {key: np.asarray(value)
                       for key, value in predicting(images, training=False).items()}
            return outputs | {"unknown": outputs["score"] < calibration.threshold} | (
                {"decisions": calibration.decisions(outputs["probabilities"])}
                if self.multi_label else {})

        self._predict = predict

    def _load_savedmodel(self, path, tta):
        import tensorflow as tf

        from transfer.export import CONFIG_ASSET, IMAGES_INPUT, SIGNATURE, read_asset

        self.classes = read_asset(path)
        exported = (path / "assets.extra" / CONFIG_ASSET).is_file() and bool(
            read_asset(path, CONFIG_ASSET).get("tta"))
        if tta is not None and tta != exported:
            raise ValueError(f"{path} was exported {'with' if exported else 'without'} "
                             f"test-time augmentation; drop --{'no-' if exported else ''}tta, "
                             f"or export the run again with --{'' if tta else 'no-'}tta.")
        signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]
        self.image_size = signature.structured_input_signature[1][IMAGES_INPUT].shape[1]
        missing = sorted({"probabilities", "score", "unknown"} - set(signature.structured_outputs))
        if missing:
            raise ValueError(f"{path} was exported before transfer calibrated its models: its "
                             f"{SIGNATURE} signature has no {' or '.join(missing)} output. "
                             "Export the run again with `transfer export`.")

        self.multi_label = "decisions" in signature.structured_outputs
        keys = ("probabilities", "score", "unknown") + (("decisions",) if self.multi_label else ())

        def predict(images):
            outputs = signature(**{IMAGES_INPUT: tf.constant(images)})
            return {key: outputs[key].numpy() for key in keys}

        self._predict = predict

    def require_keras(self, what):
        if self.model is None:
            raise ValueError(f"{what} needs the Keras model (a run directory or its .keras "
                             f"file); {self.path} is a SavedModel.")

    def predict(self, images):
        """For float32 0-255 images [N, H, W, 3]: {"probabilities": calibrated class
        probabilities [N, C], "score": in-class scores [N], "unknown": [N] bools, True
        where the score is below the model's threshold}; for a multi-label model also
        "decisions" [N, C], each label's probability at or above its threshold."""
        return self._predict(np.asarray(images, dtype=np.float32))


def expand_paths(inputs):
    """(paths, problems, skipped): files as given plus images found in folders, recursively;
    (path, reason) for links that were not followed and folders that cannot be read; and the
    folders' hidden files and files without an image extension. A bad file gets its error row
    later."""
    paths, problems, skipped = [], [], []
    for item in map(Path, inputs):
        try:
            item.lstat()  # a broken link is there: it gets its error row
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"{item} does not exist; expected image files or folders "
                                    "of them.") from None
        except OSError as error:  # in a folder this user may not look into
            problems.append((item, f"not readable: {(error.strerror or str(error)).lower()}"))
            continue
        if item.is_dir():
            listing = list_images(item)
            paths += listing.images
            problems += listing.problems
            skipped += listing.skipped
        else:
            paths.append(item)
    return paths, problems, skipped


def check_classes(predictor, expected):
    """ValueError unless `expected` (names, or a file of them) are the model's classes."""
    path = Path(expected)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        names = (json.loads(text) if path.suffix == ".json"
                 else [line.strip() for line in text.splitlines() if line.strip()])
    else:
        names = [name.strip() for name in expected.split(",") if name.strip()]
    if sorted(names) != sorted(predictor.classes):
        raise ValueError(f"The model at {predictor.path} was trained on classes "
                         f"{', '.join(predictor.classes)}; --classes gives {', '.join(names)}. "
                         "Use the model trained for these classes, or drop --classes.")


UNKNOWN = "unknown"  # the label of a rejected image


def error_row(path, error):
    return {"path": str(path), "label": None, "probability": None, "score": None,
            "unknown": None, "top_k": [], "error": error}


def predict_paths(predictor, paths, batch_size=32, top_k=3, workers=None, reject=False):
    """Yield one row per path: path, label, probability, score, unknown, top_k
    [(label, p)...], error. With `reject`, an unknown image's label is "unknown" (its
    probability and top_k still the classes'). A multi-label model's rows also hold "labels",
    those above their thresholds (label: them joined by ';', "" for none), and
    "probabilities", every label's.

    Images are decoded by `workers` threads (default: decode_workers()), one batch ahead of
    the model.
    """
    top_k = max(1, min(top_k, len(predictor.classes)))
    batches = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]

    def decode(path):
        try:
            return load_image(path, predictor.image_size), None
        except ImageError as error:
            return None, str(error)

    with concurrent.futures.ThreadPoolExecutor(workers or decode_workers()) as pool:
        pending = [pool.submit(decode, path) for path in batches[0]] if batches else []
        for index, batch in enumerate(batches):
            decoded = [future.result() for future in pending]
            pending = [pool.submit(decode, path) for path in
                       (batches[index + 1] if index + 1 < len(batches) else [])]
            good = [image for image, error in decoded if error is None]
            outputs = predictor.predict(np.stack(good)) if good else {}
            position = 0
            for path, (image, error) in zip(batch, decoded):
                if error is not None:
                    yield error_row(path, error)
                    continue
                probabilities = outputs["probabilities"][position]
                unknown = bool(outputs["unknown"][position])
                order = np.argsort(probabilities)[::-1][:top_k]
                row = {"path": str(path), "label": predictor.classes[order[0]],
                       "probability": float(probabilities[order[0]]),
                       "score": float(outputs["score"][position]), "unknown": unknown,
                       "top_k": [(predictor.classes[i], float(probabilities[i]))
                                 for i in order],
                       "error": None}
                if predictor.multi_label:
                    labels = [name for name, decided in zip(
                        predictor.classes, outputs["decisions"][position]) if decided]
                    row |= {"label": ";".join(labels), "labels": labels,
                            "probabilities": {name: float(p) for name, p in
                                              zip(predictor.classes, probabilities)}}
                if reject and unknown:
                    row["label"] = UNKNOWN
                yield row
                position += 1


def write_rows(rows, handle, fmt):
    """Write prediction rows as CSV or JSON to an open text handle."""
    if fmt == "json":
        json.dump([row | {"top_k": [{"label": label, "probability": p}
                                    for label, p in row["top_k"]]} for row in rows],
                  handle, indent=2)
        handle.write("\n")
        return
    import csv

    explained = any("explanation" in row for row in rows)
    writer = csv.writer(handle)
    writer.writerow(("path", "label", "probability", "score", "unknown", "top_k", "error")
                    + (("explanation",) if explained else ()))
    for row in rows:
        writer.writerow((row["path"], row["label"] or "",
                         "" if row["probability"] is None else f"{row['probability']:.6f}",
                         "" if row["score"] is None else f"{row['score']:.6f}",
                         "" if row["unknown"] is None else str(row["unknown"]).lower(),
                         " ".join(f"{label}:{p:.4f}" for label, p in row["top_k"]),
                         row["error"] or "")
                        + ((row.get("explanation") or "",) if explained else ()))


def explain(predictor, rows, folder, batch_size=32):
    """Write a Grad-CAM overlay of each predicted image into folder, for its predicted class,
    and add its path to the row as "explanation"."""
    from PIL import Image

    from transfer.explain import gradcam, overlay

    predictor.require_keras("Grad-CAM")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [row for row in rows if not row["error"]]
    taken = set()
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = np.stack([load_image(row["path"], predictor.image_size)
                           for row in batch]).astype("float32")
        classes = [predictor.classes.index(row["top_k"][0][0]) for row in batch]  # not "unknown"
        pictures = overlay(images, gradcam(predictor.model, images, classes))
        for row, picture in zip(batch, pictures):
            stem = Path(row["path"]).stem
            name = next(name for name in itertools.chain(
                [f"{stem}.gradcam.png"], (f"{stem}-{n}.gradcam.png" for n in itertools.count(1)))
                if name not in taken and not (folder / name).exists())  # never overwrite
            taken.add(name)
            Image.fromarray(picture).save(folder / name)
            row["explanation"] = str(folder / name)
    return rows
