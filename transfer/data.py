"""Data sets: find or download one, split it, weight its classes, feed it to Keras.

A data set is a folder; transfer.layouts finds how its images and labels are laid out.
"""

import dataclasses
import hashlib
import logging
import os
import shutil
import tarfile
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
    """A known data set's archive, how it is checked, and what of it is kept."""

    url: str
    size: int  # bytes of the archive
    folder: str  # the archive's top folder
    layout: str  # what the unpacked data set holds, for the message when it cannot be had
    sha256: str | None = None  # of the archive, checked before it is unpacked
    manifest_sha256: str | None = None  # of the sorted "<file sha256>  <path>" lines of its images
    keep: tuple | None = None  # the top folder's entries that make the data set (None: all)


KNOWN_DATASETS = {
    # The Keras/TensorFlow tutorials' Dogs-vs-Cats subset. Its publisher gives no checksum of
    # the archive, so the archive's size and the sha256 of every image it unpacks are checked.
    "cats_dogs": Download(
        url="https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip",
        size=68_606_236,
        folder="cats_and_dogs_filtered",
        layout="train/<class>/*.jpg and validation/<class>/*.jpg",
        manifest_sha256="188e6d7943cd60041e9a7382bb9e7220d993c3eff62ee900bca9acc2dca69371",
        keep=("train", "validation"),
    ),
    # TensorFlow's flower photos (tf_flowers): 3,670 photos in 5 class folders and LICENSE.txt.
    # Size and sha256 as TensorFlow Datasets pins them: tensorflow/datasets,
    # tensorflow_datasets/url_checksums/tf_flowers.txt.
    "flowers": Download(
        url="https://storage.googleapis.com/download.tensorflow.org/example_images/"
            "flower_photos.tgz",
        size=228_813_984,
        folder="flower_photos",
        layout="<class>/*.jpg (daisy, dandelion, roses, sunflowers, tulips)",
        sha256="4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c",
    ),
}


@dataclasses.dataclass(frozen=True)
class Split:
    """Image files and their integer labels (indices into the class names); for a
    multi-label data set, each label a multi-hot row (a 0/1 per class)."""

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
        raise FileNotFoundError(f"Data set folder {path} does not exist; expected "
                                f"{path}/<class>/*.jpg or {path}/train/<class>/*.jpg.")
    folder = data_home() / name_or_path
    if folder.is_dir():
        return name_or_path, folder
    if name_or_path in KNOWN_DATASETS:
        download_dataset(name_or_path, folder)
        return name_or_path, folder
    raise FileNotFoundError(
        f"No data set {name_or_path!r}: {folder} does not exist. Create {folder}/<class>/*.jpg "
        f"(or {folder}/train/<class>/*.jpg, with validation/ and test/ if you have them), set "
        f"TRANSFER_DATA_HOME to the folder holding {name_or_path}/, or pass a folder path. "
        f"Known downloadable data sets: {', '.join(KNOWN_DATASETS)}.")


def download_dataset(name, folder, spec=None):
    """Download, check and unpack a known data set (or `spec`, a Download) into `folder`.

    Nothing is moved into place before every check has passed, and a tar archive is unpacked
    with tarfile's "data" filter: no absolute paths, links or devices leaving the folder.
    """
    spec = spec or KNOWN_DATASETS[name]
    folder = Path(folder)
    log.info("Downloading %s from %s", name, spec.url)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / "archive"
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as error:
            raise FileNotFoundError(
                f"Could not download data set {name!r} from {spec.url} ({error}). On a machine with "
                f"internet, download that archive and unpack it so that {folder}/ holds "
                f"{spec.layout} (the archive's {spec.folder}/ folder holds them), or set "
                f"TRANSFER_DATA_HOME to a folder holding {name}/.") from None
        size = archive.stat().st_size
        if size != spec.size:
            raise ValueError(f"Downloaded {spec.url} is {size} bytes; expected {spec.size}. "
                             "Delete it and try again, or unpack a verified copy by hand.")
        if spec.sha256 is not None:
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            if digest != spec.sha256:
                raise ValueError(f"Downloaded {spec.url} has sha256 {digest}; expected "
                                 f"{spec.sha256}. The download is corrupt or changed.")
        unpacked_into = Path(tmp) / "unpacked"
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(unpacked_into)
        else:
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(unpacked_into, filter="data")
            except tarfile.TarError as error:  # FilterError too: a member leaving the folder
                raise ValueError(f"Downloaded {spec.url} cannot be unpacked safely: "
                                 f"{error}.") from None
        unpacked = unpacked_into / spec.folder
        if not unpacked.is_dir():
            raise ValueError(f"The archive from {spec.url} has no {spec.folder}/ folder; "
                             "it is not the data set it should be.")
        if spec.manifest_sha256 is not None:
            digest = manifest_sha256(unpacked)
            if digest != spec.manifest_sha256:
                raise ValueError(f"The files unpacked from {spec.url} have sha256 manifest "
                                 f"{digest}; expected {spec.manifest_sha256}. The download is "
                                 "corrupt or changed.")
        if spec.keep is not None:
            staged = Path(tmp) / "staged"
            staged.mkdir()
            for entry in spec.keep:
                (unpacked / entry).rename(staged / entry)
            unpacked = staged
        unpacked.rename(folder)
    log.info("Data set %s is in %s", name, folder)


