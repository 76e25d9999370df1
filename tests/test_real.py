"""The real thing, kept to about a minute: ImageNet MobileNet 0.25 on real Dogs-vs-Cats photos."""

import json

import pytest

from conftest import CATS_DOGS
from transfer.config import resolve
from transfer.pipeline import train

pytestmark = pytest.mark.real


def _subset(source, target, per_class):
    for split, count in (("train", per_class), ("validation", per_class // 2)):
        for folder in sorted((source / split).iterdir()):
            (target / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                (target / split / folder.name / image.name).symlink_to(image)
    return target


def test_mobilenet_025_with_real_imagenet_weights_learns_cats_and_dogs(
        real_weights, real_cats_dogs, tmp_path):
    dataset = _subset(CATS_DOGS, tmp_path / "cats_dogs_subset", per_class=200)
    cfg = resolve(None, dict(data=str(dataset), backbone="mobilenet_025", epochs=8, batch_size=16, learning_rate=3e-3,
                             fine_tune_epochs=1, runs_dir=str(tmp_path / "runs")))
    run_dir = train(cfg, verbose=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.90, summary
