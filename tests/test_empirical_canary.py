"""The empirical canary audit on real data: it has power without DP and stays below the
accountant's epsilon with DP (Steinke, Nasr & Jagielski 2023, one run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfed.config import RunConfig, run_config
from medfed.data.medmnist import load_medmnist
from medfed.data.site import site_from_own_file
from medfed.experiment.canary_audit import audit_site_training
from medfed.task.model_setup import initial_encoder_state

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def breast(shared_data: Path):
    data = load_medmnist(str(shared_data / "breastmnist.npz"))
    site = site_from_own_file(data, 0, 0.1, 0)
    pool = data.test.images
    return site, pool, torch.as_tensor(data.test.labels)


def run(cfg: RunConfig, breast) -> object:
    site, pool, labels = breast
    return audit_site_training(cfg, site, pool, labels, encoder_state=initial_encoder_state(cfg, site.spec),
                               num_canaries=150, rounds=30)


@pytest.mark.timeout(120)
def test_without_dp_the_audit_finds_leakage(breast) -> None:
    result = run(run_config(data="breastmnist", pretrain="none", width=8, finetune_lr=3e-3), breast)
    assert result.epsilon_lower_bound > 0.3, result.describe()  # the audit has power
    assert result.num_inserted > 50 and result.rounds == 30


@pytest.mark.timeout(120)
def test_with_dp_the_bound_stays_below_the_accountant(breast) -> None:
    cfg = run_config(data="breastmnist", pretrain="none", width=8, finetune_lr=3e-3, dp="finetune", dp_epsilon=2.0,
                    dp_delta=1e-4, finetune_rounds=30)
    result = run(cfg, breast)
    assert 0 < result.accountant_epsilon <= 2.0
    assert result.consistent and result.epsilon_lower_bound <= result.accountant_epsilon, result.describe()
