"""The backbone table: one row per ImageNet-pretrained model from keras.applications.

Adding a backbone means adding one row to ``BACKBONES``. Nothing else in the package knows
about individual backbones.
"""

import dataclasses
import logging
import os
import re
import warnings

log = logging.getLogger(__name__)

FINE_TUNE_LEARNING_RATE = 1e-5  # phase 2's, for a backbone whose row names none


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build, feed and fine-tune one keras.applications backbone.

    preprocessing: "caffe" (RGB->BGR, subtract the ImageNet mean), "tf" (scale to [-1, 1]),
        "torch" (scale to [0, 1], then ImageNet mean and std), or "none" (the Keras model
        rescales inside itself).
    cut: name prefix of the first layer to fine-tune. That layer and every layer after it in
        the backbone's layer order are unfrozen in phase 2; it always starts a whole block.
    fine_tune_learning_rate: phase 2's default rate (--fine-tune-learning-rate overrides it):
        FINE_TUNE_LEARNING_RATE, or what bench/accuracy.py measured to be better for this
        backbone (README "Accuracy").
    gradcam_layer: the layer whose output Grad-CAM weighs, the last convolutional block's;
        None means the backbone's own output, which is that block's output in every row but
        VGG's (whose output is pooled once more).
    """

    name: str
    constructor: str  # attribute of keras.applications
    module: str  # keras.applications submodule holding preprocess_input
    preprocessing: str
    default_size: int
    min_size: int
    cut: str
    kwargs: tuple = ()  # extra constructor arguments as (key, value) pairs
    gradcam_layer: str | None = None
    fine_tune_learning_rate: float = FINE_TUNE_LEARNING_RATE

    def check_size(self, image_size):
        """ValueError unless `image_size` is at least this backbone's minimum."""
        if image_size < self.min_size:
            raise ValueError(f"image size {image_size} is below backbone {self.name!r}'s minimum "
                             f"of {self.min_size}; use --image-size {self.min_size} or more.")

    def build(self, image_size, weights="imagenet"):
        """The headless backbone for `image_size` square RGB inputs.

        weights: "imagenet" (Keras's download and cache), None (random) or a weights file path.
        """
        import keras

        self.check_size(image_size)

        constructor = getattr(keras.applications, self.constructor)
        try:
            # A weights file that does not fit warns once per layer before it fails: those
            # warnings are passed on only when it loads.
            with warnings.catch_warnings(record=True) as caught:
                backbone = constructor(
                    include_top=False,
                    weights=weights,
                    input_shape=(image_size, image_size, 3),
                    **dict(self.kwargs),
                )
            for warning in caught:
                warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                       warning.lineno)
        except Exception as error:  # Keras raises a bare Exception for a failed download.
            if "URL fetch failure" in str(error):
                raise FileNotFoundError(_weights_help(self.name, str(error))) from None
            if weights in ("imagenet", None) or not isinstance(error, (OSError, ValueError,
                                                                        KeyError)):
                raise
            # h5py's OSError for a file that is not HDF5; Keras's ValueError (over many lines)
            # for one whose weights do not fit this backbone.
            raise ValueError(f"--weights {weights} could not be loaded into backbone "
                             f"{self.name!r}: {_one_line(error)} Expected a weights file of "
                             "this backbone without its top (Keras's save_weights: "
                             ".weights.h5), or --weights imagenet | none.") from None
        backbone.table_name = self.name  # what the user called it, for messages (cut_index)
        return backbone


def _one_line(error, limit=240):
    text = " ".join(str(error).split()) or type(error).__name__
    text = text if len(text) <= limit else text[:limit] + "..."
    return text if text.endswith((".", "...")) else text + "."


def _weights_help(name, message):
    match = re.search(r"URL fetch failure on (\S+?):? ", message)
    url = match.group(1) if match else "(see the Keras error below)"
    file_name = url.rsplit("/", 1)[-1]
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    models_dir = os.path.join(keras_home, "models")
    return (
        f"ImageNet weights for backbone {name!r} are not in Keras's cache and could not be "
        f"downloaded.\n  Keras wants the file: {file_name}\n  in: {models_dir}\n"
        f"  from: {url}\n"
        "Download it on a machine with internet and copy it there (or point KERAS_HOME at a "
        "folder whose models/ holds it), or train with --weights none or --weights PATH.\n"
        f"Keras said: {message}"
    )


def _row(name, constructor, module, preprocessing, default_size, min_size, cut,
         gradcam_layer=None, fine_tune_learning_rate=FINE_TUNE_LEARNING_RATE, **kwargs):
    return BackboneSpec(
        name, constructor, module, preprocessing, default_size, min_size, cut,
        tuple(sorted(kwargs.items())), gradcam_layer, fine_tune_learning_rate,
    )


