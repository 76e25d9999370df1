"""Layers: the preprocessing of each backbone mode (serializable, never a Lambda), a fused
augmentation, and the logits and calibrated outputs model.scored adds to a classifier."""

import math

import keras
from keras import ops

# ImageNet statistics in 0-255 RGB, as keras.applications.imagenet_utils uses them.
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
TORCH_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCH_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")  # the backbone table's preprocessing


@keras.saving.register_keras_serializable(package="transfer")
class CaffePreprocessing(keras.layers.Layer):
    """RGB 0-255 -> BGR minus the ImageNet mean, as VGG and ResNet v1 were trained."""

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
        return ops.flip(images - mean, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape


def preprocessing_layers(mode):
    """Keras layers that turn raw 0-255 RGB into what a backbone of `mode` expects."""
    if mode == "caffe":
        return [CaffePreprocessing(name="preprocess_caffe")]
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "torch":
        variance = [std**2 for std in TORCH_STD_RGB]
        return [keras.layers.Normalization(
            mean=list(TORCH_MEAN_RGB), variance=variance, name="preprocess_torch")]
    if mode == "none":
        return []
    raise ValueError(
        f"Unknown preprocessing mode {mode!r}; expected one of {', '.join(PREPROCESSING_MODES)}."
    )


class RandomAffine(keras.layers.Layer):
    """Random flip, rotation, zoom and translation as one resampling of each image.

    The same draws as Keras's RandomFlip, RandomRotation, RandomZoom and RandomTranslation
    (`rotation` a fraction of a full turn, `zoom` and `translation` fractions of the size;
    bilinear, borders reflected), composed into one affine transform: those layers resample
    (and blur) the image once each, and cost three times as much together on a CPU.

    The resampling is plain gathers, not ops.image.affine_transform (TensorFlow's
    ImageProjectiveTransformV3), so that XLA can compile it: jit-compiled, as data.batched
    runs it, it takes a third of that op's CPU time for the same pixels.
    """

    def __init__(self, flip="horizontal", rotation=0.0, zoom=0.0, translation=0.0, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.flip, self.rotation, self.zoom, self.translation = flip, rotation, zoom, translation
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = ops.shape(images)
        count = shape[0]
        height, width = ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")

        def uniform(low, high):
            return keras.random.uniform((count,), low, high, seed=self.generator)

        def flips(axis):
            if self.flip not in (axis, "horizontal_and_vertical"):
                return ops.ones((count,))
            return ops.where(uniform(0, 1) < 0.5, -1.0, 1.0)

        angle = uniform(-self.rotation, self.rotation) * 2 * math.pi
        scale = 1 + uniform(-self.zoom, self.zoom)
        flip_x, flip_y = flips("horizontal"), flips("vertical")
        shift_x = uniform(-self.translation, self.translation) * width
        shift_y = uniform(-self.translation, self.translation) * height
        # Output pixel p reads input pixel center + R(angle) S(scale) F(flip) (p - center) + shift.
        cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
        a0, a1, b0, b1 = cos * flip_x, -sin * flip_y, sin * flip_x, cos * flip_y
        center_x, center_y = (width - 1) / 2, (height - 1) / 2
        a2 = center_x - a0 * center_x - a1 * center_y + shift_x
        b2 = center_y - b0 * center_x - b1 * center_y + shift_y
        return _resample(images, ops.stack([a0, a1, a2, b0, b1, b2], axis=1))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config() | {"flip": self.flip, "rotation": self.rotation,
                                       "zoom": self.zoom, "translation": self.translation,
                                       "seed": self.seed}


def _resample(images, transform):
    """Bilinear resampling of [N, H, W, C] images: output pixel (x, y) of image i reads the
    input at (a0 x + a1 y + a2, b0 x + b1 y + b2) for transform[i] = (a0, a1, a2, b0, b1, b2),
    with coordinates beyond a border reflected about it (fill_mode="reflect": d c b a | a b c d).
    """
    shape = ops.shape(images)
    count, height, width = shape[0], shape[1], shape[2]
    rows, columns = ops.meshgrid(ops.arange(height, dtype="float32"),
                                 ops.arange(width, dtype="float32"), indexing="ij")
    a0, a1, a2, b0, b1, b2 = (ops.reshape(transform[:, i], (-1, 1, 1)) for i in range(6))
    x = _reflect(a0 * columns + a1 * rows + a2, width)
    y = _reflect(b0 * columns + b1 * rows + b2, height)
    x0, y0 = ops.floor(x), ops.floor(y)
    fx, fy = ops.expand_dims(x - x0, -1), ops.expand_dims(y - y0, -1)
    x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    x1, y1 = ops.minimum(x0 + 1, width - 1), ops.minimum(y0 + 1, height - 1)
    pixels = ops.reshape(images, (-1, shape[3]))
    first = ops.reshape(ops.arange(count, dtype="int32") * height * width, (-1, 1, 1))

    def read(row, column):
        return ops.take(pixels, first + row * width + column, axis=0)

    top = read(y0, x0) * (1 - fx) + read(y0, x1) * fx
    bottom = read(y1, x0) * (1 - fx) + read(y1, x1) * fx
    return ops.cast(top * (1 - fy) + bottom * fy, images.dtype)


def _reflect(coordinate, size):
    """Pixel-center coordinates mirrored into [0, size - 1] about the image's edges."""
    size = ops.cast(size, "float32")
    folded = ops.mod(coordinate + 0.5, 2 * size)
    return ops.clip(ops.where(folded >= size, 2 * size - folded, folded) - 0.5, 0, size - 1)


class Logits(keras.layers.Layer):
    """The classifier's softmax layer before its softmax: features @ kernel + bias, sharing
    that Dense layer's weights."""

    def __init__(self, dense, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.dense = dense

    def call(self, features):
        return ops.matmul(ops.cast(features, "float32"), self.dense.kernel) + self.dense.bias

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.dense.units)


class Calibrated(keras.layers.Layer):
    """(logits, pooled features) -> (softmax(logits / temperature), or with `multi_label`
    the sigmoids, and the in-class score): transfer.calibrate's formulas in the graph
    ("mahalanobis": minus the smallest squared distance of the whitened features to a
    whitened class mean; "energy": logsumexp(logits); "joint_energy": the sum of
    softplus(logits); "max_probability": the largest calibrated probability). The
    Mahalanobis statistics are constant, non-trainable weights of the layer."""

    def __init__(self, temperature=1.0, score="energy", means=None, whitening=None,
                 multi_label=False, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.temperature, self.score = float(temperature), score
        self.multi_label = multi_label
        self.centers = self.whitening = None
        if score == "mahalanobis":
            if means is None or whitening is None:
                raise ValueError("The Mahalanobis score needs the class means and whitening "
                                 "of a calibrated run; received none.")
            self.whitening = self._constant("whitening", whitening)
            self.centers = self._constant("centers", means @ whitening)

    def _constant(self, name, value):
        weight = self.add_weight(shape=value.shape, initializer="zeros", trainable=False,
                                 name=name)
        weight.assign(value.astype("float32"))
        return weight

    def call(self, inputs):
        logits, features = inputs
        probabilities = (ops.sigmoid(logits / self.temperature) if self.multi_label
                         else ops.softmax(logits / self.temperature, axis=-1))
        if self.score == "mahalanobis":
            whitened = ops.matmul(ops.cast(features, "float32"), self.whitening)
            distances = ops.sum(ops.square(whitened[:, None, :] - self.centers[None]), axis=-1)
            score = -ops.min(distances, axis=-1)
        elif self.score == "energy":
            score = ops.logsumexp(logits, axis=-1)
        elif self.score == "joint_energy":
            score = ops.sum(ops.softplus(logits), axis=-1)
        else:
            score = ops.max(probabilities, axis=-1)
        return probabilities, score


@keras.saving.register_keras_serializable(package="transfer")
class LabelCrossentropy(keras.losses.Loss):
    """A multi-label model's loss: the binary cross-entropy of each label's sigmoid, averaged
    over the labels as Keras's binary_crossentropy, with each label's positives weighted by
    `positive_weights` [C] (None: all 1), so that a rare label is not learnt as never there."""

    def __init__(self, positive_weights=None, name="label_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.positive_weights = (None if positive_weights is None
                                 else [float(weight) for weight in positive_weights])

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        epsilon = keras.config.epsilon()
        y_pred = ops.clip(y_pred, epsilon, 1 - epsilon)
        weights = (1.0 if self.positive_weights is None
                   else ops.convert_to_tensor(self.positive_weights, y_pred.dtype))
        return -ops.mean(weights * y_true * ops.log(y_pred)
                         + (1 - y_true) * ops.log(1 - y_pred), axis=-1)

    def get_config(self):
        return {**super().get_config(), "positive_weights": self.positive_weights}
