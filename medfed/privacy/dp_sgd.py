"""DP-SGD at a site with Opacus: per-example clipping, Gaussian noise, Poisson sampling.

DP-SGD (Abadi et al., CCS 2016): every step includes each of the site's ``n`` examples
independently with probability ``q`` (Poisson sampling, which the accountants assume), clips
each example's gradient to L2 norm ``C`` (``max_grad_norm``), sums, adds Gaussian noise of
standard deviation ``sigma * C`` and divides by the expected batch size ``q * n``. One
training round is then ``steps`` compositions of the Poisson-subsampled Gaussian mechanism
with parameters ``(q, sigma)``: exactly what the site's ledger records.

Opacus supplies the per-example gradients (`GradSampleModule`, hooks or the functorch
fall-back) and the clip-and-noise optimizer (`DPOptimizer`, wrapping AdamW; Adam's moments
are post-processing of the noisy gradient). Ghost clipping (``ghost``: Li et al., ICLR 2022;
Bu et al. 2022; Opacus' fast gradient clipping) computes only the per-example gradient norms
(without the per-example gradients on its ``nn.Linear`` layers), then backpropagates the sum of
the per-example losses weighted by their clipping factors: the same clipped sum, from a second
backward pass, noised by `DPOptimizerFastGradientClipping`. Sampling is ours so that the executed
``(q, steps)`` are exactly those accounted for. The hooks sit on the trainable leaf
modules, so losses that call sub-modules several times (BYOL's two views) accumulate one
per-example gradient per example, as privacy requires.

Secure RNG: Opacus' ``secure_mode`` needs torchcsprng, which is archived and does not build
for this torch. With ``secure_rng`` medfed draws every step's sampling and noise generators
from fresh OS entropy (``os.urandom``; not reproducible) and turns on Opacus' floating-point-
attack-resistant noise (the sum of 2x2 Gaussian draws, Holohan et al. 2021). The generator
itself remains torch's (not a CSPRNG); docs/PRIVACY.md says so.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medfed.constants import GradSampleMode
from medfed.exceptions import ConfigError, TrainingDiverged


@dataclass(frozen=True)
class PoissonSchedule:
    """Sampling rate and number of steps of one round: ``q = B / n``, ``ceil(n / B)`` steps per epoch."""

    sample_rate: float
    steps: int

    @classmethod
    def for_round(cls, n: int, batch_size: int, epochs: int) -> PoissonSchedule:
        if n < 1:
            raise ConfigError("a DP round needs at least one example at the site")
        return cls(min(1.0, batch_size / n), epochs * math.ceil(n / batch_size))


@dataclass(frozen=True)
class DPStepSettings:
    """The mechanism one round runs: ``steps`` draws with rate ``sample_rate`` and noise ``noise_multiplier``."""

    noise_multiplier: float
    max_grad_norm: float
    schedule: PoissonSchedule
    grad_sample_mode: str = GradSampleMode.HOOKS.value
    secure_rng: bool = False
    augment_multiplicity: int = 1  # K: views of each sampled example whose gradients are averaged before clipping


def check_private_model(module: nn.Module, what: str = "model") -> None:
    """Opacus' validator over ``module``: a clear ConfigError listing what DP-SGD cannot handle."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:5])
        raise ConfigError(f"the {what} cannot be trained with DP-SGD (Opacus validator): {listed}")


UNUSED_UNDER_DP = ("norm_cross_attn",)  # MONAI transformer blocks build a cross-attention norm they never use


def freeze_for_dp(module: nn.Module) -> list[str]:
    """Freeze the parameters Opacus cannot give per-example gradients; returns their names.

    Those are parameters registered directly on a composite module (a ViT's class token,
    MAE's mask token: used in tensor code, not through a layer Opacus knows) and parameters
    no loss uses (MONAI's unused cross-attention norms). They keep their initial or
    pretrained values; every layer (conv, linear, norms, attention projections) still trains.
    """
    from opacus import GradSampleModule

    supported = set(GradSampleModule.GRAD_SAMPLERS)
    frozen: list[str] = []
    for name, sub in module.named_modules():
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(sub) not in supported or any(tag in name for tag in UNUSED_UNDER_DP):
            for n, p in own:
                p.requires_grad_(False)
                frozen.append(f"{name}.{n}" if name else n)
    return frozen


