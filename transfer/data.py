"""Image folders: find a data set, list and check its files, split it, feed it to Keras.

A data set is a folder holding train/<class>/* and optionally validation/<class>/*.
"""

import concurrent.futures
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
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
MAX_IMAGE_PIXELS = 64_000_000  # larger declared sizes are rejected before decoding
CACHE_BUDGET_BYTES = 2 * 1024**3  # decoded images kept in memory up to this size


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


class ImageError(ValueError):
    """A file that cannot be used as an image; the message says why."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Image files and their integer labels (indices into the class names)."""

    paths: tuple
    labels: tuple

    def __len__(self):
        return len(self.paths)


def data_home():
    return Path(os.environ.get("TRANSFER_DATA_HOME", "data"))


def resolve_dataset(name_or_path):
    """(name, folder) of a data set given by name (under the data home) or by path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve().name, path
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


def is_image_file(path):
    path = Path(path)
    return (not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file())


def list_images(folder):
    """Image files under `folder` (recursively), sorted, hidden files skipped."""
    folder = Path(folder)
    return sorted(path for path in folder.rglob("*")
                  if is_image_file(path) and not any(p.startswith(".") for p in path.parts[-2:]))


def class_names(train_dir):
    """Sorted class folder names under train_dir; ValueError if there are fewer than two."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir} does not exist; expected {train_dir}/<class>/*.jpg.")
    names = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise ValueError(
            f"{train_dir} has {len(names)} class folder(s) ({', '.join(names) or 'none'}); "
            f"expected at least two: {train_dir}/<class>/*.jpg.")
    return names


def scan_split(split_dir, classes):
    """A Split of every image in split_dir/<class>/ for the given classes."""
    split_dir = Path(split_dir)
    extra = sorted(p.name for p in split_dir.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.name not in classes)
    if extra:
        raise ValueError(f"{split_dir} has class folders {', '.join(extra)} that train/ lacks; "
                         f"expected only {', '.join(classes)}.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name) if (split_dir / name).is_dir() else []
        if not files:
            raise ValueError(f"Class folder {split_dir / name} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder.")
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return Split(tuple(paths), tuple(labels))


def load_image(path, size):
    """Decode an image file to a (size, size, 3) uint8 RGB array, or raise ImageError.

    EXIF orientation is applied; alpha is composited on white; animations give their first
    frame; 16-bit and other modes are converted to 8-bit RGB.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"too large: {width}x{height} pixels "
                                 f"(limit {MAX_IMAGE_PIXELS:,})")
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Image.UnidentifiedImageError:
        reason = "empty file" if Path(path).stat().st_size == 0 else "not an image"
        raise ImageError(reason) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot decode: {error}") from None


def _to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def check_images(paths, size, workers=None):
    """Decode every file once; returns (indices of good files, [(path, reason)] of bad ones)."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    good, bad = [], []

    def attempt(path):
        try:
            load_image(path, size)
            return None
        except ImageError as error:
            return str(error)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for index, (path, reason) in enumerate(zip(paths, pool.map(attempt, paths))):
            if reason is None:
                good.append(index)
            else:
                bad.append((path, reason))
    return good, bad


def stratified_split(split, fraction, seed):
    """Seeded stratified (train, validation) split of a Split; the two never overlap."""
    from sklearn.model_selection import train_test_split

    train_paths, val_paths, train_labels, val_labels = train_test_split(
        list(split.paths), list(split.labels), test_size=fraction, random_state=seed,
        stratify=list(split.labels))
    return Split(tuple(train_paths), tuple(train_labels)), Split(tuple(val_paths), tuple(val_labels))


def augmentation(cfg):
    """The training-only augmentation as one Keras Sequential, or None when it is off."""
    import keras

    if not cfg.augment:
        return None
    layers = []
    if cfg.flip != "none":
        layers.append(keras.layers.RandomFlip(cfg.flip, seed=cfg.seed))
    if cfg.rotation:
        layers.append(keras.layers.RandomRotation(cfg.rotation, seed=cfg.seed))
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, seed=cfg.seed))
    if cfg.translation:
        layers.append(keras.layers.RandomTranslation(cfg.translation, cfg.translation,
                                                     seed=cfg.seed))
    if cfg.contrast:
        layers.append(keras.layers.RandomContrast(cfg.contrast, seed=cfg.seed))
    return keras.Sequential(layers, name="augmentation") if layers else None


def pipeline(split, size, batch_size, augment=None, shuffle_seed=None):
    """A batched tf.data pipeline of (float32 0-255 images, labels).

    Each image is decoded once: decoded images are cached in memory when they fit
    CACHE_BUDGET_BYTES. `augment` (a Keras layer) runs on the batches, for training only.
    """
    import tensorflow as tf

    def decode(path):
        return load_image(path.decode(), size)

    def load(path, label):
        image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        image.set_shape((size, size, 3))
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices(
        (list(split.paths), np.asarray(split.labels, dtype=np.int32)))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if len(split) * size * size * 3 <= CACHE_BUDGET_BYTES:
        dataset = dataset.cache()
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(split), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
