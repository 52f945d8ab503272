"""A decision threshold for binary tasks, chosen on the sites' validation data, never on test.

AUC measures ranking; a clinician needs a yes/no. A model trained under DP-SGD often ranks
well (AUC > 0.9) yet puts every case on one side of the default 0.5 cut, because noise
shifts the bias of its last layer. The fix is the standard one: choose the operating point
on held-out validation data and apply it, unchanged, to test and deployment.

In a federation the validation images stay at the sites. Each site sends, with its federated
evaluation, two histograms of the global model's score on its validation split: one over its
positive cases, one over its negatives. The score is the logit of the positive-class
probability, ``log(p / (1 - p))``, binned on a fixed grid of ``SCORE_BINS`` bins of width
``BIN_WIDTH`` over ``[-LOGIT_RANGE, LOGIT_RANGE]`` plus one open bin at each end (logits
resolve the narrow bands DP models put their probabilities in better than a grid over
``p``). The server adds the sites' histograms, which equals the histogram of the pooled
validation split, and picks the bin edge that maximises Youden's J = sensitivity +
specificity - 1 (Youden, Cancer 1950), the usual operating point when neither error is
declared costlier. Ties go to the edge nearest logit 0 (p = 0.5).

What a site reveals: ``2 * SCORE_BINS`` counts of its validation split, the same kind of
aggregate statistic as the validation AUC, accuracy and loss it already reports. They are not
protected by DP (docs/PRIVACY.md); validation images are not in any training set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medfed.constants import MetricKey
from medfed.task.metrics import sensitivity_specificity

LOGIT_RANGE = 8.0
BIN_WIDTH = 0.05
INNER_BINS = int(round(2 * LOGIT_RANGE / BIN_WIDTH))  # 320
SCORE_BINS = INNER_BINS + 2  # plus (-inf, -LOGIT_RANGE) and [LOGIT_RANGE, inf)
EDGES = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, INNER_BINS + 1)  # bin i >= 1 is [EDGES[i-1], EDGES[i])

HIST_POSITIVE = "val-score-hist-positive"  # evaluate-reply metric: counts of positive cases per score bin
HIST_NEGATIVE = "val-score-hist-negative"  # ... and of negative cases
HISTOGRAM_KEYS = (HIST_POSITIVE, HIST_NEGATIVE)

THRESHOLD = "threshold"  # the calibrated probability cut (metrics.jsonl, summary, model metadata)
CALIBRATED = {  # metrics at the calibrated threshold, beside those at 0.5
    MetricKey.ACCURACY: "calibrated-accuracy",
    MetricKey.SENSITIVITY: "calibrated-sensitivity",
    MetricKey.SPECIFICITY: "calibrated-specificity",
    MetricKey.FPR: "calibrated-fpr",
}


def positive_logits(probabilities: np.ndarray) -> np.ndarray:
    """Logit of the positive-class probability ``(N,)`` from binary probabilities ``(N, 2)``, finite."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64)[:, 1], 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def bin_index(logits: np.ndarray) -> np.ndarray:
    """Bin of each logit: 0 below ``-LOGIT_RANGE``, ``SCORE_BINS - 1`` at or above ``LOGIT_RANGE``."""
    return np.searchsorted(EDGES, np.asarray(logits, dtype=np.float64), side="right")


def score_histograms(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, list[int]]:
    """A site's two histograms for binary ``labels`` ``(N, 1)`` (1 = positive) and probabilities ``(N, 2)``."""
    truth = np.asarray(labels)[:, 0] == 1
    bins = bin_index(positive_logits(probabilities))
    return {
        HIST_POSITIVE: np.bincount(bins[truth], minlength=SCORE_BINS).astype(int).tolist(),
        HIST_NEGATIVE: np.bincount(bins[~truth], minlength=SCORE_BINS).astype(int).tolist(),
    }


