"""Self-supervised methods as pieces (views -> encoder -> head -> loss), lightly-style.

Each method is an `nn.Module` holding a reference to the shared encoder plus its own
site-local parts (projection heads, predictors, decoders, momentum targets). Only the
encoder's state travels to the server; `local_state_dict` is everything else and stays at
the site between rounds.

All randomness (views, masks) comes from the `torch.Generator` passed to `loss`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, cast

import torch
from torch import nn

from medfed.constants import EncoderKind
from medfed.data.transforms import AugmentSpec, augment, mask_patches
from medfed.models.encoders import CNNEncoder, Encoder, ViTEncoder, build_masked_autoencoder, vit_patch_size
from medfed.models.heads import RestorationDecoder, mlp_head
from medfed.selfsup.losses import byol_loss, masked_patch_mse, nt_xent, patchify


@dataclass(frozen=True)
class SSLSettings:
    """Hyper-parameters of the SSL methods (see `RunConfig` for their defaults)."""

    temperature: float = 0.2
    byol_momentum: float = 0.99
    mask_ratio: float = 0.75
    projection_dim: int = 128
    views: AugmentSpec = field(default_factory=AugmentSpec)


class SSLMethod(nn.Module, ABC):
    """Base class. Subclasses set `name`, `encoder_kinds`, `per_example_loss` and `loss`."""

    name: ClassVar[str]
    encoder_kinds: ClassVar[tuple[EncoderKind, ...]] = (EncoderKind.CNN, EncoderKind.VIT)
    per_example_loss: ClassVar[bool]
    """True when each example's loss term depends on that example alone (DP-SGD compatible)."""

    def __init__(self, encoder: Encoder, settings: SSLSettings) -> None:
        super().__init__()
        self.encoder = encoder
        self.settings = settings

    @abstractmethod
    def loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scalar loss for a batch of images ``(B, C, *S)`` scaled to [0, 1]."""

    def on_step_end(self) -> None:
        """Called after each optimiser step (BYOL updates its momentum target here)."""

    # ---- what stays at the site ----------------------------------------------------
    def _encoder_tensor_ids(self) -> set[int]:
        return {id(t) for t in self.encoder.state_dict(keep_vars=True).values()}

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """Site-local state: every tensor of this method that is not part of the shared encoder."""
        shared = self._encoder_tensor_ids()
        return {
            k: v.detach().clone()
            for k, v in self.state_dict(keep_vars=True).items()
            if id(v) not in shared
        }

    def load_local_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.local_state_dict())
        if set(state) != expected:
            raise ValueError(f"site-local state keys differ: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        self.load_state_dict(state, strict=False)


class SimCLR(SSLMethod):
    """SimCLR (Chen et al., ICML 2020): two augmented views, MLP projector, NT-Xent."""

    name = "simclr"
    per_example_loss = False

    def __init__(self, encoder: Encoder, settings: SSLSettings) -> None:
        super().__init__(encoder, settings)
        d = encoder.feature_dim
        self.projector = mlp_head(d, d, settings.projection_dim)

    def loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        v1, v2 = augment(x, self.settings.views, gen), augment(x, self.settings.views, gen)
        z = self.projector(self.encoder(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.settings.temperature)


class BYOL(SSLMethod):
    """BYOL (Grill et al., NeurIPS 2020) with LayerNorm heads (Richemond et al. 2020 show BYOL
    needs no batch statistics). The momentum target (encoder + projector) stays at the site,
    as in FedU (Zhuang et al., ICCV 2021)."""

    name = "byol"
    per_example_loss = True

    def __init__(self, encoder: Encoder, settings: SSLSettings) -> None:
        super().__init__(encoder, settings)
        d, p = encoder.feature_dim, settings.projection_dim
        self.projector = mlp_head(d, 2 * d, p)
        self.predictor = mlp_head(p, 2 * d, p)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for module in (self.target_encoder, self.target_projector):
            module.requires_grad_(False)

    def loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # The two views go through the online network in two passes of B (not one of 2B): with
        # batch-free norms the result is the same, and under DP-SGD Opacus then accumulates ONE
        # per-example gradient per image (a 2B batch would clip each view separately).
        v1, v2 = augment(x, self.settings.views, gen), augment(x, self.settings.views, gen)
        p1 = self.predictor(self.projector(self.encoder(v1)))
        p2 = self.predictor(self.projector(self.encoder(v2)))
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_encoder(torch.cat([v1, v2]))).chunk(2)
        return 0.5 * (byol_loss(p1, t2) + byol_loss(p2, t1))

    @torch.no_grad()
    def on_step_end(self) -> None:
        m = self.settings.byol_momentum
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)


class MAE(SSLMethod):
    """Masked autoencoder (He et al., CVPR 2022) from MONAI's `MaskedAutoEncoderViT`.

    The encoder modules are the `ViTEncoder`'s own; the decoder stays at the site. Masking
    uses the passed generator (MONAI's forward draws from the global RNG, so it is not used).
    """

    name = "mae"
    encoder_kinds = (EncoderKind.VIT,)
    per_example_loss = True

    def __init__(self, encoder: Encoder, settings: SSLSettings) -> None:
        super().__init__(encoder, settings)
        if not isinstance(encoder, ViTEncoder):
            raise TypeError("MAE needs a ViTEncoder")
        donor = build_masked_autoencoder(encoder.spec, encoder.size, settings.mask_ratio)
        self.decoder_embed = donor.decoder_embed
        self.mask_tokens = donor.mask_tokens
        self.decoder_pos_embedding = donor.decoder_pos_embedding
        self.decoder_blocks = donor.decoder_blocks
        self.decoder_pred = donor.decoder_pred
        self.patch = vit_patch_size(encoder.spec)
        self.light_views = AugmentSpec(
            crop_scale=(0.6, 1.0), rotate_degrees=0.0, brightness=0.0, contrast=0.0, gamma=0.0,
            noise_prob=0.0, blur_prob=0.0, channel_gain=0.0,
        )

    def reconstruct(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches ``(B, N, P)`` and the mask ``(B, N)`` (1 = hidden)."""
        enc: ViTEncoder = self.encoder  # type: ignore[assignment]
        tokens = enc.patch_embedding(x)
        b, n, _ = tokens.shape
        keep = max(1, int(round(n * (1 - self.settings.mask_ratio))))
        order = torch.argsort(torch.rand(b, n, generator=gen), dim=1).to(tokens.device)  # drawn on the CPU
        kept = order[:, :keep]
        rows = torch.arange(b, device=tokens.device).unsqueeze(1)
        visible = tokens[rows, kept]
        mask = torch.ones(b, n, device=tokens.device)
        mask[rows, kept] = 0
        cls = enc.cls_token.expand(b, -1, -1)
        latent = enc.blocks(torch.cat((cls, visible), dim=1))
        latent = self.decoder_embed(latent)
        full = self.mask_tokens.repeat(b, n, 1)
        full[rows, kept] = latent[:, 1:].to(full.dtype)  # under bf16 autocast the decoder embeds in bf16
        full = full + self.decoder_pos_embedding
        out = self.decoder_pred(self.decoder_blocks(torch.cat((latent[:, :1], full), dim=1)))
        return out[:, 1:], mask

    def loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = augment(x, self.light_views, gen)
        pred, mask = self.reconstruct(x, gen)
        return masked_patch_mse(pred, patchify(x, self.patch), mask)


class Restore(SSLMethod):
    """Restoration pretext: in-paint randomly hidden patches of a noisy view with a light decoder
    (context restoration, Chen et al., Medical Image Analysis 2019; Models Genesis, Zhou et al. 2021).
    Per-example loss; the decoder stays at the site."""

    name = "restore"
    encoder_kinds = (EncoderKind.CNN,)
    per_example_loss = True

    def __init__(self, encoder: Encoder, settings: SSLSettings) -> None:
        super().__init__(encoder, settings)
        if not isinstance(encoder, CNNEncoder):
            raise TypeError("Restore needs a CNNEncoder")
        self.decoder = RestorationDecoder(encoder)
        self.patch = max(2, min(encoder.spec.spatial_shape) // 7)
        self.corruption = AugmentSpec(
            crop_scale=(1.0, 1.0), rotate_degrees=0.0, flip_prob=0.0, brightness=0.0, contrast=0.0,
            gamma=0.0, noise_prob=1.0, noise_std=0.05, blur_prob=0.0, channel_gain=0.0,
        )

    def loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        corrupted, _ = mask_patches(augment(x, self.corruption, gen), self.patch, 0.3, gen)
        enc: CNNEncoder = self.encoder  # type: ignore[assignment]
        restored = self.decoder(enc.forward_features(corrupted))
        return (restored - x).pow(2).mean()


class Combined(SSLMethod):
    """Weighted sum of several methods sharing one encoder, e.g. contrastive + restoration.

    The review this project follows (Shurrab & Duwairi, PeerJ CS 2022, "Self-supervised
    learning methods and applications in medical imaging analysis: a survey") found combined
    pretext tasks beat single ones. Loss = sum_i w_i * loss_i.
    """

    name = "combined"
    per_example_loss = False  # class default; instances say whether every part is per-example

    def __init__(self, encoder: Encoder, parts: list[SSLMethod], weights: list[float]) -> None:
        super().__init__(encoder, parts[0].settings)
        if any(p.encoder is not encoder for p in parts):
            raise ValueError("every combined method must share the same encoder")
        self.parts = nn.ModuleList(parts)
        self.weights = list(weights)
        self.per_example_loss = all(p.per_example_loss for p in parts)  # type: ignore[misc]

    def _parts(self) -> list[SSLMethod]:
        return cast("list[SSLMethod]", list(self.parts))  # nn.ModuleList yields them as plain Modules

    def loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        losses = (w * p.loss(x, gen) for p, w in zip(self._parts(), self.weights, strict=True) if w > 0)
        return cast(torch.Tensor, sum(losses, 0.0))

    def on_step_end(self) -> None:
        for p in self._parts():
            p.on_step_end()
