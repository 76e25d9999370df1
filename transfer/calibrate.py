"""Probabilities that mean what they say, and a score for "is this one of my classes".

After training, one temperature T is fitted to the validation images' logits by minimising
their negative log-likelihood (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
the probabilities are softmax(logits / T) everywhere they leave the tool. It divides every
logit by the same number, so no predicted class changes.

The in-class score of an image is one of SCORES, higher meaning more like the training
classes: "mahalanobis", minus the smallest Mahalanobis distance of the image's pooled features
to a class mean (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks": class means and one shared covariance, here fitted on the
validation images' features with Ledoit-Wolf shrinkage); "energy", the negative free energy
logsumexp(logits) of Liu et al. 2020 ("Energy-based Out-of-distribution Detection", at their
T = 1); or "max_probability", the largest calibrated probability. SCORE is the one
bench/unknown.py measured to separate other photos best. An image whose score is below the
threshold, chosen on the validation images so that a `keep` share of them stays above it, is
"unknown". The Mahalanobis statistics are fitted on the same validation images, so its
threshold is chosen on cross-fitted scores: each half of them scored by statistics fitted on
the other half, as new images would be.

Pure NumPy and SciPy: the graph versions of the same formulas are in transfer.layers.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from transfer.files import write_json, write_npz

CALIBRATION = "calibration.json"  # in the run directory
STATISTICS = "calibration.npz"  # beside it: the Mahalanobis score's class means and whitening
ECE_BINS = 15
LOGIT_SCORES = ("energy", "max_probability")
SCORES = ("mahalanobis", *LOGIT_SCORES)
SCORE = "mahalanobis"
FALLBACK_SCORE = "energy"  # where there are too few validation images per class for SCORE
EIGENVALUE_FLOOR = 1e-6  # of the mean eigenvalue: the Mahalanobis covariance's smallest
TEMPERATURE_RANGE = (1e-2, 1e2)


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """What a run's model applies to its logits and features. The defaults change nothing and
    reject nothing: a run from before calibration, or one that was never calibrated.

    means [C, D] and whitening [D, D] (None unless score is "mahalanobis"): the class means of
    the pooled features and a W with W W^T the inverse of their shared covariance, so that an
    image's squared distance to class c is |(features - means[c]) W|^2.
    """

    temperature: float = 1.0
    score: str = FALLBACK_SCORE
    threshold: float = -math.inf  # images scoring below it are unknown
    keep: float | None = None  # the share of validation images the threshold keeps
    means: np.ndarray | None = None
    whitening: np.ndarray | None = None

    def __eq__(self, other):
        return (isinstance(other, Calibration) and self.to_dict() == other.to_dict()
                and all(np.array_equal(a, b) if a is not None and b is not None else a is b
                        for a, b in ((self.means, other.means),
                                     (self.whitening, other.whitening))))

    def to_dict(self):
        """The JSON part: everything but the arrays, which write() stores beside it."""
        return {"temperature": self.temperature, "score": self.score,
                "threshold": None if math.isinf(self.threshold) else self.threshold,
                "keep": self.keep}

    @classmethod
    def from_dict(cls, values, arrays=None):
        threshold, arrays = values.get("threshold"), arrays or {}
        return cls(float(values["temperature"]), values.get("score", FALLBACK_SCORE),
                   -math.inf if threshold is None else float(threshold), values.get("keep"),
                   arrays.get("means"), arrays.get("whitening"))


def read(run_dir):
    """The run's Calibration; the identity for a run without calibration.json (or None)."""
    path = Path(run_dir) / CALIBRATION if run_dir is not None else None
    if path is None or not path.is_file():
        return Calibration()
    values = json.loads(path.read_text())
    if values.get("score") != "mahalanobis":
        return Calibration.from_dict(values)
    statistics = path.with_name(STATISTICS)
    if not statistics.is_file():
        raise FileNotFoundError(f"{statistics} is missing: {path} scores images by Mahalanobis "
                                "distance, whose class means and whitening it holds. Restore "
                                "it, or train the run again.")
    with np.load(statistics) as arrays:
        return Calibration.from_dict(values, {key: arrays[key] for key in ("means",
                                                                         "whitening")})


