"""transfer inspect: layer sizes from the formula agree with Keras; VGG16's published totals."""

import pytest

from transfer.cli import main
from transfer.model import all_layers
from transfer.inspect import inspect_backbone


def test_vgg16_matches_the_published_figures():
    rows, backbone = inspect_backbone("vgg16")
    by_name = {row.name: row for row in rows}
    assert sum(row.params for row in rows) == backbone.count_params() == 14_714_688
    multiply_adds = sum(row.multiply_adds for row in rows)
    assert multiply_adds == pytest.approx(15.35e9, rel=0.005)  # "15.5 GFLOPs" with the FC layers
    assert by_name["block1_conv1"].flops == 2 * 224 * 224 * 3 * 3 * 3 * 64
    # Receptive fields and strides as in the literature: conv5_3 sees 196 pixels, pool5 212.
    assert (by_name["block5_conv3"].receptive_field, by_name["block5_conv3"].stride) == (196, 16)
    assert (by_name["block5_pool"].receptive_field, by_name["block5_pool"].stride) == (212, 32)


def test_convnext_counts_its_nested_blocks_and_per_pixel_dense_layers():
    rows, backbone = inspect_backbone("convnext_tiny")
    multiply_adds = sum(row.multiply_adds for row in rows)
    assert multiply_adds == pytest.approx(4.5e9, rel=0.02)  # the paper's "4.5G FLOPs"
    assert rows[-1].stride == 32  # the stem's 4 and three downsamplings' 2, inside Sequentials
    assert sum(row.params for row in rows) == pytest.approx(backbone.count_params(), rel=0.01)


@pytest.mark.parametrize("name, size", [("vgg16", 224), ("resnet50", 64), ("mobilenetv2", 96),
                                        ("xception", 71), ("efficientnetv2b0", 64),
                                        ("mobilenet_025", 40), ("convnext_tiny", 64)])
def test_output_sizes_from_the_formula_match_keras(name, size):
    rows, backbone = inspect_backbone(name, size)
    assert rows
    layers = {layer.name: layer for layer in all_layers(backbone)}
    for row in rows:
        assert row.output == tuple(layers[row.name].output.shape[1:]), row.name
    assert any(row.kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D") for row in rows)


def test_inspect_command_prints_the_table_and_rejects_bad_options(capsys):
    assert main(["inspect", "vgg16", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "block5_pool" in out and "2x2x512" in out
    assert "14.71M parameters" in out and "a multiply-add counted as 2 FLOPs" in out
    assert main(["inspect", "vgg17"]) == 2
    assert "vgg16" in capsys.readouterr().err  # the valid names
    for size in ("16", "0"):  # 0 is not "the default"
        assert main(["inspect", "vgg16", "--image-size", size]) == 2
        error = capsys.readouterr().err
        assert f"image size {size} is below backbone 'vgg16''s minimum of 32" in error
