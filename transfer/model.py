"""The classifier: raw 0-255 RGB in, the backbone's own preprocessing, a new head."""

import logging

import keras

from transfer.backbones import cut_index
from transfer.layers import preprocessing_layers

log = logging.getLogger(__name__)

INPUT_NAME = "images"


def build_classifier(spec, num_classes, image_size, weights="imagenet", dropout=0.2,
                     multi_label=False):
    """A Keras model from [N, image_size, image_size, 3] 0-255 RGB to class probabilities:
    a softmax over the classes, or with `multi_label` one sigmoid per label."""
    backbone = spec.build(image_size, weights=None if weights == "none" else weights)
    backbone.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name=INPUT_NAME)
    x = inputs
    for layer in preprocessing_layers(spec.preprocessing):
        x = layer(x)
    # training=False keeps BatchNormalization in inference mode, also once unfrozen.
    x = backbone(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 even under mixed precision: a float16 softmax loses small probabilities.
    outputs = keras.layers.Dense(num_classes, activation="sigmoid" if multi_label else "softmax",
                                 name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"transfer_{spec.name}")


def is_multi_label(model):
    """Whether a classifier gives one sigmoid per label (several labels per image) rather
    than a softmax over its classes."""
    return model.get_layer("probabilities").get_config()["activation"] == "sigmoid"


# The axes each mirror image flips, for each of TrainConfig's flip modes (NHWC: 1 rows, 2 columns).
TTA_FLIPS = {"horizontal": ((2,),), "vertical": ((1,),),
             "horizontal_and_vertical": ((2,), (1,), (1, 2)), "none": ()}


def scored(model, calibration=None, flip="none", raw=False):
    """A model sharing the classifier's layers, from images to {"probabilities": calibrated
    probabilities [N, C], "score": the in-class score [N]} (transfer.calibrate; `calibration`
    None: temperature 1, the energy score), and with `raw` also "logits" [N, C] and
    "features" [N, D], the uncalibrated logits and the pooled features they come from. With
    test-time augmentation (`flip`, as TrainConfig names the flips training augmented with)
    the pooled features are averaged over each image and its mirror images first: the
    logits, an affine function of them, are then the average of each view's logits."""
    from transfer.calibrate import Calibration
    from transfer.layers import Calibrated, Logits

    calibration = calibration or Calibration()
    dense = model.get_layer("probabilities")
    features = keras.Model(model.input, dense.input)
    inputs = keras.Input(model.input_shape[1:], name=INPUT_NAME)
    views = [inputs] + [keras.ops.flip(inputs, axis=flipped) for flipped in TTA_FLIPS[flip]]
    each = [features(view) for view in views]
    pooled = (each[0] if len(each) == 1
              else keras.layers.Average(name="tta_average", dtype="float32")(each))
    logits = Logits(dense, name="logits")(pooled)
    probabilities, score = Calibrated(calibration.temperature, calibration.score,
                                      calibration.means, calibration.whitening,
                                      is_multi_label(model), name="calibrated")([logits, pooled])
    outputs = {"probabilities": probabilities, "score": score}
    return keras.Model(inputs, outputs | ({"logits": logits, "features": pooled} if raw else {}),
                       name=f"{model.name}_scored")


def backbone_of(model):
    """The backbone: the one nested Model inside a classifier."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def image_model(model, outputs, backbone=None):
    """A model from the classifier's 0-255 images to `outputs`, tensors of its backbone or
    of `backbone` (another copy of it, e.g. with its original weights)."""
    preprocessing = model.layers[1:model.layers.index(backbone_of(model))]
    backbone = backbone or backbone_of(model)
    inputs = keras.Input(model.input_shape[1:], name=INPUT_NAME)
    x = inputs
    for layer in preprocessing:
        x = layer(x)
    return keras.Model(inputs, keras.Model(backbone.input, outputs)(x, training=False))


def pooled_from(model, tensor):
    """A model from `tensor`, inside the backbone, to the classifier's pooled features, sharing
    its layers; the backbone's part runs in inference mode, as in the classifier."""
    backbone = backbone_of(model)
    inputs = keras.Input(tensor.shape[1:])
    x = (inputs if tensor is backbone.output
         else keras.Model(tensor, backbone.output)(inputs, training=False))
    return keras.Model(inputs, model.get_layer("pool")(x))


def set_trainable(backbone, unfreeze_from):
    """Freeze the backbone, or unfreeze from the first layer named `unfreeze_from*` onwards.

    BatchNormalization layers stay frozen: their statistics fit ImageNet and small batches
    would wreck them.
    """
    if unfreeze_from is None:
        backbone.trainable = False
        return
    start = cut_index(backbone, unfreeze_from)
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)


def count_trainable(model):
    return sum(int(keras.ops.size(weight)) for weight in model.trainable_weights)


def load_model(path):
    """Load a .keras classifier in safe mode."""
    import transfer.layers  # noqa: F401  (registers CaffePreprocessing for deserialization)

    return keras.saving.load_model(path, safe_mode=True)


def all_layers(model):
    """The model's layers in order, those of nested models (ConvNeXt's stem) included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
