"""`medfed audit`: check what every site has spent, independently of the training code.

For each ledger found (in a run directory, a folder, or given as files) the audit

1. verifies the chain, every row's hash and Ed25519 signature and the signed head record
   (against the key stored in the ledger, or a trusted key given by the privacy officer), and
   checks the ledger against its anchor (the signed head kept beside the site's key; found beside
   the ledger or given with ``--anchors``): a ledger shorter than, or different from, what its key
   signed was reset or rolled back, and an anchor whose ledger is missing was deleted;
2. recomputes the site's epsilon after every DP row with Google's ``dp-accounting`` (RDP with
   Opacus' orders for ledgers kept with the RDP accountant, PLD for PRV), not with the Opacus
   code the sites used, and flags any row whose reported epsilon differs by more than 1 %;
3. judges each DP row against the budget in force when it was written (stored in the row; rows
   written before medfed stored it are judged against the run's ``dp-epsilon`` or ``--budget``);
4. lists the releases no epsilon covers (``mechanism = none``: weights that left a site from a
   non-DP phase, or from a run without DP);
5. for a run directory, cross-checks the server's view (``metrics.jsonl``: the epsilon each
   site reported each round) against the ledgers, so a row deleted from a ledger after the
   fact shows up even if the ledger's own head record was replaced by an older one;

and writes ``audit.json``, ``audit.md`` and ``audit_epsilon.png`` (epsilon per site against
its releases, with budget lines). The unit of privacy is stated in the report. A ledger that
cannot be read is one failed entry (with the reason); the others are still audited.

The audit of one ledger is `medfed.privacy.audit_site`; finding the ledgers, anchors and run configs is
`medfed.privacy.audit_discovery`. This module runs the audit over its targets, cross-checks the server's view
and writes the report.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medfed.exceptions import LedgerError
from medfed.privacy.audit_discovery import LEDGER_GLOB, _Anchors, _collect_anchors, _run_config, find_ledgers
from medfed.privacy.audit_site import TOLERANCE, SiteAudit, _unreadable, audit_ledger
from medfed.privacy.central import CENTRAL_SITE
from medfed.privacy.ledger import verify_ledger
from medfed.privacy.plots import plot_epsilon

UNIT_OF_PRIVACY = (
    "one training image of one site (example-level DP): adding or removing one image of a site's training data "
    "changes the distribution of the weights that leave that site by at most (epsilon, delta) (scalar metrics such "
    "as example counts and validation scores are not covered; see docs/PRIVACY.md). MedMNIST files carry no patient "
    "identifiers, so a patient with several images is protected per image, not as a person; deployments with "
    "patient ids should group a patient's images into one example."
)
CENTRAL_UNIT_OF_PRIVACY = (
    "for the ledger of site `central` (the server's central DP on the aggregate): one whole site (site-level DP, "
    "zero-out adjacency): replacing all of one site's update with zero changes the distribution of the released "
    "global weights by at most (epsilon, delta). It covers what anyone who receives the global model learns; the "
    "server itself sees each update unless secure aggregation (secagg+) hides them (docs/PRIVACY.md)."
)


@dataclass
class AuditReport:
    targets: list[str]
    unit_of_privacy: str
    sites: list[SiteAudit]
    run_problems: list[str]
    uncovered_runs: list[str]  # run directories without DP at all
    tolerance: float
    trusted_keys: bool = False

    @property
    def ok(self) -> bool:
        return not self.run_problems and all(s.ok for s in self.sites)


def _server_view_problems(run_dir: Path, sites: list[SiteAudit]) -> list[str]:
    """Every epsilon a site reported to the server must be a row of that site's ledger; and every update the server
    accepted without an epsilon (a run or phase without DP) must be a release in that site's ledger when the audit
    found one (sites record those too; ledgers of runs from before they did are simply not found)."""
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not metrics.is_file() or not summary.is_file():
        return []
    run_id = json.loads(summary.read_text()).get("run_id", "")
    by_key = {
        (s.group, s.site): {(r["run_id"], r["phase"], r["round"]): r["epsilon"] for r in s.releases} for s in sites
    }
    unreadable = {(s.group, s.site) for s in sites if not s.readable}  # already failed, with the reason
    problems = []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") != "train" or row.get("refused") or not row.get("accepted", True):
            continue
        arm, site = str(row["arm"]), str(row["site"])
        if (arm, site) in unreadable:
            continue
        ledger = by_key.get((arm, site))
        where = f"{arm} site {site} {row['phase']} round {row['round']}"
        if row.get("epsilon") is None:  # weights that left without DP
            if ledger is not None and (f"{run_id}/{arm}", row["phase"], int(row["round"])) not in ledger:
                problems.append(f"{where}: the server accepted an update without DP; the site's ledger has no such "
                                "release (deleted or reset?)")
            continue
        if ledger is None:
            problems.append(
                f"{where}: the server recorded epsilon {row['epsilon']:.6g} but no ledger of that site was found"
            )
            continue
        value = ledger.get((f"{run_id}/{arm}", row["phase"], int(row["round"])))
        if value is None:
            problems.append(f"{where}: the server recorded epsilon {row['epsilon']:.6g}; the site's ledger has no "
                            "such row (deleted?)")
        elif not math.isclose(value, float(row["epsilon"]), rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{where}: the server recorded epsilon {row['epsilon']:.6g}, the ledger says {value:.6g}")
    return problems


def _arms_without_ledgers(run_dir: Path, config: dict[str, Any], found: list[SiteAudit]) -> list[str]:
    """Arms of a DP run that kept no ledger (e.g. a from-scratch baseline of a DP-pretraining run)
    trained without DP: every update they sent is uncovered."""
    summary = run_dir / "summary.json"
    if config.get("dp", "none") == "none" or not summary.is_file():
        return []
    arms = json.loads(summary.read_text()).get("arms", {})
    groups = {s.group for s in found}
    return [f"{run_dir}: arm {arm} kept no privacy ledger: its updates were not DP"
            for arm in arms if arm not in groups]


def run_audit(targets: Sequence[Path], *, trusted_keys: Path | None = None, budget: float | None = None,
              tolerance: float = TOLERANCE, anchors: Path | None = None) -> AuditReport:
    """Audit run directories, ledger folders or ledger files. ``trusted_keys``: a folder of
    ``site-<id>.pub`` files (or one key file) the ledgers must be signed with. ``anchors``: an anchor
    file or a folder of them (``*.anchor.json``, kept beside the sites' keys) besides those found
    beside the ledgers. ``budget``: for rows that record no budget of their own. A ledger that cannot
    be read is a failed entry; a missing target or anchors path raises LedgerError."""
    sites: list[SiteAudit] = []
    run_problems: list[str] = []
    uncovered_runs: list[str] = []
    targets = [Path(t).expanduser() for t in targets]
    found_anchors = _collect_anchors(targets, anchors)
    for target in targets:
        config = _run_config(target) if target.is_dir() else None
        site_budget = budget if budget is not None else (
            float(config["dp-epsilon"]) if config and config.get("dp", "none") != "none" else None)
        ledgers = find_ledgers(target)
        if config is not None and config.get("dp", "none") == "none":
            protection = []
            if config.get("secure-aggregation", "none") != "none":
                protection.append("SecAgg+ showed the server only their sum")
            if config.get("central-dp", "none") != "none":
                protection.append("the released global model is covered per whole site by the central ledger")
            uncovered_runs.append(f"{target}: trained without DP-SGD at the sites (--dp none): every update that "
                                  f"left a site ({'pretraining and ' if config.get('pretrain') != 'none' else ''}"
                                  "fine-tuning) is uncovered at the example level"
                                  + (f" ({'; '.join(protection)})" if protection else ""))
        if not ledgers and (config is None or config.get("dp", "none") != "none"):
            raise LedgerError(f"no privacy ledger ({LEDGER_GLOB}) found under {str(target)!r}")
        found = [_audit_one(p, trusted_keys, None if _is_central(p) else site_budget, tolerance, found_anchors)
                 for p in ledgers]
        sites += found
        if config is not None:
            run_problems += _server_view_problems(target, found)
            uncovered_runs += _arms_without_ledgers(target, config, found)
    run_problems += found_anchors.problems + found_anchors.orphans()
    return AuditReport([str(t) for t in targets], UNIT_OF_PRIVACY, sites, run_problems, uncovered_runs, tolerance,
                       trusted_keys is not None)


def _audit_one(path: Path, trusted_keys: Path | None, budget: float | None, tolerance: float,
               anchors: _Anchors) -> SiteAudit:
    """`audit_ledger` with the ledger's anchor; a ledger (or trusted key) that cannot be read is a failed entry."""
    try:
        trusted = _trusted_key_for(trusted_keys, path)
        stored_key = verify_ledger(path).public_key_hex  # which anchor is this ledger's: by its key
        return audit_ledger(path, trusted_key=trusted, budget=budget, tolerance=tolerance,
                            anchor=anchors.for_ledger(stored_key))
    except LedgerError as exc:
        return _unreadable(path, exc)


def _is_central(ledger: Path) -> bool:
    """The server's central-DP ledger (its budget is not a site's dp-epsilon)."""
    return ledger.name == f"{CENTRAL_SITE}.ledger.sqlite"


def _trusted_key_for(trusted: Path | None, ledger: Path) -> Path | None:
    if trusted is None:
        return None
    if trusted.is_file():
        return trusted
    stem = ledger.name.removesuffix(".ledger.sqlite")
    candidate = trusted / f"{stem}.pub"
    if not candidate.is_file():
        raise LedgerError(f"no trusted key {candidate.name} for ledger {ledger} in {trusted}")
    return candidate


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def render_markdown(report: AuditReport, png: str | None, *, empirical: Any = None) -> str:
    verdict = "PASSED" if report.ok else "FAILED"
    lines = [
        "# medfed privacy audit", "",
        f"**Verdict: {verdict}.** Targets: " + ", ".join(f"`{t}`" for t in report.targets), "",
        f"**Unit of privacy:** {report.unit_of_privacy}", "",
        *([f"**Unit of privacy, central DP:** {CENTRAL_UNIT_OF_PRIVACY}", ""]
          if any(_is_central(Path(s.ledger)) for s in report.sites) else []),
        ("Signatures were checked against the trusted keys given (`--trusted-keys`). " if report.trusted_keys else
         "**No trusted keys were given**: signatures were checked against the public key stored in each ledger, which "
         "proves integrity since that key signed, not who signed; pass `--trusted-keys` with the keys from "
         "provisioning. ")
        + "Each ledger's chain, row hashes, Ed25519 signatures and signed head were verified"
        + f" ({sum(1 for s in report.sites if s.anchor)} of {len(report.sites)} also against the anchor kept beside "
        "the site's key: a ledger behind it was reset or rolled back)"
        + "; each DP row was judged against the budget recorded in it (the one in force when it was written) and "
        "its epsilon was recomputed with Google's dp-accounting (RDP with Opacus' orders for RDP ledgers, PLD for "
        f"PRV ledgers) and compared with the reported value (tolerance {report.tolerance:.0%}).", "",
        "| ledger | site | rows | reported epsilon | delta | dp-accounting RDP | dp-accounting PLD | budget "
        "| uncovered releases | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.sites:
        lines.append(
            f"| {s.group} | {s.site} | {s.rows} | {_fmt(s.reported_epsilon)} | {s.delta:g} "
            f"| {_fmt(s.recomputed.get('rdp'))} | {_fmt(s.recomputed.get('pld'))} | {_fmt(s.budget)} "
            f"| {len(s.uncovered)} | {'ok' if s.ok else 'PROBLEMS'} |"
        )
    problems = [f"- {s.label} (`{s.ledger}`): {p}" for s in report.sites for p in s.problems]
    problems += [f"- server view: {p}" for p in report.run_problems]
    lines += ["", "## Problems", ""] + (problems or ["None."])
    lines += ["", "## Uncovered exposure (weights that left a site without DP)", ""]
    uncovered = [f"- {s.label}: {u['phase']} round {u['round']} of run `{u['run_id']}`"
                 for s in report.sites for u in s.uncovered]
    uncovered += [f"- {u}" for u in report.uncovered_runs]
    lines += uncovered or ["None: every release in these ledgers was DP-SGD."]
    if empirical is not None:
        lines += ["", "## Empirical audit (canaries, one run; Steinke, Nasr & Jagielski 2023)", "",
                  empirical.describe() + ".", "",
                  "The bound " + ("stays below" if empirical.consistent else "**exceeds**")
                  + " the accountant's epsilon."]
    if png:
        lines += ["", f"![epsilon per site]({png})"]
    return "\n".join(lines) + "\n"


def write_audit(report: AuditReport, out_dir: Path, *, empirical: Any = None) -> list[Path]:
    """Write audit.json, audit.md and audit_epsilon.png into ``out_dir`` (all or nothing)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".audit-", dir=out_dir.parent))
    try:
        series = {s.label: s.series for s in report.sites if s.series}
        budgets = {s.label: s.budget for s in report.sites if s.budget is not None}
        png = plot_epsilon(series, budgets, tmp / "audit_epsilon.png", xlabel="release (ledger row)",
                           title="epsilon per site")
        data = {**asdict(report), "ok": report.ok}
        if empirical is not None:
            data["empirical"] = {**asdict(empirical), "consistent": empirical.consistent}
        (tmp / "audit.json").write_text(json.dumps(data, indent=1, default=str))
        (tmp / "audit.md").write_text(render_markdown(report, png.name if png else None, empirical=empirical))
        out_dir.mkdir(exist_ok=True)
        written = []
        for f in sorted(tmp.iterdir()):
            dest = out_dir / f.name
            f.replace(dest)
            written.append(dest)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
