"""One DP-SGD release as the accountants see it: a value object shared by the site's accountant
(Opacus, `medfed.privacy.accounting`) and the auditor's (dp-accounting, `medfed.privacy.independent`).

Imports neither accounting library, so the auditor can validate ledger rows without Opacus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medfed.exceptions import ConfigError


@dataclass(frozen=True)
class MechanismStep:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism (one DP-SGD release).

    Each step samples every example independently with probability ``sample_rate`` (q), clips
    per-example gradients and adds Gaussian noise of standard deviation ``noise_multiplier`` times
    the clipping norm (Abadi et al. 2016).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ConfigError(f"noise_multiplier must be a finite number > 0; got {sigma!r}")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1]; got {q!r}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ConfigError(f"steps must be an integer >= 1; got {steps!r}")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))
