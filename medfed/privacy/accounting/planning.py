"""Noise planning: the smallest noise multiplier that keeps a site's history plus the planned rounds within
budget (:func:`plan_noise_multiplier`, a bracketing secant search), and a run's share of the lifetime budget
(:func:`run_target_epsilon`, :func:`plan_run_noise`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

from medfed.config.rules import DEFAULT_MAX_PLANNED_NOISE, MIN_NOISE, PLANNER_MAX_NOISE, check_accountant, check_budget
from medfed.exceptions import ConfigError, PrivacyBudgetExceeded
from medfed.privacy.accounting.epsilon import (
    RDP_ORDERS,
    _rdp_epsilon,
    _rdp_total,
    _steps,
    epsilon_spent,
)
from medfed.privacy.mechanism import MechanismStep


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    prior: Sequence[MechanismStep],
    planned: Sequence[tuple[float, int]],
    accountant: str,
    *,
    max_noise: float = 50.0,
    rel_tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier that keeps ``prior`` plus the ``planned`` rounds within budget.

    Returns sigma with ``epsilon_spent(prior + [MechanismStep(sigma, q, steps) for (q, steps) in
    planned]) <= target_epsilon`` while sigma / (1 + rel_tol) was seen to exceed the target: as
    epsilon decreases in sigma, that is the smallest feasible noise rounded *up* by at most
    ``rel_tol`` (so sigma * (1 - 2 rel_tol) does not fit). Never below `MIN_NOISE`: if even that fits,
    `MIN_NOISE` is returned.

    The search (`_search`) brackets the root of log(epsilon) - log(target) in log(sigma) with
    secant steps that alternate sides of the predicted root (bisection as a safeguard). For ``rdp``
    it first runs on the integer orders alone (Opacus computes those ~10x faster than the
    fractional ones) -- the epsilon over a subset of the orders is never smaller, so that answer
    fits -- and then refines downward with all of `RDP_ORDERS`, usually in 3-5 evaluations. The
    prior's RDP is summed once per call. The returned sigma is confirmed with `epsilon_spent`.

    Raises `PrivacyBudgetExceeded` when the prior history has already spent the target, or when even
    ``max_noise`` on every planned round would pass it (the message gives the spent epsilon, the
    target and why); `ConfigError` for bad arguments.
    """
    check_budget(target_epsilon, delta)
    check_accountant(accountant)
    if not isinstance(max_noise, (int, float)) or not math.isfinite(max_noise) or max_noise <= MIN_NOISE:
        raise ConfigError(f"max_noise must be a finite number > {MIN_NOISE}; got {max_noise!r}")
    if not isinstance(rel_tol, (int, float)) or not 0 < rel_tol < 0.1:
        raise ConfigError(f"rel_tol must be in (0, 0.1); got {rel_tol!r}")
    prior_steps = _steps(prior)
    rounds: list[tuple[float, int]] = []
    for r in planned:
        try:
            q, n = r
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"planned rounds must be (sample_rate, steps) pairs; got {r!r}") from exc
        check = MechanismStep(1.0, q, n)  # validates q and steps
        rounds.append((check.sample_rate, check.steps))
    if not rounds:
        raise ConfigError("planned must hold at least one (sample_rate, steps) round")

    spent = epsilon_spent(prior_steps, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetExceeded(
            f"cannot plan a noise multiplier: epsilon {spent:.4g} is already spent of the target "
            f"{target_epsilon:g} (delta {delta:g}), so no further round fits"
        )

    def exceeded(eps_max: float) -> PrivacyBudgetExceeded:
        return PrivacyBudgetExceeded(
            f"cannot plan a noise multiplier: even sigma = {max_noise:g} on the {len(rounds)} planned round(s) "
            f"would take epsilon to {eps_max:.4g} > target {target_epsilon:g} (delta {delta:g}; "
            f"{spent:.4g} already spent), so the planned rounds do not fit in the remaining budget"
        )

    def with_sigma(sigma: float) -> list[MechanismStep]:
        return [MechanismStep(sigma, q, n) for q, n in rounds]

    def fits(sigma: float) -> bool:  # the guard's own computation
        return epsilon_spent(prior_steps + with_sigma(sigma), delta, accountant) <= target_epsilon

    log_target = math.log(target_epsilon)
    x_min, x_max, tol = math.log(MIN_NOISE), math.log(max_noise), math.log1p(rel_tol)

    def objective(eps_of_sigma: Callable[[float], float]) -> Callable[[float], float]:
        return lambda x: math.log(max(eps_of_sigma(math.exp(x)), 1e-300)) - log_target  # > 0: overspends

    # A zCDP-style first guess, only a starting point: rho ~ sum q^2 steps / (2 sigma^2) and
    # eps ~ rho + 2 sqrt(rho log(1/delta)).
    log_inv_delta = math.log(1 / delta)
    rho_target = (math.sqrt(log_inv_delta + target_epsilon) - math.sqrt(log_inv_delta)) ** 2
    rho_prior = sum(s.sample_rate**2 * s.steps / (2 * s.noise_multiplier**2) for s in prior_steps)
    rho_left = max(rho_target - rho_prior, 0.25 * rho_target)
    x0 = min(max(0.5 * math.log(sum(q * q * n for q, n in rounds) / (2 * rho_left)), x_min), x_max)

    if accountant == "rdp":
        integer = np.array([float(a).is_integer() for a in RDP_ORDERS])
        integer_orders = [a for a in RDP_ORDERS if float(a).is_integer()]
        prior_rdp = _rdp_total(prior_steps) if prior_steps else np.zeros(len(RDP_ORDERS))

        def eps_integer(sigma: float) -> float:
            rdp = prior_rdp[integer] + sum(
                np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=integer_orders))
                for q, n in rounds
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the")
                return max(float(rdp_analysis.get_privacy_spent(orders=integer_orders, rdp=rdp, delta=delta)[0]), 0.0)

        def eps_all(sigma: float) -> float:
            return _rdp_epsilon(prior_rdp + _rdp_total(with_sigma(sigma)), delta)

        # Integer orders only: an upper bound on epsilon, so its answer fits under all orders too.
        try:
            hi, slope = _search(objective(eps_integer), x0, -1.0, x_min, x_max, tol, exceeded, target_epsilon)
        except PrivacyBudgetExceeded:  # max_noise may still fit under all the orders
            at_max = eps_all(max_noise)
            if at_max > target_epsilon:
                raise exceeded(at_max) from None
            hi, slope = x_max, -1.0
        hi, _ = _search(objective(eps_all), hi, slope, x_min, hi, tol, exceeded, target_epsilon)
    else:

        def eps_prv(sigma: float) -> float:
            return epsilon_spent(prior_steps + with_sigma(sigma), delta, accountant)

        hi, _ = _search(objective(eps_prv), x0, -1.0, x_min, x_max, tol, exceeded, target_epsilon)

    sigma = MIN_NOISE if hi <= x_min else max_noise if hi >= x_max else math.exp(hi)
    while not fits(sigma):  # the search's sums and epsilon_spent's may differ in the last bits
        if sigma >= max_noise:
            raise exceeded(math.inf)
        sigma = min(sigma * (1 + rel_tol / 2), max_noise)
    return sigma


