"""DP-SGD at the site: per-example clipping, noise, Poisson sampling, validator, frozen layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfed.constants import EncoderKind, TaskType
from medfed.exceptions import ConfigError
from medfed.models.encoders import InputSpec, build_encoder
from medfed.models.heads import Classifier
from medfed.privacy.dp_sgd import (
    DPStepSettings,
    PoissonSchedule,
    check_private_model,
    dp_train_loop,
    freeze_for_dp,
)
from medfed.selfsup.methods import SSLSettings
from medfed.selfsup.registry import build_method

SPEC = InputSpec(1, (28, 28))


def _classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_encoder(EncoderKind.CNN, SPEC, 4), TaskType.BINARY, 2)


def _one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, noise: float = 0.0,
              mode: str = "hooks") -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    dp_train_loop(
        model, params, lambda idx: model.loss(model(x[idx]), y[idx]), len(x),  # type: ignore[operator]
        DPStepSettings(noise, clip, PoissonSchedule(1.0, 1), grad_sample_mode=mode), lr=1e-3, weight_decay=0.0,
        gen=torch.Generator().manual_seed(0),
    )
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_step_gradient_is_mean_of_clipped_per_example_gradients(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no noise and every example sampled, the update direction is (1/B) sum_i clip(g_i, C)."""
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([[0], [1], [1], [0], [1], [0]])
    clip = 0.05
    reference = _classifier()
    params = [p for p in reference.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(reference.loss(reference(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads, strict=True)]
    expected = [t / len(x) for t in total]
    model = _classifier()
    if mode == "ew":  # expanded weights, not Opacus' hooks under another name
        import opacus

        def no_hooks(*args: object, **kwargs: object) -> None:
            raise AssertionError("ew must not wrap the model in Opacus' GradSampleModule")

        monkeypatch.setattr(opacus.GradSampleModule, "__init__", no_hooks)
    got = _one_step(model, x, y, clip, mode=mode)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert "forward" not in vars(model)  # ew's patch is gone: the model is plain again
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.parametrize("mode", ["hooks", "ew"])
@pytest.mark.parametrize("clip", [0.05, 1e3])  # every example clipped; none clipped (the mean, not the sum)
def test_augmentation_multiplicity_clips_the_mean_of_each_examples_views(clip: float, mode: str) -> None:
    """K views per example (De et al. 2022): the step direction is (1/B) sum_i clip(mean_k g_ik, C). A clip
    per view, or per-view rows counted as examples, gives another direction; the noise stays sigma*C/B."""
    x, y = torch.rand(5, 1, 28, 28), torch.tensor([[0], [1], [1], [0], [1]])
    views = 3
    shifts = torch.tensor([0.0, 0.3, -0.2]).view(views, 1, 1, 1)
    reference = _classifier()
    params = [p for p in reference.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        per_view = [torch.autograd.grad(reference.loss(reference(x[i : i + 1] + shifts[k]), y[i : i + 1]), params)
                    for k in range(views)]
        grads = [torch.stack(g).mean(0) for g in zip(*per_view, strict=True)]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads, strict=True)]
    expected = [t / len(x) for t in total]
    model = _classifier()
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen: list[torch.Tensor] = []

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        seen.append(idx.clone())
        view_of_row = torch.arange(len(idx)) % views
        return model.loss(model(x[idx] + shifts[view_of_row]), y[idx])

    dp_train_loop(model, trainable, batch_loss, len(x), DPStepSettings(0.0, clip, PoissonSchedule(1.0, 1),
                  grad_sample_mode=mode, augment_multiplicity=views), lr=1e-3, weight_decay=0.0,
                  gen=torch.Generator().manual_seed(0))
    assert seen[0].tolist() == [i for i in range(len(x)) for _ in range(views)]  # example-major rows
    for e, p in zip(expected, trainable, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)

    torch.manual_seed(0)  # the noise: per example, not per view
    linear = nn.Sequential(nn.Linear(50, 40, bias=False))
    nn.init.zeros_(linear[0].weight)
    zeros = torch.zeros(4, 50)
    sigma, c = 2.0, 0.5
    dp_train_loop(linear, list(linear.parameters()), lambda idx: linear(zeros[idx]).mean(), 4,
                  DPStepSettings(sigma, c, PoissonSchedule(1.0, 1), augment_multiplicity=4), lr=1e-3, weight_decay=0.0,
                  gen=torch.Generator().manual_seed(3))
    assert float(linear[0].weight.grad.std()) == pytest.approx(sigma * c / 4, rel=0.08)


def test_expanded_weights_and_hooks_agree_on_a_lora_model() -> None:
    """LoRA (peft) adapters: expanded weights give the adapters and head the same clipped step as Opacus' hooks,
    and leave the frozen base weights without gradients."""
    from medfed.models.lora import add_lora

    x, y = torch.rand(5, 1, 28, 28), torch.tensor([[0], [1], [1], [0], [1]])
    grads = {}
    for mode in ("hooks", "ew"):
        model = _classifier(seed=3)
        torch.manual_seed(4)
        add_lora(model.encoder, 2, 4.0)
        grads[mode] = _one_step(model, x, y, 0.05, mode=mode)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)
    for h, e in zip(grads["hooks"], grads["ew"], strict=True):
        torch.testing.assert_close(e, h, rtol=1e-4, atol=1e-6)


