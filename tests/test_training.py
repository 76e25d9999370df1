import csv
import json

import keras
import numpy as np
import pytest

from conftest import BATCHNORM_BACKBONE, BATCHNORM_CUT, TINY_SIZE, make_dataset, split_of
from transfer import data
from transfer.check import class_names
from transfer.backbones import cut_index, get_spec
from transfer.cache import CachedFeeds
from transfer.config import Phase
from transfer.model import backbone_of, build_classifier, load_model, set_trainable
from transfer.pipeline import train
from transfer.train import PhaseTracker, fit_phases


def _weights_by_layer(backbone):
    return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in backbone.layers}


def _changed(before, after):
    return {name for name in before
            if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))}


def _batchnorm_names(backbone):
    return {layer.name for layer in backbone.layers
            if isinstance(layer, keras.layers.BatchNormalization)}


def _classifier_and_images(dataset, passes=None):
    """(spec, a BatchNorm backbone's classifier over `dataset`'s classes, its train and
    validation splits, a feed of their images that appends each split it reads to `passes`)."""
    spec = get_spec(BATCHNORM_BACKBONE)
    classes = class_names(dataset / "train")
    model = build_classifier(spec, len(classes), TINY_SIZE, weights="none")
    splits = {name: split_of(dataset / name, classes) for name in ("train", "validation")}

    def images(split, augment=False, shuffle=False):
        if passes is not None:
            passes.append(split)
        return data.batched(data.decoded(splits[split], TINY_SIZE), 4,
                            shuffle_seed=0 if shuffle else None)

    return spec, model, splits, images


@pytest.fixture(params=["images", "cached"])
def tiny_model_and_feeds(request, dataset, tiny_config):
    """A BatchNorm backbone's classifier and its feeds: on images, or on cached features."""
    spec, model, splits, images = _classifier_and_images(dataset)

    def on_images(phase):
        return model, images("train", shuffle=True), images("validation"), "images"

    if request.param == "images":
        return model, on_images
    cfg = tiny_config(backbone=BATCHNORM_BACKBONE, fine_tune_from=BATCHNORM_CUT, augment=False)
    return model, CachedFeeds(model, cfg, cfg.phases(spec), splits["train"],
                              splits["validation"], images, verbose=0)


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_phase_one_trains_the_head_only(tiny_model_and_feeds, tmp_path, solver):
    model, feeds = tiny_model_and_feeds
    backbone = backbone_of(model)
    before, head_before = _weights_by_layer(backbone), model.get_layer("probabilities").get_weights()
    fit_phases(model, [Phase("head", 2, 1e-2, None, solver)], feeds, tmp_path, patience=5,
               verbose=0)
    assert _changed(before, _weights_by_layer(backbone)) == set()
    assert not np.array_equal(head_before[0], model.get_layer("probabilities").get_weights()[0])


def test_phase_two_changes_only_layers_after_the_cut_and_no_batchnorm(tiny_model_and_feeds,
                                                                     tmp_path):
    _check_phase_two(*tiny_model_and_feeds, tmp_path)


@pytest.mark.parametrize("tiny_model_and_feeds", ["cached"], indirect=True)
def test_phase_two_on_a_schedule_with_averaged_weights_keeps_those_invariants(
        tiny_model_and_feeds, tmp_path):
    _check_phase_two(*tiny_model_and_feeds, tmp_path, schedule="cosine", ema=0.9)


def _check_phase_two(model, feeds, tmp_path, **settings):
    backbone = backbone_of(model)
    before = _weights_by_layer(backbone)
    # Phase 2 alone: with a phase before it, weights that lose to that phase are rolled back.
    history = fit_phases(model, [Phase("fine_tune", 2, 1e-2, BATCHNORM_CUT, **settings)], feeds,
                         tmp_path, patience=5, verbose=0)
    changed = _changed(before, _weights_by_layer(backbone))
    start = cut_index(backbone, BATCHNORM_CUT)
    after_cut = {layer.name for layer in backbone.layers[start:]}
    batchnorm = _batchnorm_names(backbone)
    assert changed, "phase 2 changed no backbone weight"
    assert changed <= after_cut - batchnorm
    assert [row["phase"] for row in history].count("fine_tune") >= 1
    # BatchNorm moving statistics are untouched too (the backbone runs in inference mode).
    for name in batchnorm:
        for a, b in zip(before[name], _weights_by_layer(backbone)[name]):
            np.testing.assert_array_equal(a, b)


