"""Real runs: a 2-site, 2-round Flower simulation on BreastMNIST, standalone arms, and failure clean-up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medfed.config import RunConfig, run_config
from medfed.experiment import arms, prepare, runner
from medfed.experiment.recorder import Recorder
from medfed.models.encoders import InputSpec
from medfed.simulations import launcher
from medfed.task.evaluation import evaluate_state
from medfed.task.model_setup import new_classifier, new_encoder


def small(tmp_path: Path, **changes: object) -> RunConfig:
    base = dict(
        data="breastmnist", num_sites=2, pretrain_rounds=2, pretrain_epochs=1, finetune_rounds=2, finetune_epochs=1,
        pretrain_batch_size=64, width=8, baselines="none", out_dir=str(tmp_path / "runs"), client_cpus=1,
    )
    base.update(changes)
    return run_config(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_two_site_two_round_federated_simulation_on_breastmnist(tmp_path: Path, data_path_env: Path) -> None:
    cfg = small(tmp_path)
    run_dir = launcher.simulate(cfg)
    assert run_dir == tmp_path / "runs" / "breastmnist-federated-simclr-s0"
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]  # no partial left
    for name in ("config.json", "config.toml", "split.json", "data.json", "metrics.jsonl", "summary.json", "report.md",
                 "plots/loss_per_site.png", "plots/test_auc_per_round.png"):
        assert (run_dir / name).is_file(), name
    assert RunConfig.from_flat(json.loads((run_dir / "config.json").read_text())) == cfg
    assert RunConfig.from_toml(run_dir / "config.toml") == cfg  # `medfed simulate --config` reruns the run

    rows = Recorder.load(run_dir / "metrics.jsonl")
    arm = "federated-simclr"
    pre = {(r["round"], r["site"]) for r in rows
           if r["phase"] == "pretrain" and r["split"] == "train" and r["accepted"]}
    fine = {(r["round"], r["site"]) for r in rows
            if r["phase"] == "finetune" and r["split"] == "train" and r["accepted"]}
    val = {(r["round"], r["site"]) for r in rows if r["split"] == "val"}
    test = sorted(r["round"] for r in rows if r["split"] == "test" and r["site"] == "global")
    test_site = {(r["round"], r["site"]) for r in rows if r["split"] == "test-site"}
    assert test_site == {(rnd, site) for rnd in (0, 1, 2) for site in (0, 1)}  # each site's share of the test split
    expected = {(rnd, site) for rnd in (1, 2) for site in (0, 1)}
    assert pre == expected and fine == expected and val == expected and test == [0, 1, 2]
    assert all(r["arm"] == arm for r in rows)

    # only encoder bytes travelled in pretraining
    spec = prepare.prepare(cfg).test.spec
    encoder = new_encoder(cfg, spec).state_dict()
    encoder_bytes = sum(v.numel() * v.element_size() for v in encoder.values())
    assert {r["bytes-sent"] for r in rows if r["phase"] == "pretrain" and r["split"] == "train"} == {encoder_bytes}
    # the server's wall time of every round is recorded beside the sites' rows
    assert sorted(r["round"] for r in rows if r["split"] == "round" and r["phase"] == "pretrain") == [1, 2]

    ckpt = run_dir / "arms" / arm
    assert list(load_file(str(ckpt / "pretrained_encoder.safetensors"))) == sorted(encoder)
    classifier_keys = set(new_classifier(cfg, spec, prepare.prepare(cfg).test.task, 2, None).state_dict())
    assert set(load_file(str(ckpt / "final_model.safetensors"))) == classifier_keys

    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["arms"][arm]["test"]
    assert 0.0 <= final["auc"] <= 1.0 and math.isclose(final["fpr"], 1 - final["specificity"])
    last_test = [r for r in rows if r["split"] == "test" and r["round"] == 2][0]
    assert math.isclose(last_test["auc"], final["auc"])
    # the operating point: calibrated on the sites' pooled validation histograms of that round, applied to test,
    # saved with the final model; round 0 (no federated evaluation yet) has none
    assert 0.0 < final["threshold"] < 1.0 and {"calibrated-accuracy", "calibrated-sensitivity"} <= set(final)
    assert all("threshold" in r for r in rows if r["split"] in ("test", "test-site") and r["round"] >= 1)
    assert not any("threshold" in r for r in rows if r["split"] == "test" and r["round"] == 0)
    assert not any(isinstance(v, list) for r in rows for v in r.values())  # histograms are not written out
    meta = safe_open(str(ckpt / "final_model.safetensors"), "pt").metadata()
    assert float(meta["threshold"]) == final["threshold"]
    report = (run_dir / "report.md").read_text()
    assert "| federated-simclr | federated | simclr |" in report and "test_auc_per_round.png" in report
    assert "Per-site test metrics of the global model" in report and "Per-site validation metrics" in report
    assert f"| federated-simclr | {final['threshold']:.3f} |" in report  # the calibrated operating point's table
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(i for s in split["sites"] for i in s["test"]) == list(range(156))  # BreastMNIST test split


def test_centralized_and_local_only_arms_share_the_partition(tmp_path: Path, data_path_env: Path) -> None:
    cfg = small(tmp_path, mode="local-only", pretrain="byol", baselines="all", pretrain_rounds=1, finetune_rounds=1)
    names = [a.name for a in arms.arms_for(cfg)]
    assert names == ["local-only-byol", "local-only-none", "federated-none", "federated-byol", "centralized-byol"]
    cfg = cfg.replace(baselines="none")
    run_dir = launcher.simulate(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())["arms"]["local-only-byol"]
    per_site = summary["per_site_test"]
    assert set(per_site) == {"0", "1"}
    assert math.isclose(summary["test"]["auc"], (per_site["0"]["auc"] + per_site["1"]["auc"]) / 2)
    # each site calibrates on its own validation split, which needs both classes (site 1's holds positives only)
    data = np.load(data_path_env / "breastmnist.npz")
    for site in json.loads((run_dir / "split.json").read_text())["sites"]:
        both = len(np.unique(data["val_labels"][site["val"]])) == 2
        assert ("threshold" in per_site[str(site["site_id"])]) is both, site["site_id"]
    assert 0.0 < summary["test"]["threshold"] < 1.0
    central = launcher.simulate(cfg.replace(mode="centralized", pretrain="none", run_name="central"))
    rows = Recorder.load(central / "metrics.jsonl")
    split = json.loads((central / "split.json").read_text())
    labelled = sum(len(s["labelled"]) for s in split["sites"])
    assert {r["num-examples"] for r in rows if r["split"] == "train"} == {labelled}  # the union of the sites' labels


def test_a_failing_run_leaves_no_run_directory(
    tmp_path: Path, data_path_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        assert any(p.name.startswith(".") for p in (tmp_path / "runs").iterdir())  # the partial dir existed
        raise RuntimeError("site crashed")

    monkeypatch.setattr(runner, "run_arm", explode)
    with pytest.raises(RuntimeError, match="site crashed"):
        launcher.simulate(small(tmp_path))
    assert list((tmp_path / "runs").iterdir()) == []


def test_an_existing_run_directory_is_not_overwritten(tmp_path: Path, data_path_env: Path) -> None:
    cfg = small(tmp_path, pretrain="none", finetune_rounds=1, mode="centralized")
    first = launcher.simulate(cfg)
    second = launcher.simulate(cfg)
    assert first.name == "breastmnist-centralized-none-s0" and second.name == "breastmnist-centralized-none-s0-2"


@pytest.mark.timeout(300)
def test_3d_smoke_run_on_adrenalmnist3d(tmp_path: Path, data_path_env: Path) -> None:
    cfg = small(
        tmp_path, data="adrenalmnist3d", pretrain="simclr", pretrain_rounds=1, finetune_rounds=1, width=4,
        pretrain_batch_size=64, finetune_batch_size=32,
    )
    run_dir = launcher.simulate(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    data = json.loads((run_dir / "data.json").read_text())
    assert data["spatial_shape"] == [28, 28, 28]
    assert 0.0 <= summary["arms"]["federated-simclr"]["test"]["auc"] <= 1.0


def test_encoder_init_reuses_a_pretrained_encoder_and_skips_pretraining(tmp_path: Path, data_path_env: Path) -> None:
    from medfed.exceptions import ConfigError

    cfg = small(tmp_path, mode="centralized", pretrain="byol", pretrain_rounds=1, finetune_rounds=1, run_name="first")
    first = launcher.simulate(cfg)
    encoder_file = first / "arms" / "centralized-byol" / "pretrained_encoder.safetensors"
    second = launcher.simulate(cfg.replace(encoder_init=str(encoder_file), run_name="second", label_fraction=0.5))
    rows = Recorder.load(second / "metrics.jsonl")
    assert not [r for r in rows if r["phase"] == "pretrain"]
    assert not (second / "arms" / "centralized-byol" / "pretrained_encoder.safetensors").exists()
    assert "encoder loaded from" in (second / "report.md").read_text()
    # the second run starts from the first run's pretrained encoder and the same seeded head, so their
    # models before fine-tuning (round 0) are identical
    def r0(d: Path) -> dict:
        return [r for r in Recorder.load(d / "metrics.jsonl") if r["split"] == "test" and r["round"] == 0][0]

    assert r0(first)["auc"] == r0(second)["auc"]

    wrong = cfg.replace(width=16, encoder_init=str(encoder_file), run_name="third")
    with pytest.raises(ConfigError, match="does not fit this encoder"):
        launcher.simulate(wrong)
    with pytest.raises(ConfigError, match="does not exist"):
        launcher.simulate(cfg.replace(encoder_init=str(tmp_path / "none.safetensors"), run_name="fourth"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["first", "second"]


@pytest.mark.timeout(180)
def test_module_level_server_app_reads_the_run_config_from_its_context(tmp_path: Path, data_path_env: Path) -> None:
    """The ServerApp declared in pyproject.toml, started by Flower with a run config (as `flwr run` does).

    Flower's public `run_simulation` always passes an empty run config, so this drives the same
    simulation engine through its internal entry point with a context that carries one.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from medfed.client_app import app as client_app
    from medfed.server_app import app as server_app

    cfg = small(tmp_path, pretrain_rounds=1, finetune_rounds=1, run_name="from-flwr")
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat())
    _run_simulation(
        num_supernodes=2, client_app=client_app, server_app=server_app, server_app_context=context,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
    )
    run_dir = tmp_path / "runs" / "from-flwr"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["arms"]) == ["federated-simclr"]
    rows = Recorder.load(run_dir / "metrics.jsonl")
    assert {r["site"] for r in rows if r["phase"] == "pretrain" and r["split"] == "train"} == {0, 1}