def write(run_dir, calibration, figures):
    """calibration.json (with `figures`) and, for the Mahalanobis score, calibration.npz."""
    if calibration.means is not None:
        write_npz(Path(run_dir) / STATISTICS, means=calibration.means,
                  whitening=calibration.whitening)
    write_json(Path(run_dir) / CALIBRATION, calibration.to_dict() | figures)


def softmax(logits, temperature=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    exp = np.exp(z)
    return exp / exp.sum(axis=1, keepdims=True)


def log_loss(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_norm = (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]
    return float((log_norm - z[np.arange(len(z)), np.asarray(labels)]).mean())


def fit_temperature(logits, labels):
    """The T in TEMPERATURE_RANGE that minimises the log loss of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: log_loss(logits, labels, np.exp(log_t)),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def reliability(probabilities, labels, bins=ECE_BINS):
    """Per equal-width confidence bin: [low, high, images, mean confidence, accuracy]."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    # (low, high] as Guo et al. bin them; a confidence of exactly 0 cannot occur (>= 1/C).
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        rows.append([float(edges[b]), float(edges[b + 1]), count,
                     float(confidence[inside].mean()) if count else None,
                     float(correct[inside].mean()) if count else None])
    return rows


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """ECE: the images-weighted mean |accuracy - confidence| over the confidence bins."""
    total = len(labels)
    return float(sum(count * abs(accuracy - confidence)
                     for _, _, count, confidence, accuracy in reliability(probabilities, labels,
                                                                          bins)
                     if count) / total)


def scores(logits, temperature=1.0, kind=FALLBACK_SCORE):
    """In-class scores [N] of one of LOGIT_SCORES, higher for images more like the training
    classes."""
    if kind == "max_probability":
        return softmax(logits, temperature).max(axis=1)
    if kind == "energy":
        z = np.asarray(logits, dtype=np.float64)
        top = z.max(axis=1)
        return top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    raise ValueError(f"The score must be one of {', '.join(LOGIT_SCORES)} (from logits); "
                     f"received {kind!r}.")


def fit_mahalanobis(features, labels, classes):
    """(means [C, D], whitening [D, D]) of the pooled `features`: the class means and
    W = V diag(eigenvalues)^-1/2 of the Ledoit-Wolf covariance of the features less their
    class mean (one covariance shared by the classes, as Lee et al. 2018), its eigenvalues
    floored at EIGENVALUE_FLOOR of their mean (features that never vary, like a dead ReLU's)."""
    from sklearn.covariance import LedoitWolf

    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(classes)])
    covariance = LedoitWolf().fit(features - means[labels]).covariance_
    eigenvalues, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    floor = EIGENVALUE_FLOOR * max(float(eigenvalues.mean()), np.finfo(np.float32).tiny)
    whitening = vectors / np.sqrt(np.maximum(eigenvalues, floor))
    return means.astype(np.float32), whitening.astype(np.float32)


def mahalanobis(features, means, whitening):
    """Minus the smallest squared Mahalanobis distance of each row of `features` to a class
    mean [N]."""
    features = np.asarray(features, dtype=np.float64)
    whitening = np.asarray(whitening, dtype=np.float64)
    centers = np.asarray(means, dtype=np.float64) @ whitening
    whitened = features @ whitening
    return -np.min([np.square(whitened - center).sum(axis=1) for center in centers], axis=0)


def score_of(calibration, outputs, kind=None):
    """The in-class scores [N] of `kind` (default: the calibration's) from model.scored's
    outputs with raw=True ("logits", and "features" for the Mahalanobis score)."""
    kind = kind or calibration.score
    if kind != "mahalanobis":
        return scores(outputs["logits"], calibration.temperature, kind)
    if calibration.means is None:
        raise ValueError("The Mahalanobis score needs the class means and whitening of a "
                         "calibrated run (calibration.npz); this calibration has none.")
    return mahalanobis(outputs["features"], calibration.means, calibration.whitening)