def test_the_deeper_phase_changes_only_layers_after_its_cut_from_one_frozen_pass(
        dataset, tiny_config, tmp_path):
    """Phase 2, then the deeper phase from an earlier block: nothing below the deeper cut and
    no BatchNorm statistic changes, and the images go through the frozen layers once: phase
    2's features are computed from the deeper cut's cache, as the images would give them."""
    from transfer.cache import frozen_boundary
    from transfer.model import image_model

    deeper_cut = "conv5_block2_"
    cfg = tiny_config(backbone=BATCHNORM_BACKBONE, fine_tune_from=BATCHNORM_CUT,
                      deeper_from=deeper_cut, augment=False)
    passes = []
    spec, model, splits, images = _classifier_and_images(dataset, passes)
    phases = [phase for phase in cfg.phases(spec) if phase.unfreeze_from]
    assert [phase.name for phase in phases] == ["fine_tune", "deeper"]
    feeds = CachedFeeds(model, cfg, phases, splits["train"], splits["validation"], images,
                        verbose=0)
    backbone = backbone_of(model)
    tensor = frozen_boundary(backbone, BATCHNORM_CUT)[0]
    expected = image_model(model, tensor).predict(images("validation"), verbose=0)
    passes.clear()
    validation = feeds(phases[0])[2].features[0]
    np.testing.assert_allclose(validation, expected, rtol=1e-4, atol=1e-4)  # cached in float32
    assert sorted(passes) == ["train", "validation"]

    before = _weights_by_layer(backbone)
    history = fit_phases(model, phases, feeds, tmp_path, patience=5, verbose=0)
    changed = _changed(before, _weights_by_layer(backbone))
    after_deeper_cut = {layer.name for layer in backbone.layers[cut_index(backbone, deeper_cut):]}
    assert changed and changed <= after_deeper_cut - _batchnorm_names(backbone)
    assert {row["phase"] for row in history} == {"fine_tune", "deeper"}
    assert sorted(passes) == ["train", "validation"]  # no second pass over the images


