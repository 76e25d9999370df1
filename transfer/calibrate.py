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

A multi-label model (one sigmoid per label) is calibrated the same way, its temperature fitted
on the binary cross-entropy of every image's every label, and scored by the joint energy,
the sum of softplus(logit) over the labels (Wang et al. 2021, "Can multi-label
classification networks know what they don't know?"). Each label also gets its decision
threshold: the one that maximises the label's F1 on the validation images, 0.5 for a label
they never carry.

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
LOGIT_SCORES = ("energy", "max_probability")  # a single-label model's scores of its logits
SCORES = ("mahalanobis", *LOGIT_SCORES)  # of a single-label model
MULTI_LABEL_SCORES = ("joint_energy", "max_probability")
SCORE = "mahalanobis"
MULTI_LABEL_SCORE = "joint_energy"
DEFAULT_THRESHOLD = 0.5  # a label's decision threshold where the validation images lack it
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

    multi_label: the probabilities are sigmoid(logits / temperature), each label decided by
    its own threshold of `thresholds` [C] (None: 0.5 for all).
    """

    temperature: float = 1.0
    score: str = FALLBACK_SCORE
    threshold: float = -math.inf  # images scoring below it are unknown
    keep: float | None = None  # the share of validation images the threshold keeps
    means: np.ndarray | None = None
    whitening: np.ndarray | None = None
    multi_label: bool = False
    thresholds: tuple | None = None

    def __eq__(self, other):
        return (isinstance(other, Calibration) and self.to_dict() == other.to_dict()
                and all(np.array_equal(a, b) if a is not None and b is not None else a is b
                        for a, b in ((self.means, other.means),
                                     (self.whitening, other.whitening))))

    def to_dict(self):
        """The JSON part: everything but the arrays, which write() stores beside it."""
        values = {"temperature": self.temperature, "score": self.score,
                  "threshold": None if math.isinf(self.threshold) else self.threshold,
                  "keep": self.keep}
        if self.multi_label:
            values |= {"multi_label": True, "thresholds": None if self.thresholds is None
                       else [float(t) for t in self.thresholds]}
        return values

    def decision_thresholds(self, labels):
        """The decision threshold of each of `labels` labels [C] (multi-label models)."""
        if self.thresholds is None:
            return np.full(labels, DEFAULT_THRESHOLD, dtype=np.float32)
        return np.asarray(self.thresholds, dtype=np.float32)

    def decisions(self, probabilities):
        """A multi-label model's decisions [N, C]: each label's calibrated probability at or
        above its threshold."""
        probabilities = np.asarray(probabilities)
        thresholds = self.decision_thresholds(probabilities.shape[1])
        if thresholds.shape != probabilities.shape[1:]:
            raise ValueError(f"The calibration has {len(thresholds)} label thresholds for a "
                             f"model of {probabilities.shape[1]} labels; calibrate the run "
                             "again.")
        return probabilities >= thresholds

    @classmethod
    def from_dict(cls, values, arrays=None):
        threshold, arrays = values.get("threshold"), arrays or {}
        thresholds = values.get("thresholds")
        return cls(float(values["temperature"]), values.get("score", FALLBACK_SCORE),
                   -math.inf if threshold is None else float(threshold), values.get("keep"),
                   arrays.get("means"), arrays.get("whitening"),
                   bool(values.get("multi_label", False)),
                   None if thresholds is None else tuple(float(t) for t in thresholds))


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


def sigmoid(logits, temperature=1.0):
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64) / temperature))


def probabilities_of(logits, multi_label, temperature=1.0):
    """softmax(logits / T), or for a multi-label model the sigmoids."""
    return sigmoid(logits, temperature) if multi_label else softmax(logits, temperature)


def log_loss(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of the true labels under softmax(logits / T); for
    multi-hot labels [N, C], the binary cross-entropy of sigmoid(logits / T) averaged over
    every image's every label (as Keras's binary_crossentropy)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if np.ndim(labels) == 2:
        y = np.asarray(labels, dtype=np.float64)
        return float((np.logaddexp(0, z) - y * z).mean())  # -y log s(z) - (1-y) log(1-s(z))
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
    """Per equal-width confidence bin: [low, high, images, mean confidence, accuracy]. With
    multi-hot labels [N, C] every label's probability is one prediction, and "accuracy" the
    share of them whose label the image carries."""
    probabilities = np.asarray(probabilities)
    if np.ndim(labels) == 2:
        confidence = probabilities.ravel()
        correct = np.asarray(labels).ravel() > 0
    else:
        confidence = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0, 1, bins + 1)
    # (low, high] as Guo et al. bin them; a confidence of exactly 0 goes in the first bin.
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
    total = np.size(labels) if np.ndim(labels) == 2 else len(labels)
    return float(sum(count * abs(accuracy - confidence)
                     for _, _, count, confidence, accuracy in reliability(probabilities, labels,
                                                                          bins)
                     if count) / total)


def scores(logits, temperature=1.0, kind=FALLBACK_SCORE, multi_label=False):
    """In-class scores [N] of one of LOGIT_SCORES or MULTI_LABEL_SCORES, higher for images
    more like the training classes."""
    if kind == "max_probability":
        return probabilities_of(logits, multi_label, temperature).max(axis=1)
    if kind == "energy":
        z = np.asarray(logits, dtype=np.float64)
        top = z.max(axis=1)
        return top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    if kind == "joint_energy":
        return np.logaddexp(0, np.asarray(logits, dtype=np.float64)).sum(axis=1)
    raise ValueError(f"The score must be one of "
                     f"{', '.join(dict.fromkeys(LOGIT_SCORES + MULTI_LABEL_SCORES))} (from "
                     "logits); "
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
        return scores(outputs["logits"], calibration.temperature, kind,
                      calibration.multi_label)
    if calibration.means is None:
        raise ValueError("The Mahalanobis score needs the class means and whitening of a "
                         "calibrated run (calibration.npz); this calibration has none.")
    return mahalanobis(outputs["features"], calibration.means, calibration.whitening)


def available_scores(calibration):
    """The kinds of SCORES this calibration can compute: the Mahalanobis score only with its
    statistics; a multi-label model's MULTI_LABEL_SCORES."""
    if calibration.multi_label:
        return MULTI_LABEL_SCORES
    return tuple(kind for kind in SCORES if kind != "mahalanobis" or calibration.means is not None)


def apply(calibration, outputs):
    """model.scored's outputs with raw=True, {"logits", "features", "probabilities",
    "score"}, from its uncalibrated ones ({"logits", "features"}): what the Calibrated layer
    computes in the graph, here in NumPy."""
    logits = np.asarray(outputs["logits"])
    return {**outputs, "logits": logits,
            "probabilities": probabilities_of(logits, calibration.multi_label,
                                              calibration.temperature).astype(np.float32),
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


def f1_thresholds(probabilities, labels):
    """[C] thresholds, each maximising its label's F1 on these images (predicted where the
    probability is at or above it): halfway between the lowest probability predicted and the
    next lower one. DEFAULT_THRESHOLD for a label no image carries."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels) > 0
    thresholds = np.full(probabilities.shape[1], DEFAULT_THRESHOLD)
    for c in range(probabilities.shape[1]):
        positives = int(labels[:, c].sum())
        if not positives:
            continue
        order = np.argsort(-probabilities[:, c], kind="stable")
        p, hits = probabilities[order, c], np.cumsum(labels[order, c])
        cuts = np.flatnonzero(np.append(p[:-1] > p[1:], True))  # predict order[:k + 1]
        f1 = 2 * hits[cuts] / (cuts + 1 + positives)
        k = cuts[int(np.argmax(f1))]
        thresholds[c] = (p[k] + p[k + 1]) / 2 if k + 1 < len(p) else p[k] / 2
    return thresholds


def calibrate(outputs, labels, keep, kind=SCORE):
    """(Calibration, figures for metrics.json) from the validation images' uncalibrated
    outputs (model.scored's with raw=True: "logits", "features") and labels (multi-hot
    [N, C] for a multi-label model: scored by MULTI_LABEL_SCORE, thresholds by F1).

    The Mahalanobis score needs two validation images of every class, one per half; with
    fewer it falls back to FALLBACK_SCORE and the figures say why ("score_fallback")."""
    logits, labels = np.asarray(outputs["logits"]), np.asarray(labels)
    classes, multi = logits.shape[1], labels.ndim == 2
    temperature = fit_temperature(logits, labels)
    figures = {"temperature": temperature,
               "nll_before": log_loss(logits, labels), "nll_after": log_loss(logits, labels,
                                                                            temperature),
               "ece_before": expected_calibration_error(probabilities_of(logits, multi), labels),
               "ece_after": expected_calibration_error(
                   probabilities_of(logits, multi, temperature), labels)}
    if multi:
        thresholds = f1_thresholds(sigmoid(logits, temperature), labels)
        threshold = threshold_keeping(scores(logits, temperature, MULTI_LABEL_SCORE), keep)
        return Calibration(temperature, MULTI_LABEL_SCORE, threshold, keep, multi_label=True,
                           thresholds=tuple(float(t) for t in thresholds)), figures
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
