"""Registry of self-supervised methods: name -> class, and `build_method` for 'a+b' combinations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medfed.constants import EncoderKind, SSLMethodName
from medfed.exceptions import ConfigError

if TYPE_CHECKING:
    from medfed.models.encoders import Encoder
    from medfed.selfsup.methods import SSLMethod, SSLSettings

_METHOD_PATHS = {
    SSLMethodName.SIMCLR: "SimCLR",
    SSLMethodName.BYOL: "BYOL",
    SSLMethodName.MAE: "MAE",
    SSLMethodName.RESTORE: "Restore",
}


def available_methods() -> list[str]:
    """Names accepted by ``--pretrain`` (joinable with '+'), besides 'none'."""
    return sorted(m.value for m in _METHOD_PATHS)


def method_class(name: str) -> type[SSLMethod]:
    from medfed.selfsup import methods

    if name not in _METHOD_PATHS:
        raise ConfigError(f"unknown self-supervised method {name!r}; known: {', '.join(available_methods())}")
    return getattr(methods, _METHOD_PATHS[SSLMethodName(name)])


def build_method(
    names: list[str], weights: list[float], encoder: Encoder, settings: SSLSettings
) -> SSLMethod:
    """One method, or a weighted `Combined` of several, all on the same encoder."""
    from medfed.selfsup.methods import Combined

    if not names:
        raise ConfigError("no self-supervised method given")
    parts = [method_class(n)(encoder, settings) for n in names]
    if len(parts) == 1:
        return parts[0]
    return Combined(encoder, parts, weights)


def resolve_encoder_kind(requested: str, ssl_methods: list[str]) -> EncoderKind:
    """AUTO -> ViT when MAE is among the methods, else CNN; check the methods can use the kind."""
    kind = EncoderKind(requested)
    if kind == EncoderKind.AUTO:
        kind = EncoderKind.VIT if "mae" in ssl_methods else EncoderKind.CNN
    for name in ssl_methods:
        allowed = method_class(name).encoder_kinds
        if kind not in allowed:
            raise ConfigError(
                f"self-supervised method {name!r} needs a {' or '.join(k.value for k in allowed)} encoder; "
                f"got --encoder {kind.value}"
            )
    return kind
