"""Poisson sampling of sites for central DP: DP-FedAvg's user sampling (McMahan, Ramage, Talwar & Zhang, ICLR 2018,
"Learning Differentially Private Recurrent Language Models", Algorithm 1).

With central DP and ``fraction-train`` q < 1 the server does not take Flower's fixed-size sample (``random.sample``
of ``int(q N)`` nodes): it asks every connected site for its update and keeps each one INDEPENDENTLY with
probability q. The draw comes from the operating system's CSPRNG (`secrets.SystemRandom`, which reads
``os.urandom``), never from the run seed: the amplification by sampling that the accountant claims holds only for
a draw nobody outside the server can predict or replay. Which sites a round sampled is therefore NOT reproducible
from the seed, and must not be; a seeded generator is for tests only (``rng``).

`medfed.strategies.central_dp` pairs the draw with the fixed denominator q N that makes one site's presence
change the release by at most C / (q N), so that each release is the sampled Gaussian mechanism with rate q.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from medfed.exceptions import ConfigError


@dataclass(frozen=True)
class PoissonSampling:
    """Each site in a round's sample independently with probability ``rate`` (q) out of ``num_sites`` (N)."""

    rate: float
    num_sites: int
    rng: random.Random = field(default_factory=secrets.SystemRandom, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise ConfigError(f"Poisson sampling needs a rate in (0, 1); got {self.rate}")
        if self.num_sites < 1:
            raise ConfigError(f"Poisson sampling needs at least one site; got {self.num_sites}")

    @property
    def expected_sites(self) -> float:
        """q N: the fixed denominator of the release (not the number of sites that happened to be drawn)."""
        return self.rate * self.num_sites

    def draw(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes kept: one independent Bernoulli(q) per node (possibly none)."""
        return [node for node in node_ids if self.rng.random() < self.rate]
