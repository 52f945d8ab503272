"""Byzantine-robust aggregation rules and a norm-outlier screen, on plain numpy (no Flower).

Each rule takes the updates of one round, a list of per-site ``dict[str, np.ndarray]`` over the
same keys with the same shapes and dtypes, and returns one such dict. The server passes exactly
the arrays the sites sent: the shared weights only (the encoder in pretraining; encoder + head,
adapters + head, or the head alone in fine-tuning), so the rules work with encoder-only
aggregation and never see weights that stay at the sites.

* `trimmed_mean` and `coordinate_median`: coordinate-wise trimmed mean and median (Yin, Chen,
  Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018).
* `krum` (Multi-Krum for ``select > 1``): the update(s) closest to their ``n - f - 2`` nearest
  neighbours (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017). Its guarantee needs ``n >= 2f + 3``; with
  fewer updates it refuses (`FederationError`) instead of silently choosing among too few.
* `norm_outliers`: flags an update whose L2 distance from the global weights the server sent is
  more than ``factor`` times the median distance of the other updates.

All rules are unweighted: a site's example count does not change its say, since a faulty site
could claim any count. Arithmetic is in float64 and cast back to each array's dtype; arrays that
are not floating point (counters, if any) are taken unchanged from the first update. The result
depends on the order of ``updates`` only through that first update and Krum's tie-break (lowest
index), so callers pass them in a fixed order (the server sorts by site id).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from medfed.config.rules import MIN_UPDATES_TO_SCREEN, krum_problem, trim_count
from medfed.constants import AggregationRule
from medfed.exceptions import FederationError

Update = Mapping[str, np.ndarray]


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _check(updates: Sequence[Update]) -> list[str]:
    """The common keys of the updates (first update's order); raises if they disagree."""
    if not updates:
        raise FederationError("no updates to aggregate")
    keys = list(updates[0].keys())
    for i, update in enumerate(updates[1:], start=1):
        if set(update.keys()) != set(keys):
            raise FederationError(f"update {i} has keys {sorted(update)[:5]}..., update 0 has {sorted(keys)[:5]}...")
        for key in keys:
            a, b = np.asarray(update[key]), np.asarray(updates[0][key])
            if a.shape != b.shape or a.dtype != b.dtype:
                raise FederationError(
                    f"update {i} array {key!r} is {a.dtype}{a.shape}, update 0 has {b.dtype}{b.shape}"
                )
    return keys


def _coordinatewise(updates: Sequence[Update], reduce: object) -> dict[str, np.ndarray]:
    keys = _check(updates)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        first = np.asarray(updates[0][key])
        if not _is_float(first):
            out[key] = first.copy()
            continue
        stack = np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])
        out[key] = np.asarray(reduce(stack), dtype=first.dtype)  # type: ignore[operator]
    return out


