"""The audit of one ledger (for `medfed.privacy.audit`): verify it (and against its anchor), recompute every DP
row's epsilon with dp-accounting, judge each row against the budget in force when it was written, and list the
uncovered releases."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.exceptions import ConfigError, LedgerError
from medfed.privacy.independent import INDEPENDENT_FOR, compare, independent_epsilon
from medfed.privacy.ledger import (
    MECHANISM_CENTRAL,
    MECHANISM_DP_SGD,
    MECHANISM_NONE,
    Anchor,
    LedgerEntry,
    anchor_problems,
    load_public_key,
    verify_ledger,
)

DP_MECHANISMS = (MECHANISM_DP_SGD, MECHANISM_CENTRAL)  # rows an accountant composes (one kind per ledger)
TOLERANCE = 0.01


@dataclass
class RowCheck:
    seq: int
    reported: float
    recomputed: float
    method: str
    agrees: bool


@dataclass
class SiteAudit:
    """The audit of one ledger."""

    ledger: str
    group: str  # the folder above the ledger (the arm in a simulation)
    site: str
    public_key: str
    rows: int
    problems: list[str]
    reported_epsilon: float
    delta: float
    recomputed: dict[str, float]  # independent method -> epsilon after the last row
    row_checks: list[RowCheck]
    uncovered: list[dict[str, Any]]
    budget: float | None  # the budget in force at the last row (as recorded, else the audit's fallback)
    releases: list[dict[str, Any]] = field(default_factory=list)  # seq, run_id, phase, round, mechanism, epsilon,
    # budget (the one recorded in the row, or None)
    anchor: str | None = None  # the anchor the ledger was checked against, if one was found
    readable: bool = True  # False: the ledger could not be read at all (its one problem says why)

    @property
    def series(self) -> list[tuple[int, float]]:
        """(release number, epsilon after) for the plot."""
        return [(i + 1, r["epsilon"]) for i, r in enumerate(self.releases)]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def label(self) -> str:
        return f"{self.group} site {self.site}" if self.group else f"site {self.site}"


def _history(entries: Sequence[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.mechanism in DP_MECHANISMS]


def audit_ledger(path: Path, *, trusted_key: Path | None = None, budget: float | None = None,
                 tolerance: float = TOLERANCE, anchor: Anchor | None = None) -> SiteAudit:
    """Verify one ledger (against its ``anchor`` too, when one is given) and recompute its epsilons independently.

    Each DP row is judged against the budget recorded in it (the one in force when it was written); ``budget`` is
    the fallback for rows that record none (ledgers written before medfed recorded it)."""
    trusted = load_public_key(trusted_key) if trusted_key is not None else None
    verification = verify_ledger(path, trusted)
    entries = verification.entries
    problems = list(verification.problems)
    if anchor is not None:
        behind = anchor_problems(anchor, verification.site, verification.public_key_hex, entries)
        problems += [f"ledger {p}" for p in behind]
    checks: list[RowCheck] = []
    for i, entry in enumerate(entries):
        if entry.mechanism not in DP_MECHANISMS:
            continue
        method = INDEPENDENT_FOR.get(entry.accountant)
        if method is None:
            problems.append(f"row {entry.seq}: unknown accountant {entry.accountant!r}")
            continue
        try:
            recomputed = independent_epsilon(_history(entries[: i + 1]), entry.delta, method)
        except ConfigError as exc:  # a row with impossible values (already a verification problem): no number
            problems.append(f"row {entry.seq}: epsilon cannot be recomputed ({exc})")
            continue
        agrees, _ = compare(entry.epsilon_after, recomputed, tolerance)
        checks.append(RowCheck(entry.seq, entry.epsilon_after, recomputed, method, agrees))
        if not agrees:
            problems.append(
                f"row {entry.seq}: reported epsilon {entry.epsilon_after:.6g} but {method} recomputes {recomputed:.6g} "
                f"(more than {tolerance:.0%} apart)"
            )
    problems += _budget_problems(entries, budget)
    history = _history(entries)
    delta = entries[-1].delta if entries else 0.0
    try:
        recomputed_final = {m: independent_epsilon(history, delta, m) for m in ("rdp", "pld")} if history else {}
    except ConfigError:  # listed per row above
        recomputed_final = {}
    releases = [
        {"seq": e.seq, "run_id": e.run_id, "phase": e.phase, "round": e.server_round, "mechanism": e.mechanism,
         "epsilon": e.epsilon_after, "budget": e.epsilon_budget}
        for e in entries
    ]
    uncovered = [r for r in releases if r["mechanism"] == MECHANISM_NONE]
    recorded = [e.epsilon_budget for e in entries if e.epsilon_budget is not None]
    return SiteAudit(
        ledger=str(path), group=path.parent.name, site=verification.site, public_key=verification.public_key_hex,
        rows=len(entries), problems=problems, reported_epsilon=entries[-1].epsilon_after if entries else 0.0,
        delta=delta, recomputed=recomputed_final, row_checks=checks, uncovered=uncovered,
        budget=recorded[-1] if recorded else budget, releases=releases,
        anchor=None if anchor is None else str(anchor.path),
    )


def _budget_problems(entries: Sequence[LedgerEntry], fallback: float | None) -> list[str]:
    """DP rows over the budget in force when they were written (recorded in the row); a row that records no budget
    (written before medfed recorded it) is judged against ``fallback``, whatever its mechanism, as before. A
    ``none`` row that records its budget is not judged: it spends nothing, it repeats the epsilon so far."""
    over: list[tuple[LedgerEntry, float, bool]] = []
    for e in entries:
        if e.epsilon_budget is not None:
            if e.mechanism in DP_MECHANISMS and e.epsilon_after > e.epsilon_budget * (1 + 1e-9):
                over.append((e, e.epsilon_budget, True))
        elif fallback is not None and e.epsilon_after > fallback * (1 + 1e-9):
            over.append((e, fallback, False))
    if not over:
        return []
    first, limit, recorded = over[0]
    whose = "in force when it was written" if recorded else "of this audit (the row records none)"
    return [f"row {first.seq}: epsilon {first.epsilon_after:.6g} is over the budget {limit:g} {whose} "
            f"({len(over)} row(s) over)"]


def _unreadable(path: Path, exc: LedgerError) -> SiteAudit:
    """A ledger that cannot be audited at all: one failed entry saying why (the others are still audited)."""
    site = path.name.removesuffix(".ledger.sqlite").removeprefix("site-")
    return SiteAudit(
        ledger=str(path), group=path.parent.name, site=site, public_key="", rows=0,
        problems=[f"cannot be audited: {exc}"], reported_epsilon=math.nan, delta=math.nan, recomputed={},
        row_checks=[], uncovered=[], budget=None, readable=False,
    )
