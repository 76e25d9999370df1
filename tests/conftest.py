import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFER_SHARED", REPO.parent / "shared"))
CATS_DOGS = SHARED / "datasets" / "cats_dogs"
FLOWERS = SHARED / "datasets" / "flowers"
MOBILENET_025 = SHARED / "keras" / "models" / "mobilenet_2_5_224_tf_no_top.h5"
MOBILENET_V2 = (SHARED / "keras" / "models"
                / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")

# Keras reads KERAS_HOME once, at import: point it, before any test imports Keras, at a fresh
# folder whose models/ holds only the real checkpoint from ../shared (when it is there).
KERAS_HOME = Path(tempfile.mkdtemp(prefix="transfer-keras-home-"))
(KERAS_HOME / "models").mkdir()
for checkpoint in (MOBILENET_025, MOBILENET_V2):
    if checkpoint.is_file():
        (KERAS_HOME / "models" / checkpoint.name).symlink_to(checkpoint)
os.environ["KERAS_HOME"] = str(KERAS_HOME)
CACHE_HOME = Path(tempfile.mkdtemp(prefix="transfer-cache-"))
os.environ["TRANSFER_CACHE_HOME"] = str(CACHE_HOME)


def pytest_sessionfinish(session, exitstatus):
    for folder in (KERAS_HOME, CACHE_HOME):
        shutil.rmtree(folder, ignore_errors=True)

# Small and fast at 32 px, and (unlike MobileNets, whose random-init activations vanish) its
# random-init features differ between images, so outputs and round trips are meaningful.
TINY_BACKBONE = "vgg16"
# Phase 2 of the tiny backbone from its last convolution: a third of the default cut's (block5_)
# 7 million weights, whose updates dominate a tiny run's time on a CPU.
TINY_CUT = "block5_conv3"
BATCHNORM_BACKBONE = "resnet50"  # for the phase tests: BatchNorm layers and a named cut
BATCHNORM_CUT = "conv5_block3_"  # its last block: a third of the default cut's (conv5_) weights
TINY_SIZE = 32


def write_image(path, kind, rng, size=40):
    """A small picture whose class is visible: horizontal or vertical stripes, plus noise."""
    stripes = (np.arange(size) // 4 % 2 * 200).astype(np.uint8)
    pattern = np.tile(stripes[:, None] if kind == 0 else stripes[None, :], (1, size) if kind == 0
                      else (size, 1))
    pixels = np.clip(pattern[..., None] + rng.integers(0, 50, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def make_dataset(root, classes=("horizontal", "vertical"), per_class=8, validation=4, seed=0):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / "train" / name / f"{name}_{i}.png", label % 2, rng)
        for i in range(validation):
            write_image(root / "validation" / name / f"{name}_v{i}.jpg", label % 2, rng)
    return root


def split_of(folder, classes):
    """A data.Split of every image under folder/<class>/, unchecked."""
    from transfer.check import scan_split
    from transfer.data import Split

    listings = scan_split(folder, classes)
    pairs = [(str(p), label) for label, name in enumerate(classes) for p in listings[name].images]
    return Split(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "stripes")


@pytest.fixture
def real_weights():
    """Skip unless KERAS_HOME holds the real MobileNet 0.25 ImageNet checkpoint."""
    if not MOBILENET_025.is_file():
        pytest.skip(f"real ImageNet checkpoint not found at {MOBILENET_025} (../shared absent)")


@pytest.fixture
def real_mobilenetv2():
    """Skip unless KERAS_HOME holds the real MobileNetV2 ImageNet checkpoint."""
    if not MOBILENET_V2.is_file():
        pytest.skip(f"real ImageNet checkpoint not found at {MOBILENET_V2} (../shared absent)")


@pytest.fixture
def real_flowers():
    if not FLOWERS.is_dir():
        pytest.skip(f"real data set not found at {FLOWERS} (../shared absent)")
    return FLOWERS


@pytest.fixture
def real_cats_dogs():
    if not CATS_DOGS.is_dir():
        pytest.skip(f"real data set not found at {CATS_DOGS} (../shared absent)")
    return CATS_DOGS


@pytest.fixture
def tiny_config(dataset, tmp_path):
    from transfer.config import resolve

    def build(**overrides):
        settings = dict(data=str(dataset), backbone=TINY_BACKBONE, weights="none",
                        image_size=TINY_SIZE, batch_size=4, epochs=2, fine_tune_epochs=2,
                        fine_tune_learning_rate=1e-3, fine_tune_from=TINY_CUT,
                        runs_dir=str(tmp_path / "runs"),
                        evaluate=False,  # the report has its own tests, on trained_run
                        head="adam")  # epochs of both phases; test_head.py solves the head
        return resolve(None, settings | overrides)

    return build


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished run of the tiny backbone on a stripes data set: (run_dir, dataset)."""
    from transfer.config import resolve
    from transfer.pipeline import train

    root = tmp_path_factory.mktemp("trained")
    dataset = make_dataset(root / "stripes")
    cfg = resolve(None, dict(data=str(dataset), backbone=TINY_BACKBONE, weights="none",
                             image_size=TINY_SIZE, batch_size=4, epochs=2, fine_tune_epochs=0,
                             runs_dir=str(root / "runs")))
    return train(cfg, verbose=0), dataset


def median_calibration(model, images, temperature=2.0):
    """A Calibration at `temperature` whose threshold lies halfway between the middle two
    energy scores of `images`: half of them are unknown, and none is a rounding error from
    the threshold."""
    from transfer.calibrate import Calibration
    from transfer.model import scored

    scores = np.sort(np.asarray(scored(model)(images)["score"]))
    middle = len(scores) // 2
    assert scores[middle] - scores[middle - 1] > 1e-3, scores  # else the flags are a coin toss
    return Calibration(temperature, "energy",
                       float(scores[middle - 1] + scores[middle]) / 2, 0.5)


def png_header_only(width, height):
    """A valid PNG header declaring width x height, with a tiny IDAT: a decompression bomb."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