def test_noise_has_the_planned_standard_deviation() -> None:
    """Zero data gradient (zero inputs): with clip C, sigma and expected batch B the noise on every
    coordinate has standard deviation sigma*C/B."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40, bias=False))
    nn.init.zeros_(model[0].weight)
    x = torch.zeros(4, 50)
    params = list(model.parameters())
    sigma, clip = 2.0, 0.5
    dp_train_loop(model, params, lambda idx: model(x[idx]).mean(), 4,
                  DPStepSettings(sigma, clip, PoissonSchedule(1.0, 1)), lr=1e-3, weight_decay=0.0,
                  gen=torch.Generator().manual_seed(3))
    std = float(params[0].grad.std())
    assert std == pytest.approx(sigma * clip / 4, rel=0.08)


@pytest.mark.parametrize("names,kind",
                         [(["byol"], "cnn"), (["restore"], "cnn"), (["mae"], "vit"), (["byol", "restore"], "cnn")])
def test_per_example_ssl_methods_train_under_dp_with_bounded_sensitivity(names: list[str], kind: str) -> None:
    """One image = one clipped gradient: the mean update over B images has norm <= C.
    (BYOL with both views in one 2B batch would clip each view separately: norm up to 2C.)"""
    torch.manual_seed(0)
    method = build_method(names, [1.0] * len(names), build_encoder(EncoderKind(kind), SPEC, 8), SSLSettings())
    x = torch.rand(16, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    params = [p for p in method.parameters() if p.requires_grad]
    clip = 1e-3
    dp_train_loop(method, params, lambda idx: method.loss(x[idx], gen), len(x),
                  DPStepSettings(0.0, clip, PoissonSchedule(1.0, 1)), lr=1e-3, weight_decay=0.0, gen=gen)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params if p.grad is not None))
    assert 0 < float(norm) <= clip * (1 + 1e-4)
    assert not any(hasattr(p, "grad_sample") for p in method.parameters())  # hooks and per-sample grads removed


def test_mae_tokens_and_unused_norms_are_frozen_under_dp() -> None:
    method = build_method(["mae"], [1.0], build_encoder(EncoderKind.VIT, SPEC, 8), SSLSettings())
    frozen = freeze_for_dp(method)
    assert "mask_tokens" in frozen and "encoder.cls_token" in frozen
    assert any("norm_cross_attn" in n for n in frozen)
    assert all(p.requires_grad for n, p in method.named_parameters() if "qkv" in n)


def test_empty_poisson_batches_still_release_noise_and_runs_are_reproducible() -> None:
    x, y = torch.rand(20, 1, 28, 28), torch.randint(0, 2, (20, 1))

    def run() -> torch.Tensor:
        model = _classifier()
        params = [p for p in model.parameters() if p.requires_grad]
        stats = dp_train_loop(model, params, lambda idx: model.loss(model(x[idx]), y[idx]), 20,
                              DPStepSettings(1.0, 1.0, PoissonSchedule(0.01, 5)), lr=1e-2, weight_decay=0.0,
                              gen=torch.Generator().manual_seed(7))
        assert stats.steps == 5 and stats.mean_batch < 1
        return model.head.weight.detach().clone()

    first, second = run(), run()
    assert not torch.equal(first, _classifier().head.weight)  # noise moved the weights
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_validator_refuses_batch_norm() -> None:
    with pytest.raises(ConfigError, match="cannot be trained with DP-SGD"):
        check_private_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))


def test_poisson_schedule() -> None:
    s = PoissonSchedule.for_round(100, 32, 2)
    assert s.sample_rate == pytest.approx(0.32) and s.steps == 8
    assert PoissonSchedule.for_round(10, 32, 1) == PoissonSchedule(1.0, 1)
    with pytest.raises(ConfigError):
        PoissonSchedule.for_round(0, 32, 1)
