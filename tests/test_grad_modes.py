"""DP-SGD's per-example gradient mode: ``auto`` by the CPU rule, or measured on the site's model without touching
the round (weights and generator put back), and reported in the reply."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.config import run_config
from medfed.constants import MetricKey
from medfed.data.site import SiteData
from medfed.exceptions import ConfigError
from medfed.privacy.dp_sgd import DPStepSettings, PoissonSchedule
from medfed.privacy.grad_modes import _CHOSEN, MODE_CODES, candidates, resolve_grad_sample_mode
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.selfsup.compat import check_methods_fit
from medfed.task.algo import SiteAlgo, TrainStats
from medfed.task.model_setup import new_classifier


def test_only_a_cnn_fine_tuning_can_use_expanded_weights_and_only_fine_tuning_ghost_clipping() -> None:
    assert candidates(finetuning=True, encoder="cnn") == ["hooks", "functorch", "ew", "ghost"]
    assert candidates(finetuning=True, encoder="vit") == ["hooks", "functorch", "ghost"]
    assert candidates(finetuning=False, encoder="cnn") == ["hooks", "functorch"]
    assert candidates(finetuning=False, encoder="vit") == ["hooks", "functorch"]
    assert MODE_CODES == {"hooks": 0.0, "functorch": 1.0, "ew": 2.0, "ghost": 3.0}


def _inputs(site: SiteData, encoder: str = "cnn") -> tuple[torch.nn.Module, list[torch.nn.Parameter], object,
                                                            DPStepSettings, object]:
    cfg = run_config(data="breastmnist", width=8, pretrain="none", encoder=encoder)
    model = new_classifier(cfg, site.spec, site.task, site.num_classes, None)
    images, labels = site.labelled_images, site.labelled_labels

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return model.loss(model(images[idx]), labels[idx])

    def per_example_loss(idx: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(lambda z, y: model.loss(z[None], y[None]))(model(images[idx]), labels[idx])

    dp = DPStepSettings(1.0, 1.0, PoissonSchedule(16 / len(images), 3))
    return model, [p for p in model.parameters() if p.requires_grad], batch_loss, dp, per_example_loss


def test_on_the_cpu_auto_follows_the_measured_rule_and_a_chosen_mode_is_kept(breast_site: SiteData) -> None:
    model, params, batch_loss, dp, _ = _inputs(breast_site)
    common = dict(module=model, params=params, batch_loss=batch_loss, n=len(breast_site.labelled_images), dp=dp,
                  gen=torch.Generator().manual_seed(0), lr=1e-3)
    assert resolve_grad_sample_mode("auto", finetuning=True, encoder="cnn", **common) == "ew"
    assert resolve_grad_sample_mode("auto", finetuning=False, encoder="cnn", **common) == "hooks"
    assert resolve_grad_sample_mode("functorch", finetuning=True, encoder="cnn", **common) == "functorch"
    assert resolve_grad_sample_mode("ghost", finetuning=True, encoder="cnn", **common) == "ghost"


def test_measuring_the_modes_leaves_the_weights_and_the_round_s_generator_as_they_were(breast_site: SiteData) -> None:
    model, params, batch_loss, dp, per_example_loss = _inputs(breast_site)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    _CHOSEN.clear()
    chosen = resolve_grad_sample_mode("auto", finetuning=True, encoder="cnn", module=model, params=params,
                                      batch_loss=batch_loss, n=len(breast_site.labelled_images), dp=dp, gen=gen,
                                      lr=1.0, measure=True, per_example_loss=per_example_loss)  # lr 1: a step shows
    assert chosen in ("hooks", "functorch", "ew", "ghost")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(gen.get_state(), state)
    assert all(p.grad is None and not hasattr(p, "grad_sample") and not hasattr(p, "_norm_sample") for p in params)
    assert list(_CHOSEN.values()) == [chosen]  # measured once per model, device and batch in a process
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("encoder", ["cnn", "vit"])
def test_ghost_clipping_is_measured_and_can_be_chosen(breast_site: SiteData, encoder: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU ``auto`` times ghost clipping with the other modes (really running it on the site's model) and keeps
    it when fastest; it is not timed without per-example losses, nor with augmentation multiplicity > 1."""
    from medfed.privacy import grad_modes

    timed: list[str] = []
    real = grad_modes._time_mode

    def spy(*args: object) -> float:
        mode = str(args[5])
        timed.append(mode)
        seconds = real(*args)  # type: ignore[arg-type]
        return 0.0 if mode == "ghost" else seconds + 1.0  # ghost ran; make it the fastest

    monkeypatch.setattr(grad_modes, "_time_mode", spy)
    model, params, batch_loss, dp, per_example_loss = _inputs(breast_site, encoder)
    common = dict(finetuning=True, encoder=encoder, module=model, params=params, batch_loss=batch_loss,
                  n=len(breast_site.labelled_images), gen=torch.Generator().manual_seed(0), lr=1e-3, measure=True)
    _CHOSEN.clear()
    assert resolve_grad_sample_mode("auto", dp=dp, per_example_loss=per_example_loss, **common) == "ghost"
    assert timed == candidates(finetuning=True, encoder=encoder)
    for views, per_example in ((1, None), (2, per_example_loss)):
        timed.clear()
        _CHOSEN.clear()
        chosen = resolve_grad_sample_mode("auto", dp=dataclasses.replace(dp, augment_multiplicity=views),
                                          per_example_loss=per_example, **common)
        assert "ghost" not in timed and chosen != "ghost" and timed


