"""The ledger's holes closed (issue 12): a ledger deleted or rolled back while its key stays is refused (the anchor
beside the key) and caught by the audit; `--dp none` releases are recorded; each row carries the budget in force
and is judged against it; an unreadable ledger is one failed audit entry; a site whose ledger fails verification
refuses the round without sending a path."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import make_metadata
from flwr.app import ArrayRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from medfed.cli import app as cli_app
from medfed.client_app import app as client_app
from medfed.config import RunConfig, run_config
from medfed.constants import MetricKey, Phase
from medfed.data.medmnist import load_medmnist
from medfed.data.partition import SPLIT_FILE
from medfed.data.site import site_from_own_file
from medfed.exceptions import ConfigError, LedgerError, LedgerResetError, LedgerVerificationError
from medfed.experiment.phases import ArmContext
from medfed.experiment.prepare import prepare
from medfed.experiment.recorder import Recorder
from medfed.privacy.accounting import MechanismStep, epsilon_spent
from medfed.privacy.audit import run_audit, write_audit
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.privacy.ledger import (
    MECHANISM_DP_SGD,
    MECHANISM_NONE,
    Ledger,
    Release,
    anchor_path_for_key,
    load_or_create_signing_key,
    read_anchor,
    verify_ledger,
)
from medfed.strategies.shared_weights import refusal_reason
from medfed.task.algo import SiteAlgo
from medfed.task.model_setup import new_classifier
from medfed.task.site_round import privacy_guard

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SITE = "h1"
ROUNDS = [(0.2, 10), (0.2, 10), (0.25, 8), (0.2, 10)]


def release(i: int, **changes: object) -> Release:
    values: dict[str, object] = dict(run_id="run-1", server_round=i, phase="finetune", mechanism=MECHANISM_DP_SGD,
                                     sample_rate=0.01, noise_multiplier=1.1, steps=100, delta=1e-5,
                                     epsilon_after=0.1 * (i + 1), accountant="rdp")
    values.update(changes)
    return Release(**values)  # type: ignore[arg-type]


@pytest.fixture()
def keyed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A ledger path, its key and the anchor beside the key (in another folder than the ledger)."""
    key_path = tmp_path / "keys" / "h1.ed25519.pem"
    load_or_create_signing_key(key_path)
    return tmp_path / "ledger" / "h1.ledger.sqlite", key_path, anchor_path_for_key(key_path)


def open_anchored(keyed: tuple[Path, Path, Path]) -> Ledger:
    ledger, key_path, anchor = keyed
    return Ledger.open(ledger, load_or_create_signing_key(key_path), SITE, anchor=anchor)


def fill(keyed: tuple[Path, Path, Path], n: int, start: int = 0) -> None:
    with open_anchored(keyed) as ledger:
        for i in range(start, start + n):
            ledger.append(release(i))


# ---- 1. the anchor: a site refuses a fresh or older ledger where its key already signed one ----------------------


def test_the_anchor_beside_the_key_follows_every_append(keyed: tuple[Path, Path, Path]) -> None:
    ledger, key_path, anchor_path = keyed
    assert anchor_path.name == "h1.ed25519.anchor.json" and anchor_path.parent == key_path.parent
    fill(keyed, 3)
    anchor = read_anchor(anchor_path)
    rows = verify_ledger(ledger).entries
    assert (anchor.site, anchor.seq, anchor.row_hash, anchor.ledger) == (SITE, 3, rows[-1].row_hash, str(ledger))
    assert [p.name for p in anchor_path.parent.iterdir() if p.name.endswith(".tmp")] == []  # replaced atomically
    data = json.loads(anchor_path.read_text())
    anchor_path.write_text(json.dumps({**data, "seq": 1}))  # a forged anchor (without the key) is refused
    with pytest.raises(LedgerVerificationError, match="signature invalid"):
        read_anchor(anchor_path)
    with pytest.raises(LedgerVerificationError, match="anchor"):
        open_anchored(keyed)