@pytest.mark.timeout(180)
def test_fedu_with_personal_parts_and_probing_runs_end_to_end(tmp_path: Path, data_path_env: Path) -> None:
    """Issue 16's options together in a real simulation: FedU's shared predictor never reaches the saved encoder,
    the sites report their divergence, and the personalised models are summarised and reported."""
    cfg = small(tmp_path, pretrain="byol", ssl_aggregation="fedu", pretrain_rounds=2, finetune_rounds=3,
                finetune_probe_rounds=1, personal="norm+head", baselines="default")  # with baselines: they run too
    run_dir = launcher.simulate(cfg)
    encoder = load_file(str(run_dir / "arms" / "federated-byol" / "pretrained_encoder.safetensors"))
    assert set(encoder) == set(new_encoder(cfg, cfg_spec(run_dir)).state_dict())  # no ssl-predictor.* in it
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    second = [r for r in rows if r["phase"] == "pretrain" and r["split"] == "train" and r["round"] == 2]
    assert len(second) == 2 and all(r["ssl-divergence"] > 0 and r["predictor-taken"] in (0, 1) for r in second)
    arm = json.loads((run_dir / "summary.json").read_text())["arms"]["federated-byol"]
    assert {"validation", "personalised", "global_on_site_tests"} <= set(arm)
    assert 0 <= arm["personalised"]["test"]["auc"] <= 1 and 0 <= arm["validation"]["auc"] <= 1
    assert "## Personalised models" in (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())["arms"]
    assert set(summary) == {"federated-byol", "local-only-none", "federated-none"}
    assert "personalised" in summary["federated-none"] and "personalised" not in summary["local-only-none"]


