"""Data sets: find or download one, split it, weight its classes, feed it to Keras.

A data set is a folder holding train/<class>/* and optionally validation/<class>/*.
"""

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from transfer.config import CLASS_WEIGHT_MODES
from transfer.images import IMAGE_EXTENSIONS, ImageError, load_image

log = logging.getLogger(__name__)

DECODE_FAILURE = "cannot be decoded any more"  # train.py finds these words in tf.data's error
IMBALANCE_RATIO = 1.5  # "auto" weights classes when the largest is this much bigger than the smallest


@dataclasses.dataclass(frozen=True)
class Download:
    url: str
    size: int  # bytes of the archive
    manifest_sha256: str  # sha256 of the sorted "<sha256 of file>  <relative path>" lines
    folder: str  # the archive's top folder, holding train/ and validation/


# The Keras/TensorFlow tutorials' Dogs-vs-Cats subset. Its publisher gives no checksum of the
# archive, so the archive's size and the sha256 of every image it unpacks are checked.
KNOWN_DATASETS = {
    "cats_dogs": Download(
        url="https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip",
        size=68_606_236,
        manifest_sha256="188e6d7943cd60041e9a7382bb9e7220d993c3eff62ee900bca9acc2dca69371",
        folder="cats_and_dogs_filtered",
    ),
}


@dataclasses.dataclass(frozen=True)
class Split:
    """Image files and their integer labels (indices into the class names)."""

    paths: tuple
    labels: tuple

    def __len__(self):
        return len(self.paths)


def data_home():
    return Path(os.environ.get("TRANSFER_DATA_HOME", "data"))


def dataset_name(name_or_path):
    """The name runs are filed under: a folder's own name, or the name as given."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else name_or_path


def resolve_dataset(name_or_path):
    """(name, folder) of a data set given by name (under the data home) or by path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return dataset_name(name_or_path), path
    if os.sep in str(name_or_path) or name_or_path.startswith("."):
        raise FileNotFoundError(
            f"Data set folder {path} does not exist; expected {path}/train/<class>/*.jpg.")
    folder = data_home() / name_or_path
    if folder.is_dir():
        return name_or_path, folder
    if name_or_path in KNOWN_DATASETS:
        download_dataset(name_or_path, folder)
        return name_or_path, folder
    raise FileNotFoundError(
        f"No data set {name_or_path!r}: {folder} does not exist. Create {folder}/train/<class>/*.jpg "
        f"(and optionally {folder}/validation/<class>/*.jpg), set TRANSFER_DATA_HOME to the folder "
        f"holding {name_or_path}/, or pass a folder path. Known downloadable data sets: "
        f"{', '.join(KNOWN_DATASETS)}.")


def download_dataset(name, folder):
    """Download, check and unpack a known data set into `folder` (train/ and validation/)."""
    spec = KNOWN_DATASETS[name]
    folder = Path(folder)
    log.info("Downloading %s from %s", name, spec.url)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as error:
            raise FileNotFoundError(
                f"Could not download data set {name!r} from {spec.url} ({error}). On a machine with "
                f"internet, download that archive and unpack it so that {folder}/train/<class>/*.jpg "
                f"and {folder}/validation/<class>/*.jpg exist (the archive's {spec.folder}/ folder "
                "holds train/ and validation/), or set TRANSFER_DATA_HOME to a folder holding "
                f"{name}/.") from None
        size = archive.stat().st_size
        if size != spec.size:
            raise ValueError(f"Downloaded {spec.url} is {size} bytes; expected {spec.size}. "
                             "Delete it and try again, or unpack a verified copy by hand.")
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(tmp)
        unpacked = Path(tmp) / spec.folder
        digest = manifest_sha256(unpacked)
        if digest != spec.manifest_sha256:
            raise ValueError(f"The files unpacked from {spec.url} have sha256 manifest {digest}; "
                             f"expected {spec.manifest_sha256}. The download is corrupt or changed.")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for split in ("train", "validation"):
            (unpacked / split).rename(staged / split)
        staged.rename(folder)
    log.info("Data set %s is in %s", name, folder)


