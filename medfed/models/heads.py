"""Heads that sit on an encoder: SSL projection/prediction MLPs, the restoration decoder, the classifier.

All use LayerNorm or GroupNorm, never BatchNorm, so a model stays valid for DP-SGD.
"""

from __future__ import annotations

import medfed._monai  # noqa: F401  (first: MONAI without transformers, see medfed/_monai.py)

# isort: split
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from medfed.constants import TaskType
from medfed.models.encoders import CNNEncoder, Encoder, group_norm


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU -> Linear: SimCLR projector, BYOL projector and predictor."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
    )


class RestorationDecoder(nn.Module):
    """Upsamples a `CNNEncoder` feature map back to the input: ``(B, F, *s) -> (B, C, *S)``.

    One nearest-neighbour upsample plus GroupNorm convolution per encoder stage, then a
    1x1 convolution to the image channels and a resize to the exact input size.
    """

    def __init__(self, encoder: CNNEncoder) -> None:
        super().__init__()
        nd, width = encoder.spec.spatial_dims, encoder.feature_dim
        layers: list[nn.Module] = []
        c = width
        for _ in range(encoder.stages):
            c_out = max(c // 2, 8)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                Convolution(nd, c, c_out, kernel_size=3, norm=group_norm(c_out), act="relu"),
            ]
            c = c_out
        layers.append(Convolution(nd, c, encoder.spec.channels, kernel_size=1, conv_only=True))
        self.net = nn.Sequential(*layers)
        self.out_shape = encoder.spec.spatial_shape
        self.mode = "bilinear" if nd == 2 else "trilinear"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)
        if tuple(out.shape[2:]) != tuple(self.out_shape):
            out = F.interpolate(out, size=self.out_shape, mode=self.mode, align_corners=False)
        return out


class Classifier(nn.Module):
    """Encoder + linear head. ``(B, C, *S) -> (B, num_classes)`` logits.

    Binary tasks use two logits with softmax, so binary and multi-class share one code path.
    """

    def __init__(self, encoder: Encoder, task: TaskType, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for binary/multi-class (labels ``(B, 1)``), BCE for multi-label ``(B, K)``."""
        if self.task == TaskType.MULTILABEL:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels[:, 0])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.task == TaskType.MULTILABEL:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)
