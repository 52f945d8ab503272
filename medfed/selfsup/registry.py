"""Registry of self-supervised methods: name -> class, and `build_method` for 'a+b' combinations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medfed.exceptions import ConfigError

if TYPE_CHECKING:
    from medfed.models.encoders import Encoder
    from medfed.selfsup.methods import SSLMethod, SSLSettings

_METHOD_PATHS = {
    "simclr": "SimCLR",
    "byol": "BYOL",
    "mae": "MAE",
    "restore": "Restore",
}


def available_methods() -> list[str]:
    """Names accepted by ``--pretrain`` (joinable with '+'), besides 'none'."""
    return sorted(_METHOD_PATHS)


def method_class(name: str) -> type["SSLMethod"]:
    from medfed.selfsup import methods

    if name not in _METHOD_PATHS:
        raise ConfigError(f"unknown self-supervised method {name!r}; known: {', '.join(available_methods())}")
    return getattr(methods, _METHOD_PATHS[name])


def build_method(
    names: list[str], weights: list[float], encoder: "Encoder", settings: "SSLSettings"
) -> "SSLMethod":
    """One method, or a weighted `Combined` of several, all on the same encoder."""
    from medfed.selfsup.methods import Combined

    if not names:
        raise ConfigError("no self-supervised method given")
    parts = [method_class(n)(encoder, settings) for n in names]
    if len(parts) == 1:
        return parts[0]
    return Combined(encoder, parts, weights)


def supports_dp(names: list[str]) -> bool:
    """True when every named method has a per-example loss (usable under DP-SGD)."""
    return all(method_class(n).per_example_loss for n in names)
