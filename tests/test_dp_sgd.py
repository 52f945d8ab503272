"""DP-SGD at the site: per-example clipping, noise, Poisson sampling, validator, frozen layers."""

from __future__ import annotations

import numpy as np
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


def _per_example(model: Classifier, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """Each row's ``model.loss`` alone: ``(len(idx),)``, whose mean is the batch loss (as `SiteAlgo` builds it)."""
    return lambda idx: torch.func.vmap(lambda z, t: model.loss(z[None], t[None]))(model(x[idx]), y[idx])


def _one_step(model: Classifier, x: torch.Tensor, y: torch.Tensor, clip: float, noise: float = 0.0,
              mode: str = "hooks", sample_rate: float = 1.0, steps: int = 1) -> list[torch.Tensor]:
    freeze_for_dp(model)  # as dp_train_loop does: a ViT's class token keeps its value
    params = [p for p in model.parameters() if p.requires_grad]
    dp_train_loop(
        model, params, lambda idx: model.loss(model(x[idx]), y[idx]), len(x),
        DPStepSettings(noise, clip, PoissonSchedule(sample_rate, steps), grad_sample_mode=mode), lr=1e-3,
        weight_decay=0.0, gen=torch.Generator().manual_seed(0), per_example_loss=_per_example(model, x, y),
    )
    return [p.grad.detach().clone() for p in params]


@pytest.fixture
def ghost_norms(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of Opacus' ghost norm of ``nn.Linear`` (the norm without the per-example gradient)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    samplers = dict(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
    real, calls = samplers[nn.Linear], [0]

    def counted(*args: object) -> object:
        calls[0] += 1
        return real(*args)

    samplers[nn.Linear] = counted
    monkeypatch.setattr(GradSampleModuleFastGradientClipping, "NORM_SAMPLERS", samplers)
    return calls


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_step_gradient_is_mean_of_clipped_per_example_gradients(mode: str, monkeypatch: pytest.MonkeyPatch,
                                                                ghost_norms: list[int]) -> None:
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
    assert not any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "_norm_sample"))
    assert not any(getattr(m, "activations", None) or m._forward_hooks for m in model.modules())  # hooks removed
    assert (ghost_norms[0] > 0) == (mode == "ghost")  # ghost: the head's norm without its per-example gradient


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_ghost_clipping_gives_the_noised_step_of_the_hooks(kind: str, ghost_norms: list[int]) -> None:
    """Ghost clipping and Opacus' hooks, with noise, Poisson sampling and three AdamW steps: the same weights and
    final noisy gradient (same clipped sums, same noise from the round's generator, same division by q*n). On the
    ViT, ghost norms cover every Linear (attention, MLP, head) of (B, tokens, width) activations."""
    x, y = torch.rand(8, 1, 28, 28), torch.tensor([[0], [1], [1], [0], [1], [0], [0], [1]])
    weights, grads = {}, {}
    for mode in ("hooks", "ghost"):
        torch.manual_seed(2)
        model = Classifier(build_encoder(EncoderKind(kind), SPEC, 8), TaskType.BINARY, 2)
        grads[mode] = _one_step(model, x, y, 0.5, noise=1.0, mode=mode, sample_rate=0.5, steps=3)
        weights[mode] = [p.detach().clone() for p in model.parameters()]
    assert ghost_norms[0] >= (14 if kind == "vit" else 1) * 3
    for h, g in zip(grads["hooks"] + weights["hooks"], grads["ghost"] + weights["ghost"], strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


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
    for mode in ("hooks", "ew", "ghost"):
        model = _classifier(seed=3)
        torch.manual_seed(4)
        add_lora(model.encoder, 2, 4.0)
        grads[mode] = _one_step(model, x, y, 0.05, mode=mode)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)
    for h, e, g in zip(grads["hooks"], grads["ew"], grads["ghost"], strict=True):
        torch.testing.assert_close(e, h, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_ghost_clipping_refuses_augmentation_multiplicity_and_a_loss_without_per_example_values() -> None:
    """Ghost clipping sees each row's gradient norm, not the norm of an example's mean over its K views: K > 1 is
    refused (not silently clipped per view), as is a phase that gives no per-example losses (pretraining)."""
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([[0], [1], [1], [0]])
    model = _classifier()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for views, per_example in ((2, _per_example(model, x, y)), (1, None)):
        with pytest.raises(ConfigError, match="ghost needs per-example losses"):
            dp_train_loop(model, params, lambda idx: model.loss(model(x[idx]), y[idx]), len(x),
                          DPStepSettings(1.0, 1.0, PoissonSchedule(1.0, 1), grad_sample_mode="ghost",
                                         augment_multiplicity=views),
                          lr=1.0, weight_decay=0.0, gen=torch.Generator().manual_seed(0), per_example_loss=per_example)
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))  # refused before any step
    assert not any(m._forward_hooks for m in model.modules())