def available_scores(calibration):
    """The kinds of SCORES this calibration can compute: the Mahalanobis score only with its
    statistics."""
    return tuple(kind for kind in SCORES if kind != "mahalanobis" or calibration.means is not None)


def apply(calibration, outputs):
    """model.scored's outputs with raw=True, {"logits", "features", "probabilities",
    "score"}, from its uncalibrated ones ({"logits", "features"}): what the Calibrated layer
    computes in the graph, here in NumPy."""
    logits = np.asarray(outputs["logits"])
    return {**outputs, "logits": logits,
            "probabilities": softmax(logits, calibration.temperature).astype(np.float32),
            "score": score_of(calibration, outputs)}


def threshold_keeping(scores_in, keep):
    """A threshold with at least `keep` of scores_in at or above it: just below the lowest
    score kept, by a margin that float32 graphs computing the same scores cannot cross
    (and never as far as the next lower score)."""
    if not 0 < keep <= 1:
        raise ValueError(f"--keep must be in (0, 1]: the share of in-class images kept; "
                         f"received {keep}.")
    ordered = np.sort(np.asarray(scores_in, dtype=np.float64))
    k = int(math.floor((1 - keep) * len(ordered) + 1e-9))
    margin = 1e-4 * max(1.0, abs(ordered[k]))
    if k > 0:
        margin = min(margin, (ordered[k] - ordered[k - 1]) / 2)
    return float(ordered[k] - margin)


def separation(scores_in, scores_out):
    """How well a score tells in-class images (positive) from others: AUROC and the false
    positive rate (others kept) at the threshold that keeps 95% of the in-class images."""
    from sklearn.metrics import roc_auc_score

    scores_in, scores_out = np.asarray(scores_in), np.asarray(scores_out)
    truth = np.concatenate([np.ones(len(scores_in)), np.zeros(len(scores_out))])
    cut = threshold_keeping(scores_in, 0.95)
    return {"auroc": float(roc_auc_score(truth, np.concatenate([scores_in, scores_out]))),
            "fpr_at_95_tpr": float((scores_out >= cut).mean())}


def halves(labels):
    """Two folds [N] of 0s and 1s, alternating within each class in the images' order."""
    labels = np.asarray(labels)
    fold = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        fold[np.flatnonzero(labels == c)[1::2]] = 1
    return fold


def calibrate(outputs, labels, keep, kind=SCORE):
    """(Calibration, figures for metrics.json) from the validation images' uncalibrated
    outputs (model.scored's with raw=True: "logits", "features") and labels.

    The Mahalanobis score needs two validation images of every class, one per half; with
    fewer it falls back to FALLBACK_SCORE and the figures say why ("score_fallback")."""
    logits, labels = np.asarray(outputs["logits"]), np.asarray(labels)
    classes = logits.shape[1]
    temperature = fit_temperature(logits, labels)
    figures = {"temperature": temperature,
               "nll_before": log_loss(logits, labels), "nll_after": log_loss(logits, labels,
                                                                            temperature),
               "ece_before": expected_calibration_error(softmax(logits), labels),
               "ece_after": expected_calibration_error(softmax(logits, temperature), labels)}
    counts = np.bincount(labels, minlength=classes)
    if kind == "mahalanobis" and counts.min() < 2:
        figures["score_fallback"] = (f"{FALLBACK_SCORE}, not mahalanobis: class "
                                     f"{int(counts.argmin())} has {int(counts.min())} validation "
                                     "image(s), and the Mahalanobis score needs 2 per class")
        kind = FALLBACK_SCORE
    if kind != "mahalanobis":
        return Calibration(temperature, kind, threshold_keeping(
            scores(logits, temperature, kind), keep), keep), figures
    features = np.asarray(outputs["features"])
    fold = halves(labels)
    crossed = np.empty(len(labels))
    for half in (0, 1):
        fitted = fit_mahalanobis(features[fold != half], labels[fold != half], classes)
        crossed[fold == half] = mahalanobis(features[fold == half], *fitted)
    means, whitening = fit_mahalanobis(features, labels, classes)
    return Calibration(temperature, kind, threshold_keeping(crossed, keep), keep, means,
                       whitening), figures
