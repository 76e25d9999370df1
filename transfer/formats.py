"""TFLite (float32, float16, full-integer int8) and ONNX conversions, each checked after writing.

Conversions start from the Keras model with the run's calibration applied (model.scored,
the same graph as the SavedModel's serving_default without test-time augmentation: raw 0-255
RGB in; outputs "probabilities", calibrated, and "score", the in-class score) and are
written into the export version's assets.extra/ folder with labels.txt. The unknown flag is
not converted: it is score < the threshold in the version's assets.extra/config.json
("calibration"). Each one is run on held-out images and compared with the SavedModel: float
formats must match its probabilities, quantized ones its top-1 class.
"""

import contextlib
import dataclasses
import io
import logging
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

from transfer.files import atomic_path, write_json

log = logging.getLogger(__name__)

FORMATS = ("tflite", "onnx")
FILES = {"tflite_float32": "model_float32.tflite", "tflite_float16": "model_float16.tflite",
         "tflite_int8": "model_int8.tflite", "onnx": "model.onnx"}
FLOAT_TOLERANCE = 1e-3  # largest probability difference for float32 formats
MIN_TOP1_AGREEMENT = 0.99  # for float16 and int8
# For float16 and int8 too: agreeing on the class is not enough on imbalanced data, where a
# model stuck on the largest class agrees on most images. int8's output step is 1/256.
MAX_MEAN_PROBABILITY_DIFFERENCE = 0.05


@dataclasses.dataclass
class FormatReport:
    format: str
    file: str
    size_mb: float
    val_accuracy: float
    top1_agreement: float  # with the SavedModel
    max_probability_difference: float
    mean_probability_difference: float  # half the L1 distance, averaged over the images
    latency_ms: float  # one image, median

    def ok(self):
        if self.format in ("savedmodel", "tflite_float32", "onnx"):
            return self.max_probability_difference <= FLOAT_TOLERANCE
        return (self.top1_agreement >= MIN_TOP1_AGREEMENT
                and self.mean_probability_difference <= MAX_MEAN_PROBABILITY_DIFFERENCE)

    def describe_failure(self):
        if self.format in ("savedmodel", "tflite_float32", "onnx"):
            return (f"{self.format} differs from the SavedModel by up to "
                    f"{self.max_probability_difference:.1e} in probability (tolerance "
                    f"{FLOAT_TOLERANCE:.0e})")
        return (f"{self.format} agrees with the SavedModel's top-1 class on "
                f"{self.top1_agreement:.1%} of held-out images (required: "
                f"{MIN_TOP1_AGREEMENT:.0%}) and differs from its probabilities by "
                f"{self.mean_probability_difference:.3f} on average (allowed: "
                f"{MAX_MEAN_PROBABILITY_DIFFERENCE})")