BACKBONES = {
    spec.name: spec
    for spec in [
        _row("vgg16", "VGG16", "vgg16", "caffe", 224, 32, "block5_", "block5_conv3"),
        _row("vgg19", "VGG19", "vgg19", "caffe", 224, 32, "block5_", "block5_conv4"),
        _row("resnet50", "ResNet50", "resnet", "caffe", 224, 32, "conv5_"),
        _row("resnet101", "ResNet101", "resnet", "caffe", 224, 32, "conv5_"),
        _row("resnet152", "ResNet152", "resnet", "caffe", 224, 32, "conv5_"),
        _row("resnet50v2", "ResNet50V2", "resnet_v2", "tf", 224, 32, "conv5_"),
        _row("resnet101v2", "ResNet101V2", "resnet_v2", "tf", 224, 32, "conv5_"),
        _row("resnet152v2", "ResNet152V2", "resnet_v2", "tf", 224, 32, "conv5_"),
        _row("xception", "Xception", "xception", "tf", 299, 71, "block14_"),
        # Inception's inner layers have generic names; "mixed9" starts the top block's
        # named outputs, and every layer with weights after it belongs to the top block.
        _row("inceptionv3", "InceptionV3", "inception_v3", "tf", 299, 75, "mixed9"),
        _row("inceptionresnetv2", "InceptionResNetV2", "inception_resnet_v2", "tf", 299, 75,
             "block8_9_ac"),
        _row("mobilenet", "MobileNet", "mobilenet", "tf", 224, 32, "conv_dw_12", alpha=1.0),
        _row("mobilenet_050", "MobileNet", "mobilenet", "tf", 224, 32, "conv_dw_12", alpha=0.5),
        # 1e-4 (this row and mobilenetv2's): a lower validation loss than 1e-5 on both data
        # sets (README "Accuracy").
        _row("mobilenet_025", "MobileNet", "mobilenet", "tf", 224, 32, "conv_dw_12",
             fine_tune_learning_rate=1e-4, alpha=0.25),
        _row("mobilenetv2", "MobileNetV2", "mobilenet_v2", "tf", 224, 32, "block_15_",
             fine_tune_learning_rate=1e-4),
        _row("mobilenetv3small", "MobileNetV3Small", "mobilenet_v3", "none", 224, 32,
             "expanded_conv_9_"),
        _row("mobilenetv3large", "MobileNetV3Large", "mobilenet_v3", "none", 224, 32,
             "expanded_conv_13_"),
        _row("densenet121", "DenseNet121", "densenet", "torch", 224, 32, "conv5_"),
        _row("densenet169", "DenseNet169", "densenet", "torch", 224, 32, "conv5_"),
        _row("densenet201", "DenseNet201", "densenet", "torch", 224, 32, "conv5_"),
        _row("efficientnetv2b0", "EfficientNetV2B0", "efficientnet_v2", "none", 224, 32, "block6"),
        _row("efficientnetv2b1", "EfficientNetV2B1", "efficientnet_v2", "none", 240, 32, "block6"),
        _row("efficientnetv2b2", "EfficientNetV2B2", "efficientnet_v2", "none", 260, 32, "block6"),
        _row("efficientnetv2b3", "EfficientNetV2B3", "efficientnet_v2", "none", 300, 32, "block6"),
        _row("convnext_tiny", "ConvNeXtTiny", "convnext", "none", 224, 32,
             "convnext_tiny_downsampling_block_2"),
    ]
}


def get_spec(name):
    """The BackboneSpec called `name`; a ValueError naming the valid ones otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"Unknown backbone {name!r}. Valid backbones: {', '.join(BACKBONES)}."
        ) from None


def cut_index(backbone, prefix, name=None, option="--fine-tune-from"):
    """Index in backbone.layers of the first layer whose name starts with `prefix`.

    name: the backbone as the user named it, for the message; by default the table's name
    (BackboneSpec.build records it), else Keras's model name (mobilenet_0.25_224).
    option: the option that gave `prefix`, for the message.
    """
    for index, layer in enumerate(backbone.layers):
        if layer.name.startswith(prefix):
            return index
    name = name or getattr(backbone, "table_name", None)
    raise ValueError(
        f"No layer of backbone {name or backbone.name!r} starts with {prefix!r}. Give "
        f"{option} a layer-name prefix from `transfer backbones --layers "
        f"{name or 'NAME'}`."
    )
