"""Probabilities that mean what they say, and a score for "is this one of my classes".

After training, one temperature T is fitted to the validation images' logits by minimising
their negative log-likelihood (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
the probabilities are softmax(logits / T) everywhere they leave the tool. It divides every
logit by the same number, so no predicted class changes.

The in-class score of an image is one of SCORES, higher meaning more like the training
classes: "energy", the negative free energy logsumexp(logits) of Liu et al. 2020
("Energy-based Out-of-distribution Detection", at their T = 1), or "max_probability", the
largest calibrated probability. SCORE is the one bench/unknown.py measured to separate
other photos better. An image whose score is below the threshold, chosen on the validation
images so that a `keep` share of them stays above it, is "unknown".

Pure NumPy and SciPy: the graph versions of the same formulas are in transfer.layers.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

CALIBRATION = "calibration.json"  # in the run directory
ECE_BINS = 15
SCORES = ("energy", "max_probability")
SCORE = "energy"
TEMPERATURE_RANGE = (1e-2, 1e2)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a run's model applies to its logits. The defaults change nothing and reject
    nothing: a run from before calibration, or one that was never calibrated."""

    temperature: float = 1.0
    score: str = SCORE
    threshold: float = -math.inf  # images scoring below it are unknown
    keep: float | None = None  # the share of validation images the threshold keeps

    def to_dict(self):
        return {**dataclasses.asdict(self),
                "threshold": None if math.isinf(self.threshold) else self.threshold}

    @classmethod
    def from_dict(cls, values):
        threshold = values.get("threshold")
        return cls(float(values["temperature"]), values.get("score", SCORE),
                   -math.inf if threshold is None else float(threshold), values.get("keep"))


def read(run_dir):
    """The run's Calibration; the identity for a run without calibration.json (or None)."""
    path = Path(run_dir) / CALIBRATION if run_dir is not None else None
    if path is None or not path.is_file():
        return Calibration()
    return Calibration.from_dict(json.loads(path.read_text()))


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


def scores(logits, temperature=1.0, kind=SCORE):
    """In-class scores [N], higher for images more like the training classes."""
    if kind == "max_probability":
        return softmax(logits, temperature).max(axis=1)
    if kind == "energy":
        z = np.asarray(logits, dtype=np.float64)
        top = z.max(axis=1)
        return top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    raise ValueError(f"The score must be one of {', '.join(SCORES)}; received {kind!r}.")


def apply(calibration, logits):
    """model.scored's outputs, {"logits", "probabilities", "score"}, from its uncalibrated
    logits: what the Calibrated layer computes in the graph, here in NumPy."""
    logits = np.asarray(logits)
    return {"logits": logits,
            "probabilities": softmax(logits, calibration.temperature).astype(np.float32),
            "score": scores(logits, calibration.temperature, calibration.score)}


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


def calibrate(logits, labels, keep, kind=SCORE):
    """(Calibration, figures for metrics.json) from validation logits and labels."""
    temperature = fit_temperature(logits, labels)
    calibration = Calibration(temperature, kind,
                              threshold_keeping(scores(logits, temperature, kind), keep), keep)
    figures = {"temperature": temperature,
               "nll_before": log_loss(logits, labels), "nll_after": log_loss(logits, labels,
                                                                            temperature),
               "ece_before": expected_calibration_error(softmax(logits), labels),
               "ece_after": expected_calibration_error(softmax(logits, temperature), labels)}
    return calibration, figures
