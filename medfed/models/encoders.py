"""Image encoders built from MONAI pieces, ready for DP-SGD (GroupNorm/LayerNorm, no BatchNorm).

* `CNNEncoder`: a residual CNN (He et al., CVPR 2016) from MONAI's `Convolution` and
  `ResidualUnit` with GroupNorm (Wu & He, ECCV 2018). MONAI's own `ResNet` ignores ``norm=``
  inside its residual blocks, so it is assembled here. Works in 2D and 3D; the number of
  stride-2 stages is chosen from the spatial size so the last feature map is about 4 pixels.
* `ViTEncoder`: the encoder half of MONAI's `MaskedAutoEncoderViT` (He et al., CVPR 2022),
  LayerNorm throughout; `selfsup.methods.MAE` reuses exactly these modules.

Every encoder maps ``(B, C, *spatial)`` to features ``(B, feature_dim)``.
"""

from __future__ import annotations

import medfed._monai  # noqa: F401  (first: MONAI without transformers, see medfed/_monai.py)

# isort: split
import math
from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import MaskedAutoEncoderViT
from torch import nn

from medfed.constants import EncoderKind
from medfed.exceptions import ConfigError


@dataclass(frozen=True)
class InputSpec:
    """What the data look like: channels and spatial shape (2 or 3 dims)."""

    channels: int
    spatial_shape: tuple[int, ...]

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)


def group_norm(channels: int) -> tuple[str, dict[str, int]]:
    """MONAI norm spec: GroupNorm with 8 groups (or fewer when channels are few)."""
    return ("group", {"num_groups": math.gcd(8, channels)})


class CNNEncoder(nn.Module):
    """Residual GroupNorm CNN: stem, then stride-2 residual stages doubling the width.

    Input ``(B, C, *S)``; `forward_features` gives ``(B, width * 2**stages, *S / 2**stages)``;
    `forward` global-average-pools to ``(B, feature_dim)``.
    """

    def __init__(self, spec: InputSpec, width: int = 16, max_stages: int = 4) -> None:
        super().__init__()
        if spec.spatial_dims not in (2, 3):
            raise ConfigError(f"CNNEncoder supports 2D or 3D images; got spatial shape {spec.spatial_shape}")
        nd = spec.spatial_dims
        stages = 0
        size = min(spec.spatial_shape)
        while stages < max_stages and size >= 7:
            size = math.ceil(size / 2)
            stages += 1
        channels = [width * 2**i for i in range(stages + 1)]
        layers: list[nn.Module] = [
            Convolution(nd, spec.channels, channels[0], kernel_size=3, norm=group_norm(channels[0]), act="relu")
        ]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers.append(
                ResidualUnit(nd, c_in, c_out, strides=2, kernel_size=3, subunits=2, norm=group_norm(c_out), act="relu")
            )
        self.features = nn.Sequential(*layers)
        self.pool = (nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool3d(1))
        self.spec = spec
        self.stages = stages
        self.feature_dim = channels[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def vit_patch_size(spec: InputSpec) -> int:
    """Smallest patch among 4, 7, 8, 2 (in that order of preference) dividing every side; 3D prefers 7."""
    preference = (7, 8, 4) if spec.spatial_dims == 3 else (4, 7, 8, 2)
    for p in preference:
        if all(s % p == 0 for s in spec.spatial_shape):
            return p
    raise ConfigError(
        f"ViT needs a patch size dividing every side of {spec.spatial_shape}; none of {preference} does"
    )


@dataclass(frozen=True)
class ViTSize:
    """A small ViT for 28-64 pixel images (ViT-Tiny-like, Touvron et al. 2021, fewer layers)."""

    hidden_size: int = 192
    mlp_dim: int = 384
    num_layers: int = 4
    num_heads: int = 3
    decoder_hidden_size: int = 144  # divisible by 6 (3D sin-cos) and by the 4 heads
    decoder_mlp_dim: int = 256
    decoder_num_layers: int = 2
    decoder_num_heads: int = 4


def build_masked_autoencoder(spec: InputSpec, size: ViTSize, masking_ratio: float = 0.75) -> MaskedAutoEncoderViT:
    return MaskedAutoEncoderViT(
        in_channels=spec.channels,
        img_size=spec.spatial_shape,
        patch_size=vit_patch_size(spec),
        hidden_size=size.hidden_size,
        mlp_dim=size.mlp_dim,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        masking_ratio=masking_ratio,
        decoder_hidden_size=size.decoder_hidden_size,
        decoder_mlp_dim=size.decoder_mlp_dim,
        decoder_num_layers=size.decoder_num_layers,
        decoder_num_heads=size.decoder_num_heads,
        spatial_dims=spec.spatial_dims,
    )


class ViTEncoder(nn.Module):
    """Patch embedding + class token + transformer blocks of MONAI's masked-autoencoder ViT.

    `forward_tokens` gives ``(B, 1 + num_patches, hidden)`` (class token first); `forward`
    averages the patch tokens to ``(B, hidden)`` (mean pooling fine-tunes better than the
    class token for MAE features, He et al. 2022, section A.1).
    """

    def __init__(self, spec: InputSpec, size: ViTSize = ViTSize()) -> None:
        super().__init__()
        donor = build_masked_autoencoder(spec, size)
        self.patch_embedding = donor.patch_embedding
        self.cls_token = donor.cls_token
        self.blocks = donor.blocks
        self.spec, self.size = spec, size
        self.feature_dim = size.hidden_size

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.blocks(torch.cat((cls, tokens), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 1:].mean(dim=1)


Encoder = CNNEncoder | ViTEncoder


def build_encoder(kind: EncoderKind | str, spec: InputSpec, width: int = 16) -> Encoder:
    """Encoder for data of this shape. ``kind`` must be resolved (cnn or vit), not auto."""
    kind = EncoderKind(kind)
    if kind == EncoderKind.CNN:
        return CNNEncoder(spec, width=width)
    if kind == EncoderKind.VIT:
        return ViTEncoder(spec)
    raise ConfigError(f"encoder kind must be resolved to cnn or vit before building; got {kind}")
