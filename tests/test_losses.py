"""SSL losses and patchify against analytic values, naive loops and MONAI (medfed.selfsup.losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbeddingBlock

from medfed.models.encoders import InputSpec, ViTEncoder, ViTSize
from medfed.selfsup.losses import byol_loss, masked_patch_mse, nt_xent, patchify


# ---------------------------------------------------------------- NT-Xent
def test_nt_xent_analytic():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # each anchor: positive similarity 1, two orthogonal negatives with similarity 0
    expected = math.log(1 + 2 / math.e)
    assert expected == pytest.approx(0.551444, abs=1e-6)
    assert nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_temperature_analytic():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5  # positive logit 1/t, negatives 0: loss = log(1 + 2 exp(-1/t))
    assert nt_xent(z, z, temperature=t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), abs=1e-6)


def _nt_xent_naive(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    z = torch.cat([z1, z2]).double()
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        cos = [float(F.cosine_similarity(z[i], z[k], dim=0)) / temperature for k in range(n)]
        denom = sum(math.exp(cos[k]) for k in range(n) if k != i)
        total += -math.log(math.exp(cos[pos]) / denom)
    return total / n


@pytest.mark.parametrize("b, d, t", [(4, 8, 0.2), (6, 3, 0.5), (2, 16, 1.0)])
def test_nt_xent_matches_naive_loop(b, d, t):
    torch.manual_seed(0)
    z1, z2 = torch.randn(b, d), torch.randn(b, d)
    assert nt_xent(z1, z2, t).item() == pytest.approx(_nt_xent_naive(z1, z2, t), abs=1e-5)


def test_nt_xent_is_scale_invariant_and_symmetric():
    torch.manual_seed(1)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    base = nt_xent(z1, z2, 0.3).item()
    assert nt_xent(3 * z1, 0.5 * z2, 0.3).item() == pytest.approx(base, abs=1e-5)
    assert nt_xent(z2, z1, 0.3).item() == pytest.approx(base, abs=1e-5)


# ---------------------------------------------------------------- BYOL
def test_byol_loss_values():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    orth = torch.tensor([[2.0, -1.0, 0.0], [2.0, 1.0, 7.0]])
    assert byol_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(a, 5 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert byol_loss(a, orth).item() == pytest.approx(2.0, abs=1e-6)
    assert byol_loss(a, -a).item() == pytest.approx(4.0, abs=1e-6)
    # mean over the batch: one identical row (0) and one opposite row (4)
    mixed = torch.stack([a[0], -a[1]])
    assert byol_loss(a, mixed).item() == pytest.approx(2.0, abs=1e-6)


def test_byol_loss_no_gradient_to_target():
    p = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# ---------------------------------------------------------------- MAE loss
def test_masked_patch_mse_unnormalised():
    pred = torch.tensor([[[1.0, 1.0], [5.0, 5.0], [2.0, 0.0]]])  # (1, 3, 2)
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[1, 0, 1]])
    # patch MSEs 1, 25, 2; only patches 0 and 2 hidden -> (1 + 2) / 2
    assert masked_patch_mse(pred, target, mask, normalize_target=False).item() == pytest.approx(1.5)


def test_masked_patch_mse_averages_over_all_hidden_patches_of_the_batch():
    pred = torch.tensor([[[2.0], [0.0]], [[0.0], [4.0]]])  # (2, 2, 1)
    target = torch.zeros(2, 2, 1)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert masked_patch_mse(pred, target, mask, normalize_target=False).item() == pytest.approx((4 + 0 + 16) / 3)


def test_masked_patch_mse_nothing_hidden_is_zero():
    pred, target = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert masked_patch_mse(pred, target, torch.zeros(2, 3), normalize_target=False).item() == 0.0


def test_masked_patch_mse_normalised_target():
    target = torch.tensor([[[1.0, 3.0], [10.0, 30.0]]])  # each patch standardises to [-1, 1]
    pred = torch.tensor([[[-1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1]])
    # patch 0 matches, patch 1 error 1 per pixel -> (0 + 1) / 2
    assert masked_patch_mse(pred, target, mask, normalize_target=True).item() == pytest.approx(0.5, abs=1e-5)


# ---------------------------------------------------------------- patchify
def test_patchify_2d_block_order():
    torch.manual_seed(0)
    b, c, h, w, p = 2, 3, 8, 12, 4
    x = torch.randn(b, c, h, w)
    patches = patchify(x, p)
    gh, gw = h // p, w // p
    assert patches.shape == (b, gh * gw, p * p * c)
    for n in range(gh * gw):
        i, j = n // gw, n % gw
        block = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
        # within a patch: (row, col, channel) order, channel fastest
        assert torch.equal(patches[:, n], block.permute(0, 2, 3, 1).reshape(b, -1))


def test_patchify_3d_block_order():
    torch.manual_seed(1)
    b, c, d, h, w, p = 1, 2, 8, 8, 12, 4
    x = torch.randn(b, c, d, h, w)
    patches = patchify(x, p)
    gd, gh, gw = d // p, h // p, w // p
    assert patches.shape == (b, gd * gh * gw, p**3 * c)
    for n in range(gd * gh * gw):
        k, i, j = n // (gh * gw), (n // gw) % gh, n % gw
        block = x[:, :, k * p : (k + 1) * p, i * p : (i + 1) * p, j * p : (j + 1) * p]
        assert torch.equal(patches[:, n], block.permute(0, 2, 3, 4, 1).reshape(b, -1))


def _selector_weight(c: int, p: int, nd: int) -> torch.Tensor:
    """Conv weight (p**nd * c, c, p, ...) mapping a patch to its pixels in patchify's order."""
    hidden = p**nd * c
    weight = torch.zeros(hidden, c, *([p] * nd))
    for k in range(hidden):
        ch, pos = k % c, k // c
        idx = []
        for _ in range(nd):
            idx.append(pos % p)
            pos //= p
        weight[(k, ch, *reversed(idx))] = 1.0
    return weight


