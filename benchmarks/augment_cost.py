"""Cost of making SSL views: MONAI per-sample transforms against medfed's batched augmentations.

Both pipelines do a random affine (rotation, scale), a flip, contrast, Gaussian noise and
Gaussian blur on 28x28 grayscale images; the ratio is measured in one run, together with
one SimCLR training step of the default encoder for scale. Writes into docs/RESULTS.md.

    python benchmarks/augment_cost.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise, RandGaussianSmooth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.data.transforms import AugmentSpec, augment
from medfed.models.encoders import CNNEncoder, InputSpec
from medfed.selfsup.methods import SimCLR, SSLSettings


def per_view_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    batch = torch.rand(128, 1, 28, 28)
    monai = Compose([
        RandAffine(prob=1.0, rotate_range=0.26, scale_range=0.3, padding_mode="reflection"),
        RandFlip(prob=0.5, spatial_axis=1), RandAdjustContrast(prob=1.0), RandGaussianNoise(prob=0.5, std=0.04),
        RandGaussianSmooth(prob=0.3),
    ]).set_random_state(0)
    gen = torch.Generator().manual_seed(0)
    spec = AugmentSpec()
    monai_ms = per_view_ms(lambda: [monai(x) for x in batch], 5) / len(batch)
    batched_ms = per_view_ms(lambda: augment(batch, spec, gen), 20) / len(batch)
    method = SimCLR(CNNEncoder(InputSpec(1, (28, 28)), width=16), SSLSettings())
    optimiser = torch.optim.AdamW(method.parameters(), lr=1e-3)

    def step() -> None:
        optimiser.zero_grad()
        method.loss(batch, gen).backward()
        optimiser.step()

    step_ms = per_view_ms(step, 5) / (2 * len(batch))  # two views per image
    text = "\n".join([
        "## Cost of SSL views (augmentations)",
        "",
        "Command: `python benchmarks/augment_cost.py`",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__}, batch of 128 "
        "28x28 grayscale images, one run.",
        "",
        "| pipeline | ms per view |",
        "|---|---|",
        "| MONAI per-sample Compose (RandAffine, RandFlip, RandAdjustContrast, RandGaussianNoise, RandGaussianSmooth) "
        f"| {monai_ms:.3f} |",
        f"| medfed batched `augment` (same operations, per-sample random parameters) | {batched_ms:.3f} |",
        f"| for scale: one SimCLR training step of the default encoder (width 16), per view | {step_ms:.3f} |",
        "",
        f"Ratio MONAI / batched: {monai_ms / batched_ms:.1f}x. MONAI per-sample views cost "
        f"{monai_ms / step_ms:.1f}x a training step, which is why SSL views are batched.",
    ])
    write_section("augment_cost", text)
    print(text)


if __name__ == "__main__":
    main()
