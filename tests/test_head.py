"""Phase 1 (and the refit after fine-tuning) solved to convergence: the softmax regression on
cached features (transfer.head)."""

import csv
import json

import keras
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from transfer.cache import Views
from transfer.head import _log_loss, solve_head


def problem(seed, classes=3, dim=16, train=120, validation=60, views=2, noise=1.5):
    """Gaussian classes: cached features of `views` views per image, as cache.Views holds."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))

    def draw(count, views):
        labels = rng.integers(classes, size=count)
        features = centres[labels] + noise * rng.normal(0, 1, (views, count, dim))
        return Views(features.astype("float32"), labels, batch_size=32)

    return draw(train, views), draw(validation, 1)


def dense(classes, dim=16):
    layer = keras.layers.Dense(classes, activation="softmax")
    layer.build((None, dim))
    return layer


@pytest.mark.parametrize("classes", [2, 3])
def test_the_solved_head_is_scikit_learns_optimum_at_the_chosen_strength(classes):
    train, validation = problem(0, classes)
    layer = dense(classes)
    logs = solve_head(layer, train, validation, grid=(0.01, 0.1, 1.0))
    x = train.features.reshape(-1, 16)
    reference = LogisticRegression(C=logs["l2_c"], max_iter=5000, tol=1e-8).fit(
        x, np.tile(train.labels, 2))
    x_val = validation.features[0]
    np.testing.assert_allclose(np.asarray(layer(x_val)), reference.predict_proba(x_val),
                               atol=2e-3)
    assert logs["val_loss"] == pytest.approx(_log_loss(reference.predict_proba(x_val),
                                                       validation.labels), abs=1e-3)
    assert logs["val_accuracy"] == pytest.approx(
        (reference.predict(x_val) == validation.labels).mean())


def test_the_strength_is_chosen_on_the_validation_images_only():
    """Each C's validation log loss, computed apart, picks the one chosen; the images that are
    not handed over (a test set) cannot change the choice because they are never seen."""
    train, validation = problem(1, noise=3.0)
    grid = (0.001, 0.01, 0.1, 1.0, 10.0)
    losses = {c: _log_loss(LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(
        train.features.reshape(-1, 16), np.tile(train.labels, 2)).predict_proba(
        validation.features[0]), validation.labels) for c in grid}
    logs = solve_head(dense(3), train, validation, grid=grid)
    assert logs["l2_c"] == min(losses, key=losses.get)
    flipped = Views(validation.features, (validation.labels + 1) % 3, batch_size=32)
    other = solve_head(dense(3), train, flipped, grid=grid)  # other labels, other choice
    assert other["l2_c"] != logs["l2_c"]


def test_training_solves_the_head_on_the_training_views_and_never_sees_test_images(
        tiny_config, tmp_path, monkeypatch):
    from test_layouts import class_folders

    import transfer.head
    from transfer.pipeline import train
    from transfer.runs import read_split

    seen = []
    solve = transfer.head.solve_head

    def spy(layer, train_views, validation_views, *args, **kwargs):
        seen.append((train_views.features.shape[:2], len(validation_views.labels)))
        return solve(layer, train_views, validation_views, *args, **kwargs)

    monkeypatch.setattr(transfer.head, "solve_head", spy)
    root = class_folders(tmp_path / "flowers", per_class=10)
    run_dir = train(tiny_config(data=str(root), test_split=0.2, fine_tune_epochs=1,
                                head="lbfgs"), verbose=0)
    _, splits = read_split(run_dir)
    # phase 1 and, after fine-tuning, the refit: each on the training views, chosen on the
    # validation images
    assert seen == [((2, len(splits["train"])), len(splits["validation"]))] * 2
    state = json.loads((run_dir / "state.json").read_text())
    assert state["phases"]["head"]["l2_c"] in transfer.head.C_GRID
    assert state["phases"]["refit"]["l2_c"] in transfer.head.C_GRID
    with open(run_dir / "history.csv") as handle:
        phases = [row["phase"] for row in csv.DictReader(handle)]
    assert phases == ["head", "fine_tune", "refit"]  # each solved phase is one epoch