@pytest.mark.parametrize("nd, c, spatial, p", [(2, 1, (8, 12), 4), (2, 3, (8, 8), 2), (3, 2, (4, 8, 6), 2)])
def test_patchify_matches_monai_patch_embedding(nd, c, spatial, p):
    hidden = p**nd * c
    block = PatchEmbeddingBlock(
        in_channels=c, img_size=spatial, patch_size=p, hidden_size=hidden, num_heads=1,
        proj_type="conv", pos_embed_type="none", spatial_dims=nd,
    )
    with torch.no_grad():
        block.patch_embeddings.weight.copy_(_selector_weight(c, p, nd))
        block.patch_embeddings.bias.zero_()
    torch.manual_seed(2)
    x = torch.randn(2, c, *spatial)
    with torch.no_grad():
        tokens = block(x)
    patches = patchify(x, p)
    assert tokens.shape == patches.shape
    torch.testing.assert_close(tokens, patches, atol=1e-6, rtol=0)
    # the same with an ordering-free comparison (per-token sums and sorted values)
    torch.testing.assert_close(tokens.sum(-1), patches.sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.sort(-1).values, patches.sort(-1).values, atol=1e-6, rtol=0)


def test_patchify_matches_vit_encoder_tokens():
    """The encoder MAE uses (MONAI MaskedAutoEncoderViT pieces) orders tokens like patchify."""
    spec = InputSpec(1, (16, 16))
    enc = ViTEncoder(spec, ViTSize(hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2,
                                   decoder_hidden_size=8, decoder_mlp_dim=8, decoder_num_layers=1,
                                   decoder_num_heads=2))
    emb = enc.patch_embedding
    with torch.no_grad():
        emb.patch_embeddings.weight.copy_(_selector_weight(1, 4, 2))
        emb.patch_embeddings.bias.zero_()
        x = torch.rand(2, 1, 16, 16)
        tokens = emb(x) - emb.position_embeddings
    torch.testing.assert_close(tokens, patchify(x, 4), atol=1e-6, rtol=0)
