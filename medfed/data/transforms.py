"""Intensity scaling and batched augmentations for 2D and 3D medical images.

Intensity scaling uses MONAI's `ScaleIntensityRange` with one range per file. Augmentations run on
whole batches ``(B, C, *spatial)`` with per-sample random parameters drawn from one seeded
`torch.Generator`: MONAI's per-sample transforms cost more per 28x28 view than a training step of
the encoder itself on a 2-core machine (measured by benchmarks/augment_cost.py, see
docs/RESULTS.md), so the SSL view pipeline is batched here. One affine warp (crop-and-resize, small
rotation, flip) and then intensity changes (brightness, contrast, gamma, Gaussian noise, Gaussian
blur) that suit grayscale X-ray, ultrasound and CT. 2D flips are left-right only; 3D volumes are
flipped along each axis. Colour jitter is never applied to grayscale
images; for RGB images only a mild per-channel gain is used.

The view recipe follows SimCLR (Chen et al., ICML 2020) with the medical adaptations of
Azizi et al. (ICCV 2021, "Big Self-Supervised Models Advance Medical Image Classification"):
milder crops and rotations, no hue changes.
"""

from __future__ import annotations

import medfed._monai  # noqa: F401  (first: MONAI without transformers, see medfed/_monai.py)

# isort: split
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import ScaleIntensityRange

from medfed.devices import device_generator


def scale_intensity(images: np.ndarray, value_range: tuple[float, float] = (0.0, 255.0)) -> torch.Tensor:
    """Channel-first images ``(N, C, *spatial)`` -> float32 tensor in [0, 1] (MONAI scaling).

    ``value_range`` maps to 0..1 linearly and values outside it are clipped. Use the file's
    one range (a MedMNIST file's `ArrayImages.value_range`) for every split and site, so all of them see
    the same mapping.
    """
    low, high = value_range
    scaler = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    out = scaler(torch.as_tensor(np.asarray(images, dtype=np.float32)))
    return torch.as_tensor(out, dtype=torch.float32).contiguous()


