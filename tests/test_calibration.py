"""The decision threshold calibrated on validation data: histograms, Youden's J, pooling, the reply contract."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfed.task.calibration import (
    BIN_WIDTH,
    EDGES,
    HIST_NEGATIVE,
    HIST_POSITIVE,
    SCORE_BINS,
    THRESHOLD,
    bin_index,
    histogram_problem,
    metrics_at_threshold,
    pooled_threshold,
    score_histograms,
    youden_threshold,
)


def probs_from_logits(z: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))
    return np.stack([1 - p, p], axis=1)


def test_bins_are_half_open_with_an_open_bin_at_each_end() -> None:
    assert SCORE_BINS == 322 and BIN_WIDTH == 0.05
    assert bin_index(np.array([-100.0, -8.0, -7.99, 0.0, 7.99, 8.0, 100.0])).tolist() == [0, 1, 1, 161, 320, 321, 321]


def test_a_shifted_model_gets_the_cut_between_its_classes() -> None:
    """Every score above 0.5 (what DP models do): negatives at logit 0.5-0.88, positives at 1.2-2.0. The 0.5 cut
    calls everything positive; the calibrated cut (Youden's J = 1) separates them, at the edge nearest 0."""
    labels = np.array([[0]] * 5 + [[1]] * 5)
    z = np.array([0.5, 0.6, 0.7, 0.8, 0.88, 1.2, 1.4, 1.6, 1.8, 2.0])
    hist = score_histograms(labels, probs_from_logits(z))
    assert sum(hist[HIST_POSITIVE]) == 5 and sum(hist[HIST_NEGATIVE]) == 5
    t = youden_threshold(np.array(hist[HIST_POSITIVE]), np.array(hist[HIST_NEGATIVE]))
    assert t is not None and t.youden_j == pytest.approx(1.0) and (t.positives, t.negatives) == (5, 5)
    assert math.log(t.probability / (1 - t.probability)) == pytest.approx(0.9)  # the first edge above 0.88
    at = metrics_at_threshold(labels, probs_from_logits(z), t)
    assert at[THRESHOLD] == pytest.approx(t.probability)
    assert (at["calibrated-accuracy"], at["calibrated-sensitivity"], at["calibrated-specificity"]) == (1.0, 1.0, 1.0)


def test_youden_against_a_brute_force_search_over_pooled_sites() -> None:
    """Pooling sites' histograms equals the histogram of the pooled split, and the chosen cut maximises
    sensitivity + specificity - 1 over every edge of the grid (checked by brute force on the raw scores)."""
    rng = np.random.default_rng(0)
    sites = []
    all_labels, all_z = [], []
    for _ in range(4):
        labels = (rng.random(60) < 0.6).astype(int)[:, None]
        z = rng.normal(0.8, 0.7, 60) + 1.1 * labels[:, 0]
        sites.append(score_histograms(labels, probs_from_logits(z)))
        all_labels.append(labels), all_z.append(z)
    labels, z = np.concatenate(all_labels), np.concatenate(all_z)
    pooled = score_histograms(labels, probs_from_logits(z))
    t = pooled_threshold(sites)
    assert t == youden_threshold(np.array(pooled[HIST_POSITIVE]), np.array(pooled[HIST_NEGATIVE]))
    truth = labels[:, 0] == 1
    j = [np.mean(z[truth] >= e) + np.mean(z[~truth] < e) - 1 for e in EDGES]
    assert t is not None and t.youden_j == pytest.approx(max(j))
    at = metrics_at_threshold(labels, probs_from_logits(z), t)
    assert at["calibrated-sensitivity"] + at["calibrated-specificity"] - 1 == pytest.approx(max(j))


def test_no_threshold_without_both_classes_or_without_histograms() -> None:
    only_negatives = score_histograms(np.zeros((4, 1), int), probs_from_logits(np.zeros(4)))
    assert pooled_threshold([only_negatives]) is None
    assert pooled_threshold([{"auc": 0.9}]) is None


BAD_HISTOGRAMS = {
    "one of the pair": ({HIST_POSITIVE: [0] * SCORE_BINS}, 0, "come in pairs"),
    "wrong length": ({HIST_POSITIVE: [0] * 10, HIST_NEGATIVE: [0] * SCORE_BINS}, 0, f"list of {SCORE_BINS} counts"),
    "negative count": ({HIST_POSITIVE: [-1] + [0] * (SCORE_BINS - 1), HIST_NEGATIVE: [1] + [0] * (SCORE_BINS - 1)}, 0,
                       "whole counts >= 0"),
    "fractional count": ({HIST_POSITIVE: [0.5] + [0.0] * (SCORE_BINS - 1),
                          HIST_NEGATIVE: [0.5] + [0.0] * (SCORE_BINS - 1)},
                         1, "whole counts >= 0"),
    "counts other cases": ({HIST_POSITIVE: [2] + [0] * (SCORE_BINS - 1), HIST_NEGATIVE: [1] + [0] * (SCORE_BINS - 1)},
                           4, "count 3 cases but the site evaluated 4"),
}


@pytest.mark.parametrize("metrics,n,message", BAD_HISTOGRAMS.values(), ids=list(BAD_HISTOGRAMS))
def test_malformed_histograms_are_named(metrics: dict, n: int, message: str) -> None:
    assert message in histogram_problem(metrics, n)


def test_well_formed_histograms_pass() -> None:
    hist = score_histograms(np.array([[0], [1], [1]]), probs_from_logits(np.array([-1.0, 0.0, 3.0])))
    assert histogram_problem(hist, 3) == "" and histogram_problem({"auc": 0.5}, 3) == ""