def average_view_gradients(params: list[nn.Parameter], examples: int, views: int) -> None:
    """Augmentation multiplicity (De et al., "Unlocking high-accuracy differentially private image
    classification through scale", 2022, section 3.1): the batch held ``views`` augmented copies of
    each of ``examples`` sampled examples, example-major (rows ``i * views .. (i + 1) * views - 1``
    are example ``i``). Each parameter's per-row gradients ``(examples * views, *shape)`` become
    per-example gradients ``(examples, *shape)``, the mean over the example's views, BEFORE Opacus
    clips them: every example still contributes one gradient of norm <= C, so the sensitivity, and
    the epsilon the ledger records, are those of plain DP-SGD; only the gradient's variance drops.
    """
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            continue
        if isinstance(sample, list):  # several backward passes in one step: medfed's loop makes one
            raise TrainingDiverged("augmentation multiplicity needs one backward pass per DP step")
        if sample.shape[0] != examples * views:
            raise TrainingDiverged(f"per-example gradients have {sample.shape[0]} rows; expected {examples} examples "
                                   f"x {views} views")
        # opacus' per-example gradient attribute (set by its hooks; not declared on torch's Parameter)
        p.grad_sample = sample.reshape(examples, views, *sample.shape[1:]).mean(dim=1)  # type: ignore[attr-defined]


