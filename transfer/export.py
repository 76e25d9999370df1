"""SavedModel export in TensorFlow Serving's layout: saved_models/<name>/<int version>/.

Two signatures, both with the preprocessing inside:
  serving_default  images      float32 [N, H, W, 3], raw 0-255 RGB
  serve_bytes      image_bytes string [N], encoded JPEG/PNG/GIF/BMP/WebP, decoded and resized in
                               the graph as training resized them (bilinear, no crop)
Both return, computed in the graph from the run's calibration (transfer.calibrate):
  probabilities  float32 [N, C]  softmax(logits / temperature); with test-time augmentation
                                 the logits averaged over the image and its mirror images
  class_index    int32 [N]       and class_name string [N]: the most probable class
  score          float32 [N]     the in-class score, higher for images more like the classes
  unknown        bool [N]        score < the calibration's threshold (never, uncalibrated)
A multi-label model's probabilities are each label's sigmoid(logit / temperature), and its
signatures also return
  decisions      bool [N, C]     each label's probability at or above its threshold (chosen
                                 for the label's F1 on the validation images)
"""

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from transfer.files import write_json

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serve_bytes"
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
CLASSES_ASSET = "classes.json"
CONFIG_ASSET = "config.json"


MAX_VERSION_DIGITS = 18  # versions are int64 in TensorFlow Serving


def is_version_name(name):
    """Whether a folder (or a URL's version) names a version: ASCII digits, no sign, space or
    leading zero. The one rule for export, predict and serve."""
    return (name.isascii() and name.isdigit() and len(name) <= MAX_VERSION_DIGITS
            and (name == "0" or not name.startswith("0")))


def next_version(model_dir):
    """1 + the largest integer version folder under model_dir (1 when there is none)."""
    versions = [int(p.name) for p in Path(model_dir).glob("*")
                if p.is_dir() and is_version_name(p.name)]
    return max(versions, default=0) + 1


def decode_and_resize(image_bytes, size):
    """tf graph: one encoded image -> float32 [size, size, 3] 0-255, as training loads files.

    Like transfer.images.load_image: transparency composited on white, the first frame of an
    animation, bilinear resize to a square with antialiasing, whole-number pixel values.
    (EXIF orientation is not applied in the graph: send upright images.) What TensorFlow's
    decoders cannot read right fails with a message saying so: palette and 1-bit BMPs (it
    reads their palette indices as grey levels) and animated WebPs without alpha.
    """
    import tensorflow as tf

    header = tf.strings.substr(image_bytes + b"\0" * 32, 0, 32)  # padded: short files slice

    def part(start, length):
        return tf.strings.substr(header, start, length)

    def byte(offset):
        return tf.cast(tf.io.decode_raw(part(offset, 1), tf.uint8)[0], tf.int32)

    webp = (part(0, 4) == b"RIFF") & (part(8, 4) == b"WEBP")
    extended = webp & (part(12, 4) == b"VP8X")  # flags at byte 20: 0x10 alpha, 0x02 animation
    webp_alpha = (extended & (byte(20) // 16 % 2 == 1)) | (
        webp & (part(12, 4) == b"VP8L") & (byte(24) // 16 % 2 == 1))  # lossless: bit 28
    bmp = (part(0, 2) == b"BM") & (tf.strings.length(image_bytes) >= 30)  # else too short
    bmp_bits = byte(28) + 256 * byte(29)
    checks = [
        tf.debugging.Assert(~bmp | (bmp_bits >= 24), [
            "serve_bytes reads 24- and 32-bit BMPs only; this one has", bmp_bits,
            "bits per pixel (a palette): send it as PNG"]),
        tf.debugging.Assert(~extended | webp_alpha | (byte(20) // 2 % 2 == 0), [
            "serve_bytes cannot read an animated WebP without alpha: send its first frame "
            "as PNG or JPEG"])]

    def with_alpha():  # PNG (also palette with tRNS) and WebP with alpha, on white
        rgba = tf.cast(tf.io.decode_image(image_bytes, channels=4, expand_animations=False),
                       tf.float32)
        alpha = rgba[..., 3:] / 255.0
        return tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha))

    def without_alpha():  # TensorFlow's WebP decoder needs the channels the file has
        return tf.cast(tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
                       tf.float32)

    png = part(0, 8) == b"\x89PNG\r\n\x1a\n"
    with tf.control_dependencies(checks):
        image = tf.cond(png | webp_alpha, with_alpha, without_alpha)
    image.set_shape([None, None, 3])
    resized = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def export_savedmodel(model, classes, model_dir, calibration=None, flips="none",
                      sample_images=None, config=None):
    """Write model_dir/<next version>/ and return its path; never overwrites a version.

    `model` is the plain classifier; the signatures apply `calibration` (a
    transfer.calibrate.Calibration; None: the identity, nothing unknown) and average the
    logits over the mirror images of `flips` (model.TTA_FLIPS). The version is written under
    a temporary name, reloaded and checked against the same model.scored on `sample_images`
    (random pixels if none are given), and only then renamed into place.
    """
    import keras
    import tensorflow as tf

    from transfer.calibrate import Calibration
    from transfer.model import is_multi_label, scored

    multi_label = is_multi_label(model)
    calibration = calibration or Calibration(multi_label=multi_label)
    model_dir = Path(model_dir)
    taken = next((p for p in (model_dir, *model_dir.parents) if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise ValueError(f"Cannot export into {model_dir}: {taken} is a file; expected a "
                         "folder (--output names the folder that holds saved_models/<name>/).")
    model_dir.mkdir(parents=True, exist_ok=True)
    size = model.input_shape[1]
    names = tf.constant(list(classes))
    predicting = scored(model, calibration, flips)  # shares the classifier's weights
    threshold = tf.constant(calibration.threshold, tf.float32)  # -inf: nothing is below it
    decided = tf.constant(calibration.decision_thresholds(len(classes)))

    def outputs(images):
        result = predicting(images, training=False)
        probabilities, score = result["probabilities"], result["score"]
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "class_index": index,
                "class_name": tf.gather(names, index), "score": score,
                "unknown": score < threshold,
                **({"decisions": probabilities >= decided} if multi_label else {})}

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda data: decode_and_resize(data, size), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return outputs(images)

    archive = keras.export.ExportArchive()
    archive.track(predicting)
    archive.add_endpoint(SIGNATURE, outputs, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name=IMAGES_INPUT)])
    archive.add_endpoint(BYTES_SIGNATURE, serve_bytes, input_signature=[
        tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])

    version = next_version(model_dir)
    staging = model_dir / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        archive.write_out(str(staging), verbose=False)
        extra = staging / "assets.extra"
        extra.mkdir(exist_ok=True)
        write_json(extra / CLASSES_ASSET, list(classes))
        if config is not None:
            write_json(extra / CONFIG_ASSET, config)
        target = model_dir / str(version)
        verify_export(predicting, staging, sample_images, calibration.threshold,
                      name=f"{target} (not published)",
                      decided=calibration.decision_thresholds(len(classes))
                      if multi_label else None)
        if target.exists():  # another export took this version meanwhile
            raise FileExistsError(f"{target} already exists; exports never overwrite a version.")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Exported %s (version %d of %s)", target, version, model_dir.name)
    return target