def run_target_epsilon(lifetime: float, spent_before_run: float, run_epsilon: float) -> float:
    """The cumulative epsilon a run may take a site to: its lifetime budget when ``run_epsilon`` is 0 (the run
    may spend all that is left), else what the site had spent when the run began plus the run's share, capped
    at the lifetime budget. (The share is an increase of the site's cumulative epsilon, so shares add up to
    the lifetime budget: two runs of 4 spend a budget of 8.)"""
    if run_epsilon < 0 or not math.isfinite(run_epsilon):
        raise ConfigError(f"dp-run-epsilon must be a finite number >= 0 (0: all that is left); got {run_epsilon!r}")
    if run_epsilon == 0:
        return lifetime
    return min(lifetime, spent_before_run + run_epsilon)


def plan_run_noise(
    history: Sequence[MechanismStep],
    planned: Sequence[tuple[float, int]],
    *,
    lifetime: float,
    delta: float,
    accountant: str,
    spent_before_run: float = 0.0,
    run_epsilon: float = 0.0,
    max_planned_noise: float = DEFAULT_MAX_PLANNED_NOISE,
    site: str = "this site",
) -> float:
    """The noise multiplier for this run's ``planned`` rounds (this one first), planned for the run's share.

    The target is `run_target_epsilon` (the lifetime budget, or the epsilon spent when the run began plus
    ``run_epsilon``), and sigma is `plan_noise_multiplier`'s smallest that keeps ``history`` plus the planned
    rounds within it. Raises `PrivacyBudgetExceeded` with the site's standing when the run's share is already
    spent, or when the plan needs sigma > ``max_planned_noise`` (the budget left is too small to train anything
    useful), e.g. ``site h1 has epsilon 0.3 of 8 left; this run's plan needs sigma 36.7 > 20
    (dp-max-planned-noise): refused (...)``.
    """
    if not MIN_NOISE < max_planned_noise <= PLANNER_MAX_NOISE:
        raise ConfigError(f"dp-max-planned-noise must be in ({MIN_NOISE:g}, {PLANNER_MAX_NOISE:g}]; "
                          f"got {max_planned_noise!r}")
    spent = epsilon_spent(history, delta, accountant)
    target = run_target_epsilon(lifetime, spent_before_run, run_epsilon)
    standing = f"site {site} has epsilon {max(lifetime - spent, 0.0):.3g} of {lifetime:g} left"
    if target < lifetime:
        standing += (f", of which this run may still spend {max(target - spent, 0.0):.3g} "
                     f"(dp-run-epsilon {run_epsilon:g})")
    if spent >= target:
        raise PrivacyBudgetExceeded(f"{standing}: this run's share is spent: refused")
    useless = " (dp-max-planned-noise): refused (too little budget left to train anything useful; docs/PRIVACY.md)"
    try:
        sigma = plan_noise_multiplier(target, delta, history, planned, accountant, max_noise=PLANNER_MAX_NOISE)
    except PrivacyBudgetExceeded:
        raise PrivacyBudgetExceeded(f"{standing}; this run's plan needs sigma > {PLANNER_MAX_NOISE:g} > "
                                    f"{max_planned_noise:g}{useless}") from None
    if sigma > max_planned_noise:
        raise PrivacyBudgetExceeded(f"{standing}; this run's plan needs sigma {sigma:.3g} > "
                                    f"{max_planned_noise:g}{useless}")
    return sigma


