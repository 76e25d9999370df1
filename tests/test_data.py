import dataclasses
import functools
import http.server
import threading
import zipfile

import numpy as np
import pytest

from conftest import make_dataset, split_of
from transfer import data
from transfer.check import list_images


def test_dataset_by_name_under_transfer_data_home(tmp_path, monkeypatch):
    make_dataset(tmp_path / "home" / "stripes")
    monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path / "home"))
    name, folder = data.resolve_dataset("stripes")
    assert name == "stripes" and folder == tmp_path / "home" / "stripes"


def test_unknown_dataset_explains_the_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"train/<class>/\*.jpg.*cats_dogs, flowers"):
        data.resolve_dataset("birds")


def test_offline_download_fails_at_once_with_address_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path))
    unreachable = dataclasses.replace(data.KNOWN_DATASETS["cats_dogs"],
                                      url="http://127.0.0.1:9/cats_and_dogs_filtered.zip")
    monkeypatch.setitem(data.KNOWN_DATASETS, "cats_dogs", unreachable)
    with pytest.raises(FileNotFoundError, match=r"127.0.0.1:9/cats_and_dogs_filtered.zip.*"
                                                r"cats_dogs/ holds train/<class>/\*.jpg"):
        data.resolve_dataset("cats_dogs")
    assert not (tmp_path / "cats_dogs").exists()


def _serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _zip_dataset(tmp_path):
    source = make_dataset(tmp_path / "src" / "pets_filtered", per_class=3, validation=2)
    archive = tmp_path / "www" / "pets.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(source.rglob("*")):
            zipped.write(path, path.relative_to(source.parent))
    return source, archive


def test_download_checks_size_and_checksum_then_unpacks(tmp_path, monkeypatch):
    source, archive = _zip_dataset(tmp_path)
    server = _serve(archive.parent)
    try:
        url = f"http://127.0.0.1:{server.server_port}/pets.zip"
        good = data.Download(url, archive.stat().st_size, "pets_filtered", "train/<class>/*",
                             manifest_sha256=data.manifest_sha256(source))
        monkeypatch.setitem(data.KNOWN_DATASETS, "pets", good)
        monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path / "home"))
        name, folder = data.resolve_dataset("pets")
        assert sorted(p.name for p in folder.iterdir()) == ["train", "validation"]
        assert len(list_images(folder).images) == 10

        bad = dataclasses.replace(good, manifest_sha256="0" * 64)
        monkeypatch.setitem(data.KNOWN_DATASETS, "pets2", bad)
        with pytest.raises(ValueError, match="sha256 manifest"):
            data.resolve_dataset("pets2")
        assert not (tmp_path / "home" / "pets2").exists()
    finally:
        server.shutdown()


@pytest.mark.real
def test_cats_dogs_checksum_matches_the_real_files(real_cats_dogs):
    assert data.manifest_sha256(real_cats_dogs) == data.KNOWN_DATASETS["cats_dogs"].manifest_sha256


def test_stratified_split_is_seeded_and_disjoint(dataset):
    split = split_of(dataset / "train", ["horizontal", "vertical"])
    train, val = data.stratified_split(split, 0.25, seed=3)
    again, _ = data.stratified_split(split, 0.25, seed=3)
    assert train == again
    assert not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == sorted(split.paths)
    assert sorted(val.labels) == [0, 0, 1, 1]


def test_class_weights_balance_only_imbalanced_classes():
    assert data.class_weights([0, 0, 1, 1], 2, "auto") is None
    weights = data.class_weights([0] * 8 + [1] * 2, 2, "auto")
    assert weights == {0: 10 / 16, 1: 10 / 4}
    assert 8 * weights[0] == 2 * weights[1]  # each class carries the same total weight
    assert data.class_weights([0, 0, 1, 1], 2, "balanced") == {0: 1.0, 1: 1.0}
    assert data.class_weights([0] * 8 + [1] * 2, 2, "none") is None
    with pytest.raises(ValueError, match="auto, balanced, none"):
        data.class_weights([0, 1], 2, "equal")


