"""One-run empirical lower bound on epsilon (Steinke, Nasr & Jagielski, NeurIPS 2023, arXiv 2305.08846).

Setting. m canaries; canary i is put into the training set independently with probability 1/2
(S_i = +1 "in", S_i = -1 "out"). After one training run every canary gets a membership score (higher = more
likely a member, e.g. minus its loss). The auditor guesses "in" (T_i = +1) for the k_plus highest scores,
"out" (T_i = -1) for the k_minus lowest, and abstains (T_i = 0) on the rest: r = k_plus + k_minus guesses, of
which W = sum_i max(0, T_i * S_i) = v are correct.

The bound implemented. Let q(eps) = e^eps / (1 + e^eps) (the accuracy of eps-DP randomized response) and

    f(u) = P[Binomial(r, q(eps)) >= u]                                                      (tail of the binomial)

* Pure eps-DP (Theorem 3.1 of the paper): W is stochastically dominated by Binomial(r, q(eps)), so
  P[W >= v] <= f(v).
* (eps, delta)-DP (Theorem 5.2 of the paper, the main theorem for approximate DP):

      P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i.                 (*)

  For i >= v, f(v - i) = 1, so the terms with i > v are smaller than the one at i = v and the max runs over
  i = 1..v only; f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v]. This is the p-value the paper's
  reference code computes (Appendix D, ``p_value_DP_audit``); with delta = 0 it reduces to f(v). It is clipped
  to 1. Note the delta term scales with the number of *randomized canaries* m, not with r.

`audit_p_value` returns the right-hand side of (*). `epsilon_lower_bound` returns

    eps_lower = sup { eps >= 0 : RHS of (*) at eps <= beta }

found by bisection on eps (absolute tolerance 1e-6; the paper's Appendix D bisection does the same), or 0.0
when eps = 0 is already not rejected (the guesses are no better than chance at level beta). Interpretation:
with probability >= 1 - beta over the canary randomization and training, a mechanism that is (eps, delta)-DP
has eps >= eps_lower, i.e. the mechanism is *not* (eps', delta)-DP for any eps' < eps_lower. The right-hand side
of (*) is nondecreasing in eps for the (v, r) where it rejects (f(v) always is), which is what makes the
bisection's answer a valid one-sided confidence bound; as in the paper, this is assumed rather than enforced.

Choosing the number of guesses. `audit_from_scores` tries a grid of (k_plus, k_minus) fixed in advance from m
alone (default: k_plus = k_minus = k, k = max(1, round(m * f / 2)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3,
0.5), duplicates removed) and reports the largest bound. So that picking the best of G grid points after seeing
the data stays valid, every point is tested at level beta / G (Bonferroni): the probability that *any* of the
G bounds exceeds the true epsilon is <= G * beta / G = beta, hence so is the probability that their maximum does.
The reported `beta` is the overall level; each bound in the grid was computed at beta / G.

Ties in scores are broken deterministically: canaries are ranked by ``np.argsort(scores, kind="stable")``, so
among equal scores the one with the lower index counts as lower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medfed.exceptions import ConfigError

__all__ = [
    "DEFAULT_GUESS_FRACTIONS",
    "AuditResult",
    "audit_from_scores",
    "audit_p_value",
    "canary_inclusion",
    "default_guess_grid",
    "epsilon_lower_bound",
]

#: Fractions f of the m canaries guessed on (r = f * m, split evenly between "in" and "out" guesses).
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)

_EPS_TOL = 1e-6
_EPS_CAP = 1e3  # q(eps) == 1.0 in floating point long before this


@dataclass(frozen=True)
class AuditResult:
    """The best one-run audit over the guess grid (see the module docstring for the bound)."""

    epsilon_lower_bound: float  # >= 0; 0 when the guesses are no better than chance
    num_canaries: int  # m, canaries randomized in/out
    num_guesses: int  # r = k_plus + k_minus at the reported grid point
    num_correct: int  # v, correct guesses at the reported grid point
    k_plus: int  # "in" guesses (highest scores)
    k_minus: int  # "out" guesses (lowest scores)
    beta: float  # overall failure probability (each grid point was tested at beta / len(grid))
    delta: float


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_beta_delta(beta: object, delta: object) -> tuple[float, float]:
    try:
        beta_f, delta_f = float(beta), float(delta)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"beta and delta must be numbers, got beta={beta!r}, delta={delta!r}") from exc
    if not (0.0 < beta_f < 1.0):
        raise ConfigError(f"beta must be in (0, 1), got {beta!r}")
    if not (0.0 <= delta_f < 1.0):
        raise ConfigError(f"delta must be in [0, 1), got {delta!r}")
    return beta_f, delta_f


def _check_counts(num_guesses: object, num_correct: object, num_canaries: object) -> tuple[int, int, int]:
    r = _check_int("num_guesses", num_guesses)
    v = _check_int("num_correct", num_correct)
    if v > r:
        raise ConfigError(f"num_correct ({v}) cannot exceed num_guesses ({r})")
    m = r if num_canaries is None else _check_int("num_canaries", num_canaries)
    if m < r:
        raise ConfigError(f"num_canaries ({m}) cannot be smaller than num_guesses ({r})")
    return r, v, m


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Right-hand side of (*) in the module docstring, unchecked."""
    if v <= 0:
        return 1.0
    q = float(1.0 / (1.0 + math.exp(-eps))) if eps < 700 else 1.0
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    window = np.cumsum(stats.binom.pmf(v - i, r, q))  # f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v]
    alpha = float(np.max(window / i))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def audit_p_value(
    num_guesses: int, num_correct: int, epsilon: float, delta: float, num_canaries: int | None = None
) -> float:
    """Upper bound (*) on P[>= num_correct correct guesses out of num_guesses] under (epsilon, delta)-DP.

    ``num_canaries`` is m, the number of randomized canaries; it only matters when delta > 0. When None it is
    taken to be ``num_guesses`` (correct only if the auditor guessed on every canary; pass m otherwise).
    """
    r, v, m = _check_counts(num_guesses, num_correct, num_canaries)
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating, np.integer)):
        raise ConfigError(f"delta must be a number, got {delta!r}")
    if not (0.0 <= float(delta) < 1.0):
        raise ConfigError(f"delta must be in [0, 1), got {delta!r}")
    try:
        eps = float(epsilon)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"epsilon must be a number, got {epsilon!r}") from exc
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ConfigError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return _p_value(m, r, v, eps, float(delta))