def convert(model, formats, folder, representative, calibration=None):
    """Write the requested formats of the classifier `model` into folder, each applying
    `calibration` (transfer.calibrate.Calibration; None: the identity); returns {format
    name: path}. `representative`: 0-255 training images, int8's quantization ranges and
    its bias correction are measured on them."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"Unknown export format(s) {', '.join(unknown)}; valid: "
                         f"savedmodel (always written), {', '.join(FORMATS)}.")
    folder = Path(folder)
    written = {}
    if "tflite" in formats:
        for precision in ("float32", "float16", "int8"):
            name = f"tflite_{precision}"
            with atomic_path(folder / FILES[name]) as temporary:
                temporary.write_bytes(_tflite(model, precision, representative, calibration))
            written[name] = folder / FILES[name]
            log.info("Wrote %s", written[name])
    if "onnx" in formats:
        from transfer.model import scored

        predicting = scored(model, calibration)
        # Keras exports called models only.
        predicting(np.zeros((1, *model.input_shape[1:]), "float32"))
        with atomic_path(folder / FILES["onnx"]) as temporary:
            predicting.export(str(temporary), format="onnx", verbose=False)
        written["onnx"] = folder / FILES["onnx"]
        log.info("Wrote %s", written["onnx"])
    return written


def _tflite(model, precision, representative, calibration=None):
    """The TFLite FlatBuffer of model.scored(the classifier `model`, `calibration`)."""
    import tensorflow as tf

    from transfer.model import scored

    if precision == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 TFLite needs calibration images (--calibration-images); "
                             "none were given.")
        model = bias_corrected(model, representative)  # a corrected copy of the classifier
    converter = tf.lite.TFLiteConverter.from_keras_model(scored(model, calibration))
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype("float32")]
                                                    for image in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # raw pixels are uint8 already
        converter.inference_output_type = tf.uint8
    # The converter exports the model through Keras's ExportArchive without verbose=False,
    # which prints every endpoint's TensorSpec (hundreds of lines) to stdout; errors are
    # raised, and TensorFlow's own warnings go to stderr, so neither is lost.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        converted = converter.convert()
    log.debug("The TFLite converter printed: %s", printed.getvalue())
    return converted


def bias_corrected(model, images, batch_size=32):
    """A copy of `model` whose convolutions absorb the mean error of int8 weight rounding.

    Full-integer conversion rounds each convolution's weights to 255 levels per output
    channel. The rounding error times the layer's mean input is a systematic shift of every
    output channel, and on MobileNets it flips close calls downstream. Bias correction
    (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
    Correction") measures the mean inputs on the calibration images and moves the shift
    into the moving mean of the BatchNormalization after the layer, or into its bias; the
    converter folds both into the int8 bias. The weights themselves are not touched, so the
    converter rounds them exactly as this function assumes.
    """
    import keras

    from transfer.model import backbone_of, image_model

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    backbone = backbone_of(copy)
    convolutions = [layer for layer in backbone.layers
                    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    consumers = {}
    for layer in backbone.layers:
        for tensor in keras.tree.flatten(layer.input) if layer.input is not None else []:
            consumers.setdefault(id(tensor), []).append(layer)
    probe = image_model(copy, [layer.input for layer in convolutions])
    sums = None
    for start in range(0, len(images), batch_size):
        inputs = probe.predict_on_batch(images[start:start + batch_size])
        batch = [np.asarray(x).sum(axis=(0, 1, 2), dtype="float64") for x in inputs]
        sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
    for layer, total in zip(convolutions, sums):
        mean_input = total / (len(images) * np.prod(layer.input.shape[1:3]))
        kernel = np.asarray(layer.kernel)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            error = _int8_rounding(kernel, axes=(0, 1)) - kernel  # [h, w, in, multiplier]
            shift = np.einsum("hwim,i->im", error, mean_input).reshape(-1)
        else:
            error = _int8_rounding(kernel, axes=(0, 1, 2)) - kernel  # [h, w, in / groups, out]
            groups = layer.groups  # each output channel sees its group's inputs only
            group_of = np.repeat(np.arange(groups), kernel.shape[3] // groups)
            shift = np.einsum("hwio,oi->o", error,
                              mean_input.reshape(groups, kernel.shape[2])[group_of])
        after = consumers.get(id(layer.output), [])
        if len(after) == 1 and isinstance(after[0], keras.layers.BatchNormalization):
            after[0].moving_mean.assign(np.asarray(after[0].moving_mean) + shift)
        elif layer.use_bias:
            layer.bias.assign(np.asarray(layer.bias) - shift)
    return copy


def _int8_rounding(kernel, axes):
    """The kernel as TFLite's symmetric per-channel int8 quantization rounds it."""
    scale = np.abs(kernel).max(axis=axes, keepdims=True) / 127
    scale = np.where(scale == 0, 1, scale)
    return np.round(kernel / scale) * scale


OUTPUTS = ("probabilities", "score")  # what every format returns, by name


def runner(name, path):
    """A function from float32 0-255 images [N, H, W, 3] to {"probabilities": [N, C],
    "score": [N]}."""
    if name == "savedmodel":
        from transfer.predict import Predictor

        predict = Predictor(path).predict
        return lambda images: {key: value for key, value in predict(images).items()
                               if key in OUTPUTS}
    if name == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda images: dict(zip(OUTPUTS, session.run(
            list(OUTPUTS), {input_name: images.astype("float32")})))
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=str(path))
    # By signature: the converter numbers the output tensors in no particular order.
    signature = interpreter.get_signature_runner()
    (input_name, source), = signature.get_input_details().items()
    targets = signature.get_output_details()

    def run(images):
        rows = []
        for image in images:  # TFLite models are converted for one image at a time
            x = image[None]
            if source["dtype"] == np.uint8:
                scale, zero = source["quantization"]
                x = np.clip(np.round(x / scale + zero), 0, 255)
            got = signature(**{input_name: x.astype(source["dtype"])})
            row = {}
            for key in OUTPUTS:
                y = got[key][0].astype("float32")
                if targets[key]["dtype"] == np.uint8:
                    scale, zero = targets[key]["quantization"]
                    y = (y - zero) * scale
                row[key] = y
            rows.append(row)
        return {key: np.stack([row[key] for row in rows]) for key in OUTPUTS}

    return run


def evaluate(paths, images, labels, latency_runs=30, batch_size=32):
    """A FormatReport per format in paths ({name: path}; "savedmodel" is the reference)."""
    outputs, latencies = {}, {}
    for name, path in paths.items():
        run = runner(name, path)
        outputs[name] = np.concatenate([run(images[i:i + batch_size])["probabilities"]
                                        for i in range(0, len(images), batch_size)])
        run(images[:1])
        timings = []
        for i in range(latency_runs):
            started = time.perf_counter()
            run(images[i % len(images):i % len(images) + 1])
            timings.append(time.perf_counter() - started)
        latencies[name] = 1000 * statistics.median(timings)
    reference = outputs["savedmodel"]
    reports = []
    for name, path in paths.items():
        predicted = outputs[name].argmax(axis=1)
        reports.append(FormatReport(
            format=name, file=Path(path).name,
            size_mb=round(_size(path) / 2**20, 3),
            val_accuracy=round(float((predicted == np.asarray(labels)).mean()), 4),
            top1_agreement=round(float((predicted == reference.argmax(axis=1)).mean()), 4),
            max_probability_difference=float(np.abs(outputs[name] - reference).max()),
            mean_probability_difference=round(float(
                np.abs(outputs[name] - reference).sum(axis=1).mean() / 2), 4),
            latency_ms=round(latencies[name], 2)))
    return reports


def write_report(reports, path):
    write_json(path, [dataclasses.asdict(report) for report in reports])


def table(reports):
    """The reports as an aligned text table."""
    lines = [f"{'format':<16}{'size MB':>9}{'val acc':>9}{'top-1 agree':>13}{'max |dp|':>10}"
             f"{'mean |dp|':>11}{'ms/image':>10}"]
    for r in reports:
        lines.append(f"{r.format:<16}{r.size_mb:>9.2f}{r.val_accuracy:>9.4f}"
                     f"{r.top1_agreement:>13.4f}{r.max_probability_difference:>10.1e}"
                     f"{r.mean_probability_difference:>11.4f}{r.latency_ms:>10.2f}")
    return "\n".join(lines)


def _size(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and "assets.extra" not in p.parts)