def test_a_deleted_ledger_is_refused_while_its_key_and_anchor_stay(keyed: tuple[Path, Path, Path]) -> None:
    ledger = keyed[0]
    fill(keyed, 3)
    ledger.unlink()
    with pytest.raises(LedgerResetError) as info:
        open_anchored(keyed)
    message = str(info.value)
    assert str(ledger) in message and "does not exist" in message
    assert "already signed a ledger with 3 release(s)" in message and "restore the ledger from backup" in message
    assert not ledger.exists()  # no fresh ledger was started


def test_an_older_copy_or_another_ledger_of_the_same_key_is_refused(keyed: tuple[Path, Path, Path],
                                                                     tmp_path: Path) -> None:
    ledger, key_path, _ = keyed
    fill(keyed, 2)
    shutil.copy(ledger, tmp_path / "old.sqlite")
    fill(keyed, 2, start=2)
    shutil.copy(tmp_path / "old.sqlite", ledger)  # rolled back to a genuine older copy: it verifies on its own
    assert verify_ledger(ledger).ok
    with pytest.raises(LedgerResetError, match="holds 2 release\\(s\\) but its key already signed 4"):
        open_anchored(keyed)
    ledger.unlink()  # a fresh ledger with the same key, filled without the anchor, longer than the real one
    with Ledger.open(ledger, load_or_create_signing_key(key_path), SITE) as other:
        for i in range(5):
            other.append(release(i, epsilon_after=0.05 * (i + 1)))
    with pytest.raises(LedgerResetError, match="row 4 is not the row 4 its key signed"):
        open_anchored(keyed)


def test_a_ledger_ahead_of_its_anchor_is_used_and_the_anchor_caught_up(keyed: tuple[Path, Path, Path]) -> None:
    """A crash between the ledger's commit and the anchor's update leaves the anchor one row behind: fine."""
    ledger, key_path, anchor_path = keyed
    fill(keyed, 2)
    with Ledger.open(ledger, load_or_create_signing_key(key_path), SITE) as unanchored:
        unanchored.append(release(2))
    assert read_anchor(anchor_path).seq == 2
    with open_anchored(keyed) as reopened:
        assert len(reopened.entries()) == 3
    assert read_anchor(anchor_path).seq == 3


def test_a_replaced_key_is_refused_by_the_anchor_it_left(keyed: tuple[Path, Path, Path]) -> None:
    ledger, key_path, _ = keyed
    fill(keyed, 2)
    ledger.unlink()
    key_path.unlink()  # ledger and key gone, the anchor kept: a new key would start a fresh budget
    with pytest.raises(LedgerResetError, match="records 2 release\\(s\\) of site 'h1'.*key was replaced"):
        open_anchored(keyed)


