"""Central (site-level) differential privacy on the aggregate: clip, average, add Gaussian noise.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, ICLR 2018, "Learning Differentially Private Recurrent
Language Models"; Geyer, Klein & Nabi 2017): each site's update ``Delta_i`` (its shared weights minus
the global weights it was sent) is clipped to L2 norm ``C`` (over all shared arrays together, "flat
clipping"), the server averages the ``n`` clipped updates UNWEIGHTED and adds ``N(0, (z C / n)^2)``
to every coordinate of the mean::

    w_next = w + (1/n) * (sum_i clip(Delta_i, C) + N(0, (z C)^2 I))

The unit of privacy is a whole site: two federations are neighbours when one site's update is
replaced by zero ("zero-out" adjacency, Kairouz et al., ICML 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling"), which changes the sum by at most ``C``. Every aggregate is
one Gaussian mechanism with noise multiplier ``z``; no amplification by sampling is claimed (even
when ``fraction-train`` < 1), so ``T`` releases compose as ``T`` Gaussian mechanisms (RDP; the same
accountant as the sites' DP-SGD with sample rate 1). Amplification would need each site to be included
independently with probability q by a draw the adversary cannot know (Poisson subsampling, the bound the
RDP accountant computes); Flower samples a fixed number of sites with Python's ``random`` module, and the
noise is scaled by the updates that arrived, not by the expected number (tests/test_many_sites.py pins it).

Who clips: ``server-clip`` (the server sees and clips every update) or ``client-clip`` (each site clips
before sending; the server verifies the norm unless SecAgg+ hides the update); the strategy's part is
`medfed.strategies.central_dp`.

The noise comes from the operating system's CSPRNG (``os.urandom``, Box-Muller), never from the run
seed: a receiver of the model who could regenerate the noise could subtract it. Floating-point
Gaussian sampling has known side channels (Mironov, CCS 2012); this implementation does not defend
against them.

Flower-free: tests and the strategy call these functions directly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medfed.config import CentralDPSettings
from medfed.exceptions import FederationError
from medfed.privacy.accounting import epsilon_spent
from medfed.privacy.guard import KEY_SUFFIX, LEDGER_SUFFIX, open_signed_ledger, release_history
from medfed.privacy.ledger import MECHANISM_CENTRAL, Release
from medfed.privacy.mechanism import MechanismStep

CENTRAL_SITE = "central"  # the ledger's site name for the server's own releases
CENTRAL_ACCOUNTANT = "rdp"
CLIP_TOLERANCE = 1e-5  # relative slack when the server checks a site-clipped update (float32 rounding)


def noise_std(settings: CentralDPSettings, num_updates: int) -> float:
    """Standard deviation of the noise on each coordinate of the mean of ``num_updates`` clipped updates:
    ``z C / n``.

    Raises:
        FederationError: no update to average.
    """
    if num_updates < 1:
        raise FederationError("central DP: no update to average")
    return settings.noise_multiplier * settings.clipping_norm / num_updates


def update_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``weights - reference`` over every array of ``weights`` together (float64 sums)."""
    total = 0.0
    for key, value in weights.items():
        diff = np.asarray(value, dtype=np.float64) - np.asarray(reference[key], dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def clip_update(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                clipping_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``reference + clip(weights - reference, C)`` (flat clipping, Flower's ``compute_clip_model_update``
    by key) and the update's norm before clipping; dtypes kept."""
    norm = update_norm(weights, reference)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out = {}
    for key, value in weights.items():
        ref = np.asarray(reference[key], dtype=np.float64)
        out[key] = (ref + (np.asarray(value, dtype=np.float64) - ref) * scale).astype(np.asarray(value).dtype)
    return out, norm


def secure_standard_normal(size: int) -> np.ndarray:
    """``size`` independent N(0, 1) draws from the OS CSPRNG (53-bit uniforms, Box-Muller)."""
    pairs = (size + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]: log is finite
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return normals[:size]


def add_noise(mean: Mapping[str, np.ndarray], std: float) -> dict[str, np.ndarray]:
    """``mean`` plus N(0, std^2) on every coordinate (float arrays only; dtypes kept)."""
    out = {}
    for key, value in mean.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            raise FederationError(f"central DP: shared array {key!r} is {value.dtype}, not floating point; "
                                  "it cannot be noised")
        noise = secure_standard_normal(value.size).reshape(value.shape) * std
        out[key] = (value.astype(np.float64) + noise).astype(value.dtype)
    return out


class CentralLedger:
    """The server's signed ledger of its central-DP releases (``central.ledger.sqlite`` in the arm's ledger
    folder; the same chained, signed format as a site's, so `medfed audit` verifies and recomputes it).

    One row per aggregate released: mechanism ``central-gaussian``, sample rate 1, one step, the noise
    multiplier, the delta and the cumulative site-level epsilon over every row of this ledger (across
    rounds, phases and runs that share the ledger folder)."""

    def __init__(self, ledger_dir: Path, run_id: str, settings: CentralDPSettings) -> None:
        self.path = ledger_dir / f"{CENTRAL_SITE}{LEDGER_SUFFIX}"
        self.key_path = ledger_dir / f"{CENTRAL_SITE}{KEY_SUFFIX}"
        self.run_id, self.settings = run_id, settings

    def record(self, phase: str, server_round: int) -> float:
        """Append one release; returns the cumulative epsilon after it."""
        s = self.settings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open_signed_ledger(self.path, self.key_path, CENTRAL_SITE) as ledger:
            history = [*release_history(ledger.entries(), MECHANISM_CENTRAL), MechanismStep(s.noise_multiplier, 1.0, 1)]
            after = epsilon_spent(history, s.delta, CENTRAL_ACCOUNTANT)
            ledger.append(Release(run_id=self.run_id, server_round=server_round, phase=phase,
                                  mechanism=MECHANISM_CENTRAL, sample_rate=1.0, noise_multiplier=s.noise_multiplier,
                                  steps=1, delta=s.delta, epsilon_after=after, accountant=CENTRAL_ACCOUNTANT))
        return after
