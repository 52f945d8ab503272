"""DP end to end: a real Flower simulation refuses at the budget, ledgers carry across runs,
the audit recomputes and verifies, tampering is caught, LoRA sends adapters only."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app as cli_app
from medfed.config import RunConfig, run_config
from medfed.experiment import prepare
from medfed.experiment.recorder import Recorder
from medfed.privacy.accounting import MechanismStep, epsilon_spent
from medfed.privacy.audit import run_audit
from medfed.privacy.ledger import verify_ledger
from medfed.simulations import launcher

ARM = "federated-none"


def dp_config(tmp_path: Path, **changes: object) -> RunConfig:
    base = dict(
        data="breastmnist", num_sites=2, partition="iid", pretrain="none", finetune_rounds=3, finetune_epochs=1,
        finetune_batch_size=8, width=8, baselines="none", out_dir=str(tmp_path / "runs"), client_cpus=1,
        dp="finetune", dp_noise_multiplier=1.0, dp_delta=1e-4, label_fraction=0.2,
    )
    base.update(changes)
    return run_config(**base)  # type: ignore[arg-type]


def budget_for_two_rounds(cfg: RunConfig) -> float:
    """A budget between every site's epsilon after 2 rounds and after 3 (the sites differ slightly in size)."""
    prep = prepare.prepare(cfg.replace(dp="none"))
    after2, after3 = [], []
    for site in prep.plan.sites:
        n = len(site.labelled)
        q, steps = min(1.0, cfg.finetune.batch_size / n), -(-n // cfg.finetune.batch_size)
        step = MechanismStep(cfg.privacy.noise_multiplier, q, steps)
        after2.append(epsilon_spent([step] * 2, cfg.privacy.delta, cfg.privacy.accountant))
        after3.append(epsilon_spent([step] * 3, cfg.privacy.delta, cfg.privacy.accountant))
    assert max(after2) < min(after3), (after2, after3)
    return (max(after2) + min(after3)) / 2


@pytest.mark.timeout(240)
def test_sites_refuse_at_the_budget_and_the_audit_agrees(tmp_path: Path, data_path_env: Path) -> None:
    cfg0 = dp_config(tmp_path)
    cfg = cfg0.replace(dp_epsilon=budget_for_two_rounds(cfg0))
    run_dir = launcher.simulate(cfg)
    rows = Recorder.load(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    accepted = {(r["round"], r["site"]) for r in train if r["accepted"]}
    refused = {(r["round"], r["site"]) for r in train if r.get("refused")}
    assert accepted == {(rnd, s) for rnd in (1, 2) for s in (0, 1)}
    assert refused == {(3, 0), (3, 1)}  # both refused round 3; the run still finished
    assert all("privacy budget" in r["reason"] or "refuses" in r["reason"] for r in train if r.get("refused"))
    eps = {(r["round"], r["site"]): r["epsilon"] for r in train if r["accepted"]}
    assert all(eps[(2, s)] > eps[(1, s)] > 0 for s in (0, 1))  # cumulative, not per round
    assert all(v <= cfg.privacy.epsilon for v in eps.values())
    assert not any("train-loss" in r for r in train)  # the loss is a non-private statistic: kept at the site
    val = {(r["round"], r["site"]) for r in rows if r["split"] == "val" and r["accepted"]}
    assert val == {(rnd, s) for rnd in (1, 2, 3) for s in (0, 1)}  # federated evaluation works under DP
    report = (run_dir / "report.md").read_text()
    assert "epsilon per site per round" in report and "| 3 | R | R |" in report
    assert (run_dir / "plots" / "epsilon_per_site.png").is_file()

    # every ledger verifies; each site wrote exactly its 2 accepted rounds, nothing for the refused one
    ledgers = sorted((run_dir / "ledgers" / ARM).glob("*.ledger.sqlite"))
    assert [p.name for p in ledgers] == ["site-0.ledger.sqlite", "site-1.ledger.sqlite"]
    for path in ledgers:
        v = verify_ledger(path)
        assert v.ok and [e.server_round for e in v.entries] == [1, 2]

    # the audit recomputes with dp-accounting and agrees within 1 %; exit 0, files written
    audit = run_audit([run_dir])
    assert audit.ok, [s.problems for s in audit.sites] + audit.run_problems
    for site in audit.sites:
        assert site.row_checks and all(c.agrees for c in site.row_checks)
        assert site.recomputed["rdp"] == pytest.approx(site.reported_epsilon, rel=0.01)
    result = CliRunner().invoke(cli_app, ["audit", str(run_dir)])
    assert result.exit_code == 0, result.output
    for name in ("audit.json", "audit.md", "audit_epsilon.png"):
        assert (run_dir / "audit" / name).is_file()
    assert json.loads((run_dir / "audit" / "audit.json").read_text())["ok"] is True

    # the empirical canary audit replays site 0's fine-tuning with canaries under the run's DP settings
    result = CliRunner().invoke(cli_app, ["audit", str(run_dir), "--empirical", "--canaries", "60",
                                          "--out", str(tmp_path / "audit-empirical")])
    assert result.exit_code == 0, result.output
    empirical = json.loads((tmp_path / "audit-empirical" / "audit.json").read_text())["empirical"]
    assert empirical["dp"] and empirical["consistent"]
    assert empirical["epsilon_lower_bound"] <= empirical["accountant_epsilon"] <= cfg.privacy.epsilon

    # tamper with a row (after dropping the append-only triggers, as an attacker with file access could)
    with sqlite3.connect(ledgers[1]) as conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE releases SET noise_multiplier = 2.0 WHERE seq = 2")
    result = CliRunner().invoke(cli_app, ["audit", str(run_dir), "--out", str(tmp_path / "audit2")])
    assert result.exit_code == 1
    assert "row 2" in result.output


@pytest.mark.timeout(240)
def test_budget_carries_across_runs_with_a_shared_ledger_dir(tmp_path: Path, data_path_env: Path) -> None:
    cfg0 = dp_config(tmp_path, finetune_rounds=2, ledger_dir=str(tmp_path / "ledgers"))
    budget = budget_for_two_rounds(cfg0.replace(finetune_rounds=3))
    first = launcher.simulate(cfg0.replace(dp_epsilon=budget, run_name="first"))
    second = launcher.simulate(cfg0.replace(dp_epsilon=budget, run_name="second"))
    rows1 = [r for r in Recorder.load(first / "metrics.jsonl") if r["split"] == "train"]
    rows2 = [r for r in Recorder.load(second / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["accepted"] for r in rows1)
    assert rows2 and all(r.get("refused") for r in rows2)  # the budget was spent by the first run
    for path in sorted((tmp_path / "ledgers" / ARM).glob("*.ledger.sqlite")):
        assert len(verify_ledger(path).entries) == 2  # refusals write nothing
    assert run_audit([first]).ok


@pytest.mark.timeout(240)
def test_dp_lora_sends_adapters_and_head_only(tmp_path: Path, data_path_env: Path) -> None:
    cfg = dp_config(tmp_path, pretrain="restore", pretrain_rounds=1, pretrain_batch_size=64, finetune_rounds=1,
                    finetune_mode="lora", dp="all", dp_epsilon=50.0, dp_noise_multiplier=0.0, width=16)
    run_dir = launcher.simulate(cfg)
    rows = Recorder.load(run_dir / "metrics.jsonl")
    pre = [r for r in rows if r["phase"] == "pretrain" and r["split"] == "train"]
    fine = [r for r in rows if r["phase"] == "finetune" and r["split"] == "train"]
    assert pre and fine and all(r["accepted"] for r in pre + fine)
    assert all(r["noise-multiplier"] > 0 for r in pre + fine)  # planned from the budget
    assert all(r["epsilon"] <= 50.0 for r in pre + fine)
    ratio = fine[0]["bytes-sent"] / pre[0]["bytes-sent"]
    assert ratio <= 1 / 20, ratio  # adapters + head against the whole encoder
    assert run_audit([run_dir]).ok


@pytest.mark.timeout(300)
def test_a_site_with_a_bad_or_deleted_ledger_refuses_with_its_reason_not_a_site_error(tmp_path: Path,
                                                                                       data_path_env: Path) -> None:
    """Simulation: a ledger that fails verification, or was deleted while its key stays, is that site's refusal (the
    kind of problem only: no path reaches the server), not a Ray traceback reported as "site -1: site error"."""
    cfg = dp_config(tmp_path, finetune_rounds=1, dp_epsilon=50.0, ledger_dir=str(tmp_path / "ledgers"))
    first = launcher.simulate(cfg.replace(run_name="first"))
    assert run_audit([first]).ok
    folder = tmp_path / "ledgers" / ARM
    (folder / "site-0.ledger.sqlite").unlink()  # site 0's budget would start again from 0
    with sqlite3.connect(folder / "site-1.ledger.sqlite") as conn:  # site 1's recorded noise is raised
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE releases SET noise_multiplier = 9.0 WHERE seq = 1")
    second = launcher.simulate(cfg.replace(run_name="second"))  # every site refuses: the global model is kept
    train = {r["site"]: r for r in Recorder.load(second / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(train) == [0, 1] and all(r.get("refused") and not r["accepted"] for r in train.values())
    assert train[0]["reason"] == ("refused: site 0: its privacy ledger is missing or behind the releases its signing "
                                  "key already signed (reset or rolled back); nothing is released (details in the "
                                  "site's log)")
    assert train[1]["reason"] == ("refused: site 1: its privacy ledger failed verification; nothing is released "
                                  "(details in the site's log)")
    assert str(tmp_path) not in (second / "metrics.jsonl").read_text()
    assert not (folder / "site-0.ledger.sqlite").exists()  # no fresh ledger was started
    report = run_audit([second])
    assert not report.ok
    assert any("anchor" in p and "no readable ledger" in p for p in report.run_problems), report.run_problems
    assert any("row 1" in p for s in report.sites if s.site == "1" for p in s.problems)