def verify_export(predicting, path, images=None, threshold=-math.inf, atol=1e-4, name=None,
                  decided=None):
    """Reload the SavedModel at `path` and check that its serving_default reproduces
    `predicting` (a model.scored model): its probabilities to `atol`, its scores to `atol`
    relative to their size (energy scores are ~10, Mahalanobis scores thousands), the
    unknown flags (score < `threshold`) wherever the score is not within that tolerance of
    the threshold, and for a multi-label model (`decided`: its thresholds [C]) the decisions
    likewise. ValueError (naming the export `name`, by default its path) if not; returns the
    largest probability difference."""
    import tensorflow as tf

    size = predicting.input_shape[1]
    if images is None:
        images = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
    expected = {key: np.asarray(value)
                for key, value in predicting(images, training=False).items()}
    loaded = tf.saved_model.load(str(path))
    served = loaded.signatures[SIGNATURE](**{IMAGES_INPUT: tf.constant(images, tf.float32)})
    got = {key: served[key].numpy() for key in ("probabilities", "score", "unknown")}
    problem = None
    if (got["probabilities"].shape != expected["probabilities"].shape
            or not np.allclose(got["probabilities"], expected["probabilities"], atol=atol)):
        problem = (f"largest probability difference "
                   f"{np.max(np.abs(got['probabilities'] - expected['probabilities'])):.2e} "
                   f"(tolerance {atol})")
    elif (got["score"].shape != expected["score"].shape
          or not np.allclose(got["score"], expected["score"], rtol=atol, atol=atol)):
        problem = (f"largest score difference "
                   f"{np.max(np.abs(got['score'] - expected['score'])):.2e} (tolerance {atol} "
                   "relative)")
    else:
        # An image scoring within the tolerance of the threshold may fall either side of it.
        clear = ~np.isclose(expected["score"], threshold, rtol=atol, atol=atol)
        wrong = clear & (got["unknown"] != (expected["score"] < threshold))
        if wrong.any():
            problem = (f"{int(wrong.sum())} of {len(wrong)} images flagged unknown wrongly "
                       f"(threshold {threshold:.4f})")
        elif decided is not None:
            p = expected["probabilities"]
            clear = ~np.isclose(p, decided, atol=atol)
            wrong = clear & (served["decisions"].numpy() != (p >= decided))
            if wrong.any():
                problem = f"{int(wrong.sum())} label decisions differ from the thresholds'"
    if problem is not None:
        raise ValueError(f"The export {name or path} does not reproduce the model: {problem}.")
    return float(np.max(np.abs(got["probabilities"] - expected["probabilities"])))


def read_asset(path, name=CLASSES_ASSET):
    """A JSON asset (class names by default) stored inside an export version folder."""
    asset = Path(path) / "assets.extra" / name
    if not asset.is_file():
        raise FileNotFoundError(f"{path} has no assets.extra/{name}; was it exported by "
                                "transfer? Re-export with `python -m transfer export`.")
    return json.loads(asset.read_text())


def versions(model_dir):
    """{version number: path} of the SavedModel versions under model_dir."""
    return {int(p.name): p for p in Path(model_dir).glob("*")
            if is_version_name(p.name) and (p / "saved_model.pb").is_file()}