def manifest_sha256(folder):
    """sha256 over the sorted lines "<file sha256>  <path>" of the images under folder."""
    folder = Path(folder)
    lines = sorted(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}"
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def stratified_split(split, fraction, seed):
    """Seeded stratified (train, validation) split of a Split; the two never overlap."""
    from sklearn.model_selection import train_test_split

    try:
        train_paths, val_paths, train_labels, val_labels = train_test_split(
            list(split.paths), list(split.labels), test_size=fraction, random_state=seed,
            stratify=list(split.labels))
    except ValueError as error:  # too few images for every class to be on both sides
        raise ValueError(f"train/ has too few images for a stratified validation split of "
                         f"{fraction:g} ({error}). Add images, change --validation-split, or add "
                         "a validation/<class>/ folder.") from None
    return Split(tuple(train_paths), tuple(train_labels)), Split(tuple(val_paths), tuple(val_labels))


def class_weights(labels, num_classes, mode="auto"):
    """{label: weight} that balances the classes' total weight, or None when not wanted.

    "balanced" always weights; "auto" weights only when the largest class has at least
    IMBALANCE_RATIO times the images of the smallest; "none" never does.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class_weights must be one of {', '.join(CLASS_WEIGHT_MODES)}; "
                         f"received {mode!r}.")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if mode == "none" or (mode == "auto" and counts.max() < IMBALANCE_RATIO * counts.min()):
        return None
    return {label: float(len(labels) / (num_classes * count))
            for label, count in enumerate(counts) if count}


def augmentation(cfg):
    """The training-only augmentation as one Keras Sequential, or None when it is off."""
    import keras

    from transfer.layers import RandomAffine

    if not cfg.augment:
        return None
    layers = []
    if cfg.flip != "none" or cfg.rotation or cfg.zoom or cfg.translation:
        layers.append(RandomAffine(cfg.flip, cfg.rotation, cfg.zoom, cfg.translation,
                                   seed=cfg.seed))
    if cfg.contrast:
        layers.append(keras.layers.RandomContrast(cfg.contrast, seed=cfg.seed))
    return keras.Sequential(layers, name="augmentation") if layers else None


def decoded(split, size, memory_budget=2 * 1024**3, cache_file=None):
    """A tf.data dataset of (uint8 image, label), decoded in parallel and only once.

    Decoded images are cached in memory when they fit `memory_budget` bytes, else in
    `cache_file` (a path prefix for tf.data's file cache, in an existing folder), else not at
    all. Pipelines built on one such dataset share its cache.
    """
    import tensorflow as tf

    def decode(path):
        path = os.fsdecode(path)
        try:
            return load_image(path, size)
        except ImageError as error:  # it passed the check at the start of the run
            raise ValueError(f"{path} {DECODE_FAILURE} ({error}): it changed after the data "
                             "set was checked.") from None

    def load(path, label):
        image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        image.set_shape((size, size, 3))
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices(
        ([os.fsencode(path) for path in split.paths], np.asarray(split.labels, dtype=np.int32)))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if len(split) * size * size * 3 <= memory_budget:
        return dataset.cache()
    if cache_file is not None:
        return dataset.cache(str(cache_file))
    return dataset


def batched(dataset, batch_size, augment=None, shuffle_seed=None):
    """Batches of (float32 0-255 images, labels) from a `decoded` dataset, prefetched.

    `augment` (a Keras layer) runs on the batches, for training only, and differs on every
    pass; with `shuffle_seed` the order changes on every pass too.
    """
    import tensorflow as tf

    if shuffle_seed is not None:
        dataset = dataset.shuffle(dataset.cardinality(), seed=shuffle_seed,
                                  reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment is not None:
        # Compiled by XLA: the augmentation's resampling then takes a third of the CPU time.
        # XLA compiles each batch shape anew (half a second), so a last, smaller batch is
        # padded to the full size.
        compiled = tf.function(lambda x: augment(x, training=True), jit_compile=True)

        def transform(x, y):
            count = tf.shape(x)[0]
            padded = tf.pad(x, [[0, batch_size - count], [0, 0], [0, 0], [0, 0]])
            return compiled(padded)[:count], y

        dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    # Parallel maps run one call per core, not as tf.data's autotuning sets them: beside the
    # model's own threads, its tuning left a run on one core in 3 of 4 tries (twice the time).
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)