@dataclass(frozen=True)
class AugmentSpec:
    """Strength of each augmentation; ``light()`` is for supervised fine-tuning."""

    crop_scale: tuple[float, float] = (0.4, 1.0)  # fraction of the image area kept
    rotate_degrees: float = 15.0
    flip_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.3
    gamma: float = 0.3
    noise_prob: float = 0.5
    noise_std: float = 0.04
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    channel_gain: float = 0.1  # RGB only

    @classmethod
    def light(cls) -> AugmentSpec:
        return cls(
            crop_scale=(0.8, 1.0), rotate_degrees=10.0, brightness=0.1, contrast=0.1, gamma=0.0,
            noise_prob=0.0, blur_prob=0.0, channel_gain=0.0,
        )


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` uniform draws from ``gen`` (a CPU generator: every device draws the same parameters for a seed)."""
    return low + (high - low) * torch.rand(n, generator=gen)


def random_affine(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop-and-resize, in-plane rotation and flips in one warp.

    ``x``: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; returns the same shape. 2D images are flipped
    left-right only; 3D volumes along each axis independently (as in Models Genesis).
    """
    b, nd = x.shape[0], x.ndim - 2
    area = _uniform(b, *spec.crop_scale, gen)
    scale = area.pow(1.0 / nd)  # side length of the crop as a fraction of the image
    angle = _uniform(b, -1.0, 1.0, gen) * math.radians(spec.rotate_degrees)
    theta = torch.zeros(b, nd, nd + 1)
    eye = torch.eye(nd).expand(b, nd, nd).clone()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotate in the last two (in-plane) axes; grid coordinates are ordered (x=W, y=H, z=D)
    eye[:, 0, 0], eye[:, 0, 1], eye[:, 1, 0], eye[:, 1, 1] = cos, -sin, sin, cos
    flips = torch.where(torch.rand(b, nd, generator=gen) < spec.flip_prob, -1.0, 1.0)
    flips[:, 1:] = 1.0 if nd == 2 else flips[:, 1:]  # 2D: left-right flips only
    linear = eye * scale[:, None, None] * flips[:, None, :]
    max_shift = (1.0 - scale)[:, None]
    shift = (torch.rand(b, nd, generator=gen) * 2 - 1) * max_shift
    theta[:, :, :nd] = linear
    theta[:, :, nd] = shift
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over every spatial axis of ``(B, C, *spatial)``, reflect-padded
    (zero padding would darken the borders)."""
    k = _gaussian_kernel(sigma).to(x.device, x.dtype)
    c, nd = x.shape[1], x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    radius = k.numel() // 2
    out = x
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k.numel()
        weight = k.reshape(1, 1, *shape).repeat(c, 1, *([1] * nd))
        pad = [0] * (2 * nd)  # F.pad lists the last axis first
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = min(radius, x.shape[2 + axis] - 1)
        padded = F.pad(out, tuple(pad), mode="reflect")
        out = conv(padded, weight, groups=c)
        if out.shape[2 + axis] != x.shape[2 + axis]:  # kernel wider than the image allows to reflect
            out = F.interpolate(out, size=x.shape[2:], mode="nearest")
    return out


def random_intensity(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, gamma and noise with per-sample random strength; blur applied to a
    random subset of the batch with one sigma drawn per batch. ``x`` in [0, 1]."""
    b, c, nd = x.shape[0], x.shape[1], x.ndim - 2
    view = (b,) + (1,) * (nd + 1)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    dev = x.device  # the per-image parameters are drawn on the CPU and moved (a few numbers per image)
    contrast = 1.0 + _uniform(b, -spec.contrast, spec.contrast, gen).reshape(view).to(dev)
    bright = _uniform(b, -spec.brightness, spec.brightness, gen).reshape(view).to(dev)
    x = (x - mean) * contrast + mean + bright
    if c == 3 and spec.channel_gain > 0:
        x = x * (1.0 + _uniform(b * c, -spec.channel_gain, spec.channel_gain, gen).reshape(b, c, *(1,) * nd).to(dev))
    x = x.clamp(0.0, 1.0)
    if spec.gamma > 0:
        gamma = torch.exp(_uniform(b, -spec.gamma, spec.gamma, gen)).reshape(view).to(dev)
        x = x.clamp_min(1e-6).pow(gamma)
    if spec.blur_prob > 0:
        sigma = float(_uniform(1, *spec.blur_sigma, gen))
        chosen = (torch.rand(b, generator=gen) < spec.blur_prob).reshape(view).to(dev)
        x = torch.where(chosen, gaussian_blur(x, sigma), x)
    if spec.noise_prob > 0:
        chosen = (torch.rand(b, generator=gen) < spec.noise_prob).reshape(view).to(dev, x.dtype)
        # the noise is as large as the batch: drawn where the batch is (a GPU generator seeded from ``gen``)
        noise = torch.randn(x.shape, generator=device_generator(gen, dev), device=dev) * spec.noise_std
        x = x + chosen * noise
    return x.clamp(0.0, 1.0)


def augment(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """One random view of every image in the batch ``(B, C, *spatial)``, values in [0, 1]."""
    return random_intensity(random_affine(x, spec, gen), spec, gen)


def mask_patches(
    x: torch.Tensor, patch: int, ratio: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random ``ratio`` of non-overlapping ``patch``-sized cells (in-painting corruption).

    Returns the corrupted batch and the pixel mask ``(B, 1, *spatial)`` (1 where hidden).
    Used by the restoration pretext (Pathak et al., CVPR 2016; Chen et al., MedIA 2019).
    """
    b, nd = x.shape[0], x.ndim - 2
    cells = [math.ceil(s / patch) for s in x.shape[2:]]
    hidden = (torch.rand(b, 1, *cells, generator=gen) < ratio).to(x.device, x.dtype)
    mask = hidden
    for axis in range(nd):
        mask = mask.repeat_interleave(patch, dim=2 + axis)
    mask = mask[(slice(None), slice(None)) + tuple(slice(0, s) for s in x.shape[2:])]
    return x * (1 - mask), mask
