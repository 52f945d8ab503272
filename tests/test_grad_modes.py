"""DP-SGD's per-example gradient mode: ``auto`` by the CPU rule, or measured on the site's model without touching
the round (weights and generator put back), and reported in the reply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfed.config import run_config
from medfed.constants import MetricKey
from medfed.data.medmnist import load_medmnist
from medfed.data.site import SiteData, site_from_own_file
from medfed.privacy.dp_sgd import DPStepSettings, PoissonSchedule
from medfed.privacy.grad_modes import _CHOSEN, MODE_CODES, candidates, resolve_grad_sample_mode
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.task.algo import SiteAlgo
from medfed.task.model_setup import new_classifier


@pytest.fixture(scope="module")
def breast_site(shared_data: Path) -> SiteData:
    return site_from_own_file(load_medmnist(shared_data / "breastmnist.npz"), site_id=0, label_fraction=0.2, seed=0)


def test_only_a_cnn_fine_tuning_can_use_expanded_weights() -> None:
    assert candidates(finetuning=True, encoder="cnn") == ["hooks", "functorch", "ew"]
    assert candidates(finetuning=True, encoder="vit") == ["hooks", "functorch"]
    assert candidates(finetuning=False, encoder="cnn") == ["hooks", "functorch"]


def _inputs(site: SiteData) -> tuple[torch.nn.Module, list[torch.nn.Parameter], object, DPStepSettings]:
    cfg = run_config(data="breastmnist", width=8, pretrain="none")
    model = new_classifier(cfg, site.spec, site.task, site.num_classes, None)
    images, labels = site.labelled_images, site.labelled_labels

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return model.loss(model(images[idx]), labels[idx])

    dp = DPStepSettings(1.0, 1.0, PoissonSchedule(16 / len(images), 3))
    return model, list(model.parameters()), batch_loss, dp


def test_on_the_cpu_auto_follows_the_measured_rule_and_a_chosen_mode_is_kept(breast_site: SiteData) -> None:
    model, params, batch_loss, dp = _inputs(breast_site)
    common = dict(module=model, params=params, batch_loss=batch_loss, n=len(breast_site.labelled_images), dp=dp,
                  gen=torch.Generator().manual_seed(0), lr=1e-3)
    assert resolve_grad_sample_mode("auto", finetuning=True, encoder="cnn", **common) == "ew"
    assert resolve_grad_sample_mode("auto", finetuning=False, encoder="cnn", **common) == "hooks"
    assert resolve_grad_sample_mode("functorch", finetuning=True, encoder="cnn", **common) == "functorch"


def test_measuring_the_modes_leaves_the_weights_and_the_round_s_generator_as_they_were(breast_site: SiteData) -> None:
    model, params, batch_loss, dp = _inputs(breast_site)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    _CHOSEN.clear()
    chosen = resolve_grad_sample_mode("auto", finetuning=True, encoder="cnn", module=model, params=params,
                                      batch_loss=batch_loss, n=len(breast_site.labelled_images), dp=dp, gen=gen,
                                      lr=1.0, measure=True)  # lr 1: any step left behind would show
    assert chosen in ("hooks", "functorch", "ew")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(gen.get_state(), state)
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in params)
    assert list(_CHOSEN.values()) == [chosen]  # measured once per model, device and batch in a process


def test_a_dp_round_reports_the_gradient_mode_it_ran_with(breast_site: SiteData, tmp_path: Path) -> None:
    cfg = run_config(data="breastmnist", width=8, pretrain="none", dp="finetune", dp_epsilon=8.0,
                     finetune_batch_size=16, finetune_epochs=1, dp_grad_sample_mode="hooks")
    guard = PrivacyGuard(SitePrivacy.resolve(cfg, "0", {}, tmp_path), "modes")
    start = new_classifier(cfg, breast_site.spec, breast_site.task, breast_site.num_classes, None).state_dict()
    _, stats = SiteAlgo(cfg, breast_site, guard).finetune_round(start, 1)
    assert stats.privacy[MetricKey.DP_GRAD_MODE.value] == MODE_CODES["hooks"] == 0.0
