"""Feature and image caches: same model as without them, never stale, never over budget."""

import json
import logging
import os
import re

import keras
import numpy as np
import pytest

from conftest import TINY_CUT, TINY_SIZE, make_dataset, split_of
from transfer import data
from transfer.backbones import get_spec
from transfer.cache import FeatureStore, Views, frozen_boundary
from transfer.export import export_savedmodel
from transfer.images import load_image
from transfer.model import load_model
from transfer.pipeline import train


def _train(cfg, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transfer"):
        run_dir = train(cfg, verbose=0)
    return run_dir, caplog.text


def _structure(model):
    """Every layer, nested ones included: name (Keras numbers input layers), type, shapes."""
    return [("input" if isinstance(layer, keras.layers.InputLayer) else layer.name,
             type(layer).__name__, [tuple(w.shape) for w in layer.weights])
            for layer in model._flatten_layers()]


def _signatures(version):
    """{signature: (inputs, outputs)}, each {name: (shape, dtype)}, of a SavedModel."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version))

    def specs(structure):
        return {name: (tuple(spec.shape), spec.dtype.name) for name, spec in structure.items()}

    return {name: (specs(fn.structured_input_signature[1]), specs(fn.structured_outputs))
            for name, fn in loaded.signatures.items()}


def test_cached_and_uncached_runs_give_the_same_model(tiny_config, tmp_path, caplog):
    dataset = make_dataset(tmp_path / "stripes", per_class=24, validation=8)
    settings = dict(data=str(dataset), epochs=8, fine_tune_epochs=2, batch_size=8,
                    learning_rate=1e-2, fine_tune_learning_rate=1e-4)
    cached, log_cached = _train(tiny_config(**settings), caplog)
    plain, log_plain = _train(tiny_config(cache=False, **settings), caplog)
    assert "on cached backbone features" in log_cached
    assert f"on cached outputs of the frozen layers below {TINY_CUT}" in log_cached
    assert "on cached" not in log_plain and "on images (--no-cache)" in log_plain

    # The saved classifier is the whole network on raw images either way.
    model, reference = load_model(cached / "model.keras"), load_model(plain / "model.keras")
    assert _structure(model) == _structure(reference)
    assert model.input_shape == (None, TINY_SIZE, TINY_SIZE, 3)
    assert model.count_params() == reference.count_params()
    exports = [export_savedmodel(m, ["horizontal", "vertical"], tmp_path / "exports" / name)
               for m, name in ((model, "cached"), (reference, "plain"))]
    assert _signatures(exports[0]) == _signatures(exports[1])
    assert _signatures(exports[0])["serving_default"][0] == {
        "images": ((None, TINY_SIZE, TINY_SIZE, 3), "float32")}
    summaries = [json.loads((run / "summary.json").read_text()) for run in (cached, plain)]
    assert summaries[0]["phases"]["head"]["fed"] == "cached backbone features"
    assert summaries[1]["phases"]["fine_tune"]["fed"] == "images (--no-cache)"
    accuracies = [summary["val_accuracy"] for summary in summaries]
    assert min(accuracies) >= 0.9 and abs(accuracies[0] - accuracies[1]) <= 0.1, accuracies
    # The run's own validation accuracy is the model's accuracy on raw validation images.
    images = np.stack([load_image(p, TINY_SIZE) for p in sorted(
        (dataset / "validation").rglob("*.jpg"))]).astype("float32")
    labels = np.array([0 if "horizontal" in str(p) else 1 for p in sorted(
        (dataset / "validation").rglob("*.jpg"))])
    measured = (model.predict(images, verbose=0).argmax(axis=1) == labels).mean()
    assert measured == pytest.approx(summaries[0]["val_accuracy"])
    assert not (cached / "image_cache").exists()


def test_changed_augmentation_or_files_invalidate_the_cache(tiny_config, dataset, caplog):
    settings = dict(epochs=1, fine_tune_epochs=0)
    _, first = _train(tiny_config(**settings), caplog)
    assert "Cached pooled train features" in first
    _, again = _train(tiny_config(**settings), caplog)
    assert "Using cached pooled features of the train images" in again
    assert "Cached pooled" not in again

    _, rotated = _train(tiny_config(rotation=0.2, **settings), caplog)
    assert "Cached pooled train features" in rotated  # new augmentation: computed anew
    assert "Using cached pooled features of the validation images" in rotated  # not augmented

    changed = sorted((dataset / "train" / "vertical").iterdir())[0]
    os.utime(changed, ns=(0, 0))  # same name, different file as far as the cache can know
    _, touched = _train(tiny_config(**settings), caplog)
    assert "Cached pooled train features" in touched
    (dataset / "validation" / "vertical" / "vertical_v0.jpg").unlink()
    _, fewer = _train(tiny_config(**settings), caplog)
    assert "Cached pooled validation features" in fewer


def _add(store, key, value, age):
    """Store a 10,000-byte entry from a new run and make it `age` seconds old."""
    store = FeatureStore(store.root, store.budget)  # a run keeps what it uses itself
    array = store.create(key, {}, (2500,), "float32", lambda out: out.fill(value))
    if array is not None:
        stamp = 1_000_000_000 - age
        os.utime(store.root / key, (stamp, stamp))
    return array


def test_feature_store_stays_under_its_budget(tmp_path):
    store = FeatureStore(tmp_path / "features", budget=35_000)  # room for three entries
    for index in range(5):
        assert _add(store, f"key{index}", index, age=100 - index) is not None
        assert store.size() <= store.budget
    assert sorted(p.name for p in store.root.iterdir()) == ["key2", "key3", "key4"]
    assert store.create("huge", {}, (store.budget,), "float32", lambda out: None) is None
    assert not (store.root / "huge").exists() and store.size() <= store.budget
    np.testing.assert_array_equal(store.load("key4"), np.full(2500, 4))


def test_store_never_removes_what_this_run_uses(tmp_path):
    store = FeatureStore(tmp_path / "features", budget=35_000)
    for index, key in enumerate(("first", "second", "third")):
        _add(store, key, index, age=100 - index)
    run = FeatureStore(store.root, store.budget)  # a run that uses the oldest entry
    run.load("first")
    os.utime(store.root / "first", (0, 0))
    run.create("fourth", {}, (2500,), "float32", lambda out: out.fill(4))
    assert sorted(p.name for p in store.root.iterdir()) == ["first", "fourth", "third"]


def test_over_budget_features_fall_back_with_a_reason(tiny_config, caplog):
    run_dir, text = _train(tiny_config(cache_disk_mb=0, epochs=1, fine_tune_epochs=1), caplog)
    assert "Not caching: the pooled features exceed the 0 MB cache budget" in text
    assert f"Not caching: the outputs of the layers below {TINY_CUT} exceed" in text
    assert (run_dir / "model.keras").is_file()


def test_decoded_images_over_the_memory_budget_go_to_a_file_cache(dataset, tmp_path):
    classes = ["horizontal", "vertical"]
    split = split_of(dataset / "train", classes)
    cached = data.decoded(split, TINY_SIZE, memory_budget=0, cache_file=tmp_path / "train")
    first = [image.numpy() for image, _ in cached]
    assert list(tmp_path.glob("train*.index"))
    assert sum(f.stat().st_size for f in tmp_path.glob("train*")) >= len(split) * TINY_SIZE**2 * 3
    second = [image.numpy() for image, _ in cached]
    np.testing.assert_array_equal(np.stack(first), np.stack(second))


def test_an_image_that_breaks_after_the_check_stops_training_naming_it(dataset, tiny_config):
    from transfer.layouts import check_dataset

    check_dataset(dataset)  # verdicts now cached
    image = sorted((dataset / "train").rglob("*.png"))[0]
    stat = image.stat()
    image.write_bytes(b"\0" * stat.st_size)  # same size and time: the cached verdict stands
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match=f"^{re.escape(str(image))} cannot be decoded any more"
                                         ".* Restore it and continue with: .* --resume "):
        train(tiny_config(epochs=1, fine_tune_epochs=0), verbose=0)


def test_views_visit_every_view_of_every_image():
    features = np.arange(3 * 10, dtype="float32").reshape(3, 10, 1)  # view v, image i: 10v + i
    views = Views(features, labels=np.arange(10) % 2, batch_size=4, shuffle_seed=0)
    seen = {i: set() for i in range(10)}
    for _ in range(3):
        batches = [views[index] for index in range(len(views))]
        values = np.concatenate([x[:, 0] for x, _ in batches]).astype(int)
        labels = np.concatenate([y for _, y in batches])
        assert sorted(values % 10) == list(range(10))  # every image once per epoch
        np.testing.assert_array_equal(labels, (values % 10) % 2)
        for value in values:
            seen[value % 10].add(value // 10)
        views.on_epoch_end()
    assert all(found == {0, 1, 2} for found in seen.values())
    plain = Views(features[:1], np.arange(10) % 2, batch_size=4)
    assert plain[0][0][:, 0].tolist() == [0, 1, 2, 3]


def test_boundary_is_one_tensor_or_a_reason():
    resnet = get_spec("resnet50").build(32, weights=None)
    tensor, reason = frozen_boundary(resnet, "conv5_")
    assert reason is None and tensor._keras_history.operation.name == "conv4_block6_out"
    top = keras.Model(tensor, resnet.output)
    assert top.layers[1].name.startswith("conv5_block1")

    inception = get_spec("inceptionv3").build(75, weights=None)
    tensor, reason = frozen_boundary(inception, "mixed9")
    assert tensor is None and "through 6 tensors" in reason
    assert frozen_boundary(resnet, "conv1_")[1] == "nothing below conv1_ is frozen"
