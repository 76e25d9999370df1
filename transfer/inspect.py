"""What a backbone computes, layer by layer: sizes, parameters, receptive field and FLOPs.

Output sizes come from OH = (H + 2P - FH) / S + 1 (rounded down), with FH the dilated filter
size; Keras's "same" padding picks P so that OH = ceil(H / S). The receptive field r and the
stride so far j (the "jump": input pixels between neighbouring outputs) grow as
r' = r + (FH - 1) j and j' = j S. Where branches meet, the largest r and j are kept. FLOPs
count a multiply-add as two; pooling counts one per element read.
"""

import dataclasses
import math

import keras

from transfer.backbones import get_spec

POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
GLOBAL_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


@dataclasses.dataclass
class Row:
    name: str
    kind: str
    output: tuple  # (height, width, channels)
    params: int
    receptive_field: int | None  # None: the whole image (after global pooling)
    stride: int  # input pixels between neighbouring outputs
    flops: int
    multiply_adds: int = 0  # of convolutions; pooling has none


@dataclasses.dataclass
class Spatial:
    height: int
    width: int
    receptive_field: int | None
    stride: int


def inspect_backbone(name, image_size=None):
    """(rows for every convolution, pooling and per-pixel Dense layer, the backbone), for the
    named backbone."""
    spec = get_spec(name)
    backbone = spec.build(spec.default_size if image_size is None else image_size, weights=None)
    return table(backbone), backbone


def table(model):
    """Rows for the convolution, pooling and per-pixel Dense layers of a functional model, in
    order, those of nested Sequential blocks (ConvNeXt's stem and downsampling) included.

    It walks the model's operations, not only its layers: a residual `x + y` is an operation
    that is no layer, and the layers after it must still find their input.
    """
    spatial = {}
    rows = []
    for operation in model.operations:
        inputs = [spatial[id(t)] for t in keras.tree.flatten(operation.input)
                  if id(t) in spatial]
        if not inputs:  # the input layer
            _, height, width, _ = operation.output.shape
            spatial[id(operation.output)] = Spatial(height, width, 1, 1)
            continue
        after, new_rows = _apply(operation, _merge(inputs))
        for tensor in keras.tree.flatten(operation.output):
            spatial[id(tensor)] = after
        rows += new_rows
    return rows


def _apply(operation, before):
    """(spatial state after the operation, its rows), stepping through a Sequential block."""
    if isinstance(operation, keras.Sequential):
        rows = []
        for layer in operation.layers:
            before, new_rows = _apply(layer, before)
            rows += new_rows
        return before, rows
    after, row = _step(operation, before)
    return after, [] if row is None else [row]


def _merge(inputs):
    fields = [s.receptive_field for s in inputs]
    return Spatial(inputs[0].height, inputs[0].width,
                   None if None in fields else max(fields), max(s.stride for s in inputs))


def _step(layer, before):
    """(spatial state after the layer, its Row or None)."""
    channels = layer.output.shape[-1]
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (top, bottom), (left, right) = layer.padding
        return dataclasses.replace(before, height=before.height + top + bottom,
                                   width=before.width + left + right), None
    if isinstance(layer, GLOBAL_POOLING):
        flops = before.height * before.width * channels
        output = (1, 1, channels) if layer.keepdims else (channels,)
        return Spatial(1, 1, None, before.stride), Row(
            layer.name, type(layer).__name__, output, 0, None, before.stride, flops)
    if isinstance(layer, keras.layers.Dense) and len(layer.input.shape) == 4:
        # applied to every pixel: a 1x1 convolution (ConvNeXt's pointwise layers)
        multiply_adds = before.height * before.width * layer.input.shape[-1] * channels
        return before, Row(layer.name, "Dense", (before.height, before.width, channels),
                           layer.count_params(), before.receptive_field, before.stride,
                           2 * multiply_adds, multiply_adds)
    convolution = isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D |
                             keras.layers.SeparableConv2D)
    if not (convolution or isinstance(layer, POOLING)):
        # Elementwise, normalisation, concatenation, squeeze-and-excite reshapes: no spatial
        # change of their own; sizes follow Keras where a layer reshapes.
        shape = layer.output.shape
        if len(shape) == 4 and (shape[1], shape[2]) != (before.height, before.width):
            return dataclasses.replace(before, height=shape[1], width=shape[2]), None
        return before, None
    kernel = layer.kernel_size if convolution else layer.pool_size
    strides = layer.strides
    dilation = layer.dilation_rate if convolution else (1, 1)
    effective = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    sizes = [_output_size(size, f, s, layer.padding)
             for size, f, s in zip((before.height, before.width), effective, strides)]
    field = (None if before.receptive_field is None
             else before.receptive_field + (effective[0] - 1) * before.stride)
    after = Spatial(sizes[0], sizes[1], field, before.stride * strides[0])
    positions = sizes[0] * sizes[1]
    inputs = layer.input.shape[-1]
    window = kernel[0] * kernel[1]
    if isinstance(layer, keras.layers.SeparableConv2D):
        multiply_adds = positions * (window * inputs * layer.depth_multiplier
                                     + inputs * layer.depth_multiplier * channels)
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        multiply_adds = positions * window * channels
    elif convolution:
        multiply_adds = positions * window * inputs // layer.groups * channels
    else:
        return after, Row(layer.name, type(layer).__name__, (*sizes, channels), 0, field,
                          after.stride, positions * window * channels)
    return after, Row(layer.name, type(layer).__name__, (*sizes, channels), layer.count_params(),
                      field, after.stride, 2 * multiply_adds, multiply_adds)


def _output_size(size, filter_size, stride, padding):
    if padding == "same":
        return math.ceil(size / stride)
    return (size - filter_size) // stride + 1  # OH = (H + 2P - FH) / S + 1 with P = 0


def format_table(rows, backbone):
    """The rows as aligned text, with the totals."""
    lines = [f"{'layer':<28}{'type':<24}{'output':>16}{'params':>11}{'RF':>6}{'stride':>8}"
             f"{'MFLOPs':>10}"]
    for row in rows:
        output = "x".join(str(n) for n in row.output)
        field = "all" if row.receptive_field is None else str(row.receptive_field)
        lines.append(f"{row.name:<28}{row.kind:<24}{output:>16}{row.params:>11,}{field:>6}"
                     f"{row.stride:>8}{row.flops / 1e6:>10.1f}")
    flops = sum(row.flops for row in rows)
    multiply_adds = sum(row.multiply_adds for row in rows)
    lines.append(f"total: {backbone.count_params() / 1e6:.2f}M parameters "
                 f"({sum(row.params for row in rows) / 1e6:.2f}M in these layers); "
                 f"{flops / 1e9:.2f} GFLOPs per image, a multiply-add counted as 2 FLOPs; "
                 f"{multiply_adds / 1e9:.2f} G multiply-adds (what papers often call FLOPs)")
    return "\n".join(lines)
