"""Epsilon of a site's DP-SGD history with Opacus' accountants; noise planning; budget checks.

This is the site's training-time accountant. A site's ledger holds one row per release: ``steps``
compositions of the Poisson-subsampled Gaussian mechanism with sample rate ``q`` and noise
multiplier ``sigma`` (DP-SGD, Abadi et al. 2016, "Deep Learning with Differential Privacy").
Before every round the site rebuilds the accountant from the ledger's whole history
(`epsilon_spent`), projects the epsilon after the coming round (`project_epsilon`), and refuses the
round past its lifetime budget; `plan_noise_multiplier` picks the smallest noise that fits.

Two accountants (``ACCOUNTANTS``), both Opacus 1.6:

``rdp``
    Rényi DP (Mironov 2017, "Rényi Differential Privacy"). The RDP of one step of the sampled
    Gaussian mechanism at order alpha is Opacus' ``analysis.rdp.compute_rdp`` (Mironov, Talwar &
    Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3: exact
    binomial expansion at integer orders, the two-sided series at fractional ones); compositions
    add. The orders are ``RDPAccountant.DEFAULT_ALPHAS``: 1.1, 1.2, ..., 10.9 (99 fractional and
    integer orders in steps of 0.1) and 12, 13, ..., 63 (note: 11 is not among them). Opacus 1.6
    converts RDP to (epsilon, delta) in ``analysis.rdp.get_privacy_spent`` with Theorem 21 of
    Balle et al. 2020 ("Hypothesis Testing Interpretations and Rényi Differential Privacy"),
    ``eps = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)``, minimised
    over the orders (not Mironov 2017's ``rdp + log(1/delta) / (alpha - 1)``). We checked the
    fractional orders against numerical integration of the definition: Opacus is exact to ~1e-8
    relative.

``prv``
    Numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz 2021,
    "Numerical Composition of Differential Privacy"). Opacus' ``PRVAccountant.get_epsilon`` returns
    the *upper* bound of the discretised composition (``eps_upper`` of ``DiscretePRV.compute_epsilon``:
    the epsilon at ``delta - delta_error`` plus ``eps_error``), not the estimate, so the guarantee
    holds. Its default ``eps_error=0.01`` is absolute; we refine it so that the bound is within
    about 0.4 % of the estimate (`_prv_epsilon`), floored at ``1e-5`` for near-zero epsilons.
    Consecutive rows with the same (sigma, q) are merged into one (their steps added), exactly as
    Opacus' own ``step()`` builds its history; the cost grows with the number of distinct rows.

Both accountants' results are clamped at 0: Opacus' PRV bound can come out slightly negative when
the mechanism is already (0, delta)-DP (e.g. -3e-4 for sigma=5, q=0.01, one step, delta=1e-3), and
(0, delta)-DP is the floor (dp-accounting clamps the same way).

The RDP per-step curves are memoised per ``(sigma, q)`` (`_rdp_curve`, a pure function of two
floats: no accountant state is carried between calls, every call re-derives the epsilon from the
history it is given). The result equals what a fresh ``RDPAccountant`` with ``.history`` set to the
same rows returns, bit for bit (tests/test_accounting.py checks this); without the memo a ledger of
a few hundred rows would cost seconds per projection and noise planning tens of seconds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from medfed.exceptions import ConfigError, PrivacyBudgetExceeded
from medfed.privacy.mechanism import MechanismStep

ACCOUNTANTS = ("rdp", "prv")

# Opacus' RDP orders (RDPAccountant.DEFAULT_ALPHAS), used for every RDP evaluation here.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)

_PRV_EPS_ERROR = 0.01  # Opacus' default eps_error: the first pass
_PRV_REL_ERROR = 0.004  # then eps_error <= 0.4 % of the epsilon
_PRV_MIN_EPS_ERROR = 1e-5  # floor (relative accuracy is meaningless as epsilon -> 0)
_PRV_PASSES = 3

MIN_NOISE = 0.1  # the planner never goes below this noise multiplier
PLANNER_MAX_NOISE = 50.0  # the planner never goes above this one (`plan_noise_multiplier`'s max_noise)
DEFAULT_MAX_PLANNED_NOISE = 20.0
"""`RunConfig.dp_max_planned_noise`'s default: a run whose planned sigma exceeds it is refused, the budget left
being too small to train anything useful. In docs/RESULTS.md (dp_utility, batch 64) sigma 9.3-18.1 at epsilon 1
still reached test AUC 0.72-0.74, while the sigma 36.7 left for a second run after a first had spent the whole
budget gave AUC 0.49 (chance; issue 12)."""


def check_accountant(name: str) -> str:
    """Return ``name`` if it is one of `ACCOUNTANTS`, else raise `ConfigError`."""
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}; choose {' or '.join(ACCOUNTANTS)}")
    return name


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1); got {delta!r}")


def check_budget(epsilon: float, delta: float, site_size: int | None = None) -> None:
    """Validate a privacy budget (epsilon, delta), and delta against the site's size if given.

    Raises `ConfigError` when epsilon is not a finite number > 0, when delta is not in (0, 1), or
    when delta is not below 1/n for the n examples at the site: a mechanism that publishes one
    random example outright is (0, 1/n)-DP, so delta >= 1/n permits exactly that.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigError(f"epsilon must be a finite number > 0; got {epsilon!r}")
    _check_delta(delta)
    if site_size is None:
        return
    if isinstance(site_size, bool) or not isinstance(site_size, (int, np.integer)) or site_size < 1:
        raise ConfigError(f"site_size must be an integer >= 1; got {site_size!r}")
    if delta >= 1 / site_size:
        raise ConfigError(
            f"delta {delta:g} must be below 1/n = {1 / site_size:.3g} for the n = {site_size} examples at the site, "
            "else the mechanism may publish an example outright"
        )


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
    return sum([_rdp_curve(s.noise_multiplier, s.sample_rate) * s.steps for s in history])


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
    _check_delta(delta)
    steps = _steps(history)
    if not steps:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(_rdp_total(steps), delta)
    return _prv_epsilon(steps, delta)


def project_epsilon(history: Sequence[MechanismStep], step: MechanismStep, delta: float, accountant: str) -> float:
    """Epsilon after appending ``step`` to ``history`` (the guard's projection before a round)."""
    return epsilon_spent([*_steps(history), *_steps([step])], delta, accountant)


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
