"""Names of a model's parts by role: its normalisation parameters and its task head (what a site may keep
personal, `medfed.constants.PersonalParts`)."""

from __future__ import annotations

from torch import nn

from medfed.constants import PersonalParts

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)
"""The normalisation layers medfed's models use (no BatchNorm: DP-SGD needs per-example independence)."""


def norm_parameter_keys(module: nn.Module, prefix: str = "") -> list[str]:
    """State keys of the affine parameters (weight, bias) of every GroupNorm/LayerNorm in ``module``, in order.

    Args:
        module: an encoder, a classifier or an SSL method.
        prefix: prepended to each key (e.g. ``"encoder."`` when ``module`` sits inside a larger model).
    """
    keys: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, NORM_TYPES):
            path = f"{prefix}{name}." if name else prefix
            keys += [path + p for p, _ in child.named_parameters(recurse=False)]
    return keys


def personal_keys(classifier: nn.Module, personal: PersonalParts | str) -> list[str]:
    """The state keys of a `Classifier` that each site keeps its own of under ``personal``: the encoder's norm
    parameters (norm), the head (head), both, or none."""
    parts = PersonalParts(personal)
    keys: list[str] = []
    if parts.norm:
        keys += norm_parameter_keys(classifier.get_submodule("encoder"), "encoder.")
    if parts.head:
        keys += [k for k in classifier.state_dict() if k.startswith("head.")]
    return keys
