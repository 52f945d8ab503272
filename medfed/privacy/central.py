"""Central (site-level) differential privacy on the aggregate: clip, average, add Gaussian noise.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang, ICLR 2018, "Learning Differentially Private Recurrent
Language Models"; Geyer, Klein & Nabi 2017): each site's update ``Delta_i`` (its shared weights minus
the global weights it was sent) is clipped to L2 norm ``C`` (over all shared arrays together, "flat
clipping"); with every site asked, the server averages the ``n`` clipped updates UNWEIGHTED and adds
``N(0, (z C / n)^2)`` to every coordinate of the mean (with sampling, see below)::

    w_next = w + (1/n) * (sum_i clip(Delta_i, C) + N(0, (z C)^2 I))

The unit of privacy is a whole site: two federations are neighbours when one site's update is
replaced by zero ("zero-out" adjacency, Kairouz et al., ICML 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling"), which changes the sum by at most ``C``.

``fraction-train`` = 1 (every site, every round): each aggregate is one Gaussian mechanism with noise
multiplier ``z`` (sample rate 1), and ``T`` releases compose as ``T`` Gaussian mechanisms (RDP; the same
accountant as the sites' DP-SGD). The mean is over the ``n`` updates that arrived.

``fraction-train`` = q < 1: DP-FedAvg's sampling and estimator (McMahan et al. 2018, Algorithm 1). Each
site is in a round's sample independently with probability q, drawn by the server's CSPRNG
(`medfed.strategies.site_sampling`, not reproducible), and the release divides by the FIXED expected
count ``q N`` (N = num-sites), not by the number that arrived::

    w_next = w + (1/(q N)) * (sum_{i sampled} clip(Delta_i, C) + N(0, (z C)^2 I))

A sampled site that fails, refuses or is rejected adds zero, and a round with no site sampled still
releases (the noise alone, as DP-SGD does for an empty batch): a site's presence changes the sum by at
most ``C``, whatever else happens, so every release is the Poisson-sampled Gaussian mechanism with rate
q and noise multiplier z (Mironov, Talwar & Zhang 2019), and the accountant composes ``(z, q, 1)`` per
release (`CentralLedger` records q in the row; `medfed audit` recomputes from it). With zero-out
adjacency and the fixed denominator, a site whose update is zero and a site that is absent give the same
release, so the add/remove analysis of the sampled Gaussian applies. Flower's own sampling (a fixed
number of sites drawn with Python's seeded ``random``, the mean over the updates that arrived) would
support neither claim; it is not used when central DP samples.

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
from collections.abc import Mapping, Sequence
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


def sampled_noise_std(settings: CentralDPSettings, expected_sites: float) -> float:
    """Under Poisson sampling, the noise std on each coordinate of the estimate ``sum / (q N)``: ``z C / (q N)``.

    Raises:
        FederationError: ``expected_sites`` (q N) is not positive.
    """
    if not expected_sites > 0:
        raise FederationError(f"central DP: the expected number of sites q N must be > 0; got {expected_sites}")
    return settings.noise_multiplier * settings.clipping_norm / expected_sites


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


def clipped_sum(updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray],
                clipping_norm: float) -> dict[str, np.ndarray]:
    """``sum_i clip(updates[i] - reference, C)`` over the keys of ``reference``, in float64 (zeros for no update):
    the sum whose sensitivity to one site is ``C``."""
    total = {key: np.zeros(np.shape(value), np.float64) for key, value in reference.items()}
    for update in updates:
        norm = update_norm({key: update[key] for key in reference}, reference)
        scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
        for key, value in reference.items():
            total[key] += (np.asarray(update[key], np.float64) - np.asarray(value, np.float64)) * scale
    return total


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

    One row per aggregate released: mechanism ``central-gaussian``, the sample rate (1 when every site is
    asked, q under Poisson sampling), one step, the noise multiplier, the delta and the cumulative site-level
    epsilon over every row of this ledger (across rounds, phases and runs that share the ledger folder)."""

    def __init__(self, ledger_dir: Path, run_id: str, settings: CentralDPSettings) -> None:
        self.path = ledger_dir / f"{CENTRAL_SITE}{LEDGER_SUFFIX}"
        self.key_path = ledger_dir / f"{CENTRAL_SITE}{KEY_SUFFIX}"
        self.run_id, self.settings = run_id, settings

    def record(self, phase: str, server_round: int, sample_rate: float = 1.0) -> float:
        """Append one release at ``sample_rate`` (q: each site in it independently with that probability);
        returns the cumulative epsilon after it."""
        s = self.settings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open_signed_ledger(self.path, self.key_path, CENTRAL_SITE) as ledger:
            step = MechanismStep(s.noise_multiplier, sample_rate, 1)
            after = epsilon_spent([*release_history(ledger.entries(), MECHANISM_CENTRAL), step], s.delta,
                                  CENTRAL_ACCOUNTANT)
            ledger.append(Release(run_id=self.run_id, server_round=server_round, phase=phase,
                                  mechanism=MECHANISM_CENTRAL, sample_rate=sample_rate,
                                  noise_multiplier=s.noise_multiplier,
                                  steps=1, delta=s.delta, epsilon_after=after, accountant=CENTRAL_ACCOUNTANT))
        return after