def epsilon_lower_bound(
    num_guesses: int, num_correct: int, delta: float, beta: float = 0.05, num_canaries: int | None = None
) -> float:
    """Largest epsilon the audit rejects at level beta: sup{eps >= 0 : (*) <= beta}; 0.0 if eps = 0 is not rejected.

    ``num_canaries`` (m) enters only the delta term of (*); when None it is taken to be ``num_guesses`` (exact
    when the auditor guessed on every canary, optimistic otherwise, so pass m whenever delta > 0).
    Bisection to an absolute tolerance of 1e-6; the returned value is always a rejected eps (or 0.0).
    """
    beta_f, delta_f = _check_beta_delta(beta, delta)
    r, v, m = _check_counts(num_guesses, num_correct, num_canaries)
    if _p_value(m, r, v, 0.0, delta_f) > beta_f:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p(lo) <= beta < p(hi)
    while _p_value(m, r, v, hi, delta_f) <= beta_f:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_CAP:  # unreachable for v >= 1: p -> P[Bin(r, 1) >= v] = 1 as eps grows
            return lo
    while hi - lo > _EPS_TOL:
        mid = 0.5 * (lo + hi)
        if _p_value(m, r, v, mid, delta_f) <= beta_f:
            lo = mid
        else:
            hi = mid
    return lo


