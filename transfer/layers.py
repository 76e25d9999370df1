"""The one custom layer: "caffe" preprocessing, as a serializable layer (never a Lambda)."""

import keras
from keras import ops

from transfer.backbones import IMAGENET_MEAN_RGB


@keras.saving.register_keras_serializable(package="transfer")
class CaffePreprocessing(keras.layers.Layer):
    """RGB 0-255 -> BGR minus the ImageNet mean, as VGG and ResNet v1 were trained."""

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
        return ops.flip(images - mean, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape
