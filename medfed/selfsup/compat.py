"""Checks a run's settings must pass that depend on what the self-supervised methods are.

`RunConfig` checks its settings on their own; these checks need the methods' facts (which encoder a
method works with, whether its loss is per-example), which live with the methods. `check_methods_fit`
runs wherever settings arrive before anything trains or is written: `medfed simulate` and the
ServerApp (`medfed.experiment.prepare`), `medfed run` before it submits, and each site (`SiteAlgo`).
"""

from __future__ import annotations

from medfed.config import RunConfig
from medfed.constants import DPScope, EncoderKind, GradSampleMode
from medfed.exceptions import ConfigError
from medfed.selfsup.registry import method_class, resolve_encoder_kind


def check_methods_fit(c: RunConfig) -> None:
    """Raise `ConfigError` when the encoder or DP-SGD cannot serve the run's self-supervised methods.

    Args:
        c: the run's settings.

    Raises:
        ConfigError: a method needs another encoder kind; ``dp-grad-sample-mode ew`` with a ViT; or DP
            over pretraining with a method whose loss couples the examples of a batch (SimCLR's in-batch
            negatives), where per-example clipping no longer bounds one image's influence.
    """
    kind = resolve_encoder_kind(c.model.encoder, c.ssl.methods)  # raises when a method cannot use the encoder
    if c.privacy.scope == DPScope.NONE:
        return
    if c.privacy.grad_sample_mode == GradSampleMode.EW and kind != EncoderKind.CNN:
        raise ConfigError("dp-grad-sample-mode ew works with the cnn encoder only (PyTorch's expanded-weights "
                          "convolution fails on the ViT's patch embedding); use auto, hooks or functorch")
    pretrains = bool(c.ssl.methods) and not c.model.encoder_init
    if DPScope(c.privacy.scope) in (DPScope.PRETRAIN, DPScope.ALL) and pretrains:
        coupled = [m for m in c.ssl.methods if not method_class(m).per_example_loss]
        if coupled:
            raise ConfigError(
                f"pretrain {c.ssl.method!r} cannot run under DP-SGD: {', '.join(coupled)} couples the examples of a "
                "batch (in-batch negatives), so one image changes every other image's gradient and per-example "
                "clipping no longer bounds its influence. Use a per-example method under DP (mae, byol, restore) or "
                "--dp finetune."
            )
