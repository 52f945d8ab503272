"""The row format of a privacy ledger: the mechanisms, :class:`Release` (what a caller records) and
:class:`LedgerEntry` (a stored row), their field lists, and the value rules every release must satisfy."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

LEDGER_VERSION = 1
MECHANISM_DP_SGD = "poisson-subsampled-gaussian"
MECHANISM_NONE = "none"
MECHANISM_CENTRAL = "central-gaussian"  # the server's site-level Gaussian on an aggregate (q: 1 or Poisson rate)
MECHANISMS = (MECHANISM_DP_SGD, MECHANISM_NONE, MECHANISM_CENTRAL)


@dataclass(frozen=True)
class Release:
    """One DP training release, as the caller supplies it for a new ledger row.

    ``mechanism`` is :data:`MECHANISM_DP_SGD` (``steps`` compositions of the Poisson-subsampled
    Gaussian mechanism) or :data:`MECHANISM_NONE` (weights left the site without DP: an
    uncovered exposure, with sample_rate, noise_multiplier and steps all 0 and ``epsilon_after``
    the DP epsilon so far). ``epsilon_after`` is the site's cumulative DP epsilon after this
    release, as the site's accountant (``accountant``: "rdp", "prv", ...) computed it.
    ``epsilon_budget`` is the site's budget in force when the release was made (None: not
    recorded, as in rows written before the field existed, and in the server's central ledger).
    """

    run_id: str
    server_round: int
    phase: str
    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    epsilon_after: float
    accountant: str
    epsilon_budget: float | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class LedgerEntry(Release):
    """A stored ledger row: the release plus its place in the signed hash chain."""

    seq: int
    site: str
    created_at: str
    prev_hash: str
    row_hash: str
    signature: str


_RELEASE_FIELDS = tuple(f.name for f in fields(Release))
_HASHED_FIELDS = (*_RELEASE_FIELDS, "seq", "site", "created_at", "prev_hash")
_ENTRY_FIELDS = tuple(f.name for f in fields(LedgerEntry))
_FLOAT_FIELDS = ("sample_rate", "noise_multiplier", "delta", "epsilon_after")
_OPTIONAL_FIELDS = ("epsilon_budget",)  # hashed only when set, so rows written before it existed still verify
_INT_FIELDS = ("server_round", "steps")
_TEXT_FIELDS = ("run_id", "phase", "mechanism", "accountant")


# --------------------------------------------------------------------------- value rules


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _text_problems(release: Release) -> list[str]:
    problems = []
    for name in ("run_id", "phase", "accountant"):
        value = getattr(release, name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{name} must be non-empty text, got {value!r}")
    if release.mechanism not in MECHANISMS:
        problems.append(f"mechanism must be one of {', '.join(MECHANISMS)}, got {release.mechanism!r}")
    return problems


def _general_number_problems(release: Release) -> list[str]:
    """Rules on numbers that hold whatever the mechanism."""
    problems = []
    if not _is_int(release.server_round) or release.server_round < 0:
        problems.append(f"server_round must be an integer >= 0, got {release.server_round!r}")
    if not _is_real(release.delta) or not 0 <= release.delta < 1:
        problems.append(f"delta must be a finite number in [0, 1), got {release.delta!r}")
    if not _is_real(release.epsilon_after) or release.epsilon_after < 0:
        problems.append(f"epsilon_after must be a finite number >= 0, got {release.epsilon_after!r}")
    budget = release.epsilon_budget
    if budget is not None and (not _is_real(budget) or budget <= 0):
        problems.append(f"epsilon_budget must be a finite number > 0 (or absent), got {budget!r}")
    return problems


def _mechanism_problems(release: Release) -> list[str]:
    """Rules on sample_rate, noise_multiplier and steps, which depend on the mechanism."""
    rate, noise, steps = release.sample_rate, release.noise_multiplier, release.steps
    if release.mechanism == MECHANISM_NONE:
        problems = []
        if not _is_real(rate) or rate != 0:
            problems.append(f"sample_rate must be 0 for mechanism 'none', got {rate!r}")
        if not _is_real(noise) or noise != 0:
            problems.append(f"noise_multiplier must be 0 for mechanism 'none', got {noise!r}")
        if not _is_int(steps) or steps != 0:
            problems.append(f"steps must be 0 for mechanism 'none', got {steps!r}")
        return problems
    dp = release.mechanism in (MECHANISM_DP_SGD, MECHANISM_CENTRAL)
    min_steps = 1 if dp else 0
    problems = []
    if not _is_real(rate) or not (0 < rate <= 1 if dp else 0 <= rate <= 1):
        problems.append(f"sample_rate must be a number in {'(0, 1]' if dp else '[0, 1]'}, got {rate!r}")
    if not _is_real(noise) or not (noise > 0 if dp else noise >= 0):
        problems.append(f"noise_multiplier must be a finite number {'> 0' if dp else '>= 0'}, got {noise!r}")
    if not _is_int(steps) or steps < min_steps:
        problems.append(f"steps must be an integer >= {min_steps}, got {steps!r}")
    return problems


def _release_problems(release: Release) -> list[str]:
    """Every rule the release's values break, each naming the field (empty when valid)."""
    return [*_text_problems(release), *_general_number_problems(release), *_mechanism_problems(release)]


def _normalized(release: Release) -> dict[str, Any]:
    """The release's values as plain int/float/str (numpy scalars and the like converted)."""
    values: dict[str, Any] = {name: getattr(release, name) for name in _RELEASE_FIELDS}
    for name in _FLOAT_FIELDS:
        values[name] = float(values[name])
    for name in _INT_FIELDS:
        values[name] = int(values[name])
    for name in _OPTIONAL_FIELDS:
        if values[name] is not None:
            values[name] = float(values[name])
    return values


def _is_utc_iso(text: Any) -> bool:
    """Whether ``text`` is an ISO-8601 time with a zero UTC offset."""
    if not isinstance(text, str):
        return False
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    offset = moment.utcoffset()
    return offset is not None and offset.total_seconds() == 0
