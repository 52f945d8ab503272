"""benchmarks/label_efficiency.py's own logic (no runs): variants, per-fraction variants, the choice on validation.

The benchmark decides which federated SSL variant the issue's targets are judged on, so its parsing and its choice
are pinned here: a variant restricted to 1 % labels must not run, nor be chosen, at 10 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def le() -> ModuleType:
    return load_script("label_efficiency")


def test_variant_without_fractions_runs_everywhere(le: ModuleType) -> None:
    v = le.parse_variant("fedema:ssl-aggregation=fedema,fedema-tau=0.5", [0.1, 0.01])
    assert (v.name, v.flat, v.fractions) == ("fedema", {"ssl-aggregation": "fedema", "fedema-tau": 0.5}, ())
    assert v.runs_at(0.1) and v.runs_at(0.01)


def test_variant_at_one_fraction(le: ModuleType) -> None:
    v = le.parse_variant("ft4@0.01:finetune-epochs=4,finetune-lr=0.003", [0.1, 0.01])
    assert v.name == "ft4" and v.fractions == (0.01,)
    assert v.flat == {"finetune-epochs": 4, "finetune-lr": 0.003}
    assert v.runs_at(0.01) and not v.runs_at(0.1)
    assert le.parse_variant("both@0.1/0.01:", [0.1, 0.01]).fractions == (0.1, 0.01)


@pytest.mark.parametrize("text, rule", [
    ("ft@0.5:finetune-epochs=4", "not one of --fractions"),
    ("ft@abc:finetune-epochs=4", "not a labelled fraction"),
    ("ft@0:x=1", "not one of --fractions"),
    ("bad name:x=1", "the name must be"),
    ("ft:finetune-epochs", "is not KEY=VALUE"),
])
def test_bad_variants_are_refused(le: ModuleType, text: str, rule: str) -> None:
    with pytest.raises(SystemExit, match=rule):
        le.parse_variant(text, [0.1, 0.01])


def row(variant: str | None, seed: int, val: float | None, test: float, dp: bool = False) -> dict[str, Any]:
    return {"variant": variant, "seed": seed, "val_auc": val, "test": {"auc": test}, "dp": dp, "arm": "x"}


def test_choice_is_on_mean_validation_never_on_test(le: ModuleType) -> None:
    rows = [row("a", 0, 0.90, 0.99), row("a", 1, 0.80, 0.99),  # mean val 0.85, best test
            row("b", 0, 0.86, 0.50), row("b", 1, 0.86, 0.50),  # mean val 0.86
            row("c", 0, 0.99, 0.99, dp=True),  # DP runs never compete
            row(None, 0, None, 1.0)]  # baselines never compete
    assert le.choose(rows) == "b"
    assert le.choose([row("a", 0, None, 0.9)]) is None
    # ties go to the earlier variant
    assert le.choose([row("a", 0, 0.9, 0.1), row("b", 0, 0.9, 0.9)]) == "a"


def test_reuse_takes_encoders_of_the_same_pretraining_and_skips_gone_files(le: ModuleType, tmp_path: Path) -> None:
    from medfed.config import RunConfig

    base = le.with_flat(RunConfig.from_flat({**RunConfig().to_flat(), "data": "pneumoniamnist"}),
                        {"pretrain-rounds": 30}, "test")
    meta = [{"config": base.to_flat()}]
    there = tmp_path / "enc.safetensors"
    there.write_bytes(b"x")

    def pretrained(variant: str | None, overrides: dict[str, Any], seed: int, encoder: Path,
                   arm: str = "federated SSL") -> dict[str, Any]:
        return {"dataset": "pneumoniamnist", "seed": seed, "variant": variant, "overrides": overrides,
                "arm": arm, "pretrained": True, "dp": False, "encoder": str(encoder),
                "run_dir": str(tmp_path / "no-run")}

    rows = [pretrained("fedavg", {}, 0, there), pretrained("personal", {"personal": "norm+head"}, 1, there),
            pretrained(None, {}, 2, there, arm=le.CENTRALIZED), pretrained("fedavg", {}, 1, tmp_path / "gone")]
    for r in rows:
        r["pretraining_key"] = le.recomputed_key(r, meta)
    # a fine-tuning-only variant shares FedAvg's pretraining; personal norms and the centralized arm do not
    fedavg = le.pretraining_key(le.with_flat(base, {"finetune-epochs": 4}, "test"), "federated")
    assert rows[0]["pretraining_key"] == fedavg != rows[1]["pretraining_key"]
    assert rows[2]["pretraining_key"] == le.pretraining_key(base, "centralized") != fedavg
    runner = le.Runner("pneumoniamnist", [], {}, lambda: None)
    assert runner.reuse(rows) == 3  # the file that is gone pretrains again
    assert runner.encoders == {(0, fedavg): str(there), (1, rows[1]["pretraining_key"]): str(there),
                               (2, rows[2]["pretraining_key"]): str(there)}
    assert le.Runner("breastmnist", [], {}, lambda: None).reuse(rows) == 0  # another data set's encoders: never
    # a row written before a setting existed (its key lacks it) still matches: the run had the default
    older = {k: v for k, v in json.loads(rows[0]["pretraining_key"]).items() if k != "pretrain-server-momentum"}
    runner = le.Runner("pneumoniamnist", [], {}, lambda: None)
    assert runner.reuse([{**rows[0], "pretraining_key": json.dumps(older)}]) == 1 and (0, fedavg) in runner.encoders
    changed = json.dumps({**older, "pretrain-server-momentum": 0.9})  # another setting's value: never
    runner = le.Runner("pneumoniamnist", [], {}, lambda: None)
    assert runner.reuse([{**rows[0], "pretraining_key": changed}]) == 1 and (0, fedavg) not in runner.encoders


def test_baselines_are_reused_only_from_runs_with_the_same_settings(le: ModuleType, tmp_path: Path) -> None:
    import json

    from medfed.config import RunConfig

    base = le.with_flat(RunConfig.from_flat({**RunConfig().to_flat(), "data": "pneumoniamnist"}),
                        {"pretrain-rounds": 30}, "test")
    other = le.with_flat(base, {"pretrain-rounds": 10}, "test")

    def baseline(arm: str, seed: int, auc: float) -> dict[str, Any]:
        return {"dataset": "pneumoniamnist", "fraction": 0.1, "seed": seed, "arm": arm, "variant": None,
                "test": {"auc": auc}, "run_dir": f"runs/{arm}-{seed}", "dp": False}

    def doc(cfg: RunConfig, rows: list[dict[str, Any]], name: str) -> str:
        flat = {**cfg.to_flat(), "out-dir": f"elsewhere/{name}"}  # where runs were written does not matter
        del flat["pretrain-server-momentum"]  # a file written before the setting existed: it had the default
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"datasets": {"pneumoniamnist": [{"config": flat}]}, "rows": rows}))
        return str(path)

    same = doc(base, [baseline(le.SCRATCH, 0, 0.93), baseline(le.LOCAL_ONLY, 0, 0.83),
                      {**baseline("federated SSL: fedavg", 0, 0.94), "variant": "fedavg"}], "same")
    differs = doc(other, [baseline(le.SCRATCH, 1, 0.5)], "differs")
    saved: list[int] = []
    rows: list[dict[str, Any]] = []
    runner = le.Runner("pneumoniamnist", rows, {}, lambda: saved.append(len(rows)))
    assert runner.reuse_baselines([same, differs], base) == 2  # the SSL row and the other settings' row: never
    assert set(runner.baselines) == {(0.1, 0, le.SCRATCH), (0.1, 0, le.LOCAL_ONLY)}
    got = runner.baseline(base, None, label=le.SCRATCH, seed=0, fraction=0.1)  # no arm: it must not run
    assert got["test"]["auc"] == 0.93 and got["reused_from"] == "runs/federated supervised from scratch-0"
    assert rows == [got] and saved == [1]
    assert le.Runner("breastmnist", [], {}, lambda: None).reuse_baselines([same], base) == 0
    ran: list[tuple[str, int]] = []  # not reused: a seed without an earlier row runs
    runner.run = lambda cfg, arm, *, label, slug, seed, fraction: ran.append((slug, seed)) or {"ran": True}
    assert runner.baseline(base, None, label=le.SCRATCH, seed=1, fraction=0.1) == {"ran": True}
    assert ran == [("scratch", 1)] and rows == [got]  # the reused row was appended once, the run appends its own


def test_the_dp_target_is_judged_on_the_chosen_variants_dp_runs_only(le: ModuleType) -> None:
    def full(variant: str | None, seed: int, val: float | None, test: float, *, dp: bool = False,
             arm: str = "federated SSL") -> dict[str, Any]:
        return {"dataset": "pneumoniamnist", "fraction": 0.1, "seed": seed, "arm": arm, "variant": variant,
                "val_auc": val, "test": {"auc": test, "accuracy": 0.8}, "wall": 1.0, "peak": 1.0, "encoder": "",
                "pretrained": True, "dp": dp, "personal_test_auc": None, "personal_val_auc": None,
                "global_site_test_auc": None}

    dp_arm = le.dp_label(8.0)
    rows = [full("a", s, 0.99, 0.95) for s in range(3)] + [full("b", s, 0.98, 0.96) for s in range(3)]
    rows += [full(None, s, 0.98, 0.92, arm=le.SCRATCH) for s in range(3)]
    rows += [full("b", s, 0.9, 0.99, dp=True, arm=dp_arm) for s in range(3)]  # another encoder's DP runs
    meta = {"command": "c", "date": "d", "cores": 2, "cpu": "x", "device": "cpu", "torch": "t", "minutes": 1.0,
            "settings": "s", "seeds": [0, 1, 2], "fractions": [0.1], "set": {}, "variants": ["a:", "b:"],
            "dp": {"epsilon": 8.0, "delta": 1e-5, "fraction": 0.1}}
    text = le.section("pneumoniamnist", rows, [meta])
    assert "chosen on validation: a" in text
    assert "no DP run fine-tuned the chosen variant's encoders" in text and "test AUC 0.990" not in text
    text = le.section("pneumoniamnist", rows + [full("a", s, 0.9, 0.91, dp=True, arm=dp_arm) for s in range(3)],
                      [meta])
    assert "DP at epsilon 8: test AUC 0.910, mean over 3 runs (target >= 0.93: missed)" in text
    assert f"| {dp_arm} (b) |" in text and f"| {dp_arm} (a) |" in text  # both shown, the target on a's


def test_a_tag_keeps_its_runs_in_a_section_of_their_own(le: ModuleType, tmp_path: Path) -> None:
    """Runs with other run settings (finetune-select best-validation for every arm) are written under
    label_efficiency-TAG-<data>, so their baselines never replace the untagged section's."""
    row = {"dataset": "breastmnist", "fraction": 0.1, "seed": 0, "arm": le.SCRATCH, "variant": None, "val_auc": 0.7,
           "test": {"auc": 0.6, "accuracy": 0.8}, "wall": 1.0, "peak": 1.0, "encoder": "", "pretrained": False,
           "dp": False, "personal_test_auc": None, "personal_val_auc": None, "global_site_test_auc": None}
    meta = {"command": "c", "date": "d", "cores": 2, "cpu": "x", "device": "cpu", "torch": "t", "minutes": 1.0,
            "settings": "s", "seeds": [0], "fractions": [0.1], "set": {}, "variants": [], "dp": None,
            "config": {"finetune-select": "best-validation"}}
    results = tmp_path / "RESULTS.md"
    le.write_all([row], {"breastmnist": [meta]}, results, "select")
    text = results.read_text()
    assert "<!-- label_efficiency-select-breastmnist:start -->" in text
    assert "label_efficiency-breastmnist:" not in text
    assert "## Label efficiency on breastmnist (select)" in text and "the fine-tuning round each run kept" in text
    assert "| test AUC of the last round |" in text
    assert f"| {le.SCRATCH} | 0.700 ± 0.000 | 0.600 ± 0.000 | n/a |" in text
    le.write_all([row], {"breastmnist": [{**meta, "config": {}}]}, results)
    assert "last-round federated evaluation" in results.read_text().split("label_efficiency-breastmnist:start")[1]
    variant = {**row, "arm": "federated SSL: bv", "variant": "bv", "overrides": {"finetune-select": "best-validation"}}
    text = le.section("breastmnist", [row, variant], [{**meta, "config": {}}])  # set by a variant, not --set
    assert "| test AUC of the last round |" in text
    for bad in ("Select", "a b", "-x"):
        with pytest.raises(Exception, match="lower-case"):
            le.tag_name(bad)


