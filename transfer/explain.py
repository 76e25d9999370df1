"""Grad-CAM: where in an image the evidence for a class is, as heatmaps and overlays.

Used by the evaluation report and by `predict --explain`.
"""

import numpy as np


def gradcam(model, images, class_indices, layer=None):
    """Grad-CAM heatmaps [N, h, w] in [0, 1] for each image's class: the class logit's
    gradient, averaged per channel, weighs the channels of a backbone layer's output. The
    layer is the backbone table's Grad-CAM layer (default: the backbone's output)."""
    import tensorflow as tf

    from transfer.backbones import BACKBONES
    from transfer.model import backbone_of, image_model, pooled_from

    backbone = backbone_of(model)
    if layer is None:
        spec = next((s for s in BACKBONES.values() if model.name == f"transfer_{s.name}"), None)
        layer = (spec and spec.gradcam_layer) or backbone.layers[-1].name
    tensor = backbone.get_layer(layer).output
    features = image_model(model, tensor)(images)
    pooled = pooled_from(model, tensor)
    dense = model.get_layer("probabilities")
    with tf.GradientTape() as tape:
        tape.watch(features)
        # the dense layer's own dtype: pooled features are float16 under mixed precision
        pooled_features = tf.cast(pooled(features), dense.kernel.dtype)
        logits = tf.matmul(pooled_features, dense.kernel) + dense.bias
        scores = tf.gather(logits, np.asarray(class_indices), axis=1, batch_dims=1)
    gradients = tape.gradient(scores, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    maps = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
    peaks = maps.max(axis=(1, 2), keepdims=True)
    return maps / np.where(peaks > 0, peaks, 1)


def overlay(images, heatmaps, alpha=0.45):
    """The heatmaps, resized and coloured (jet), over 0-255 images: uint8 [N, H, W, 3]."""
    from matplotlib import colormaps
    from PIL import Image

    size = images.shape[1:3][::-1]
    out = []
    for image, heatmap in zip(images, heatmaps):
        resized = np.asarray(Image.fromarray(np.uint8(255 * heatmap)).resize(
            size, Image.Resampling.BILINEAR)) / 255
        colour = colormaps["jet"](resized)[..., :3] * 255
        out.append(np.uint8((1 - alpha) * image + alpha * colour))
    return np.stack(out)