def test_noise_has_the_planned_standard_deviation() -> None:
    """Zero data gradient (zero inputs): with clip C, sigma and expected batch B the noise on every
    coordinate has standard deviation sigma*C/B; ghost clipping draws the very same noise."""
    x = torch.zeros(4, 50)
    sigma, clip = 2.0, 0.5
    noise = {}
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(50, 40, bias=False))
        nn.init.zeros_(model[0].weight)
        params = list(model.parameters())
        dp_train_loop(model, params, lambda idx, m=model: m(x[idx]).mean(), 4,
                      DPStepSettings(sigma, clip, PoissonSchedule(1.0, 1), grad_sample_mode=mode), lr=1e-3,
                      weight_decay=0.0, gen=torch.Generator().manual_seed(3),
                      per_example_loss=lambda idx, m=model: m(x[idx]).mean(dim=1))
        noise[mode] = params[0].grad
        assert float(noise[mode].std()) == pytest.approx(sigma * clip / 4, rel=0.08)
    torch.testing.assert_close(noise["ghost"], noise["hooks"], rtol=0, atol=0)


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

    def run(mode: str) -> torch.Tensor:
        model = _classifier()
        params = [p for p in model.parameters() if p.requires_grad]
        stats = dp_train_loop(model, params, lambda idx: model.loss(model(x[idx]), y[idx]), 20,
                              DPStepSettings(1.0, 1.0, PoissonSchedule(0.01, 5), grad_sample_mode=mode), lr=1e-2,
                              weight_decay=0.0, gen=torch.Generator().manual_seed(7),
                              per_example_loss=_per_example(model, x, y))
        assert stats.steps == 5 and stats.mean_batch < 1
        return model.head.weight.detach().clone()

    first, second = run("hooks"), run("hooks")
    assert not torch.equal(first, _classifier().head.weight)  # noise moved the weights
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(run("ghost"), first, rtol=0, atol=0)  # ghost: the same noise, from the same draws


def test_ghost_clipping_releases_noise_on_an_empty_batch() -> None:
    """A step whose Poisson batch is empty: ghost clipping calls no loss and releases N(0, (sigma C)^2) / (q n)."""
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 2, (10, 1))
    model = _classifier()
    params = [p for p in model.parameters() if p.requires_grad]
    calls: list[int] = []

    def per_example(idx: torch.Tensor) -> torch.Tensor:
        calls.append(len(idx))
        return _per_example(model, x, y)(idx)

    stats = dp_train_loop(model, params, lambda idx: model.loss(model(x[idx]), y[idx]), 10,
                          DPStepSettings(2.0, 0.5, PoissonSchedule(1e-9, 1), grad_sample_mode="ghost"), lr=1e-3,
                          weight_decay=0.0, gen=torch.Generator().manual_seed(1), per_example_loss=per_example)
    assert calls == [] and stats.mean_batch == 0 and np.isnan(stats.loss)
    noise = torch.cat([p.grad.flatten() for p in params])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 1, rel=0.05)  # expected batch max(1, round(q n)) = 1
    assert not any(hasattr(p, a) for p in params for a in ("grad_sample", "_norm_sample", "summed_grad"))


def test_validator_refuses_batch_norm() -> None:
    with pytest.raises(ConfigError, match="cannot be trained with DP-SGD"):
        check_private_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))


def test_poisson_schedule() -> None:
    s = PoissonSchedule.for_round(100, 32, 2)
    assert s.sample_rate == pytest.approx(0.32) and s.steps == 8
    assert PoissonSchedule.for_round(10, 32, 1) == PoissonSchedule(1.0, 1)
    with pytest.raises(ConfigError):
        PoissonSchedule.for_round(0, 32, 1)
