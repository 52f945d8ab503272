"""Intensity scaling, batched augmentation and patch masking (medfed.data.transforms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.data.transforms import AugmentSpec, augment, gaussian_blur, mask_patches, random_affine, scale_intensity

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- scale_intensity
def test_scale_intensity_uint8():
    images = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    out = scale_intensity(images)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert out.shape == (1, 1, 16, 16)
    assert out.min().item() == 0.0 and out.max().item() == 1.0
    torch.testing.assert_close(out, torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 255.0)


def test_scale_intensity_uint8_is_not_min_max():
    # a dark 8-bit image stays dark: 0..255 is the fixed range, not the data's own min/max
    images = np.full((2, 1, 8, 8), 51, dtype=np.uint8)
    images[0, 0, 0, 0] = 102
    out = scale_intensity(images)
    assert out[1].max().item() == pytest.approx(0.2)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.4)


def test_scale_intensity_float_uses_the_given_range_and_clips():
    images = np.array([-100.0, 0.0, 300.0, 500.0], dtype=np.float64).reshape(1, 1, 1, 4)
    out = scale_intensity(images, (-100.0, 300.0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.25, 1.0, 1.0]))


# ---------------------------------------------------------------- augment
SHAPES = [(6, 1, 28, 28), (6, 3, 28, 28), (4, 1, 16, 16, 16)]


def _images(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", [AugmentSpec(), AugmentSpec.light()], ids=["ssl", "light"])
def test_augment_shape_range_and_determinism(shape, spec):
    x = _images(shape)
    a = augment(x, spec, _gen(1))
    b = augment(x, spec, _gen(1))
    c = augment(x, spec, _gen(2))
    assert a.shape == x.shape
    assert a.dtype == torch.float32
    assert a.min().item() >= 0.0 and a.max().item() <= 1.0
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # same generator seed, same views
    assert not torch.allclose(a, c)  # another seed, other views
    assert not torch.allclose(a, x)  # it did change the images
    assert torch.equal(x, _images(shape))  # the input is not modified in place


@pytest.mark.parametrize("shape", SHAPES)
def test_augment_differs_per_sample(shape):
    one = _images((1, *shape[1:]), seed=3)
    batch = one.expand(shape).contiguous()  # B identical images
    out = augment(batch, AugmentSpec(), _gen(4))
    flat = out.flatten(1)
    for i in range(shape[0]):
        for j in range(i + 1, shape[0]):
            assert (flat[i] - flat[j]).abs().max() > 1e-3, f"samples {i} and {j} got the same transform"


def test_augment_advances_generator():
    gen = _gen(5)
    x = _images(SHAPES[0])
    first, second = augment(x, AugmentSpec(), gen), augment(x, AugmentSpec(), gen)
    assert not torch.allclose(first, second)


def test_identity_spec_keeps_images():
    spec = AugmentSpec(
        crop_scale=(1.0, 1.0), rotate_degrees=0.0, flip_prob=0.0, brightness=0.0, contrast=0.0, gamma=0.0,
        noise_prob=0.0, blur_prob=0.0, channel_gain=0.0,
    )
    x = _images((3, 1, 16, 16))
    torch.testing.assert_close(augment(x, spec, _gen(0)), x, atol=1e-5, rtol=0)


def test_flip_only_spec_flips_left_right():
    spec = AugmentSpec(
        crop_scale=(1.0, 1.0), rotate_degrees=0.0, flip_prob=1.0, brightness=0.0, contrast=0.0, gamma=0.0,
        noise_prob=0.0, blur_prob=0.0, channel_gain=0.0,
    )
    x = _images((2, 1, 12, 12))
    torch.testing.assert_close(augment(x, spec, _gen(0)), x.flip(-1), atol=1e-5, rtol=0)


def test_gaussian_blur_preserves_constant_and_mass():
    x = torch.full((1, 2, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.0), x)  # borders too: reflect padding, no darkening
    torch.testing.assert_close(gaussian_blur(torch.full((1, 1, 6, 6, 6), 0.7), 1.0), torch.full((1, 1, 6, 6, 6), 0.7))
    impulse = torch.zeros(1, 1, 15, 15, 15)
    impulse[0, 0, 7, 7, 7] = 1.0
    out = gaussian_blur(impulse, 0.8)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0, 7, 7, 7] < 1.0 and out[0, 0, 7, 7, 8] > 0


# ---------------------------------------------------------------- mask_patches
@pytest.mark.parametrize("shape, patch", [((64, 1, 28, 28), 4), ((16, 3, 28, 28), 3), ((16, 1, 16, 16, 16), 4)])
@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_mask_patches(shape, patch, ratio):
    x = torch.rand(shape, generator=_gen(0)) + 0.1  # strictly positive, so zeros mean hidden
    corrupted, mask = mask_patches(x, patch, ratio, _gen(1))
    assert corrupted.shape == x.shape
    assert mask.shape == (shape[0], 1, *shape[2:])
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - ratio) < 0.06
    hidden = mask.expand_as(x).bool()
    assert torch.all(corrupted[hidden] == 0)
    assert torch.equal(corrupted[~hidden], x[~hidden])
    # the mask is constant inside each patch cell (check the first cell of every sample)
    cell = mask[(slice(None), 0) + (slice(0, patch),) * (len(shape) - 2)]
    flat = cell.reshape(shape[0], -1)
    assert torch.all(flat == flat[:, :1])


def test_mask_patches_deterministic_and_ragged_edges():
    x = torch.ones(4, 1, 10, 10)
    c1, m1 = mask_patches(x, 4, 0.5, _gen(7))
    c2, m2 = mask_patches(x, 4, 0.5, _gen(7))
    assert torch.equal(m1, m2) and torch.equal(c1, c2)
    assert m1.shape == (4, 1, 10, 10)  # 3x3 cells, last ones cut to size
    _, none = mask_patches(x, 4, 0.0, _gen(0))
    _, full = mask_patches(x, 4, 1.0, _gen(0))
    assert none.sum() == 0 and full.sum() == full.numel()


def test_flips_left_right_in_2d_and_every_axis_in_3d():
    only_flip = AugmentSpec(crop_scale=(1.0, 1.0), rotate_degrees=0.0, flip_prob=1.0)
    x2 = _images((2, 1, 12, 12))
    torch.testing.assert_close(random_affine(x2, only_flip, _gen(0)), x2.flip(-1), atol=1e-5, rtol=0)
    x3 = _images((2, 1, 8, 8, 8))
    torch.testing.assert_close(random_affine(x3, only_flip, _gen(0)), x3.flip(-1, -2, -3), atol=1e-5, rtol=0)
