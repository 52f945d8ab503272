"""SiteAlgo (Flower-free site training): reproducibility, FedProx, the logit-adjusted loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.config import RunConfig, run_config
from medfed.constants import TaskType
from medfed.data.site import SiteData
from medfed.exceptions import ConfigError
from medfed.task.algo import SiteAlgo
from medfed.task.model_setup import derive_seed, new_classifier, new_encoder


def cfg(**changes: object) -> RunConfig:
    return run_config(data="breastmnist", width=8, pretrain_batch_size=64, finetune_batch_size=16, pretrain_epochs=1,
                      finetune_epochs=1, **changes)


def test_seeds_are_stable_across_processes() -> None:
    assert derive_seed(0, 1, "pretrain", 2) == derive_seed(0, 1, "pretrain", 2) != derive_seed(0, 1, "pretrain", 3)
    assert derive_seed(0, "encoder-init") == 3935142102492746204  # pinned: sha256-based, not Python's hash()


def test_same_seed_same_weights_and_other_seed_other_weights(breast_site: SiteData) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        c = cfg(seed=seed, pretrain="byol")
        algo = SiteAlgo(c, breast_site)
        enc, _, _ = algo.pretrain_round(new_encoder(c, breast_site.spec).state_dict(), None, 1)
        return enc

    a, b, other = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_fedprox_keeps_local_weights_near_the_global_ones(breast_site: SiteData) -> None:
    def drift(mu: float) -> float:
        c = cfg(pretrain="none", strategy="fedprox" if mu else "fedavg", proximal_mu=mu, finetune_lr=0.01)
        start = new_classifier(c, breast_site.spec, breast_site.task, breast_site.num_classes, None).state_dict()
        out, _ = SiteAlgo(c, breast_site).finetune_round(start, 1)
        return float(sum((out[k].float() - start[k].float()).pow(2).sum() for k in out))

    assert drift(1000.0) < 0.2 * drift(0.0)


def test_logit_shift_is_the_log_of_the_smoothed_site_prior(breast_site: SiteData) -> None:
    assert SiteAlgo(cfg(), breast_site).logit_shift() == 0.0
    counts = np.bincount(breast_site.labelled_labels[:, 0].numpy(), minlength=2) + 1.0
    shift = SiteAlgo(cfg(finetune_loss="logit-adjusted"), breast_site).logit_shift()
    np.testing.assert_allclose(shift.numpy(), np.log(counts / counts.sum()), rtol=1e-6)
    one_class = SiteData(0, breast_site.train_images, breast_site.labelled_images[:3],
                         torch.ones(3, 1, dtype=torch.long),
                         breast_site.val_images, breast_site.val_labels, TaskType.BINARY, 2)
    np.testing.assert_allclose(SiteAlgo(cfg(finetune_loss="logit-adjusted"), one_class).logit_shift().numpy(),
                               np.log([0.2, 0.8]), rtol=1e-6)
    multilabel = SiteData(0, breast_site.train_images, breast_site.labelled_images[:3],
                          torch.ones(3, 4, dtype=torch.long),
                          breast_site.val_images, breast_site.val_labels[:, :1].repeat(1, 4), TaskType.MULTILABEL, 4)
    with pytest.raises(ConfigError, match="single-label task"):
        SiteAlgo(cfg(finetune_loss="logit-adjusted"), multilabel).logit_shift()
