"""SavedModel export in TensorFlow Serving's layout: saved_models/<name>/<int version>/."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
CLASSES_ASSET = "classes.json"


def next_version(model_dir):
    """1 + the largest integer version folder under model_dir (1 when there is none)."""
    versions = [int(p.name) for p in Path(model_dir).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def export_savedmodel(model, classes, model_dir, sample_images=None, config=None):
    """Write model_dir/<next version>/ and return its path; never overwrites a version.

    The serving_default signature takes `images` [N, H, W, 3] float32 0-255 and returns
    `probabilities` [N, C], `class_index` [N] and `class_name` [N]. The version is written
    under a temporary name and renamed into place, then reloaded and checked against
    `model` on `sample_images` (random pixels if none are given).
    """
    import keras
    import tensorflow as tf

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    size = model.input_shape[1]
    names = tf.constant(list(classes))

    def serve(images):
        probabilities = model(images, training=False)
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "class_index": index,
                "class_name": tf.gather(names, index)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])

    version = next_version(model_dir)
    staging = model_dir / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        archive.write_out(str(staging), verbose=False)
        extra = staging / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / CLASSES_ASSET).write_text(json.dumps(list(classes)) + "\n")
        if config is not None:
            (extra / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        target = model_dir / str(version)
        if target.exists():  # another export took this version meanwhile
            raise FileExistsError(f"{target} already exists; exports never overwrite a version.")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    verify_export(model, target, sample_images)
    log.info("Exported %s (version %d of %s)", target, version, model_dir.name)
    return target


def verify_export(model, path, images=None, atol=1e-4):
    """Reload the SavedModel at `path` and check it matches `model`; ValueError if not."""
    import tensorflow as tf

    size = model.input_shape[1]
    if images is None:
        images = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
    expected = np.asarray(model(images, training=False))
    loaded = tf.saved_model.load(str(path))
    served = loaded.signatures[SIGNATURE](images=tf.constant(images, tf.float32))
    got = served["probabilities"].numpy()
    if got.shape != expected.shape or not np.allclose(got, expected, atol=atol):
        raise ValueError(f"The export at {path} does not reproduce the model: largest difference "
                         f"{np.max(np.abs(got - expected)):.2e} (tolerance {atol}).")
    return float(np.max(np.abs(got - expected)))


def read_classes(path):
    """Class names stored inside an export version folder."""
    asset = Path(path) / "assets.extra" / CLASSES_ASSET
    if not asset.is_file():
        raise FileNotFoundError(f"{path} has no {asset.relative_to(path)}; was it exported by "
                                "transfer? Re-export with `python -m transfer export`.")
    return json.loads(asset.read_text())