@pytest.mark.timeout(240)
def test_server_learning_rate_moves_the_global_encoder_along_the_sites_mean_step(tmp_path: Path,
                                                                                  data_path_env: Path) -> None:
    """FedAvgM's server step in a real simulation: after one pretraining round the sites trained from the same
    seeded encoder in both runs, so with pretrain-server-lr 2 the global encoder is the start plus twice FedAvg's
    step (and with momentum the first round's velocity is that step: the same as lr 1, momentum 0)."""
    cfg = small(tmp_path, pretrain_rounds=1, finetune_rounds=1, run_name="fedavg")
    fedavg = launcher.simulate(cfg)
    scaled = launcher.simulate(cfg.replace(pretrain_server_lr=2.0, pretrain_server_momentum=0.5, run_name="fedavgm"))

    def encoder(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run_dir / "arms" / "federated-simclr" / "pretrained_encoder.safetensors"))

    start = new_encoder(cfg, cfg_spec(fedavg)).state_dict()  # the seeded encoder both runs sent in round 1
    a, b = encoder(fedavg), encoder(scaled)
    assert set(a) == set(b) == set(start)
    moved = 0
    for key, w0 in start.items():
        if not w0.is_floating_point():
            continue
        expected = w0.double() + 2.0 * (a[key].double() - w0.double())
        torch.testing.assert_close(b[key].double(), expected, atol=1e-6, rtol=1e-5)
        moved += int(not torch.equal(a[key], w0))
    assert moved > 0  # the sites did train: the check compares real steps
    config = json.loads((scaled / "config.json").read_text())
    assert config["pretrain-server-lr"] == 2.0 and config["pretrain-server-momentum"] == 0.5