def histogram_problem(metrics: dict, num_examples: float) -> str:
    """Why a reply's histograms break the contract (both or neither, ``SCORE_BINS`` whole counts >= 0
    adding up to the site's ``num-examples``), or ''."""
    present = [k for k in HISTOGRAM_KEYS if k in metrics]
    if not present:
        return ""
    if len(present) != 2:
        return f"score histograms come in pairs ({', '.join(HISTOGRAM_KEYS)}); got only {present[0]}"
    total = 0
    for key in HISTOGRAM_KEYS:
        counts = metrics[key]
        if not isinstance(counts, list) or len(counts) != SCORE_BINS:
            return f"{key} must be a list of {SCORE_BINS} counts"
        if any(not float(c).is_integer() or c < 0 for c in counts):
            return f"{key} must hold whole counts >= 0"
        total += sum(int(c) for c in counts)
    if total != num_examples:
        return f"score histograms count {total} cases but the site evaluated {num_examples:g}"
    return ""


@dataclass(frozen=True)
class Threshold:
    """The calibrated cut: predict positive when p(positive) >= ``probability``."""

    probability: float
    youden_j: float  # on the pooled validation histograms
    positives: int
    negatives: int


def youden_threshold(positive: np.ndarray, negative: np.ndarray) -> Threshold | None:
    """The bin edge maximising sensitivity + specificity - 1 over pooled histograms; None without both classes.

    Candidate cuts are the ``INNER_BINS + 1`` edges: cut at edge ``e`` predicts positive for bins
    at or above it. Ties go to the edge nearest logit 0.
    """
    positive, negative = np.asarray(positive, dtype=np.int64), np.asarray(negative, dtype=np.int64)
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # cut at EDGES[j] (j = 0..INNER_BINS) predicts positive for bins j+1 .. SCORE_BINS-1
    pos_above = np.cumsum(positive[::-1])[::-1]  # pos_above[b] = positives in bins >= b
    neg_below = np.cumsum(negative)  # neg_below[b] = negatives in bins <= b
    j = np.arange(INNER_BINS + 1)
    sensitivity = pos_above[j + 1] / n_pos
    specificity = neg_below[j] / n_neg
    youden = sensitivity + specificity - 1.0
    best = np.flatnonzero(np.isclose(youden, youden.max(), rtol=0.0, atol=1e-12))
    edge = float(EDGES[best[np.argmin(np.abs(EDGES[best]))]])
    return Threshold(1.0 / (1.0 + math.exp(-edge)), float(youden.max()), n_pos, n_neg)


def pooled_threshold(histograms: list[dict]) -> Threshold | None:
    """Add the sites' histograms (the pooled validation split's) and calibrate; None if no site sent any."""
    sent = [h for h in histograms if HIST_POSITIVE in h]
    if not sent:
        return None
    positive = np.sum([np.asarray(h[HIST_POSITIVE], dtype=np.int64) for h in sent], axis=0)
    negative = np.sum([np.asarray(h[HIST_NEGATIVE], dtype=np.int64) for h in sent], axis=0)
    return youden_threshold(positive, negative)


def metrics_at_threshold(labels: np.ndarray, probabilities: np.ndarray, threshold: Threshold) -> dict[str, float]:
    """Accuracy, sensitivity, specificity and FPR of binary ``probabilities`` ``(N, 2)`` cut at the threshold,
    with the threshold itself; the cut is applied on the same logit grid it was chosen on."""
    truth = np.asarray(labels)[:, 0] == 1
    edge = math.log(threshold.probability / (1.0 - threshold.probability))
    predicted = positive_logits(probabilities) >= edge - 1e-9
    sens, spec = sensitivity_specificity(truth, predicted)
    return {
        THRESHOLD: threshold.probability,
        CALIBRATED[MetricKey.ACCURACY]: float(np.mean(truth == predicted)),
        CALIBRATED[MetricKey.SENSITIVITY]: sens,
        CALIBRATED[MetricKey.SPECIFICITY]: spec,
        CALIBRATED[MetricKey.FPR]: 1.0 - spec if np.isfinite(spec) else float("nan"),
    }