def test_a_phase_that_must_beat_the_earlier_ones_stops_after_patience_epochs_that_do_not(
        tmp_path):
    """The deeper phase (beat_best) stops after `patience` epochs above the best validation
    loss of the phases before it, though each improves on its own last; phase 2's rule (its
    own best) goes on. A tracker rebuilt from history.csv (a resumed run) counts the same."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    earlier = [{"epoch": 1, "phase": "fine_tune", "loss": 0.1, "accuracy": 0.9, "val_loss": 0.10,
                "val_accuracy": 0.9, "learning_rate": 1e-4}]
    logs = {"loss": 0.1, "accuracy": 0.9, "val_accuracy": 0.9}
    losses = [0.30, 0.20, 0.15]  # better and better, none below 0.10
    for beat_best, stops in ((True, [False, False, True]), (False, [False, False, False])):
        phase = Phase("deeper", 10, 1e-4, "conv4_", beat_best=beat_best)
        run_dir = tmp_path / f"beat_best_{beat_best}"
        run_dir.mkdir()
        tracker = PhaseTracker(model, phase, earlier, run_dir, patience=3)
        assert [tracker.record(1 + i, logs | {"val_loss": loss}, 1e-4)
                for i, loss in enumerate(losses)] == stops
        resumed = PhaseTracker(model, phase, tracker.history[:-1], run_dir, patience=3)
        assert resumed.wait == (2 if beat_best else 0)
        assert resumed.record(3, logs | {"val_loss": losses[-1]}, 1e-4) == stops[-1]
    # one below the earlier best counts as that phase's best: patience starts again
    tracker = PhaseTracker(model, Phase("deeper", 10, 1e-4, "conv4_", beat_best=True), earlier,
                           tmp_path, patience=3)
    assert [tracker.record(1 + i, logs | {"val_loss": loss}, 1e-4)
            for i, loss in enumerate([0.3, 0.3, 0.09, 0.3, 0.3, 0.3])] == [False] * 5 + [True]


def test_phase_three_solves_the_head_again_on_the_fine_tuned_features_only(
        tiny_model_and_feeds, tmp_path, monkeypatch):
    """The refit changes the head's Dense layer and nothing else, is solved on features the
    fine-tuned layers compute (not phase 1's), and is kept only if it lowers the validation
    loss; on images (nothing cached) it is skipped."""
    import transfer.head

    model, feeds = tiny_model_and_feeds
    # Phase 2 alone first, so that its weights are kept (not rolled back to a phase 1's).
    phases = [Phase("fine_tune", 2, 1e-2, BATCHNORM_CUT), Phase("refit", 0, 1e-2, None, "lbfgs")]
    cached = isinstance(feeds, CachedFeeds)
    frozen = np.array(feeds(phases[1])[1].features[0]) if cached else None  # before phase 2
    fit_phases(model, phases[:1], feeds, tmp_path, patience=5, verbose=0)
    before, head = _weights_by_layer(backbone_of(model)), model.get_layer("probabilities")
    fine_tuned = [w.copy() for w in head.get_weights()]
    solved = []
    solve = transfer.head.solve_head

    def spy(layer, train_views, validation_views, *args, **kwargs):
        solved.append(np.asarray(train_views.features[0]))
        logs = solve(layer, train_views, validation_views, *args, **kwargs)
        solved.append([w.copy() for w in layer.get_weights()])
        return logs

    monkeypatch.setattr(transfer.head, "solve_head", spy)
    history = fit_phases(model, phases, feeds, tmp_path, patience=5, verbose=0)
    assert _changed(before, _weights_by_layer(backbone_of(model))) == set()
    refit = [row for row in history if row["phase"] == "refit"]
    if cached:
        assert len(refit) == 1 and refit[0]["epoch"] == history[-2]["epoch"] + 1
        features, solution = solved
        assert features.shape == frozen.shape and not np.allclose(features, frozen)
        earlier = min(row["val_loss"] for row in history if row["phase"] != "refit")
        kept = solution if refit[0]["val_loss"] < earlier else fine_tuned
        for now, expected in zip(head.get_weights(), kept):
            np.testing.assert_array_equal(now, expected)
    else:
        assert refit == [] and solved == []
        assert "refit" in json.loads((tmp_path / "state.json").read_text())["completed"]


@pytest.mark.parametrize("tiny_model_and_feeds", ["cached"], indirect=True)
def test_cosine_schedule_warms_up_for_an_epoch_then_decays_to_zero(tiny_model_and_feeds,
                                                                  tmp_path):
    model, feeds = tiny_model_and_feeds
    history = fit_phases(model, [Phase("head", 3, 1e-2, None, schedule="cosine")], feeds,
                         tmp_path, patience=5, verbose=0)
    # Logged at each epoch's end: the warmup's peak, half way down the cosine, and 0.
    np.testing.assert_allclose([row["learning_rate"] for row in history], [1e-2, 5e-3, 0],
                               atol=1e-7)


@pytest.mark.parametrize("tiny_model_and_feeds", ["cached"], indirect=True)
def test_the_averaged_weights_are_the_ones_validated_and_kept(tiny_model_and_feeds, tmp_path):
    model, feeds = tiny_model_and_feeds
    head = model.get_layer("probabilities")

    def moved(ema, run):
        start = head.kernel.numpy().copy()
        (tmp_path / run).mkdir()
        fit_phases(model, [Phase("head", 2, 1e-1, None, ema=ema)], feeds, tmp_path / run,
                   patience=5, verbose=0)
        return np.abs(head.kernel.numpy() - start).max()

    # Keras starts the average at the weights after the first step (Adam moves each weight
    # by about the learning rate in it); at momentum 0.999 the average then hardly moves. So
    # kept weights that moved as far as plain Adam's are not the average.
    averaged, plain = moved(0.999, "averaged"), moved(0.0, "plain")
    assert averaged < 1.1e-1 < plain


def test_set_trainable_freezes_batchnorm_and_everything_before_the_cut():
    backbone = get_spec("resnet50").build(32, weights=None)
    set_trainable(backbone, "conv5_")
    trainable = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert trainable and all(name.startswith("conv5_") for name in trainable)
    assert not any(name.endswith("_bn") for name in trainable)
    set_trainable(backbone, None)
    assert backbone.trainable_weights == []


def test_train_writes_a_complete_run_directory(tiny_config, tmp_path):
    three_classes = make_dataset(tmp_path / "three", classes=("a", "b", "c"), per_class=4)
    run_dir = train(tiny_config(data=str(three_classes)), verbose=0)
    for name in ("config.json", "classes.json", "versions.json", "split.csv", "history.csv",
                 "learning_curves.png", "model.keras", "summary.json", "bad_files.csv"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_size"] == TINY_SIZE and config["seed"] == 1337
    assert json.loads((run_dir / "classes.json").read_text()) == ["a", "b", "c"]
    assert "keras" in json.loads((run_dir / "versions.json").read_text())
    with open(run_dir / "history.csv") as handle:
        phases = [row["phase"] for row in csv.DictReader(handle)]
    assert phases[0] == "head" and phases[-1] == "fine_tune"
    assert (run_dir / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"

    # The saved model reloads in safe mode and predicts exactly as before.
    model = load_model(run_dir / "model.keras")
    images = np.random.default_rng(0).uniform(0, 255, (3, TINY_SIZE, TINY_SIZE, 3))
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (3, 3)
    assert np.abs(probabilities[0] - probabilities[1]).max() > 1e-6  # not a constant model
    # Augmentation belongs to the training pipeline, never to the saved model.
    assert not [layer for layer in model.layers if layer.name.startswith("random")
                or layer.name == "augmentation"]
    again = load_model(run_dir / "model.keras")
    np.testing.assert_allclose(probabilities, again.predict(images, verbose=0), rtol=1e-6)
    assert model.get_layer("preprocess_caffe") is not None


def test_training_calibrates_on_the_validation_images(trained_run):  # and predict applies it
    from transfer import calibrate
    from transfer.predict import Predictor, predict_paths
    from transfer.runs import read_split

    run_dir, _ = trained_run
    stored = json.loads((run_dir / calibrate.CALIBRATION).read_text())
    assert stored["temperature"] > 0 and stored["keep"] == 0.95
    assert stored["nll_after"] <= stored["nll_before"] + 1e-9
    # The threshold keeps the asked share of the validation images, as predict reports them.
    _, splits = read_split(run_dir)
    rows = list(predict_paths(Predictor(run_dir), list(splits["validation"].paths)))
    kept = np.mean([not row["unknown"] for row in rows])
    assert 0.95 <= kept <= 0.95 + 1 / len(rows)
    scores = np.array([row["score"] for row in rows])
    assert np.mean(scores >= stored["threshold"]) == kept


@pytest.mark.parametrize("overrides", [{}, {"fine_tune_epochs": 0}, {"deeper_from": "block4_"}])
def test_calibration_takes_the_validation_outputs_from_the_caches_as_the_images_give_them(
        tiny_config, monkeypatch, overrides):
    """With the caches, the calibration reads the validation images' logits and features off
    the cache the phases validated on (phase 2's, the deeper phase's or the head's), not a
    second pass over the images; and they are the saved model's outputs for the images."""
    from transfer import calibrate, evaluate
    from transfer.model import scored
    from transfer.runs import read_split

    predict_files = evaluate.predict_files

    def refused(*args, **kwargs):
        raise AssertionError("the validation images were predicted again")

    monkeypatch.setattr(evaluate, "predict_files", refused)
    run_dir = train(tiny_config(**overrides), verbose=0)
    stored = json.loads((run_dir / calibrate.CALIBRATION).read_text())
    _, splits = read_split(run_dir)
    outputs = predict_files(scored(load_model(run_dir / "model.keras"), raw=True),
                            splits["validation"].paths)[1]
    expected, figures = calibrate.calibrate(outputs, splits["validation"].labels, 0.95)
    assert stored["nll_before"] == pytest.approx(figures["nll_before"], rel=1e-4, abs=1e-6)
    assert stored["temperature"] == pytest.approx(expected.temperature, rel=1e-3)
    assert (stored["score"], stored["threshold"]) == (expected.score, pytest.approx(
        expected.threshold, rel=1e-3, abs=1e-4))


def test_no_validation_folder_makes_a_saved_disjoint_split(tiny_config, dataset, monkeypatch):
    import os
    import shutil

    shutil.rmtree(dataset / "validation")
    monkeypatch.chdir(dataset.parent)  # the data set given as a relative path
    run_dir = train(tiny_config(data=dataset.name, fine_tune_epochs=0, epochs=1,
                                validation_split=0.25), verbose=0)
    with open(run_dir / "split.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all(os.path.isabs(row["path"]) for row in rows)  # resumable from any folder
    train_paths = {r["path"] for r in rows if r["split"] == "train"}
    val_paths = {r["path"] for r in rows if r["split"] == "validation"}
    assert len(val_paths) == 4 and len(train_paths) == 12 and not train_paths & val_paths
    with open(run_dir / "history.csv") as handle:
        assert {row["phase"] for row in csv.DictReader(handle)} == {"head"}


def test_validation_that_cannot_be_made_stops_before_anything_is_written(tiny_config, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    empty = make_dataset(tmp_path / "empty_validation", per_class=3, validation=0)
    (empty / "validation" / "horizontal").mkdir(parents=True)
    with pytest.raises(ValueError, match="validation holds no usable images; add some, or remove"):
        train(tiny_config(data=str(empty), runs_dir=str(runs)), verbose=0)
    lonely = make_dataset(tmp_path / "lonely", per_class=3, validation=0)
    for extra in sorted((lonely / "train" / "vertical").iterdir())[1:]:
        extra.unlink()
    shutil.rmtree(lonely / "validation", ignore_errors=True)
    with pytest.raises(ValueError, match="vertical have one image in train/"):
        train(tiny_config(data=str(lonely), runs_dir=str(runs)), verbose=0)
    few = make_dataset(tmp_path / "few", per_class=2, validation=0)
    shutil.rmtree(few / "validation", ignore_errors=True)
    with pytest.raises(ValueError, match="too few images for a stratified validation split of "
                                         "0.9"):
        train(tiny_config(data=str(few), runs_dir=str(runs), validation_split=0.9), verbose=0)
    assert not runs.exists()


def test_unreadable_training_files_are_set_aside_and_reported(tiny_config, dataset):
    (dataset / "train" / "vertical" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    run_dir = train(tiny_config(fine_tune_epochs=0, epochs=1), verbose=0)
    with open(run_dir / "bad_files.csv") as handle:
        bad = list(csv.DictReader(handle))
    assert [row["path"].endswith("broken.jpg") for row in bad] == [True]
    assert "broken.jpg" not in (run_dir / "split.csv").read_text()



def test_imbalanced_classes_get_class_weights_by_default(tiny_config, dataset, caplog):
    import logging

    for path in sorted((dataset / "train" / "vertical").iterdir())[:5]:
        path.unlink()  # 8 horizontal, 3 vertical
    with caplog.at_level(logging.INFO, logger="transfer"):
        train(tiny_config(epochs=1, fine_tune_epochs=0), verbose=0)
    assert "Class weights (imbalanced classes): horizontal 0.69, vertical 1.83" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transfer"):
        train(tiny_config(epochs=1, fine_tune_epochs=0, class_weights="none"), verbose=0)
    assert "Class weights" not in caplog.text