def cfg_spec(run_dir: Path) -> InputSpec:
    """The encoder's input spec, from the run's data.json."""
    data = json.loads((run_dir / "data.json").read_text())
    return InputSpec(data["channels"], tuple(data["spatial_shape"]))


def weighted_validation_auc(rows: list[dict], arm: str) -> dict[int, float]:
    """Each fine-tuning round's mean validation AUC over the sites that have one, weighted by images."""
    pairs: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        if r["arm"] == arm and r["split"] == "val" and isinstance(r.get("auc"), float) and math.isfinite(r["auc"]):
            pairs.setdefault(r["round"], []).append((r["auc"], r["num-examples"]))
    return {rnd: sum(a * n for a, n in p) / sum(n for _, n in p) for rnd, p in pairs.items()}


@pytest.mark.timeout(240)
def test_best_validation_keeps_the_round_whose_global_model_scored_best_on_validation(
        tmp_path: Path, data_path_env: Path) -> None:
    """finetune-select best-validation in a real simulation: the kept round is the validation argmax (here
    round 3 of 4, pinned), the summary reports that round's test and validation metrics, and the saved final
    model is that round's model (it scores that round's test AUC, not the last round's)."""
    cfg = small(tmp_path, pretrain="none", finetune_rounds=4, finetune_lr=0.003, finetune_select="best-validation")
    run_dir = launcher.simulate(cfg)
    arm = "federated-none"
    rows = Recorder.load(run_dir / "metrics.jsonl")
    val = weighted_validation_auc(rows, arm)
    best = min(rnd for rnd, auc in val.items() if auc == max(val.values()))
    selected = [r for r in rows if r["split"] == "selected"]
    assert [(r["round"], r["site"]) for r in selected] == [(best, "global")]
    assert best < 4  # this configuration's validation AUC peaks before the last round (round 3 on this CPU build)
    assert selected[0]["validation-auc"] == pytest.approx(val[best])
    test_rows = {r["round"]: r for r in rows if r["split"] == "test" and r["site"] == "global"}
    test_auc = {rnd: r["auc"] for rnd, r in test_rows.items()}
    assert test_auc[best] != test_auc[4]  # the kept model is told apart from the last one by its test AUC
    summary = json.loads((run_dir / "summary.json").read_text())["arms"][arm]
    assert summary["selected_round"] == best
    assert summary["test"]["auc"] == pytest.approx(test_auc[best])
    assert summary["validation"]["auc"] == pytest.approx(val[best])
    final = run_dir / "arms" / arm / "final_model.safetensors"
    scored = evaluate_state(cfg, prepare.prepare(cfg).test, load_file(str(final)))
    assert scored["auc"] == pytest.approx(test_auc[best], abs=1e-9)
    with safe_open(str(final), "pt") as f:  # the operating point calibrated for the kept round travels with it
        assert float(f.metadata()["threshold"]) == pytest.approx(test_rows[best]["threshold"])
    assert f"{arm}: round {best} (validation AUC {val[best]:.3f})" in (run_dir / "report.md").read_text()


@pytest.mark.timeout(240)
def test_best_validation_in_a_centralized_arm_keeps_its_own_best_round(tmp_path: Path, data_path_env: Path) -> None:
    """The standalone arms choose on their own validation split: the kept round's test metrics are reported and its
    model saved."""
    cfg = small(tmp_path, mode="centralized", pretrain="none", finetune_rounds=4, finetune_lr=0.003,
                finetune_select="best-validation")
    run_dir = launcher.simulate(cfg)
    rows = Recorder.load(run_dir / "metrics.jsonl")
    selected = [r for r in rows if r["split"] == "selected"]
    assert len(selected) == 1 and selected[0]["site"] == "global"
    chosen = selected[0]["round"]
    test_auc = {r["round"]: r["auc"] for r in rows if r["split"] == "test"}
    assert chosen < 4 and test_auc[chosen] != test_auc[4]  # its validation AUC peaks early (round 2 on this build)
    summary = json.loads((run_dir / "summary.json").read_text())["arms"]["centralized-none"]
    assert summary["test"]["auc"] == pytest.approx(test_auc[chosen])
    scored = evaluate_state(cfg, prepare.prepare(cfg).test, load_file(str(run_dir / "arms" / "centralized-none" /
                                                                          "final_model.safetensors")))
    assert scored["auc"] == pytest.approx(test_auc[chosen], abs=1e-9)
