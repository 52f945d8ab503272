"""What medfed computes is pinned: a small federated SSL run and a small DP run reproduce the numbers the
code gave before the issue-13 restructure (measured at commit 23cfd1a, torch 2.13.0 CPU, flwr 1.41.0).

Runs are bitwise reproducible on one machine; the tolerance (1e-5 relative) only absorbs a different CPU's
BLAS rounding, while any change to sampling, seeding, training, aggregation or DP noise moves these numbers
by far more. A DP run's noise is keyed by each site's secret signing key and the run id, so the DP run
plants fixed test keys and fixes the run id.
"""

from __future__ import annotations

import json
import types
import uuid
from pathlib import Path

import pytest

from medfed.config import run_config
from medfed.experiment import runner
from medfed.simulations.launcher import simulate

REL = 1e-5

# 2 sites, SimCLR 2 rounds then full fine-tuning 2 rounds, BreastMNIST, width 8
SSL_TRAIN_LOSS = {("pretrain", 1, 0): 4.524210691452026, ("pretrain", 1, 1): 4.810035228729248,
                  ("pretrain", 2, 0): 4.45435365041097, ("pretrain", 2, 1): 4.6781206130981445,
                  ("finetune", 1, 0): 0.6190091073513031, ("finetune", 1, 1): 0.6159390807151794,
                  ("finetune", 2, 0): 0.5496538877487183, ("finetune", 2, 1): 0.2886102497577667}
SSL_TEST = {0: (0.2959482038429407, 0.6759913563728333), 1: (0.3316624895572264, 0.5924040675163269),
            2: (0.5962823725981621, 0.5780560970306396)}  # round -> (test AUC, test loss)

# 2 sites, DP-SGD fine-tuning from scratch (sigma 1), 2 rounds, fixed site keys and run id
DP_EPSILON = {(1, 0): 3.326483693665491, (1, 1): 3.3721081819569125, (2, 0): 4.219722434413083,
              (2, 1): 4.283423669321869}
DP_TEST = {0: (0.4298245614035088, 0.720251739025116), 1: (0.4690893901420217, 0.7817623019218445),
           2: (0.522765246449457, 1.075500726699829)}
SITE_KEYS = {  # test-only Ed25519 keys (PKCS#8), planted so that the sites' secret noise seeds are fixed
    0: ("MC4CAQAwBQYDK2VwBCIEIGLqKulX1wCyK4ZJ+Ktd8MxccmJUA9Pb/+cJseh6WVu0",
        "MCowBQYDK2VwAyEAccfS4SfFBRHWVrVR174+SizubCr0pS3J68lMPyrudR8="),
    1: ("MC4CAQAwBQYDK2VwBCIEIHB4IcK7hDkZsVZJlfTNDZ1SpFuAVh4QoSSrmNnTfDd0",
        "MCowBQYDK2VwAyEAdSkkENwhfjluSh5xoayHLqbXWde/gruOhyilJH4QBDw="),
}


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def global_test_metrics(rows: list[dict]) -> dict[tuple[int, int], float]:
    """(round, 0) -> AUC and (round, 1) -> loss of the global model on the official test split."""
    tests = [r for r in rows if r["split"] == "test" and r["site"] == "global"]
    return {(r["round"], i): value for r in tests for i, value in enumerate((r["auc"], r["eval-loss"]))}


def flat(pinned: dict[int, tuple[float, float]]) -> dict[tuple[int, int], float]:
    return {(rnd, i): value for rnd, pair in pinned.items() for i, value in enumerate(pair)}


@pytest.mark.timeout(300)
def test_a_small_federated_ssl_run_gives_the_pinned_numbers(tmp_path: Path, data_path_env: Path) -> None:
    cfg = run_config(data="breastmnist", num_sites=2, pretrain_rounds=2, pretrain_epochs=1, finetune_rounds=2,
                     finetune_epochs=1, pretrain_batch_size=64, width=8, baselines="none",
                     out_dir=str(tmp_path / "runs"), client_cpus=1)
    rows = rows_of(simulate(cfg))
    losses = {(r["phase"], r["round"], r["site"]): r["train-loss"] for r in rows if r["split"] == "train"}
    assert losses == pytest.approx(SSL_TRAIN_LOSS, rel=REL)
    assert global_test_metrics(rows) == pytest.approx(flat(SSL_TEST), rel=REL)


@pytest.mark.timeout(300)
def test_a_small_dp_run_gives_the_pinned_numbers(tmp_path: Path, data_path_env: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ledgers = tmp_path / "ledgers" / "federated-none"
    ledgers.mkdir(parents=True)
    for site, (private, public) in SITE_KEYS.items():
        pem = ledgers / f"site-{site}.ed25519.pem"
        pem.write_text(f"-----BEGIN PRIVATE KEY-----\n{private}\n-----END PRIVATE KEY-----\n")
        pem.chmod(0o600)
        (ledgers / f"site-{site}.pub").write_text(f"-----BEGIN PUBLIC KEY-----\n{public}\n-----END PUBLIC KEY-----\n")
    monkeypatch.setattr(runner, "uuid", types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=7)))  # the run id
    cfg = run_config(data="breastmnist", num_sites=2, partition="iid", pretrain="none", finetune_rounds=2,
                     finetune_epochs=1, finetune_batch_size=8, width=8, baselines="none",
                     out_dir=str(tmp_path / "runs"), client_cpus=1, dp="finetune", dp_noise_multiplier=1.0,
                     dp_delta=1e-4, label_fraction=0.2, ledger_dir=str(tmp_path / "ledgers"))
    rows = rows_of(simulate(cfg))
    epsilon = {(r["round"], r["site"]): r["epsilon"] for r in rows if r["split"] == "train"}
    assert epsilon == pytest.approx(DP_EPSILON, rel=REL)
    assert global_test_metrics(rows) == pytest.approx(flat(DP_TEST), rel=REL)
