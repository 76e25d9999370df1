"""Feature caches: each training image through the frozen layers about once, not every epoch.

Phase 1 trains the head on a frozen backbone; phase 2 trains the backbone's top blocks while
everything below the cut stays frozen. A frozen layer is a fixed function of the image, so the
frozen part's output is computed once for `views` augmented copies of every training image
(and one plain copy of every validation image), and only the trainable part is fit, on one
view per image per epoch. The models fit here share their layers with the classifier, so the
classifier that is saved and exported still takes raw images and holds the whole backbone.

Training views are stored in float16 (pooled features in float32); validation images in
float32, so that the validation losses the run chooses by, and the outputs its calibration and
report take from the cache, are the classifier's to float32 rounding.

Entries are .npy files in $TRANSFER_CACHE_HOME/features/<key>/, memory-mapped while in use.
The key hashes all the features depend on (the frozen layers' weights, input size,
augmentation settings and seed, number of views, and each file's path, size and mtime), so a
stale entry is never read. The folder stays under its byte budget by removing the least
recently used entries; an entry larger than the whole budget is not cached.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from transfer.files import cache_home, write_json
from transfer.model import backbone_of, image_model, pooled_from

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: validation in float32
ENTRY_OVERHEAD = 4096  # bytes beside the array: the .npy header and key.json


class FeatureStore:
    """A folder of feature arrays kept under `budget` bytes, least recently used removed first.

    Several processes may share the folder (two trainings of the same data at once): an
    entry appears whole, by one rename, and the second to create one uses the first's.
    """

    def __init__(self, root, budget):
        self.root, self.budget = Path(root), budget
        self.in_use = set()  # never removed to make room

    def load(self, key):
        """The entry's array, memory-mapped, or None when there is no complete entry."""
        path = self.root / key / "features.npy"
        if not (path.is_file() and (path.parent / "key.json").is_file()):
            return None
        try:
            os.utime(path.parent)  # most recently used
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError:  # another process removed it to make room just now
            return None
        self.in_use.add(key)
        return array

    def create(self, key, parts, shape, dtype, fill):
        """Make room, call fill(array) on a new [shape] array and store it under key.

        Returns the stored array (memory-mapped), or None when it would not fit the budget.
        """
        size = math.prod(shape) * np.dtype(dtype).itemsize + ENTRY_OVERHEAD
        if size > self.budget:
            return None
        self._make_room(size)
        temporary = self.root / f".tmp-{os.getpid()}-{key}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        try:
            array = np.lib.format.open_memmap(temporary / "features.npy", "w+", dtype, shape)
            fill(array)
            array.flush()
            del array
            write_json(temporary / "key.json", parts)
            self._publish(temporary, key)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return self.load(key)

    def _publish(self, temporary, key):
        """Rename the finished entry into place, unless another process got there first."""
        target = self.root / key
        for _ in range(2):
            try:
                os.rename(temporary, target)
                return
            except OSError:  # ENOTEMPTY or EEXIST: the target is there
                if (target / "key.json").is_file() and (target / "features.npy").is_file():
                    log.info("Another process cached these features first; using its entry %s",
                             target)
                    return
                shutil.rmtree(target, ignore_errors=True)  # not an entry: replace it
        os.rename(temporary, target)

    def size(self):
        return _tree_size(self.root)

    def _make_room(self, needed):
        for folder in self.root.glob(".tmp-*"):  # left by a killed run
            pid = folder.name.split("-")[1]
            if not pid.isdigit() or not _running(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
        entries = sorted((folder for folder in self.root.glob("*")
                          if not folder.name.startswith(".") and folder.name not in self.in_use),
                         key=_mtime)
        total = self.size() if self.root.is_dir() else 0
        while entries and total + needed > self.budget:
            oldest = entries.pop(0)
            freed = _tree_size(oldest)
            shutil.rmtree(oldest, ignore_errors=True)
            total -= freed
            log.info("Feature cache over its %.0f MB budget: removed %s (%.0f MB)",
                     self.budget / 2**20, oldest.name, freed / 2**20)


def _tree_size(folder):
    """The bytes of the files under folder, skipping those another process removes meanwhile
    (os.walk passes over a folder that vanishes; Path.rglob would raise)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _mtime(path):
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed by another process meanwhile: oldest of all
        return 0.0


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Views(keras.utils.PyDataset):
    """Batches of (cached features, labels) from a [views, N, ...] array.

    With a shuffle seed, each epoch visits every image once in a new order, and each image
    steps through its views in turn from a random start, so K epochs see all K views.
    Without one, batches follow the file order through view 0 (for validation).
    """

    def __init__(self, features, labels, batch_size, shuffle_seed=None):
        super().__init__()
        self.features, self.batch_size = features, batch_size
        self.labels = np.asarray(labels, dtype=np.int32)
        count, views = len(self.labels), features.shape[0]
        self.rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        self.start = (np.zeros(count, dtype=np.int64) if self.rng is None
                      else self.rng.integers(views, size=count))
        self.epoch = 0
        self._arrange()

    def _arrange(self):
        count = len(self.labels)
        self.order = np.arange(count) if self.rng is None else self.rng.permutation(count)
        self.view = (self.start + self.epoch) % self.features.shape[0]

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index):
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        return self.features[self.view[rows], rows].astype("float32"), self.labels[rows]

    def on_epoch_end(self):
        self.epoch += 1
        self._arrange()


def frozen_boundary(backbone, unfreeze_from):
    """(tensor, None): the one tensor through which the backbone's frozen layers (those
    before the cut) feed the rest; or (None, why not) when there is no such tensor."""
    from transfer.backbones import cut_index

    cut = cut_index(backbone, unfreeze_from)
    frozen = {id(layer) for layer in backbone.layers[:cut]}
    crossing = {}
    for layer in backbone.layers[cut:]:
        for tensor in keras.tree.flatten(layer.input):
            if id(tensor._keras_history.operation) in frozen:
                crossing[id(tensor)] = tensor
    if cut <= 1:
        return None, f"nothing below {unfreeze_from} is frozen"
    if len(crossing) != 1:
        names = sorted(t._keras_history.operation.name for t in crossing.values())
        return None, (f"the frozen layers feed the layers from {unfreeze_from} on through "
                      f"{len(crossing)} tensors ({', '.join(names) or 'none a layer makes'}), "
                      "not one")
    tensor = next(iter(crossing.values()))
    try:
        keras.Model(tensor, backbone.output)
    except ValueError as error:  # an operation that is not a layer also crosses the cut
        name = tensor._keras_history.operation.name
        return None, f"the layers from {unfreeze_from} on need more than {name}'s output: {error}"
    return tensor, None


class CachedFeeds:
    """What each phase fits: a model sharing the classifier's trainable layers, on cached
    outputs of the frozen ones, or (where that is not valid) the classifier on images.

    `images(split, augment=False, shuffle=False)` gives the batched image pipelines. Called
    with a Phase, returns (model to fit, training data, validation data, how it is fed).
    """

    def __init__(self, classifier, cfg, phases, train_split, val_split, images, verbose=1):
        from transfer.backbones import cut_index
        from transfer.data import augmentation

        self.classifier, self.cfg, self.images, self.verbose = classifier, cfg, images, verbose
        self.splits = {"train": train_split, "validation": val_split}
        self.augmented = augmentation(cfg) is not None
        self.views = cfg.cache_views if self.augmented else 1  # else all views would be equal
        self.store = FeatureStore(cache_home() / "features", cfg.cache_disk_mb * 2**20)
        # The deepest cut's cache serves every phase: the others' features are computed from it
        # (None: no phase fine-tunes, or the layers below that cut feed it through no one tensor).
        cut = min((p.unfreeze_from for p in phases if p.unfreeze_from), default=None,
                  key=lambda prefix: cut_index(self._backbone(), prefix))
        self.fine_tunes = cut is not None
        self.deepest = frozen_boundary(self._backbone(), cut)[0] if cut else None

    def __call__(self, phase):
        if phase.unfreeze_from is None:
            pooled = self._pooled()
            if pooled is None:
                return self._fallback(f"the pooled features exceed the "
                                      f"{self.cfg.cache_disk_mb} MB cache budget")
            return _head_model(self.classifier), *self._feeds(pooled), "cached backbone features"
        tensor, reason = frozen_boundary(self._backbone(), phase.unfreeze_from)
        if tensor is None:
            return self._fallback(reason)
        below = self._below(tensor)
        if below is None:
            return self._fallback(f"the outputs of the layers below {phase.unfreeze_from} "
                                  f"exceed the {self.cfg.cache_disk_mb} MB cache budget")
        return (_top_model(self.classifier, tensor), *self._feeds(below),
                f"cached outputs of the frozen layers below {phase.unfreeze_from}")

    def validation_outputs(self):
        """The classifier's {"logits", "features"} for the validation images, as
        model.scored(raw=True) gives them from the images (to float32 rounding), computed from
        the cache the phases validated on: the top layers' pass over the deepest cut's
        outputs, or with no fine-tuning the pooled features. None where that is not cached."""
        from transfer.layers import Logits

        if self.deepest is not None:
            below = self._below(self.deepest)
            if below is None:
                return None
            top = pooled_from(self.classifier, self.deepest)
            batches = _array_batches(below, self.cfg.batch_size)("validation")(0)
            features = np.concatenate([top.predict_on_batch(x) for x in batches])
        elif not self.fine_tunes:  # the head's own cache, of the frozen backbone
            pooled = self._pooled()
            if pooled is None:
                return None
            features = np.asarray(pooled[1][0])
        else:  # the fine-tuned phases ran on images
            return None
        logits = Logits(self.classifier.get_layer("probabilities"))(features)
        return {"logits": keras.ops.convert_to_numpy(logits), "features": features}

    def _backbone(self):
        return backbone_of(self.classifier)

    def _fallback(self, reason):
        log.info("Not caching: %s; the frozen layers run in every step.", reason)
        return (self.classifier, self.images("train", augment=True, shuffle=True),
                self.images("validation"), f"images ({reason})")

    def _feeds(self, features):
        train, val = features
        return (Views(train, self.splits["train"].labels, self.cfg.batch_size, self.cfg.seed),
                Views(val, self.splits["validation"].labels, self.cfg.batch_size))

    def _below(self, tensor):
        """(train, validation) outputs of the frozen layers at `tensor`, or None. Computed
        from the deepest cut's cache when `tensor` is above it."""
        extractor = image_model(self.classifier, tensor)
        level = f"below {tensor._keras_history.operation.name}"
        deepest = self.deepest
        below = self._below(deepest) if deepest is not None and deepest is not tensor else None
        if below is None:
            return self._features(level, extractor, extractor, "float16", self._image_batches)
        return self._features(level, extractor, keras.Model(deepest, tensor), "float16",
                              _array_batches(below, self.cfg.batch_size))

    def _pooled(self):
        """(train, validation) pooled backbone outputs, or None. Computed from the deepest
        cut's cache when there is one: one pass through the frozen layers then serves all."""
        classifier = self.classifier
        pooled = keras.Model(classifier.input, classifier.get_layer("pool").output)
        tensor = self.deepest
        below = self._below(tensor) if tensor is not None else None
        if below is None:
            return self._features("pooled", pooled, pooled, "float32", self._image_batches)
        return self._features("pooled", pooled, pooled_from(classifier, tensor), "float32",
                              _array_batches(below, self.cfg.batch_size))

    def _features(self, level, keyed_by, extractor, dtype, batches):
        """(train, validation) arrays of the features at `level`, from the store or computed
        with extractor over batches(split)(view), the training views' in `dtype`;
        None when they exceed the budget.

        keyed_by: the model from images to these features, whose weights the key hashes.
        """
        weights = hashlib.sha256()  # once for both splits: a large backbone takes a while
        for weight in keyed_by.weights:
            weights.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
        arrays = []
        for split in ("train", "validation"):
            views = self.views if split == "train" else 1
            parts = self._key_parts(level, weights.hexdigest(), keyed_by.input_shape[1], split,
                                    views)
            key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
            array = self.store.load(key)
            if array is not None:
                log.info("Using cached %s features of the %s images (%s)", level, split,
                         self.store.root / key)
            else:
                shape = (views, len(self.splits[split]), *extractor.output_shape[1:])
                stored = dtype if split == "train" else "float32"
                array = self.store.create(key, parts, shape, stored, lambda out: self._fill(
                    out, extractor, batches(split), f"{level} {split}"))
                if array is None:
                    return None
            arrays.append(array)
        return arrays

    def _fill(self, out, extractor, batches, what):
        started = time.time()
        views, count = out.shape[:2]
        progress = (keras.utils.Progbar(views * count, verbose=1 if self.verbose == 1 else 2,
                                        unit_name="image") if self.verbose else None)
        for view in range(views):
            start = 0
            for x in batches(view):
                y = extractor.predict_on_batch(x)
                out[view, start:start + len(y)] = y
                start += len(y)
                if progress:
                    progress.add(len(y))
        log.info("Cached %s features: %d view(s) of %d images in %.1f s", what, views, count,
                 time.time() - started)

    def _image_batches(self, split):
        dataset = self.images(split, augment=split == "train")
        return lambda view: (images for images, _ in dataset)  # a new augmentation per view

    def _key_parts(self, level, weights_sha256, image_size, split, views):
        files = hashlib.sha256()
        for path in self.splits[split].paths:
            stat = os.stat(path)
            files.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        cfg = self.cfg
        augmentation = ({key: getattr(cfg, key) for key in ("flip", "rotation", "zoom",
                                                           "translation", "contrast", "seed")}
                        if split == "train" and self.augmented else None)
        return {"version": FORMAT_VERSION, "level": level, "backbone": cfg.backbone,
                "image_size": image_size, "weights_sha256": weights_sha256,
                "split": split, "views": views, "augmentation": augmentation,
                "files_sha256": files.hexdigest()}


def _array_batches(arrays, batch_size):
    """batches(split)(view): batches of a cached (train, validation) pair, as float32."""
    def batches(split):
        array = arrays[0 if split == "train" else 1]
        return lambda view: (np.asarray(array[view, i:i + batch_size], dtype="float32")
                             for i in range(0, array.shape[1], batch_size))

    return batches


def _head_model(classifier):
    """The classifier's head (dropout, dense) on pooled features, sharing its layers."""
    inputs = keras.Input(classifier.get_layer("pool").output.shape[1:], name="pooled_features")
    outputs = classifier.get_layer("probabilities")(classifier.get_layer("dropout")(inputs))
    return keras.Model(inputs, outputs, name="head")


def _top_model(classifier, tensor):
    """The backbone's layers from the frozen boundary `tensor` on, and the head, sharing
    the classifier's layers."""
    inputs = keras.Input(tensor.shape[1:], name="frozen_features")
    outputs = _head_model(classifier)(pooled_from(classifier, tensor)(inputs))
    return keras.Model(inputs, outputs, name="top")
