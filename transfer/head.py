"""Phase 1 solved, not stepped: the head as a softmax regression fitted to convergence.

On the frozen backbone, phase 1 trains one Dense layer on the pooled features: a convex
problem. Ten epochs of Adam stop short of its optimum; L-BFGS (scikit-learn's
LogisticRegression) reaches it in seconds on the cached features of every training view. The
L2 strength is chosen by the validation images' log loss over a grid; the test images, when a
run has them, are never seen here.

A multi-label head (a sigmoid per label) is the same problem for every label at once: the
binary cross-entropy of each label, its positives weighted, plus the L2 penalty, minimised
jointly by SciPy's L-BFGS, with the same grid of C on the validation images' loss.
"""

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

# Inverse L2 strengths (scikit-learn's C: its loss is C * sum of log losses + |w|^2 / 2).
C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 9))


def solve_head(dense, train, validation, class_weight=None, grid=C_GRID):
    """Set `dense` (the classifier's softmax layer) to the softmax regression on the cached
    features of `train` (a cache.Views: every view of every image) whose C in `grid` gives
    the lowest log loss on `validation` (view 0). Returns the epoch's logs, as Keras names
    them, with the C chosen. Multi-hot labels (a sigmoid layer): `class_weight` is the
    positives' weight of each label [C], and the head is solved by _solve_sigmoid."""
    from sklearn.linear_model import LogisticRegression

    started = time.time()
    views, count = train.features.shape[:2]
    x = np.asarray(train.features, dtype=np.float32).reshape(views * count, -1)
    y = np.tile(train.labels, (views, 1) if np.ndim(train.labels) == 2 else views)
    x_val = np.asarray(validation.features[0], dtype=np.float32)
    y_val = validation.labels
    if np.ndim(y) == 2:
        return _solve_sigmoid(dense, x, y, x_val, y_val, class_weight, grid, started, views)
    weights = (None if class_weight is None
               else np.asarray([class_weight[label] for label in y], dtype=np.float64))
    classes = dense.kernel.shape[-1]
    best = None
    solver = LogisticRegression(max_iter=5000, tol=1e-4, warm_start=True)  # its default
    for c in sorted(grid):  # warm-started from the more regularised solution
        solver.set_params(C=c)
        solver.fit(x, y, sample_weight=weights)
        loss = _log_loss(_probabilities(solver, x_val, classes), y_val)
        if best is None or loss < best[0]:
            best = (loss, c, solver.coef_.copy(), solver.intercept_.copy())
    _, c, coef, intercept = best
    kernel, bias = _softmax_weights(coef, intercept, classes)
    dense.kernel.assign(kernel.astype(dense.kernel.dtype))
    dense.bias.assign(bias.astype(dense.bias.dtype))
    train_probabilities = _softmax(x @ kernel + bias)
    val_probabilities = _softmax(x_val @ kernel + bias)
    logs = {"loss": _log_loss(train_probabilities, y),
            "accuracy": _accuracy(train_probabilities, y),
            "val_loss": _log_loss(val_probabilities, y_val),
            "val_accuracy": _accuracy(val_probabilities, y_val)}
    log.info("Head solved by L-BFGS in %.1f s on %d views x %d images: L2 C=%g chosen of %d "
             "on the validation log loss; val_loss %.4f, val_accuracy %.4f",
             time.time() - started, views, count, c, len(grid), logs["val_loss"],
             logs["val_accuracy"])
    return logs | {"l2_c": c}


def _solve_sigmoid(dense, x, y, x_val, y_val, positive_weights, grid, started, views):
    """solve_head for multi-hot labels: minimise C * (sum of the weighted binary
    cross-entropies) + |kernel|^2 / 2 for each C of the grid, warm-started from the more
    regularised solution, and keep the one of the lowest validation loss."""
    from scipy.optimize import minimize

    x, y = x.astype(np.float64), y.astype(np.float64)
    features, labels = x.shape[1], y.shape[1]
    weights = np.ones(labels) if positive_weights is None else np.asarray(positive_weights)
    start, best = np.zeros((features + 1) * labels), None

    def objective(theta, c):
        kernel, bias = theta[:-labels].reshape(features, labels), theta[-labels:]
        z = x @ kernel + bias
        loss = weights * y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)
        gradient = c * (weights * y * (_sigmoid(z) - 1) + (1 - y) * _sigmoid(z))
        value = c * loss.sum() + 0.5 * np.square(kernel).sum()
        return value, np.concatenate([(x.T @ gradient + kernel).ravel(), gradient.sum(axis=0)])

    for c in sorted(grid):
        start = minimize(objective, start, args=(c,), jac=True, method="L-BFGS-B",
                         options={"maxiter": 5000}).x
        kernel, bias = start[:-labels].reshape(features, labels), start[-labels:]
        loss = _label_loss(x_val @ kernel + bias, y_val, weights)
        if best is None or loss < best[0]:
            best = (loss, c, kernel, bias)
    _, c, kernel, bias = best
    dense.kernel.assign(kernel.astype(dense.kernel.dtype))
    dense.bias.assign(bias.astype(dense.bias.dtype))
    logs = {"loss": _label_loss(x @ kernel + bias, y, weights),
            "accuracy": float(((x @ kernel + bias >= 0) == (y > 0)).mean()),
            "val_loss": best[0],
            "val_accuracy": float(((x_val @ kernel + bias >= 0) == (np.asarray(y_val) > 0))
                                  .mean())}
    log.info("Head solved by L-BFGS in %.1f s on %d views x %d images, a sigmoid per label: "
             "L2 C=%g chosen of %d on the validation loss; val_loss %.4f, val_accuracy "
             "(per label) %.4f", time.time() - started, views, len(x) // views, c, len(grid),
             logs["val_loss"], logs["val_accuracy"])
    return logs | {"l2_c": c}


def _sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * z))  # no overflow for large |z|


def _label_loss(logits, labels, weights):
    """transfer.layers.LabelCrossentropy of sigmoid(logits), in NumPy: the weighted binary
    cross-entropy averaged over labels and images."""
    y = np.asarray(labels, dtype=np.float64)
    return float((weights * y * np.logaddexp(0, -logits)
                  + (1 - y) * np.logaddexp(0, logits)).mean())


def _softmax_weights(coef, intercept, classes):
    """A Dense kernel [D, classes] and bias from scikit-learn's coefficients; with two
    classes it fits one logit difference, split evenly between the two outputs."""
    if classes == 2 and coef.shape[0] == 1:
        return np.stack([-coef[0] / 2, coef[0] / 2], axis=1), np.array(
            [-intercept[0] / 2, intercept[0] / 2])
    return coef.T, intercept


def _probabilities(solver, x, classes):
    """[N, classes]: columns for classes the training labels lack are 0."""
    out = np.zeros((len(x), classes))
    out[:, solver.classes_] = solver.predict_proba(x)
    return out


def _softmax(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _log_loss(probabilities, labels):
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1)).mean())


def _accuracy(probabilities, labels):
    return float((probabilities.argmax(axis=1) == labels).mean())