def _augment(images, **settings):
    import tensorflow as tf

    from transfer.layers import RandomAffine

    layer = RandomAffine(**settings, seed=0)
    return np.stack([tf.function(lambda x: layer(x, training=True))(images).numpy()
                     for _ in range(4)])  # 4 draws, as 4 epochs through tf.data would see


def test_random_affine_flips_exactly_and_does_nothing_when_off():
    images = np.random.default_rng(0).uniform(0, 255, (8, 12, 10, 3)).astype("float32")
    still = _augment(images, flip="none")
    np.testing.assert_allclose(still, np.broadcast_to(images, still.shape), atol=1e-3)
    flipped = _augment(images, flip="horizontal")
    mirrored = images[:, :, ::-1]
    for draw in flipped:
        for image, original, mirror in zip(draw, images, mirrored):
            assert (np.allclose(image, original, atol=1e-3)
                    or np.allclose(image, mirror, atol=1e-3))
    assert not np.allclose(flipped[0], flipped[1])  # new draws every time
    from transfer.layers import RandomAffine

    np.testing.assert_array_equal(RandomAffine(rotation=0.5)(images, training=False), images)


def test_a_seeded_augmentation_repeats_batch_for_batch():
    """The augmented training batches are the same on every run with the same seed: each batch
    takes its draws from the seeded generator in order, not as parallel calls happen to run."""
    import tensorflow as tf

    from transfer.layers import RandomAffine

    images = np.random.default_rng(0).uniform(0, 255, (256, 16, 16, 3)).astype("uint8")
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(256, "int32")))

    def augmented():
        layer = RandomAffine(flip="horizontal", rotation=0.1, seed=1337)
        return np.concatenate([x.numpy() for x, _ in data.batched(dataset, 4, augment=layer)])

    first = augmented()
    assert not np.allclose(first, images)
    for _ in range(2):
        np.testing.assert_array_equal(augmented(), first)


def test_random_affine_rotates_zooms_and_shifts_within_the_pixel_range():
    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    for settings in ({"rotation": 0.1}, {"zoom": 0.2}, {"translation": 0.2}):
        moved = _augment(images, flip="none", **settings)
        assert moved.shape == (4, *images.shape)
        assert not np.allclose(moved[0], images, atol=1)  # every setting moves pixels
        assert moved.min() >= -1e-3 and moved.max() <= 255 + 1e-3  # reflected, interpolated
    upright = _augment(images[:1], flip="none", rotation=1e-9)  # the transform's centre is right
    np.testing.assert_allclose(upright[0, 0], images[0], atol=1e-2)


def test_random_affine_resamples_as_tensorflows_projective_transform_also_under_xla():
    import keras
    import tensorflow as tf

    from transfer.layers import _resample

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 20, 16, 3)).astype("float32")
    angle, scale = rng.uniform(-0.8, 0.8, 6), rng.uniform(0.7, 1.3, 6)
    flip = rng.choice([-1.0, 1.0], 6)
    a0, a1 = np.cos(angle) * scale * flip, -np.sin(angle) * scale
    b0, b1 = np.sin(angle) * scale * flip, np.cos(angle) * scale
    shift = rng.uniform(-12, 12, (2, 6))  # far enough past the borders to reflect
    transform = np.stack([a0, a1, 7.5 - a0 * 7.5 - a1 * 9.5 + shift[0],
                          b0, b1, 9.5 - b0 * 7.5 - b1 * 9.5 + shift[1]], axis=1).astype("float32")
    expected = keras.ops.image.affine_transform(
        images, np.concatenate([transform, np.zeros((6, 2), "float32")], axis=1),
        interpolation="bilinear", fill_mode="reflect")
    np.testing.assert_allclose(_resample(images, transform), expected, atol=1e-2)
    compiled = tf.function(_resample, jit_compile=True)
    np.testing.assert_allclose(compiled(images, transform), expected, atol=1e-2)