def manifest_sha256(folder):
    """sha256 over the sorted lines "<file sha256>  <path>" of the images under folder."""
    folder = Path(folder)
    lines = sorted(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}"
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def stratified_split(split, fraction, seed, part="validation"):
    """Seeded stratified (rest, part) split of a Split; the two never overlap."""
    from sklearn.model_selection import train_test_split

    try:
        train_paths, val_paths, train_labels, val_labels = train_test_split(
            list(split.paths), list(split.labels), test_size=fraction, random_state=seed,
            stratify=list(split.labels))
    except ValueError as error:  # too few images for every class to be on both sides
        raise ValueError(f"There are too few images for a stratified {part} split of "
                         f"{fraction:g} ({error}). Add images, change --{part}-split, or add "
                         f"a {part}/<class>/ folder.") from None
    return Split(tuple(train_paths), tuple(train_labels)), Split(tuple(val_paths), tuple(val_labels))


def iterative_split(split, fraction, seed, part="validation"):
    """Seeded (rest, part) split of a multi-label Split by iterative stratification
    (Sechidis et al. 2011, "On the Stratification of Multi-label Data"): the label with the
    fewest images left is dealt out first, each of its images to the side that most lacks it,
    except that a side still without the label gets the next one, so that a label of two or
    more images is on both sides. Images of no label fill the sides to their sizes."""
    carries = np.asarray(split.labels, dtype=bool).reshape(len(split), -1)
    rng = np.random.default_rng(seed)
    share = np.array([1 - fraction, fraction])
    wanted = share * len(split)  # images each side still wants
    wanted_label = np.outer(share, carries.sum(axis=0))  # per side and label
    have = np.zeros_like(wanted_label)
    side = np.full(len(split), -1)
    while (side < 0).any():
        left = carries[side < 0].sum(axis=0)
        if left.any():
            label = min(np.flatnonzero(left), key=lambda c: left[c])
            todo = np.flatnonzero((side < 0) & carries[:, label])
        else:
            label, todo = None, np.flatnonzero(side < 0)
        for image in rng.permutation(todo):
            if label is None:
                need = wanted
            elif (have[:, label] == 0).any() and have[:, label].any():
                need = (have[:, label] == 0).astype(float)
            else:
                need = wanted_label[:, label] + 1e-9 * wanted  # ties: the side wanting more
            choice = rng.choice(np.flatnonzero(need == need.max()))
            side[image] = choice
            wanted[choice] -= 1
            wanted_label[choice] -= carries[image]
            have[choice] += carries[image]
    rest, chosen = np.flatnonzero(side == 0), np.flatnonzero(side == 1)
    if not len(rest) or not len(chosen):
        raise ValueError(f"There are too few images ({len(split)}) for a {part} split of "
                         f"{fraction:g}. Add images, change --{part}-split, or give the {part} "
                         "images a split column in the label file.")
    return tuple(Split(tuple(split.paths[i] for i in picked),
                       tuple(split.labels[i] for i in picked)) for picked in (rest, chosen))