def _search(
    f: Callable[[float], float],
    x0: float,
    slope: float,
    x_min: float,
    x_max: float,
    tol: float,
    exceeded: Callable[[float], PrivacyBudgetExceeded],
    target: float,
) -> tuple[float, float]:
    """Smallest x in [x_min, x_max] with f(x) <= 0, for f decreasing, to within ``tol``.

    Returns ``(hi, slope)``: f(hi) <= 0 and either hi == x_min or f(hi - tol') > 0 for some
    tol' <= tol was evaluated; ``slope`` is the last secant slope (a start for a refinement).
    Each step predicts the root with the secant of the last two points (``slope`` at first) and
    evaluates just beyond it (0.3 tol), on the side opposite the current point, so that the bracket
    closes from both ends; after two steps that do not halve the bracket, a bisection.
    Raises ``exceeded(epsilon at x_max)`` when f(x_max) > 0.
    """
    lo: float | None = None  # the largest x seen with f > 0
    hi: float | None = None  # the smallest x seen with f <= 0
    x, previous = x0, None
    width, slow = math.inf, 0
    for _ in range(100):
        fx = f(x)
        if fx > 0:
            if lo is None or x > lo:
                lo = x
            if x >= x_max:
                raise exceeded(math.exp(fx) * target)
        elif hi is None or x < hi:
            hi = x
        if hi is not None and (hi <= x_min or (lo is not None and hi - lo <= tol)):
            return hi, slope
        if previous is not None and previous[0] != x:
            secant = (fx - previous[1]) / (x - previous[0])
            if secant < 0:
                slope = secant
        previous = (x, fx)
        root = x - fx / slope
        if lo is None or hi is None:  # no bracket yet: overshoot the predicted root
            x = x + 1.2 * (root - x) + (tol if fx > 0 else -tol)
            x = min(max(x, x_min), x_max)
            continue
        slow = slow + 1 if hi - lo > 0.5 * width else 0
        width = hi - lo
        if slow >= 2:  # two steps without halving the bracket: bisect
            x, slow = 0.5 * (lo + hi), 0
        else:  # just past the predicted root, on the other side from this point
            x = root + (0.3 * tol if fx > 0 else -0.3 * tol)
        x = min(max(x, lo + 0.1 * tol), hi - 0.1 * tol)
    raise RuntimeError("noise multiplier search did not converge")  # pragma: no cover
