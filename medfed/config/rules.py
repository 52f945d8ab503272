"""Rules about settings that both the settings' own checks and the code that carries them out apply.

They live here, below every layer that uses them, so that `RunConfig` checks a whole run's settings
without importing the privacy accountant or the aggregation rules, and those import the same rule
instead of repeating it.
"""

from __future__ import annotations

import math

import numpy as np

from medfed.exceptions import ConfigError

ACCOUNTANTS = ("rdp", "prv")
"""The privacy accountants `medfed.privacy.accounting` offers (both Opacus 1.6)."""

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


def check_delta(delta: float) -> None:
    """Raise `ConfigError` unless delta is a number in (0, 1)."""
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
    check_delta(delta)
    if site_size is None:
        return
    if isinstance(site_size, bool) or not isinstance(site_size, (int, np.integer)) or site_size < 1:
        raise ConfigError(f"site_size must be an integer >= 1; got {site_size!r}")
    if delta >= 1 / site_size:
        raise ConfigError(
            f"delta {delta:g} must be below 1/n = {1 / site_size:.3g} for the n = {site_size} examples at the site, "
            "else the mechanism may publish an example outright"
        )


_EPS = 1e-9  # guards floor(trim * n) against 0.29 * 100 = 28.999...


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values `trimmed_mean` drops at EACH end of every coordinate: floor(trim_fraction * n)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5); got {trim_fraction}")
    return math.floor(trim_fraction * n + _EPS)


def krum_problem(n: int, byzantine: int, select: int = 1) -> str:
    """Why Krum cannot run on ``n`` updates tolerating ``byzantine`` faulty ones and keeping ``select``, or ''."""
    if byzantine < 0 or select < 1:
        return f"Krum needs krum-byzantine >= 0 and krum-select >= 1; got {byzantine} and {select}"
    if n < 2 * byzantine + 3:
        return (f"Krum tolerating f={byzantine} faulty updates needs n >= 2f+3 = {2 * byzantine + 3} updates "
                f"(Blanchard et al. 2017); got n={n}")
    if select > n - byzantine:
        return (f"Multi-Krum keeping m={select} updates must keep m <= n - f = {n} - {byzantine} = {n - byzantine}, "
                f"or a faulty update could always be among them")
    return ""


MIN_UPDATES_TO_SCREEN = 3
"""With fewer updates there is no 'the others' to compare with, and `norm_outliers` flags nothing."""
