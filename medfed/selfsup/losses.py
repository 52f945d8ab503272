"""Self-supervised losses, pure functions of tensors (reference values are pinned in tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent / InfoNCE of SimCLR (Chen et al., ICML 2020, eq. 1), averaged over all 2B anchors.

    ``z1``, ``z2``: ``(B, D)`` projections of two views; row i of each is a positive pair,
    the other 2B - 2 rows are negatives. The loss couples examples in a batch, so SimCLR
    cannot run under DP-SGD.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, targets)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss 2 - 2 cos(p, z) (Grill et al., NeurIPS 2020, eq. 2), mean over the batch.

    ``p``: online predictions ``(B, D)``; ``z``: target projections ``(B, D)`` (no gradient).
    Per-example: each term depends on one image only.
    """
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def masked_patch_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize_target: bool = True
) -> torch.Tensor:
    """MAE reconstruction loss (He et al., CVPR 2022): MSE on masked patches only.

    ``pred``, ``target``: ``(B, N, P)`` patch pixels; ``mask``: ``(B, N)`` with 1 where the
    patch was hidden. With ``normalize_target`` each target patch is standardised first
    (the paper's norm_pix_loss). Per-example up to the mean over the batch.
    """
    if normalize_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, N, patch**nd * C)``, patches in row-major grid order.

    The grid order matches MONAI's `PatchEmbeddingBlock` (conv projection flattened over the
    spatial grid), so patch n here is token n there.
    """
    b, c, nd = x.shape[0], x.shape[1], x.ndim - 2
    grid = [s // patch for s in x.shape[2:]]
    shape = [b, c]
    for g in grid:
        shape += [g, patch]
    x = x.reshape(shape)
    grid_axes = [2 + 2 * i for i in range(nd)]
    inner_axes = [3 + 2 * i for i in range(nd)]
    x = x.permute(0, *grid_axes, *inner_axes, 1)
    return x.reshape(b, int(torch.tensor(grid).prod()), -1)