def as_split(report, classes, multi_label=False):
    """A check.SplitReport's usable files as a Split, by absolute path (so that a run can be
    resumed from any folder), sorted within each class (multi-label: sorted, each with its
    multi-hot row): the same files, however listed (a label file's rows, folders), are split
    the same way."""
    if multi_label:
        carried = {cls: {os.path.abspath(p) for p in report.good[cls]} for cls in classes}
        paths = sorted(set().union(*carried.values(),
                                   (os.path.abspath(p) for p in report.unlabelled)))
        return Split(tuple(paths), tuple(tuple(int(path in carried[cls]) for cls in classes)
                                         for path in paths))
    pairs = [(path, label) for label, cls in enumerate(classes)
             for path in sorted(os.path.abspath(p) for p in report.good[cls])]
    return Split(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


def assign_splits(reports, classes, validation_split, test_split, seed, multi_label=False):
    """{"train", "validation" and, when there is one, "test": Split} from checked splits.

    The splits the layout gives are kept; the rest are carved from the training images,
    seeded and stratified (multi-label: iteratively, iterative_split): the test images first
    (`test_split` of them), so that nothing chosen on validation images ever sees them, then
    `validation_split` of all the images.
    """
    given = {report.name: report for report in reports}
    pool = given.get("train") or next(iter(given.values()))
    where = "train/" if pool.name == "train" else "the data set"
    splits = {"train": as_split(pool, classes, multi_label)}
    for name in ("validation", "test"):
        if name in given:
            splits[name] = as_split(given[name], classes, multi_label)
            if not splits[name]:
                raise ValueError(f"{given[name].folder} holds no usable images; add some, or "
                                 f"remove the folder to take the {name} images from {where} "
                                 f"(seeded: --{name}-split).")
    if "test" in given and test_split:
        raise ValueError(f"The data set gives its test images; drop --test-split "
                         f"{test_split:g}, or remove its test split.")
    single = [cls for cls, count in pool.counts().items() if count < 2]
    carve = iterative_split if multi_label else stratified_split
    if single and multi_label:  # the image carries other labels: kept, with a warning
        log.warning("Warning: label(s) %s are on one image of %s: too few to be both trained "
                    "and validated on; such a label keeps the decision threshold 0.5. Add "
                    "images carrying it.", ", ".join(single), where)
    elif single and ("validation" not in splits or (test_split and "test" not in splits)):
        raise ValueError(f"Class(es) {', '.join(single)} have one image in {where}, too few "
                         "to be both trained and validated on; add images, or add a "
                         "validation/<class>/ folder.")
    if "test" not in splits and test_split:
        splits["train"], splits["test"] = carve(splits["train"], test_split, seed, "test")
        log.info("A seeded stratified %.0f%% of %s is the test set (%d images), never trained "
                 "or chosen on", 100 * test_split, where, len(splits["test"]))
    if "validation" not in splits:
        fraction = validation_split / (1 - test_split) if test_split else validation_split
        splits["train"], splits["validation"] = carve(splits["train"], fraction, seed)
        log.info("A seeded stratified %.0f%% of %s validates (%d images)",
                 100 * validation_split, where, len(splits["validation"]))
    return splits


def positive_weights(labels, mode="auto"):
    """Per-label weights [C] of the positives in a multi-label loss, or None when not wanted:
    a label's negatives over its positives, which gives both the same total weight. "auto"
    weights only the rare labels (IMBALANCE_RATIO times more negatives than positives), 1
    for the others; "balanced" weights every label; "none" never weights."""
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class_weights must be one of {', '.join(CLASS_WEIGHT_MODES)}; "
                         f"received {mode!r}.")
    carries = np.asarray(labels, dtype=np.float64)
    positives = carries.sum(axis=0)
    ratio = (len(carries) - positives) / np.maximum(positives, 1)
    weights = np.where(positives > 0, ratio, 1.0)
    if mode == "auto":
        weights = np.where(ratio >= IMBALANCE_RATIO, weights, 1.0)
    if mode == "none" or np.all(weights == 1):
        return None
    return [float(w) for w in weights]


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

        # One call at a time: the layer draws from one seeded generator, so calls running in
        # parallel would take each other's draws in whatever order they ran, and a seeded run
        # would not repeat. The resampling is a few percent of the backbone's time per image.
        dataset = dataset.map(transform)
    # Parallel maps run one call per core, not as tf.data's autotuning sets them: beside the
    # model's own threads, its tuning left a run on one core in 3 of 4 tries (twice the time).
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)
