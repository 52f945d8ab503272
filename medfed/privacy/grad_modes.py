"""Which per-example gradient mode a DP-SGD phase runs with: ``auto`` resolved per model and device.

Every mode gives the same clipped, noised step (tests/test_dp_sgd.py): Opacus' hooks, its functorch fall-back,
PyTorch's expanded weights (``ew``, for losses that go through the model's own forward: fine-tuning a CNN) and
Opacus' ghost clipping (``ghost``: fine-tuning a CNN or a ViT, augmentation multiplicity 1) differ only in speed
and memory, and which is fastest depends on the model and the device. The accounting is untouched: every mode
clips the same per-example gradients; the ledger records the same ``(q, sigma, steps)``.

* On the CPU, ``auto`` keeps the rule measured there (docs/RESULTS.md, ``dp_cost_cpu``): ``ew`` for fine-tuning a
  CNN, hooks otherwise. It is a fixed rule, so a CPU run stays bitwise reproducible.
* On a GPU, ``auto`` times each mode that can run the phase for two DP steps on the site's own model and batch
  (the second step timed; weights, optimizer and the round's generator are put back afterwards, so nothing of the
  measurement reaches the round) and keeps the fastest for the process, per (model, device, phase, batch).

The mode a round ran with travels in its reply (``dp-grad-sample-mode``: 0 hooks, 1 functorch, 2 ew, 3 ghost) and lands
in metrics.jsonl; a site's log names it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from medfed.constants import GradSampleMode
from medfed.privacy.dp_sgd import DPStepSettings, PoissonSchedule, dp_train_loop, remove_per_example_hooks

log = logging.getLogger(__name__)

MODE_CODES = {GradSampleMode.HOOKS.value: 0.0, GradSampleMode.FUNCTORCH.value: 1.0, GradSampleMode.EW.value: 2.0,
              GradSampleMode.GHOST.value: 3.0}
"""How a mode is reported in a reply's scalar metrics."""

_CHOSEN: dict[tuple[object, ...], str] = {}


def candidates(*, finetuning: bool, encoder: str) -> list[str]:
    """The modes that can run a phase: expanded weights and ghost clipping only for a loss through the model's
    forward (fine-tuning); expanded weights only on a CNN (PyTorch's expanded-weights convolution fails on the ViT's
    patch embedding)."""
    modes = [GradSampleMode.HOOKS.value, GradSampleMode.FUNCTORCH.value]
    if finetuning and encoder == "cnn":
        modes.append(GradSampleMode.EW.value)
    if finetuning:
        modes.append(GradSampleMode.GHOST.value)
    return modes


def _time_mode(module: nn.Module, params: list[nn.Parameter], batch_loss: Callable[[torch.Tensor], torch.Tensor],
               n: int, dp: DPStepSettings, mode: str, gen: torch.Generator, lr: float,
               per_example_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Seconds of the second of two DP steps in ``mode`` (the first warms the kernels up)."""
    trial = dataclasses.replace(dp, schedule=PoissonSchedule(dp.schedule.sample_rate, 1), grad_sample_mode=mode,
                                secure_rng=False)
    probe = torch.Generator().manual_seed(0)
    dp_train_loop(module, params, batch_loss, n, trial, lr=lr, weight_decay=0.0, gen=probe,
                  per_example_loss=per_example_loss)
    if params and params[0].device.type == "cuda":
        torch.cuda.synchronize(params[0].device)
    start = time.perf_counter()
    dp_train_loop(module, params, batch_loss, n, trial, lr=lr, weight_decay=0.0, gen=probe,
                  per_example_loss=per_example_loss)
    if params and params[0].device.type == "cuda":
        torch.cuda.synchronize(params[0].device)
    return time.perf_counter() - start


def resolve_grad_sample_mode(setting: str, *, finetuning: bool, encoder: str, module: nn.Module,
                             params: list[nn.Parameter], batch_loss: Callable[[torch.Tensor], torch.Tensor], n: int,
                             dp: DPStepSettings, gen: torch.Generator, lr: float, measure: bool | None = None,
                             per_example_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str:
    """The mode this phase runs with: the setting unless ``auto``; ``auto`` by the CPU rule, or on a GPU the mode
    measured fastest for this model and batch (cached for the process). ``measure`` forces either way (tests).
    Ghost clipping is measured only with ``per_example_loss`` (`dp_train_loop`) and augmentation multiplicity 1."""
    mode = GradSampleMode(setting)
    if mode != GradSampleMode.AUTO:
        return mode.value
    device = params[0].device if params else torch.device("cpu")
    if not (device.type == "cuda" if measure is None else measure):
        return mode.for_phase(finetuning=finetuning, encoder=encoder).value
    shapes = tuple(tuple(p.shape) for p in params)
    ghost_ok = per_example_loss is not None and dp.augment_multiplicity == 1
    key = (type(module).__name__, shapes, str(device), finetuning, round(dp.schedule.sample_rate * n), ghost_ok)
    if key in _CHOSEN:
        return _CHOSEN[key]
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    gen_state = gen.get_state()
    times: dict[str, float] = {}
    try:
        for name in candidates(finetuning=finetuning, encoder=encoder):
            if name == GradSampleMode.GHOST and not ghost_ok:
                continue
            try:
                times[name] = _time_mode(module, params, batch_loss, n, dp, name, gen, lr, per_example_loss)
            except Exception as exc:  # a mode this model cannot run here: not a candidate
                remove_per_example_hooks(module)
                log.info("DP gradient mode %s cannot run this model here: %s", name, type(exc).__name__)
    finally:
        remove_per_example_hooks(module)
        module.load_state_dict(saved)
        gen.set_state(gen_state)
        for p in params:
            p.grad = None
            for attr in ("grad_sample", "summed_grad", "_processed", "_norm_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
    chosen = min(times, key=times.__getitem__) if times else GradSampleMode.HOOKS.value
    log.info("DP gradient mode on %s: %s (seconds per step: %s)", device, chosen,
             ", ".join(f"{k} {v:.4f}" for k, v in times.items()))
    _CHOSEN[key] = chosen
    return chosen