def mean(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Unweighted coordinate-wise mean (what Multi-Krum averages)."""
    return _coordinatewise(updates, lambda s: s.mean(axis=0))


def trimmed_mean(updates: Sequence[Update], trim_fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, Algorithm "beta-trimmed mean").

    For every coordinate, the ``k = floor(trim_fraction * n)`` largest and ``k`` smallest values
    are dropped and the remaining ``n - 2k`` (at least one, as ``trim_fraction < 0.5``) averaged.
    It tolerates up to ``k`` faulty updates per coordinate; with ``k == 0`` it is the plain mean.
    """
    k = trim_count(len(updates), trim_fraction)

    def reduce(stack: np.ndarray) -> np.ndarray:
        ordered = np.sort(stack, axis=0)
        return ordered[k:stack.shape[0] - k].mean(axis=0)

    return _coordinatewise(updates, reduce)


def coordinate_median(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Coordinate-wise median (Yin et al., ICML 2018): for an even count, the mean of the two middle values.

    It tolerates fewer than half faulty updates per coordinate; with two updates it is their mean.
    """
    return _coordinatewise(updates, lambda s: np.median(s, axis=0))


def _pairwise_sq_distances(updates: Sequence[Update], keys: list[str]) -> np.ndarray:
    """Squared L2 distances between updates over their floating-point arrays, in float64, key by key."""
    n = len(updates)
    dist = np.zeros((n, n), dtype=np.float64)
    for key in keys:
        if not _is_float(np.asarray(updates[0][key])):
            continue
        flat = [np.asarray(u[key], dtype=np.float64).ravel() for u in updates]
        for i in range(n):
            for j in range(i + 1, n):
                d = float(np.sum((flat[i] - flat[j]) ** 2))
                dist[i, j] += d
                dist[j, i] += d
    return dist


def krum_scores(updates: Sequence[Update], byzantine: int) -> np.ndarray:
    """Krum's score of every update: the sum of squared distances to its ``n - f - 2`` nearest other updates."""
    keys = _check(updates)
    problem = krum_problem(len(updates), byzantine)
    if problem:
        raise FederationError(problem)
    n = len(updates)
    dist = _pairwise_sq_distances(updates, keys)
    neighbours = n - byzantine - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = others[:neighbours].sum()
    return scores


def krum_selection(updates: Sequence[Update], byzantine: int, select: int = 1) -> list[int]:
    """Indices of the ``select`` best-scored updates, best first (ties: the lower index)."""
    problem = krum_problem(len(updates), byzantine, select)
    if problem:
        raise FederationError(problem)
    scores = krum_scores(updates, byzantine)
    return [int(i) for i in np.argsort(scores, kind="stable")[:select]]


def krum(updates: Sequence[Update], byzantine: int, select: int = 1) -> dict[str, np.ndarray]:
    """Krum (``select == 1``: the best-scored update itself) or Multi-Krum (the unweighted mean of the
    ``select`` best-scored updates), Blanchard et al., NeurIPS 2017. Needs ``n >= 2f + 3`` and
    ``select <= n - f``; otherwise raises `FederationError` naming the numbers."""
    chosen = krum_selection(updates, byzantine, select)
    return mean([updates[i] for i in chosen])


def aggregate(rule: str, updates: Sequence[Update], *, trim_fraction: float = 0.2, krum_byzantine: int = 1,
              krum_select: int = 1) -> dict[str, np.ndarray]:
    """Apply a robust rule by name (trimmed-mean, median or krum); 'mean' here is the unweighted mean."""
    match AggregationRule(rule):
        case AggregationRule.TRIMMED_MEAN:
            return trimmed_mean(updates, trim_fraction)
        case AggregationRule.MEDIAN:
            return coordinate_median(updates)
        case AggregationRule.KRUM:
            return krum(updates, krum_byzantine, krum_select)
        case AggregationRule.MEAN:
            return mean(updates)
    raise AssertionError(rule)  # pragma: no cover


# ---- norm-outlier screen ---------------------------------------------------------------------

def update_distances(updates: Sequence[Update], reference: Update) -> np.ndarray:
    """Each update's L2 distance from ``reference`` (the global weights sent), over the update's
    floating-point arrays, in float64."""
    out = np.zeros(len(updates), dtype=np.float64)
    for i, update in enumerate(updates):
        total = 0.0
        for key, value in update.items():
            array = np.asarray(value)
            if _is_float(array):
                total += float(np.sum((array.astype(np.float64) - np.asarray(reference[key], dtype=np.float64)) ** 2))
        out[i] = math.sqrt(total)
    return out


def norm_outliers(updates: Sequence[Update], reference: Update, factor: float) -> dict[int, str]:
    """Updates whose distance from the global weights is more than ``factor`` x the median distance of the
    OTHER updates, as ``{index: reason}``.

    Each update is judged against the others alone, so the result does not depend on the order, and one
    huge update cannot raise the bar it is judged by. The smallest update is never flagged (``factor > 1``),
    so at least one survives. With fewer than `MIN_UPDATES_TO_SCREEN` updates nothing is flagged.
    """
    if not factor > 1:
        raise ValueError(f"factor must be > 1; got {factor}")
    n = len(updates)
    if n < MIN_UPDATES_TO_SCREEN:
        return {}
    distances = update_distances(updates, reference)
    flagged: dict[int, str] = {}
    for i in range(n):
        others = float(np.median(np.delete(distances, i)))
        if distances[i] > factor * others:
            ratio = f"{distances[i] / others:.3g}x" if others > 0 else "infinitely"
            flagged[i] = (
                f"update norm far beyond the others: L2 distance {distances[i]:.4g} from the global weights is {ratio} "
                f"the median {others:.4g} of the other {n - 1} updates (norm-outlier-factor {factor:g})"
            )
    return flagged


__all__ = [
    "MIN_UPDATES_TO_SCREEN", "aggregate", "coordinate_median", "krum", "krum_problem",
    "krum_scores",
    "krum_selection", "mean", "norm_outliers", "trim_count", "trimmed_mean", "update_distances",
]
