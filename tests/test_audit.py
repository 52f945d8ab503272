"""`medfed audit` on ledgers built without training: agreement, tamper detection that says
where, trusted keys, the server-view cross-check, uncovered exposure, outputs, exit codes."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app as cli_app
from medfed.config import run_config
from medfed.constants import Phase
from medfed.exceptions import LedgerError
from medfed.privacy.audit import run_audit, write_audit
from medfed.privacy.guard import PrivacyGuard, SitePrivacy

ROUNDS = [(0.2, 10), (0.2, 10), (0.25, 8), (0.2, 10)]


def build_ledgers(folder: Path, accountant: str = "rdp", sites: int = 2) -> list[Path]:
    """Each site: one uncovered pretraining release, then DP rounds with planned noise."""
    cfg = run_config(pretrain="none", dp="finetune", dp_epsilon=3.0, dp_delta=1e-5, dp_accountant=accountant)
    for site in range(sites):
        guard = PrivacyGuard(SitePrivacy.resolve(cfg, str(site), {}, folder), "run-A/federated-none")
        guard.record_uncovered(Phase.PRETRAIN, 1)
        for i, (q, steps) in enumerate(ROUNDS):
            plan = guard.plan(q, steps, [(q2, s2) for q2, s2 in ROUNDS[i + 1:]])
            guard.record_dp(plan, Phase.FINETUNE, i + 1)
    return sorted(folder.glob("*.ledger.sqlite"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ledgers") / "federated-none"
    build_ledgers(folder)
    return folder


def copy(clean: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "federated-none"
    shutil.copytree(clean, dest)
    return dest


def tamper(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        for sql in statements:
            conn.execute(sql)


def test_honest_ledgers_pass_and_the_recomputation_agrees(clean: Path) -> None:
    report = run_audit([clean])
    assert report.ok, [s.problems for s in report.sites]
    for site in report.sites:
        assert site.rows == 5 and len(site.row_checks) == 4 and all(c.agrees for c in site.row_checks)
        assert site.reported_epsilon <= 3.0 and site.recomputed["rdp"] == pytest.approx(site.reported_epsilon, rel=0.01)
        assert site.recomputed["pld"] <= site.recomputed["rdp"] * 1.01  # PLD is tighter than RDP
        assert [u["phase"] for u in site.uncovered] == ["pretrain"]  # the non-DP release is listed


def test_prv_ledgers_are_checked_with_pld(tmp_path: Path) -> None:
    folder = tmp_path / "prv"
    build_ledgers(folder, accountant="prv", sites=1)
    report = run_audit([folder])
    assert report.ok, report.sites[0].problems
    assert {c.method for c in report.sites[0].row_checks} == {"pld"}


TAMPERING = {
    "edited noise": (["UPDATE releases SET noise_multiplier = noise_multiplier * 0.8 WHERE seq = 3"], "row 3"),
    "edited epsilon": (["UPDATE releases SET epsilon_after = epsilon_after / 2 WHERE seq = 4"], "row 4"),
    "deleted row": (["DELETE FROM releases WHERE seq = 3"], "row 4"),
    "deleted last row": (["DELETE FROM releases WHERE seq = 5"], "head"),
    "reordered rows": (["UPDATE releases SET seq = 100 WHERE seq = 2", "UPDATE releases SET seq = 2 WHERE seq = 3",
                        "UPDATE releases SET seq = 3 WHERE seq = 100"], "row 2"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_fails_the_audit_and_names_the_row(case: str, clean: Path, tmp_path: Path) -> None:
    folder = copy(clean, tmp_path)
    statements, where = TAMPERING[case]
    tamper(folder / "site-1.ledger.sqlite", *statements)
    report = run_audit([folder])
    assert not report.ok
    bad = {s.site: s for s in report.sites}
    assert bad["0"].ok and not bad["1"].ok  # the other site is untouched
    assert any(where in p for p in bad["1"].problems), bad["1"].problems
    result = CliRunner().invoke(cli_app, ["audit", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and where in result.output


def test_a_ledger_signed_by_another_key_fails_against_trusted_keys(clean: Path, tmp_path: Path) -> None:
    folder = copy(clean, tmp_path)
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(folder / "site-0.pub", keys / "site-0.pub")
    shutil.copy(folder / "site-0.pub", keys / "site-1.pub")  # site 1's ledger is not signed by this key
    report = run_audit([folder], trusted_keys=keys)
    assert {s.site: s.ok for s in report.sites} == {"0": True, "1": False}
    assert any("key" in p for p in report.sites[1].problems)


def test_the_server_view_catches_a_row_missing_from_a_ledger(clean: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ledgers = run_dir / "ledgers"
    ledgers.mkdir(parents=True)
    shutil.copytree(clean, ledgers / "federated-none")
    (run_dir / "config.json").write_text(
        json.dumps(run_config(pretrain="none", dp="finetune", dp_epsilon=3.0).to_flat()))
    (run_dir / "summary.json").write_text(json.dumps({"run_id": "run-A"}))
    report = run_audit([ledgers / "federated-none"])
    rows = [{"arm": "federated-none", "phase": "finetune", "round": c.seq - 1, "site": int(s.site), "split": "train",
             "accepted": True, "epsilon": c.reported} for s in report.sites for c in s.row_checks]
    rows.append({"arm": "federated-none", "phase": "finetune", "round": 9, "site": 0, "split": "train",
                 "accepted": True, "epsilon": 2.9})  # the server saw a release the ledger does not hold
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = run_audit([run_dir])
    assert all(s.ok for s in report.sites) and not report.ok
    assert len(report.run_problems) == 1
    assert "round 9" in report.run_problems[0] and "no such row" in report.run_problems[0]


def test_outputs_and_bad_input(clean: Path, tmp_path: Path) -> None:
    written = write_audit(run_audit([clean]), tmp_path / "audit")
    assert sorted(p.name for p in written) == ["audit.json", "audit.md", "audit_epsilon.png"]
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "Unit of privacy" in md and "Verdict: PASSED" in md and "Uncovered exposure" in md
    with pytest.raises(LedgerError, match="does not exist"):
        run_audit([tmp_path / "nowhere"])
    out = tmp_path / "never"
    result = CliRunner().invoke(cli_app, ["audit", str(tmp_path / "nowhere"), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    result = CliRunner().invoke(cli_app, ["audit", str(clean), "--tolerance", "2", "--out", str(out)])
    assert result.exit_code == 2 and "tolerance" in result.output and not out.exists()