def cfg(**changes: object) -> RunConfig:
    base = dict(data="breastmnist", pretrain="none", width=8, finetune_batch_size=16, finetune_rounds=4,
                dp="finetune", dp_noise_multiplier=1.2, dp_delta=1e-4, dp_epsilon=20.0)
    base.update(changes)
    return run_config(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site(shared_data: Path):
    return site_from_own_file(load_medmnist(str(shared_data / "breastmnist.npz")), 0, 0.1, 0)


def guard(c: RunConfig, folder: Path, node_config: dict | None = None, run_id: str = "run-1") -> PrivacyGuard:
    return PrivacyGuard(SitePrivacy.resolve(c, "0", node_config or {}, folder), run_id)


def test_a_site_whose_ledger_was_deleted_refuses_before_training(site, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg()
    state = new_classifier(c, site.spec, site.task, site.num_classes, None).state_dict()
    for rnd in (1, 2):
        SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(state, rnd)
    (tmp_path / "site-0.ledger.sqlite").unlink()  # the budget would start again from 0

    from medfed.task import algo

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the ledger was reset")

    monkeypatch.setattr(algo, "dp_train_loop", no_training)
    with pytest.raises(LedgerResetError, match="already signed a ledger with 2 release\\(s\\) .*restore the ledger"):
        SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(state, 3)
    assert not (tmp_path / "site-0.ledger.sqlite").exists()


# ---- 2. a run without DP records every release, and no epsilon changes ---------------------------------------------


def test_releases_without_dp_are_recorded_and_change_no_epsilon(site, tmp_path: Path) -> None:
    none = cfg(dp="none")
    state = new_classifier(none, site.spec, site.task, site.num_classes, None).state_dict()
    shared, stats = SiteAlgo(none, site, guard(none, tmp_path, run_id="run-0")).finetune_round(state, 1)
    assert stats.privacy == {}  # nothing to report: no DP, no epsilon
    rows = verify_ledger(tmp_path / "site-0.ledger.sqlite").entries
    assert [(r.run_id, r.phase, r.server_round, r.mechanism, r.epsilon_after, r.steps) for r in rows] == [
        ("run-0", "finetune", 1, MECHANISM_NONE, 0.0, 0)]
    # a DP run on the same ledger: its epsilon is exactly the golden value of a first DP round
    dp = cfg()
    _, stats = SiteAlgo(dp, site, guard(dp, tmp_path)).finetune_round(state, 1)
    n = len(site.labelled_images)
    step = MechanismStep(1.2, min(1.0, 16 / n), -(-n // 16))
    assert stats.privacy[MetricKey.EPSILON] == pytest.approx(epsilon_spent([step], 1e-4, "rdp"), rel=1e-9)
    assert stats.privacy[MetricKey.EPSILON] == pytest.approx(3.319190557139267, rel=1e-9)  # sigma 1.2, delta 1e-4
    report = run_audit([tmp_path])
    assert report.ok, report.sites[0].problems
    assert [(u["run_id"], u["phase"], u["round"]) for u in report.sites[0].uncovered] == [("run-0", "finetune", 1)]
    assert len(report.sites[0].row_checks) == 1 and report.sites[0].row_checks[0].agrees


def test_a_deployed_site_needs_a_ledger_path_even_without_dp(site) -> None:
    with pytest.raises(ConfigError, match="ledger-path.*with or without DP"):
        privacy_guard(cfg(dp="none"), site, {"data-path": "/somewhere/h1.npz"}, {})


@pytest.fixture()
def arm(tmp_path: Path, data_path_env: Path):
    def make(**changes: object) -> ArmContext:
        c = run_config(data="breastmnist", num_sites=2, pretrain="none", finetune_batch_size=16, width=8, **changes)
        prep = prepare(c)
        prep.plan.save(tmp_path / SPLIT_FILE)
        return ArmContext("federated-none", c, tmp_path, prep.data.path, prep.test, Recorder(tmp_path / "m.jsonl"))

    return make


def send(ctx: ArmContext, state: dict[str, torch.Tensor], rnd: int, site_id: int = 0) -> Message:
    config = ctx.message_config(Phase.FINETUNE)
    config["server-round"] = rnd
    msg = Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), metadata=make_metadata(dst_node_id=5))
    context = Context(run_id=1, node_id=5, node_config={"partition-id": site_id, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    return client_app(msg, context)


def test_the_client_app_records_a_release_without_dp(arm) -> None:
    ctx = arm(finetune_epochs=1)
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
    reply = send(ctx, state, 1)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert "epsilon" not in dict(next(iter(reply.content.metric_records.values())))
    rows = verify_ledger(ctx.ledger_dir / "site-0.ledger.sqlite").entries
    assert [(r.mechanism, r.phase, r.server_round) for r in rows] == [(MECHANISM_NONE, "finetune", 1)]


# ---- 5. a ledger that fails verification: the site refuses, naming no path ------------------------------------------


def test_a_site_whose_ledger_fails_verification_refuses_and_sends_no_path(arm, tmp_path: Path) -> None:
    ctx = arm(finetune_epochs=1, dp="finetune", dp_noise_multiplier=1.0, dp_delta=1e-4, dp_epsilon=50.0,
              label_fraction=0.2)
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
    first = send(ctx, state, 1)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    ledger = ctx.ledger_dir / "site-0.ledger.sqlite"
    with sqlite3.connect(ledger) as conn:  # an attacker with file access lowers the recorded noise
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE releases SET noise_multiplier = 5.0 WHERE seq = 1")
    reply = send(ctx, state, 2)
    assert not reply.has_error(), reply.error.reason  # a refusal, not a site error
    assert not reply.content.array_records
    metrics = dict(next(iter(reply.content.metric_records.values())))
    assert metrics == {"site-id": 0, "refused": 1.0}  # no epsilon from a ledger that cannot be trusted
    reason = refusal_reason(reply.content)
    assert reason == ("site 0: its privacy ledger failed verification; nothing is released (details in the site's "
                      "log)")
    assert str(tmp_path) not in reason and "sqlite" not in reason
    assert len(verify_ledger(ledger).entries) == 1  # nothing recorded either


# ---- 1 and 3 and 4: the audit -------------------------------------------------------------------------------------


def build(folder: Path, budget: float = 3.0, run_id: str = "run-A/federated-none", sites: int = 2,
          rounds: list[tuple[float, int]] = ROUNDS, copy_after: int | None = None) -> Path | None:
    """Each site: DP rounds with planned noise, as in tests/test_audit.py; optionally a copy of site 1's ledger after
    ``copy_after`` rows (a backup an attacker could put back)."""
    c = run_config(pretrain="none", dp="finetune", dp_epsilon=budget, dp_delta=1e-5)
    backup = None
    for s in range(sites):
        g = PrivacyGuard(SitePrivacy.resolve(c, str(s), {}, folder), run_id)
        for i, (q, steps) in enumerate(rounds):
            if s == 1 and i == copy_after:
                backup = folder.parent / "backup.sqlite"
                shutil.copy(folder / "site-1.ledger.sqlite", backup)
            g.record_dp(g.plan(q, steps, rounds[i + 1:]), Phase.FINETUNE, i + 1)
    return backup


def test_the_audit_fails_a_ledger_rolled_back_behind_its_anchor(tmp_path: Path) -> None:
    folder = tmp_path / "federated-none"
    backup = build(folder, copy_after=2)
    assert run_audit([folder]).ok
    assert backup is not None
    shutil.copy(backup, folder / "site-1.ledger.sqlite")  # the genuine older copy, with its own signed head
    assert verify_ledger(folder / "site-1.ledger.sqlite").ok  # on its own it verifies
    report = run_audit([folder])
    bad = {s.site: s for s in report.sites}
    assert bad["0"].ok and not bad["1"].ok and not report.ok
    assert bad["1"].anchor == str(folder / "site-1.ed25519.anchor.json")
    assert any("holds 2 release(s) but its key already signed 4" in p for p in bad["1"].problems), bad["1"].problems
    result = CliRunner().invoke(cli_app, ["audit", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "already signed 4" in result.output


def test_the_audit_fails_a_deleted_ledger_whose_anchor_remains(tmp_path: Path) -> None:
    folder = tmp_path / "federated-none"
    build(folder)
    (folder / "site-1.ledger.sqlite").unlink()
    report = run_audit([folder])
    assert [s.site for s in report.sites] == ["0"] and report.sites[0].ok and not report.ok
    assert len(report.run_problems) == 1 and "signed a ledger with 4 release(s)" in report.run_problems[0]
    assert "no readable ledger signed by that key was found" in report.run_problems[0]


def test_the_audit_takes_anchors_kept_elsewhere(tmp_path: Path) -> None:
    folder = tmp_path / "federated-none"
    backup = build(folder, copy_after=1)
    audited = tmp_path / "sent-to-the-officer"  # only the (rolled back) ledger file, without its anchor
    audited.mkdir()
    shutil.copy(backup, audited / "site-1.ledger.sqlite")  # type: ignore[arg-type]
    assert run_audit([audited / "site-1.ledger.sqlite"]).ok  # nothing to compare with: the limit
    report = run_audit([audited / "site-1.ledger.sqlite"], anchors=folder)
    assert not report.ok and any("holds 1 release(s) but its key already signed 4" in p
                                 for p in report.sites[0].problems)
    result = CliRunner().invoke(cli_app, ["audit", str(audited / "site-1.ledger.sqlite"), "--anchors",
                                          str(folder / "site-1.ed25519.anchor.json"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output


def test_each_row_is_judged_against_the_budget_in_force_when_it_was_written(tmp_path: Path) -> None:
    folder = tmp_path / "federated-none"
    build(folder, budget=3.0, run_id="run-A/federated-none", sites=1)
    build(folder, budget=6.0, run_id="run-B/federated-none", sites=1)  # a later run with a larger budget
    rows = verify_ledger(folder / "site-0.ledger.sqlite").entries
    assert [r.epsilon_budget for r in rows] == [3.0] * 4 + [6.0] * 4
    assert rows[3].epsilon_after <= 3.0 < rows[-1].epsilon_after <= 6.0
    report = run_audit([folder], budget=3.0)  # e.g. the audit of run A, whose dp-epsilon was 3
    assert report.ok, report.sites[0].problems
    assert report.sites[0].budget == 6.0 and [r["budget"] for r in report.sites[0].releases][3:5] == [3.0, 6.0]
    # a row over the budget it recorded fails (the row is re-signed: only its budget breaks the rule)
    over = tmp_path / "over"
    with Ledger.open(over / "site-0.ledger.sqlite", load_or_create_signing_key(over / "k.pem"), "0") as ledger:
        ledger.append(release(1, delta=1e-5, epsilon_after=3.5, epsilon_budget=3.0, noise_multiplier=0.7,
                              sample_rate=0.2, steps=30))
    report = run_audit([over], budget=10.0, tolerance=0.99)
    assert any("over the budget 3 in force when it was written" in p for p in report.sites[0].problems)


def test_rows_without_a_recorded_budget_fall_back_to_the_audits(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    key = load_or_create_signing_key(tmp_path / "k.pem")
    with Ledger.open(folder / "site-0.ledger.sqlite", key, "0") as ledger:  # written as before budgets were recorded
        ledger.append(release(1, epsilon_after=4.0, noise_multiplier=0.7, sample_rate=0.2, steps=30))
    assert verify_ledger(folder / "site-0.ledger.sqlite").entries[0].epsilon_budget is None
    report = run_audit([folder], budget=3.0, tolerance=0.99)
    assert any("over the budget 3 of this audit (the row records none)" in p for p in report.sites[0].problems)


def test_a_ledger_from_before_budgets_were_recorded_still_verifies_and_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "site-0.ledger.sqlite"
    key = load_or_create_signing_key(tmp_path / "k.pem")
    with Ledger.open(path, key, "0") as ledger:
        ledger.append(release(1))
    with sqlite3.connect(path) as conn:  # the file as medfed wrote it before the column existed
        conn.execute("ALTER TABLE releases DROP COLUMN epsilon_budget")
    assert verify_ledger(path).ok and verify_ledger(path).entries[0].epsilon_budget is None
    with Ledger.open(path, key, "0") as ledger:
        ledger.append(release(2, epsilon_budget=8.0))
    rows = verify_ledger(path)
    assert rows.ok and [e.epsilon_budget for e in rows.entries] == [None, 8.0]
    with sqlite3.connect(path) as conn:  # the budget is signed: raising it is caught
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE releases SET epsilon_budget = 80 WHERE seq = 2")
    assert any("row 2: hash does not match" in p for p in verify_ledger(path).problems)


def test_one_unreadable_ledger_is_a_failed_entry_and_the_others_are_audited(tmp_path: Path) -> None:
    folder = tmp_path / "federated-none"
    build(folder)
    (folder / "site-1.ledger.sqlite").write_bytes(b"not a database, just bytes" * 100)
    report = run_audit([folder])
    by_site = {s.site: s for s in report.sites}
    assert by_site["0"].ok and by_site["0"].rows == 4
    assert not by_site["1"].readable and not report.ok
    reason = by_site["1"].problems[0]
    assert reason.startswith("cannot be audited: ") and "site-1.ledger.sqlite" in reason and "SQLite" in reason
    out = tmp_path / "out"
    result = CliRunner().invoke(cli_app, ["audit", str(folder), "--out", str(out)])
    assert result.exit_code == 1 and "cannot be audited" in result.output
    assert json.loads((out / "audit.json").read_text())["ok"] is False
    assert "Verdict: FAILED" in (out / "audit.md").read_text()
    write_audit(report, tmp_path / "again")  # the report of a failed entry is written like any other
    with pytest.raises(LedgerError, match="does not exist"):  # a missing target is still bad input
        run_audit([tmp_path / "nowhere"])


def test_the_servers_record_is_the_second_witness_when_ledger_and_anchor_are_both_deleted(tmp_path: Path) -> None:
    """The remaining limit of the anchor, and what catches it: a site that loses ledger *and* anchor (or an attacker
    who deletes both) starts a fresh ledger that verifies on its own; the server's metrics.jsonl still lists the
    releases the old ledger held, and the audit of that run directory names them."""
    shared = tmp_path / "site-ledgers"
    run_dir = tmp_path / "run-A"
    run_dir.mkdir()
    none = run_config(pretrain="none", dp="none", ledger_dir=str(shared))
    (run_dir / "config.json").write_text(json.dumps(none.to_flat()))
    (run_dir / "summary.json").write_text(json.dumps({"run_id": "run-A"}))
    rows = []
    for s in (0, 1):
        g = PrivacyGuard(SitePrivacy.resolve(none, str(s), {}, shared / "federated-none"), "run-A/federated-none")
        for rnd in (1, 2):
            g.record_uncovered(Phase.FINETUNE, rnd)
            rows.append({"arm": "federated-none", "phase": "finetune", "round": rnd, "site": s, "split": "train",
                         "accepted": True, "num-examples": 10})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = run_audit([run_dir])
    assert report.ok, [s.problems for s in report.sites] + report.run_problems
    assert sum(len(s.uncovered) for s in report.sites) == 4 and report.uncovered_runs  # all of it uncovered

    folder = shared / "federated-none"
    (folder / "site-1.ledger.sqlite").unlink()
    (folder / "site-1.ed25519.anchor.json").unlink()
    later = PrivacyGuard(SitePrivacy.resolve(none, "1", {}, folder), "run-B/federated-none")
    later.record_uncovered(Phase.FINETUNE, 1)  # a fresh ledger, accepted by the site: nothing left to compare with
    assert verify_ledger(folder / "site-1.ledger.sqlite").ok
    report = run_audit([run_dir])
    assert all(s.ok for s in report.sites) and not report.ok
    assert report.run_problems == [
        f"federated-none site 1 finetune round {rnd}: the server accepted an update without DP; the site's ledger has "
        "no such release (deleted or reset?)" for rnd in (1, 2)]


def test_a_row_with_impossible_values_is_listed_not_a_crash_of_the_audit(tmp_path: Path) -> None:
    folder = tmp_path / "federated-none"
    build(folder)
    with sqlite3.connect(folder / "site-1.ledger.sqlite") as conn:  # noise 0 cannot be recomputed at all
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE releases SET noise_multiplier = 0 WHERE seq = 2")
    report = run_audit([folder])
    by_site = {s.site: s for s in report.sites}
    assert by_site["0"].ok and not by_site["1"].ok
    problems = by_site["1"].problems
    assert any(p.startswith("row 2: epsilon cannot be recomputed") for p in problems), problems
