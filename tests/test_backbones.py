import importlib

import keras
import numpy as np
import pytest

from conftest import KERAS_HOME
from transfer.backbones import BACKBONES, _weights_help, cut_index, get_spec
from transfer.layers import preprocessing_layers
from transfer.model import backbone_of, build_classifier


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_row_builds_at_its_minimum_size_with_its_cut_and_report_figures(name, tmp_path):
    """Each backbone built once (the large ones take seconds): its cut, and the report's
    filters and feature maps drawn from it."""
    from transfer.evaluate import plot_feature_maps, plot_filters

    spec = BACKBONES[name]
    model = build_classifier(spec, 2, spec.min_size, weights="none")
    backbone = backbone_of(model)
    assert backbone.input_shape == (None, spec.min_size, spec.min_size, 3)
    start = cut_index(backbone, spec.cut)
    trainable_after_cut = [w for layer in backbone.layers[start:] for w in layer.weights]
    assert 0 < start < len(backbone.layers)
    assert trainable_after_cut, f"{name}: nothing to fine-tune after {spec.cut}"

    assert plot_filters(model, tmp_path / "filters.png") == tmp_path / "filters.png"
    image = np.random.default_rng(0).uniform(0, 255, (spec.min_size, spec.min_size, 3))
    plot_feature_maps(model, None, image.astype("float32"), tmp_path / "maps.png")
    for figure in ("filters.png", "maps.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"
    keras.backend.clear_session()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_preprocessing_layer_matches_keras_preprocess_input(name):
    spec = BACKBONES[name]
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    module = importlib.import_module(f"keras.applications.{spec.module}")
    expected = module.preprocess_input(pixels.copy())
    got = pixels
    for layer in preprocessing_layers(spec.preprocessing):
        got = layer(got)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ValueError, match="vgg16, vgg19, resnet50"):
        get_spec("vgg17")


def test_unknown_cut_prefix_is_a_clear_error():
    backbone = get_spec("mobilenet_025").build(32, weights=None)
    with pytest.raises(ValueError, match="No layer .* starts with 'block99_'"):
        cut_index(backbone, "block99_")


def test_failed_download_names_the_file_keras_wants(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    message = _weights_help("vgg16", "URL fetch failure on https://example.org/w/vgg16_notop.h5: "
                                     "None -- [Errno -2] Name or service not known")
    assert "vgg16_notop.h5" in message
    assert str(tmp_path / "models") in message
    assert "--weights none" in message


def test_offline_imagenet_weights_fail_with_the_file_name():
    try:  # KERAS_HOME (see conftest) holds no alpha 0.5 checkpoint
        get_spec("mobilenet_050").build(224, weights="imagenet")
    except FileNotFoundError as error:
        assert "mobilenet_5_0_224_tf_no_top.h5" in str(error)
        assert str(KERAS_HOME / "models") in str(error)
    else:
        pytest.skip("this machine can download ImageNet weights, so there is no offline failure")


@pytest.mark.real
def test_real_imagenet_checkpoint_loads_through_keras_home(real_weights):
    backbone = get_spec("mobilenet_025").build(224, weights="imagenet")
    assert backbone.count_params() == 218_544
    # ImageNet weights are not random: the first conv kernel has structure, not Glorot noise.
    assert float(np.abs(backbone.get_layer("conv1").kernel.numpy()).max()) > 0.5


def test_weights_path_loads_that_file(tmp_path):
    spec = get_spec("resnet50")
    source = spec.build(32, weights=None)
    source.save_weights(tmp_path / "mine.weights.h5")
    loaded = spec.build(32, weights=str(tmp_path / "mine.weights.h5"))
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