def test_without_a_tag_the_command_line_writes_the_untagged_sections(le: ModuleType, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse passes the empty default through ``tag_name`` too: no ``--tag`` must mean no tag, not an error."""
    row = {"dataset": "breastmnist", "fraction": 0.1, "seed": 0, "arm": le.SCRATCH, "variant": None, "val_auc": 0.7,
           "test": {"auc": 0.6, "accuracy": 0.8}, "wall": 1.0, "peak": 1.0, "encoder": "", "pretrained": False,
           "dp": False, "personal_test_auc": None, "personal_val_auc": None, "global_site_test_auc": None,
           "pretraining_key": ""}
    meta = {"command": "c", "date": "d", "cores": 2, "cpu": "x", "device": "cpu", "torch": "t", "minutes": 1.0,
            "settings": "s", "seeds": [0], "fractions": [0.1], "set": {}, "variants": [], "dp": None, "config": {}}
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"datasets": {"breastmnist": [meta]}, "rows": [row]}))
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["label_efficiency.py", "--from-json", str(runs), "--results", str(results)])
    le.main()
    assert "<!-- label_efficiency-breastmnist:start -->" in results.read_text()


def test_the_last_rounds_test_auc_is_read_from_the_runs_metrics(le: ModuleType, tmp_path: Path) -> None:
    """Beside a best-validation run's reported (kept-round) AUC the section shows the last round's, read from the
    run's metrics.jsonl: the global model's for a federated run, the mean of each site's last round for local-only."""
    def write(name: str, rows: list[dict[str, Any]]) -> Path:
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run

    def test_row(rnd: int, site: Any, auc: float, **extra: Any) -> dict[str, Any]:
        return {"phase": "finetune", "split": "test", "round": rnd, "site": site, "auc": auc, **extra}

    federated = write("fed", [test_row(0, "global", 0.5), test_row(2, "global", 0.7), test_row(1, "global", 0.9),
                              {"phase": "finetune", "split": "test-site", "round": 2, "site": 0, "auc": 0.1},
                              {"phase": "finetune", "split": "selected", "round": 1, "site": "global"}])
    assert le.last_round_test_auc(federated) == 0.7
    local = write("local", [test_row(1, 0, 0.6), test_row(2, 0, 0.8), test_row(1, 1, 0.4),
                            test_row(2, 1, 0.1, accepted=False)])
    assert le.last_round_test_auc(local) == pytest.approx((0.8 + 0.4) / 2)
    assert le.last_round_test_auc(tmp_path / "gone") is None


def test_dp_runs_of_several_recipes_are_shown_apart_and_the_target_takes_the_one_best_on_validation(
        le: ModuleType, tmp_path: Path) -> None:
    """``--dp-set`` rows (e.g. a head-only DP recipe) beside the plain DP recipe's: both in the table, the target on
    the chosen variant's recipe with the higher mean validation AUC, never on test."""
    def full(seed: int, val: float, test: float, *, dp_set: dict[str, Any] | None = None) -> dict[str, Any]:
        row = {"dataset": "pneumoniamnist", "fraction": 0.1, "seed": seed, "arm": le.dp_label(8.0), "variant": "a",
               "val_auc": val, "test": {"auc": test, "accuracy": 0.8}, "wall": 1.0, "peak": 1.0, "encoder": "",
               "pretrained": False, "dp": True, "personal_test_auc": None, "personal_val_auc": None,
               "global_site_test_auc": None}
        return {**row, "dp_set": dp_set} if dp_set else row

    ssl = [{**full(s, 0.99, 0.95), "arm": "federated SSL", "dp": False, "pretrained": True} for s in range(3)]
    scratch = [{**full(s, 0.98, 0.92), "arm": le.SCRATCH, "variant": None, "dp": False} for s in range(3)]
    linear = {"finetune-mode": "linear", "finetune-lr": 0.05}
    meta = {"command": "c", "date": "d", "cores": 2, "cpu": "x", "device": "cpu", "torch": "t", "minutes": 1.0,
            "settings": "s", "seeds": [0, 1, 2], "fractions": [0.1], "set": {}, "variants": ["a:"],
            "dp": {"epsilon": 8.0, "delta": 1e-5, "fraction": 0.1, "set": linear}}
    plain = [full(s, 0.90, 0.99) for s in range(3)]  # best on test, worse on validation: not the one judged
    head = [full(s, 0.92, 0.931, dp_set=linear) for s in range(3)]
    text = le.section("pneumoniamnist", ssl + scratch + plain + head, [meta])
    assert f"| {le.dp_label(8.0)} (a) |" in text
    assert f"| {le.dp_label(8.0)} (a, finetune-mode=linear,finetune-lr=0.05) |" in text
    assert ("DP at epsilon 8 (finetune-mode=linear,finetune-lr=0.05, chosen on validation): test AUC 0.931, mean over "
            "3 runs (target >= 0.93: met)") in text
    # merged from files, the two recipes' runs of one seed stay apart
    for name, part in (("plain.json", plain), ("head.json", head)):
        (tmp_path / name).write_text(json.dumps({"datasets": {"pneumoniamnist": [meta]},
                                                 "rows": [{**r, "pretraining_key": "", "last_round_test_auc": None}
                                                          for r in part]}))
    rows, _ = le.load([str(tmp_path / "plain.json"), str(tmp_path / "head.json")], quiet=True)
    assert len(rows) == 6
    worse = [full(s, 0.80, 0.931, dp_set=linear) for s in range(3)]
    text = le.section("pneumoniamnist", ssl + scratch + plain + worse, [meta])
    assert "DP at epsilon 8: test AUC 0.990, mean over 3 runs (target >= 0.93: met)" in text
    assert le.choose_dp([]) is None


def test_dp_set_refuses_the_dp_arms_own_settings_before_any_run(le: ModuleType, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["label_efficiency.py", "--datasets", "pneumoniamnist", "--dp-set",
                                      "finetune-mode=linear", "dp-epsilon=3", "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--dp-set dp-epsilon: dp, dp-epsilon and encoder-init are the DP arm's own"):
        le.main()
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written
    assert le.dp_settings(["finetune-mode=linear", "finetune_lr=0.05"]) == {"finetune-mode": "linear",
                                                                           "finetune-lr": 0.05}


def test_last_rounds_reads_every_run_at_its_last_round(le: ModuleType, tmp_path: Path) -> None:
    """``--last-rounds``: a best-validation run's row becomes what ``finetune-select last`` reports: the last round's
    validation mean (weighted by the sites' images) and test metrics, not the kept round's; local-only: mean over
    sites' last rows. A run whose metrics are gone is refused, not skipped."""
    def run(name: str, metrics: list[dict[str, Any]]) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        return str(d)

    def m(split: str, rnd: int, site: str, auc: float, n: int = 10, acc: float = 0.5) -> dict[str, Any]:
        return {"phase": "finetune", "split": split, "round": rnd, "site": site, "auc": auc, "accuracy": acc,
                "num-examples": n}

    fed = run("fed", [m("val", 1, "0", 0.99), m("val", 1, "1", 0.99), m("test", 1, "global", 0.95, acc=0.9),
                      m("val", 2, "0", 0.70, n=30), m("val", 2, "1", 0.90), m("test", 2, "global", 0.60, acc=0.4),
                      {**m("test", 3, "global", 0.1), "accepted": False}, {"phase": "finetune", "split": "selected",
                                                                           "round": 1, "site": "global"}])
    local = run("local", [m("test", 1, "0", 0.7), m("test", 2, "0", 0.8), m("test", 1, "1", 0.5)])
    base = {"dataset": "pneumoniamnist", "fraction": 0.1, "seed": 0, "arm": "x", "variant": "a", "dp": False,
            "val_auc": 0.99, "test": {"auc": 0.95, "accuracy": 0.9}, "last_round_test_auc": 0.6,
            "overrides": {"finetune-select": "best-validation"}}
    got = le.as_last_round({**base, "run_dir": fed})
    assert got["val_auc"] == pytest.approx((0.70 * 30 + 0.90 * 10) / 40)
    assert got["test"] == {"auc": pytest.approx(0.60), "accuracy": pytest.approx(0.4)}
    got = le.as_last_round({**base, "variant": None, "run_dir": local})
    assert got["val_auc"] is None and got["test"]["auc"] == pytest.approx((0.8 + 0.5) / 2)
    with pytest.raises(SystemExit, match="gone"):
        le.as_last_round({**base, "run_dir": str(tmp_path / "nothing")})
    meta = {"command": "c", "date": "d", "cores": 2, "cpu": "x", "device": "cpu", "torch": "t", "minutes": 1.0,
            "settings": "s", "seeds": [0], "fractions": [0.1], "set": {}, "variants": ["a:"], "dp": None,
            "config": {"finetune-select": "best-validation"}}
    results = tmp_path / "RESULTS.md"
    row = {**base, "run_dir": fed, "wall": 1.0, "peak": 1.0, "encoder": "", "pretrained": True,
           "personal_test_auc": None, "personal_val_auc": None, "global_site_test_auc": None,
           "arm": "federated SSL"}
    le.write_all([row], {"pneumoniamnist": [meta]}, results, "last", last_rounds=True)
    text = results.read_text()
    assert "read at its last fine-tuning round" in text and "test AUC of the last round" not in text
    assert "| federated SSL: a | 0.750 ± 0.000 | 0.600 ± 0.000 |" in text


def test_last_rounds_without_from_json_is_refused(le: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["label_efficiency.py", "--last-rounds"])
    with pytest.raises(SystemExit):
        le.main()
    assert "--last-rounds reads finished runs: give it --from-json" in capsys.readouterr().err
