"""SecAgg+ and central DP in a real Flower simulation (the same ServerApp/ClientApp as a deployment):
the secure sum equals plain averaging up to SecAgg+'s quantisation; a site refusing at its privacy
budget drops out of the sum with weight 0 while the others go on; the central ledger, the sites'
ledgers and the report agree, and the audit passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from medfed.config import RunConfig, run_config
from medfed.experiment import prepare
from medfed.experiment.recorder import Recorder
from medfed.privacy.accounting import MechanismStep, epsilon_spent
from medfed.privacy.audit import run_audit
from medfed.privacy.central import CENTRAL_ACCOUNTANT
from medfed.privacy.ledger import verify_ledger
from medfed.simulations import launcher
from medfed.task.model_setup import new_encoder

ARM = "federated-simclr"


def config(tmp_path: Path, name: str, **changes: object) -> RunConfig:
    base = dict(data="breastmnist", num_sites=3, partition="iid", pretrain="simclr", pretrain_rounds=1,
                pretrain_batch_size=32, finetune_rounds=1, finetune_batch_size=16, width=8, baselines="none",
                label_fraction=0.3, out_dir=str(tmp_path / "runs"), client_cpus=1, run_name=name)
    base.update(changes)
    return run_config(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(300)
def test_the_secure_sum_equals_plain_averaging_up_to_quantisation(tmp_path: Path, data_path_env: Path) -> None:
    plain = launcher.simulate(config(tmp_path, "plain"))
    secure = launcher.simulate(config(tmp_path, "secure", secure_aggregation="secagg+"))
    a = load_file(plain / "arms" / ARM / "pretrained_encoder.safetensors")
    b = load_file(secure / "arms" / ARM / "pretrained_encoder.safetensors")
    assert a.keys() == b.keys()
    # IID sites of equal size: FedAvg's example weights are equal, so both are the plain mean; SecAgg+ quantises each
    # value to 16 / 2**22 (about 4e-6) with stochastic rounding
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert 0 < worst < 2e-5, worst
    rows = Recorder.load(secure / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert {(r["phase"], r["site"]) for r in train if r["accepted"]} == {(p, s) for p in ("pretrain", "finetune")
                                                                          for s in (0, 1, 2)}
    assert not any("bytes-sent" in r for r in train)  # the server never held a site's update to measure
    assert "**SecAgg+**" in (secure / "report.md").read_text()
    # FedAvgM's server step on SecAgg+'s unmasked mean: the start plus twice the mean's step (one round, so the
    # velocity is that step), up to the quantisation of both secure sums
    moved = launcher.simulate(config(tmp_path, "secure-fedavgm", secure_aggregation="secagg+",
                                     pretrain_server_lr=2.0, pretrain_server_momentum=0.9))
    c = load_file(moved / "arms" / ARM / "pretrained_encoder.safetensors")
    cfg = config(tmp_path, "plain")
    start = {k: v.numpy() for k, v in new_encoder(cfg, prepare.prepare(cfg).test.spec).state_dict().items()}
    worst = max(float(np.abs(c[k] - (start[k] + 2.0 * (a[k] - start[k]))).max()) for k in a)
    assert worst < 6e-5, worst
    assert max(float(np.abs(c[k] - a[k]).max()) for k in a) > 1e-3  # the step did move the encoder beyond FedAvg's


@pytest.mark.timeout(300)
def test_secagg_with_dp_sgd_and_central_dp_a_refusing_site_drops_out(tmp_path: Path, data_path_env: Path) -> None:
    cfg0 = config(tmp_path, "x", pretrain="none", partition="quantity", finetune_rounds=2, finetune_batch_size=8,
                  dp="finetune", dp_noise_multiplier=1.0, dp_delta=1e-4, secure_aggregation="secagg+",
                  central_dp="client-clip", central_dp_noise_multiplier=5.0, central_dp_clipping_norm=0.5,
                  central_dp_delta=1e-3)
    prep = prepare.prepare(cfg0.replace(dp="none", secure_aggregation="none", central_dp="none"))
    after = []
    for site in prep.plan.sites:  # every site's epsilon after 1 and after 2 rounds (sites differ in size)
        n = len(site.labelled)
        step = MechanismStep(1.0, min(1.0, 8 / n), -(-n // 8))
        after.append([epsilon_spent([step] * k, 1e-4, "rdp") for k in (1, 2)])
    first = max(a[0] for a in after)  # every site can afford round 1
    budget = (first + min(a[1] for a in after if a[1] > first)) / 2
    affords_two = {s for s, a in enumerate(after) if a[1] <= budget}
    assert 1 <= len(affords_two) <= 2, after  # some sites go on in round 2, the others refuse
    run_dir = launcher.simulate(cfg0.replace(run_name="dp", dp_epsilon=budget))

    rows = Recorder.load(run_dir / "metrics.jsonl")
    train = {(r["round"], r["site"]): r for r in rows if r["split"] == "train"}
    assert all(train[(1, s)]["accepted"] for s in (0, 1, 2))
    assert {s for s in (0, 1, 2) if train[(2, s)]["accepted"]} == affords_two
    refusals = [train[(2, s)] for s in (0, 1, 2) if s not in affords_two]
    assert all(r.get("refused") and "refuses the round" in r["reason"] for r in refusals)
    releases = [r for r in rows if r["split"] == "central-dp"]
    assert [(r["round"], int(r["sites"])) for r in releases] == [(1, 3), (2, len(affords_two))]  # refusers weighed 0
    c = cfg0.central
    expected = epsilon_spent([MechanismStep(c.noise_multiplier, 1.0, 2)], c.delta, CENTRAL_ACCOUNTANT)
    assert releases[-1]["central-epsilon"] == pytest.approx(expected)
    assert releases[-1]["noise-std"] == pytest.approx(5.0 * 0.5 / len(affords_two))

    ledgers = run_dir / "ledgers" / "federated-none"
    assert len(verify_ledger(ledgers / "central.ledger.sqlite").entries) == 2
    site_rows = {s: len(verify_ledger(ledgers / f"site-{s}.ledger.sqlite").entries) for s in (0, 1, 2)}
    assert site_rows == {s: 2 if s in affords_two else 1 for s in (0, 1, 2)}  # a refused round writes nothing
    audit = run_audit([run_dir])
    assert audit.ok, [s.problems for s in audit.sites] + audit.run_problems
    report = (run_dir / "report.md").read_text()
    assert "**Central DP** (client-clip)" in report and "for any one whole site" in report
    assert "for any one image of a site" in report
