"""LoRA adapters on an encoder's conv and linear layers with peft (Hu et al., ICLR 2022).

Every ``Conv{1,2,3}d`` and ``Linear`` of the encoder gets a rank-``r`` adapter: peft keeps
the pretrained layer as ``base_layer`` (frozen) and adds ``lora_A`` (a conv with the
layer's kernel, ``in -> r``) and ``lora_B`` (``r -> out``, 1x1, zero-initialised, so the
adapted encoder starts equal to the pretrained one), scaled by ``alpha / r``. Only the
adapters and the task head train and travel; the adapters are plain ``nn.Conv*d`` /
``nn.Linear`` modules, so Opacus computes their per-example gradients like any other
layer (DP-SSLoRA, Computers in Biology and Medicine 2024, uses the same combination).
"""

from __future__ import annotations

from torch import nn

LORA_MARKER = "lora_"
ADAPTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def lora_target_names(encoder: nn.Module) -> list[str]:
    """Names of the encoder's conv and linear layers (the layers that get adapters)."""
    return [name for name, module in encoder.named_modules() if isinstance(module, ADAPTED_TYPES)]


def add_lora(encoder: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Inject adapters into ``encoder`` in place; everything but the adapters is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates an int; a float works (scaling = alpha / r)
        target_modules=lora_target_names(encoder),
        lora_dropout=0.0,
        bias="none",
    )
    inject_adapter_in_model(config, encoder)
    for name, param in encoder.named_parameters():
        param.requires_grad_(LORA_MARKER in name)
    return encoder


def is_lora_key(key: str) -> bool:
    return LORA_MARKER in key