def dp_round(site: SiteData, ledgers: Path, mode: str) -> tuple[dict, dict, TrainStats]:
    """One DP fine-tuning round of ``site`` (batch 16) in gradient ``mode``: the start, what it shares, its stats."""
    cfg = run_config(data="breastmnist", width=8, pretrain="none", dp="finetune", dp_epsilon=8.0,
                     finetune_batch_size=16, finetune_epochs=1, dp_grad_sample_mode=mode)
    guard = PrivacyGuard(SitePrivacy.resolve(cfg, "0", {}, ledgers), mode)
    start = new_classifier(cfg, site.spec, site.task, site.num_classes, None).state_dict()
    shared, stats = SiteAlgo(cfg, site, guard).finetune_round(start, 1)
    return start, shared, stats


def test_a_dp_round_reports_the_gradient_mode_it_ran_with(breast_site: SiteData, tmp_path: Path) -> None:
    _, _, stats = dp_round(breast_site, tmp_path, "hooks")
    assert stats.privacy[MetricKey.DP_GRAD_MODE.value] == MODE_CODES["hooks"] == 0.0


def test_a_dp_fine_tuning_round_runs_ghost_clipping_and_the_run_refuses_it_where_it_cannot(
        breast_site: SiteData, tmp_path: Path) -> None:
    """A site's fine-tuning round with ``dp-grad-sample-mode ghost`` (the per-example losses built by `SiteAlgo`)
    reports code 3 and records the same mechanism in the ledger; the run refuses ghost for DP pretraining (the SSL
    losses do not go through the model's forward) and with augmentation multiplicity > 1."""
    start, shared, stats = dp_round(breast_site, tmp_path, "ghost")
    assert stats.privacy[MetricKey.DP_GRAD_MODE.value] == MODE_CODES["ghost"] == 3.0
    n = len(breast_site.labelled_images)
    assert stats.privacy[MetricKey.SAMPLE_RATE.value] == pytest.approx(16 / n)
    assert stats.privacy[MetricKey.DP_STEPS.value] == -(-n // 16)
    assert np.isfinite(stats.loss) and any(not torch.equal(shared[k], start[k]) for k in shared)
    with pytest.raises(ConfigError, match="dp-grad-sample-mode ghost needs the loss to go through the model's"):
        run_config(data="breastmnist", dp="all", pretrain="byol", dp_grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="ghost needs dp-augment-multiplicity 1"):
        run_config(data="breastmnist", dp="finetune", dp_grad_sample_mode="ghost", dp_augment_multiplicity=2)
    vit = run_config(data="breastmnist", dp="finetune", encoder="vit", pretrain="none", dp_grad_sample_mode="ghost")
    check_methods_fit(vit)  # unlike ew, ghost clipping serves the ViT
