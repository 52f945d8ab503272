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

The package: :mod:`.epsilon` (the accountants, `epsilon_spent`, `project_epsilon`, budget checks) and
:mod:`.planning` (`plan_noise_multiplier`, `run_target_epsilon`, `plan_run_noise`).
"""

from __future__ import annotations

from medfed.config.rules import (
    ACCOUNTANTS,
    DEFAULT_MAX_PLANNED_NOISE,
    MIN_NOISE,
    PLANNER_MAX_NOISE,
    check_accountant,
    check_budget,
)
from medfed.privacy.accounting.epsilon import (
    RDP_ORDERS,
    epsilon_spent,
    project_epsilon,
)
from medfed.privacy.accounting.planning import (
    plan_noise_multiplier,
    plan_run_noise,
    run_target_epsilon,
)
from medfed.privacy.mechanism import MechanismStep

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_MAX_PLANNED_NOISE",
    "MIN_NOISE",
    "PLANNER_MAX_NOISE",
    "RDP_ORDERS",
    "MechanismStep",
    "check_accountant",
    "check_budget",
    "epsilon_spent",
    "plan_noise_multiplier",
    "plan_run_noise",
    "project_epsilon",
    "run_target_epsilon",
]
