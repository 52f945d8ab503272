"""AUC, accuracy, sensitivity, specificity and FPR against hand-computed values (medfed.task.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfed.constants import MetricKey, TaskType
from medfed.task.metrics import binary_auc, classification_metrics


@pytest.mark.parametrize(
    "labels, scores, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all ties
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),  # perfect
        ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.0),  # perfectly wrong
        ([0, 0, 1], [0.2, 0.5, 0.5], 0.75),  # one tie counts one half
        ([1, 0, 1, 0, 0], [3.0, -1.0, 0.0, 2.0, -5.0], 5 / 6),  # scores need not be probabilities; 0.0 < 2.0
        ([True, False, True], [0.9, 0.1, 0.2], 1.0),
    ],
)
def test_binary_auc_hand_values(labels, scores, expected):
    assert binary_auc(np.array(labels), np.array(scores)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_binary_auc_single_class_is_nan(labels):
    assert math.isnan(binary_auc(np.array(labels, dtype=int), np.linspace(0, 1, len(labels))))


def test_binary_auc_equals_pairwise_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 8, 60) / 8  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert binary_auc(labels, scores) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)


def _check(m: dict, auc, acc, sens, spec):
    assert m[MetricKey.AUC] == pytest.approx(auc, abs=1e-12)
    assert m[MetricKey.ACCURACY] == pytest.approx(acc, abs=1e-12)
    assert m[MetricKey.SENSITIVITY] == pytest.approx(sens, abs=1e-12)
    assert m[MetricKey.SPECIFICITY] == pytest.approx(spec, abs=1e-12)
    assert m[MetricKey.FPR] == pytest.approx(1 - spec, abs=1e-12)
    assert m[MetricKey.FPR] == pytest.approx(1 - m[MetricKey.SPECIFICITY], abs=1e-12)
    assert set(m) == {"auc", "accuracy", "sensitivity", "specificity", "fpr"}


def test_binary_metrics():
    labels = np.array([0, 0, 1, 1, 1])[:, None]
    p1 = np.array([0.2, 0.6, 0.7, 0.4, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    # predicted positive at p >= 0.5: [F, T, T, F, T]; TP=2 FN=1 TN=1 FP=1
    # AUC: positives {0.7, 0.4, 0.9} vs negatives {0.2, 0.6}: 5 of 6 pairs ordered
    _check(classification_metrics(TaskType.BINARY, labels, probs), auc=5 / 6, acc=3 / 5, sens=2 / 3, spec=1 / 2)


def test_binary_threshold_is_inclusive():
    labels = np.array([[1], [0]])
    probs = np.array([[0.5, 0.5], [0.6, 0.4]])  # p=0.5 counts as positive
    _check(classification_metrics(TaskType.BINARY, labels, probs), auc=1.0, acc=1.0, sens=1.0, spec=1.0)


def test_binary_one_class_only_gives_nan_auc_and_spec():
    m = classification_metrics(TaskType.BINARY, np.array([[1], [1]]), np.array([[0.2, 0.8], [0.7, 0.3]]))
    assert math.isnan(m[MetricKey.AUC])
    assert m[MetricKey.SENSITIVITY] == 0.5
    assert math.isnan(m[MetricKey.SPECIFICITY]) and math.isnan(m[MetricKey.FPR])
    assert m[MetricKey.ACCURACY] == 0.5


def test_multiclass_metrics():
    labels = np.array([0, 1, 2, 2])[:, None]
    probs = np.array(
        [
            [0.50, 0.05, 0.45],  # pred 0 (right)
            [0.30, 0.40, 0.30],  # pred 1 (right)
            [0.50, 0.10, 0.40],  # pred 0 (wrong, is 2)
            [0.10, 0.20, 0.70],  # pred 2 (right)
        ]
    )
    # one-vs-rest: class 0 sens 1 spec 2/3; class 1 sens 1 spec 1; class 2 sens 1/2 spec 1
    # AUC: class 0 = 5/6 (one tie), class 1 = 1, class 2 = 3/4
    _check(
        classification_metrics(TaskType.MULTICLASS, labels, probs),
        auc=(5 / 6 + 1 + 3 / 4) / 3, acc=3 / 4, sens=(1 + 1 + 0.5) / 3, spec=(2 / 3 + 1 + 1) / 3,
    )


def test_multiclass_absent_class_is_skipped_in_macro_means():
    labels = np.array([0, 0, 1])[:, None]  # class 2 never occurs
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]])
    # class 0: sens 1/2, spec 1; class 1: sens 1, spec 1; class 2: sens NaN, spec 2/3 (row 1 predicted 2)
    # AUC: class 0 = 1 (0.8, 0.2 > 0.1), class 1 = 1, class 2 = NaN
    _check(classification_metrics(TaskType.MULTICLASS, labels, probs),
           auc=1.0, acc=2 / 3, sens=(0.5 + 1) / 2, spec=(1 + 1 + 2 / 3) / 3)


def test_multilabel_metrics():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.4, 0.6], [0.3, 0.8], [0.1, 0.7]])
    # predicted: [[1,0],[0,1],[0,1],[0,1]] -> 6 of 8 entries right
    # label 0: sens 1/2 spec 1; label 1: sens 1 spec 1/2; AUC 3/4 for both
    _check(classification_metrics(TaskType.MULTILABEL, labels, probs), auc=0.75, acc=0.75, sens=0.75, spec=0.75)