def default_guess_grid(num_canaries: int) -> list[tuple[int, int]]:
    """The default (k_plus, k_minus) grid for m canaries: k = k_plus = k_minus = max(1, round(m * f / 2))."""
    m = _check_int("num_canaries", num_canaries, minimum=2)
    ks = sorted({min(max(1, round(m * f / 2)), m // 2) for f in DEFAULT_GUESS_FRACTIONS})
    return [(k, k) for k in ks]


def _inclusion_bits(included: np.ndarray) -> np.ndarray:
    arr = np.asarray(included)
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or arr.size == 0:
        raise ConfigError(f"included must be bool (or 0/1, or -1/+1), got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError("included contains non-finite values")
    values = set(np.unique(arr).tolist())
    if values <= {0, 1} or values <= {-1, 1}:
        return arr == 1
    raise ConfigError(f"included must be bool, 0/1 or -1/+1, got values {sorted(values)[:5]}")


def _grid(guess_counts: Sequence[int] | Sequence[tuple[int, int]] | None, m: int) -> list[tuple[int, int]]:
    if guess_counts is None:
        return default_guess_grid(m)
    if isinstance(guess_counts, (str, bytes)) or not isinstance(guess_counts, Sequence) or not guess_counts:
        raise ConfigError(f"guess_counts must be a non-empty sequence, got {guess_counts!r}")
    grid: list[tuple[int, int]] = []
    for item in guess_counts:
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ConfigError(f"a guess_counts pair must be (k_plus, k_minus), got {item!r}")
            kp, km = _check_int("k_plus", item[0]), _check_int("k_minus", item[1])
        else:
            kp = km = _check_int("guess count k", item, minimum=1)
        if kp + km < 1:
            raise ConfigError(f"guess count {item!r} makes no guesses")
        if kp + km > m:
            raise ConfigError(f"guess count {item!r} needs {kp + km} guesses but there are only {m} canaries")
        if (kp, km) not in grid:
            grid.append((kp, km))
    return grid


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    beta: float = 0.05,
    guess_counts: Sequence[int] | Sequence[tuple[int, int]] | None = None,
) -> AuditResult:
    """One-run audit of canary membership scores: the best bound over a Bonferroni-corrected guess grid.

    ``scores``: float (m,), higher = more likely a member. ``included``: bool (m,) (0/1 or -1/+1 also accepted),
    the true inclusion bits. ``guess_counts``: each entry k means k_plus = k_minus = k; a (k_plus, k_minus) pair
    is also accepted. Default grid: `default_guess_grid`. Each grid point is tested at beta / len(grid).
    Among grid points with equal bounds the first one is reported.
    """
    beta_f, delta_f = _check_beta_delta(beta, delta)
    try:
        s = np.asarray(scores, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scores must be numeric, got {type(scores).__name__}") from exc
    inc = _inclusion_bits(included)
    if s.ndim != 1 or inc.ndim != 1 or s.shape != inc.shape:
        raise ConfigError(f"scores and included must be 1-D of the same length, got {s.shape} and {inc.shape}")
    m = s.shape[0]
    if m < 2:
        raise ConfigError(f"need at least 2 canaries, got {m}")
    if not np.all(np.isfinite(s)):
        raise ConfigError("scores contain NaN or infinite values")
    grid = _grid(guess_counts, m)
    level = beta_f / len(grid)

    order = np.argsort(s, kind="stable")  # ascending; ties: lower index ranks lower
    inc_sorted = inc[order]
    # correct "out" guesses among the k lowest, correct "in" guesses among the k highest
    out_correct = np.concatenate([[0], np.cumsum(~inc_sorted)])
    in_correct = np.concatenate([[0], np.cumsum(inc_sorted[::-1])])

    best: AuditResult | None = None
    for kp, km in grid:
        v = int(in_correct[kp] + out_correct[km])
        eps = epsilon_lower_bound(kp + km, v, delta_f, level, num_canaries=m)
        if best is None or eps > best.epsilon_lower_bound:
            best = AuditResult(eps, m, kp + km, v, kp, km, beta_f, delta_f)
    assert best is not None
    return best


def canary_inclusion(num_canaries: int, seed: int) -> np.ndarray:
    """Inclusion bits for m canaries: bool (m,), each True independently with probability 1/2.

    Drawn from ``numpy.random.Generator(numpy.random.PCG64(seed))`` (one uniform per canary, True when < 1/2).
    """
    m = _check_int("num_canaries", num_canaries, minimum=1)
    sd = _check_int("seed", seed)
    rng = np.random.Generator(np.random.PCG64(sd))
    return rng.random(m) < 0.5
