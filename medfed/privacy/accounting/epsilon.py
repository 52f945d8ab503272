"""Epsilon of a DP-SGD history with Opacus' accountants (``rdp``, ``prv``; see the package docstring), the
projection before a round, and the checks of accountant names and budgets."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from medfed.config.rules import check_accountant, check_delta
from medfed.exceptions import ConfigError
from medfed.privacy.mechanism import MechanismStep

# Opacus' RDP orders (RDPAccountant.DEFAULT_ALPHAS), used for every RDP evaluation here.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)

_PRV_EPS_ERROR = 0.01  # Opacus' default eps_error: the first pass
_PRV_REL_ERROR = 0.004  # then eps_error <= 0.4 % of the epsilon
_PRV_MIN_EPS_ERROR = 1e-5  # floor (relative accuracy is meaningless as epsilon -> 0)
_PRV_PASSES = 3


def _steps(history: Sequence[MechanismStep]) -> list[MechanismStep]:
    steps = list(history)
    for s in steps:
        if not isinstance(s, MechanismStep):
            raise ConfigError(f"history entries must be MechanismStep; got {s!r}")
    return steps


@lru_cache(maxsize=4096)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one step of the sampled Gaussian mechanism at `RDP_ORDERS` (read-only)."""
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    curve = np.asarray(curve, dtype=float)
    curve.setflags(write=False)
    return curve


def _rdp_total(history: Sequence[MechanismStep]) -> np.ndarray:
    # The same arithmetic as RDPAccountant.get_privacy_spent: sum([compute_rdp(...) * steps ...]).
    return np.asarray(sum([_rdp_curve(s.noise_multiplier, s.sample_rate) * s.steps for s in history]))


def _rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings():
        # "Optimal order is the smallest/largest alpha": the bound is still valid, only maybe loose.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return max(float(eps), 0.0)


def _prv_epsilon(history: Sequence[MechanismStep], delta: float) -> float:
    """Opacus' PRV upper bound, with eps_error refined to ~0.4 % of epsilon (floor 1e-4).

    Pass 1 uses Opacus' default ``eps_error = 0.01``. While that error is more than
    `_PRV_REL_ERROR` of a lower estimate of epsilon (the bound minus twice the error), recompute
    with the smaller error (at most `_PRV_PASSES` passes). Deterministic: the same history always
    takes the same passes.
    """
    merged: list[tuple[float, float, int]] = []
    for s in history:  # as PRVAccountant.step() would have built it
        if merged and merged[-1][:2] == (s.noise_multiplier, s.sample_rate):
            merged[-1] = (s.noise_multiplier, s.sample_rate, merged[-1][2] + s.steps)
        else:
            merged.append((s.noise_multiplier, s.sample_rate, s.steps))
    accountant = PRVAccountant()
    accountant.history = merged
    err = _PRV_EPS_ERROR
    with warnings.catch_warnings():
        # Its domain size comes from an RDP bound, which may warn about the order range.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps = float(accountant.get_epsilon(delta, eps_error=err))
        for _ in range(_PRV_PASSES - 1):
            wanted = max(_PRV_REL_ERROR * (eps - 2 * err), _PRV_MIN_EPS_ERROR)
            if err <= wanted * 1.01:
                break
            err = wanted
            eps = float(accountant.get_epsilon(delta, eps_error=err))
    return max(eps, 0.0)


def epsilon_spent(history: Sequence[MechanismStep], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of ``history``, in order, with Opacus' ``accountant``.

    0.0 for an empty history. ``rdp``: equal to ``RDPAccountant()`` with ``.history`` set to
    ``[(sigma, q, steps), ...]`` and ``get_epsilon(delta)`` (Balle et al. 2020 conversion over
    ``DEFAULT_ALPHAS``). ``prv``: a fresh ``PRVAccountant`` with the same history (consecutive equal
    rows merged); its upper bound, refined to ~0.4 % (see `_prv_epsilon`). Both clamped at 0.
    Deterministic; no accountant state survives the call.
    """
    check_accountant(accountant)
    check_delta(delta)
    steps = _steps(history)
    if not steps:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(_rdp_total(steps), delta)
    return _prv_epsilon(steps, delta)


def project_epsilon(history: Sequence[MechanismStep], step: MechanismStep, delta: float, accountant: str) -> float:
    """Epsilon after appending ``step`` to ``history`` (the guard's projection before a round)."""
    return epsilon_spent([*_steps(history), *_steps([step])], delta, accountant)