class _OwnForward(nn.Module):
    """Runs ``inner``'s class forward without going through ``inner.__call__`` (whose ``forward`` the
    expanded-weights patch replaces), so the patched forward does not call itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object, **kwargs: object) -> object:
        return type(self.inner).forward(self.inner, *args, **kwargs)


@contextlib.contextmanager
def expanded_weights(module: nn.Module) -> Iterator[None]:
    """While active, ``module(x)`` computes per-example gradients with PyTorch's expanded weights
    (``call_for_per_sample_grads``; what Opacus' ``grad_sample_mode="ew"`` wraps): every trainable
    parameter's ``grad_sample`` is ``(rows, *shape)`` after ``backward``. Only a loss computed through
    ``module``'s own forward gets them, so this serves fine-tuning, not the SSL losses (which call
    sub-modules). Frozen parameters (LoRA's base weights) are left alone."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    plain = _OwnForward(module)

    def forward(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        return call_for_per_sample_grads(plain, batch_size=x.shape[0], loss_reduction="mean")(x, *args, **kwargs)

    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def remove_per_example_hooks(module: nn.Module) -> None:
    """Remove whatever Opacus' `GradSampleModule` left on ``module`` (its hooks and bookkeeping), e.g. when its
    construction failed part-way: the next DP round must find the module plain ("Trying to add hooks twice")."""
    for sub in module.modules():
        for handle in getattr(sub, "autograd_grad_sample_hooks", []) or []:
            handle.remove()
        for attr in ("autograd_grad_sample_hooks", "ft_compute_sample_grad", "_forward_counter", "activations",
                     "max_batch_len"):
            if hasattr(sub, attr):
                delattr(sub, attr)


def _entropy_generator(device: torch.device | None = None) -> torch.Generator:
    seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    return torch.Generator(device=device or "cpu").manual_seed(seed)


@dataclass(frozen=True)
class DPTrainStats:
    num_examples: int
    loss: float  # mean loss over the non-empty steps
    steps: int
    seconds: float
    mean_batch: float  # realised mean Poisson batch size


def dp_train_loop(
    module: nn.Module,
    params: list[nn.Parameter],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    dp: DPStepSettings,
    *,
    lr: float,
    weight_decay: float,
    gen: torch.Generator,
    on_step_end: Callable[[], None] | None = None,
    per_example_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DPTrainStats:
    """Run ``dp.schedule.steps`` DP-SGD steps over ``module``'s trainable ``params``.

    ``batch_loss(idx)`` must return the MEAN over the examples ``idx`` of per-example losses
    computed through ``module``'s sub-modules (Opacus' ``loss_reduction="mean"``). With
    ``dp.augment_multiplicity`` K > 1 it gets every sampled index K times in a row and must draw
    each row's augmentation independently; the K rows' gradients are averaged per example
    (`average_view_gradients`) before clipping.
    ``per_example_loss(idx)`` returns the ``(len(idx),)`` losses whose mean ``batch_loss`` is; ghost clipping
    (``dp.grad_sample_mode`` ghost) calls it instead of ``batch_loss`` and refuses K > 1 (it sees each row's
    gradient norm, not the norm of an example's mean over its views).
    ``gen`` seeds sampling and noise (ignored with ``secure_rng``).
    """
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    check_private_model(module)
    freeze_for_dp(module)
    params = [p for p in params if p.requires_grad]
    start = time.perf_counter()
    q, steps, views = dp.schedule.sample_rate, dp.schedule.steps, dp.augment_multiplicity
    if views < 1:
        raise ConfigError(f"augmentation multiplicity must be >= 1; got {views}")
    ghost = dp.grad_sample_mode == GradSampleMode.GHOST
    if ghost and (per_example_loss is None or views > 1):
        raise ConfigError("dp-grad-sample-mode ghost needs per-example losses through the model's forward "
                          "(fine-tuning) and augmentation multiplicity 1; use hooks or functorch")
    expected = max(1, round(q * n))
    gsm: GradSampleModule | GradSampleModuleFastGradientClipping | None = None
    if dp.grad_sample_mode != GradSampleMode.EW:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure_mode and full backward hooks
            try:
                if ghost:
                    gsm = GradSampleModuleFastGradientClipping(
                        module, batch_first=True, loss_reduction="mean", strict=False,
                        max_grad_norm=dp.max_grad_norm, use_ghost_clipping=True,
                    )
                else:
                    gsm = GradSampleModule(
                        module, batch_first=True, loss_reduction="mean", strict=False,
                        force_functorch=dp.grad_sample_mode == GradSampleMode.FUNCTORCH,
                    )
            except Exception:  # a layer it cannot handle, after earlier layers were hooked: leave the module plain
                remove_per_example_hooks(module)
                raise
    per_example = expanded_weights(module) if gsm is None else contextlib.nullcontext()
    sample_gen = gen  # on the CPU: it draws the Poisson batch, whose indices read the site's images
    device = params[0].device if params else torch.device("cpu")  # the noise is drawn where the gradients are
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    optimiser = (DPOptimizerFastGradientClipping if ghost else DPOptimizer)(
        torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, expected_batch_size=expected,
        loss_reduction="mean", generator=noise_gen, secure_mode=dp.secure_rng,
    )
    losses: list[float] = []
    sizes: list[int] = []
    try:
        with per_example:
            for step in range(steps):
                if dp.secure_rng:
                    sample_gen = _entropy_generator()
                    optimiser.generator = _entropy_generator(device)
                idx = torch.nonzero(torch.rand(n, generator=sample_gen) < q).flatten()
                sizes.append(len(idx))
                optimiser.zero_grad(set_to_none=True)
                if len(idx) == 0:  # an empty Poisson batch still releases noise: zero per-example gradients
                    for p in params:
                        if ghost:  # ghost clipping's optimizer noises the clipped sum in p.grad
                            p.grad = torch.zeros_like(p)
                        else:  # opacus' per-example gradient attribute, as above
                            p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                                (0, *p.shape), dtype=p.dtype, device=p.device)
                else:
                    rows = idx.repeat_interleave(views) if views > 1 else idx
                    per_row = per_example_loss(rows) if ghost and per_example_loss is not None else None
                    loss = batch_loss(rows) if per_row is None else per_row.mean()
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"DP training loss became {float(loss)} at step {step}; lower the learning rate"
                        )
                    if per_row is None:
                        loss.backward()
                    else:  # Opacus' two passes: the norms, then sum_i clip factor_i * loss_i (hooks off)
                        if per_row.shape != (len(idx),):
                            raise TrainingDiverged(f"per-example losses have shape {tuple(per_row.shape)}; "
                                                   f"expected ({len(idx)},)")
                        DPTensorFastGradientClipping(gsm, optimiser, per_row, "mean").backward()
                    if views > 1:
                        average_view_gradients(params, len(idx), views)
                    losses.append(float(loss.detach()))
                optimiser.step()
                if on_step_end is not None:
                    on_step_end()
    finally:
        if gsm is not None:
            gsm._close()  # remove the hooks and per-example gradients: the module is plain again
        for p in params:
            for attr in ("summed_grad", "grad_sample", "_processed", "_norm_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
    return DPTrainStats(
        n, float(np.mean(losses)) if losses else float("nan"), steps, time.perf_counter() - start,
        float(np.mean(sizes)) if sizes else 0.0,
    )
