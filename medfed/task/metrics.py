"""Classification metrics for medical tasks: AUC, accuracy, sensitivity, specificity, FPR.

AUC is the Mann-Whitney statistic with tied scores counted as one half (the area under
the ROC curve, Hanley & McNeil 1982); macro one-vs-rest for multi-class, macro over labels
for multi-label (MedMNIST v2's convention). Sensitivity, specificity and false-positive
rate use a 0.5 threshold for binary and multi-label tasks and the argmax for multi-class. The
false-positive rate (1 - specificity) is reported on its own because clinical readers ask for it
and papers rarely give it.
For binary tasks sensitivity and specificity are those of the positive class (label 1);
for multi-class and multi-label tasks they are macro averages over classes (one-vs-rest).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from medfed.constants import MetricKey, TaskType


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC of ``scores`` for binary ``labels`` (1 = positive); NaN if a class is absent."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def sensitivity_specificity(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Sensitivity and specificity for boolean arrays (NaN where undefined)."""
    tp = np.sum(truth & predicted)
    fn = np.sum(truth & ~predicted)
    tn = np.sum(~truth & ~predicted)
    fp = np.sum(~truth & predicted)
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return float(sens), float(spec)


def classification_metrics(task: TaskType, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Metrics for ``labels`` ``(N, 1)`` (or ``(N, K)`` multi-label) and probabilities ``(N, K)``."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if task == TaskType.MULTILABEL:
        truth = labels.astype(bool)
        predicted = probs >= 0.5
        aucs = [binary_auc(truth[:, k], probs[:, k]) for k in range(truth.shape[1])]
        rates = [sensitivity_specificity(truth[:, k], predicted[:, k]) for k in range(truth.shape[1])]
        accuracy = float(np.mean(truth == predicted))
    elif task == TaskType.BINARY:
        truth = labels[:, 0] == 1
        predicted = probs[:, 1] >= 0.5
        aucs = [binary_auc(truth, probs[:, 1])]
        rates = [sensitivity_specificity(truth, predicted)]
        accuracy = float(np.mean(truth == predicted))
    else:
        y = labels[:, 0]
        pred = probs.argmax(axis=1)
        aucs = [binary_auc(y == k, probs[:, k]) for k in range(probs.shape[1])]
        rates = [sensitivity_specificity(y == k, pred == k) for k in range(probs.shape[1])]
        accuracy = float(np.mean(y == pred))
    sens = float(np.nanmean([r[0] for r in rates])) if any(np.isfinite(r[0]) for r in rates) else float("nan")
    spec = float(np.nanmean([r[1] for r in rates])) if any(np.isfinite(r[1]) for r in rates) else float("nan")
    auc = float(np.nanmean(aucs)) if any(np.isfinite(a) for a in aucs) else float("nan")
    return {
        MetricKey.AUC: auc,
        MetricKey.ACCURACY: accuracy,
        MetricKey.SENSITIVITY: sens,
        MetricKey.SPECIFICITY: spec,
        MetricKey.FPR: 1.0 - spec if np.isfinite(spec) else float("nan"),
    }
