"""Settings parts for the federation: the strategy and its rounds, and how the centre combines the sites'
updates (the mean, or a Byzantine-robust rule, and a norm-outlier screen)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medfed.config.base import Part, setting
from medfed.constants import DEFAULT_ROUND_TIMEOUT, AggregationRule, PersonalParts, StrategyName
from medfed.exceptions import ConfigError


@dataclass(frozen=True)
class FederationSettings(Part):
    """Flower's strategy and how rounds sample and wait for the sites."""

    TITLE: ClassVar[str] = "federation"

    strategy: StrategyName = setting(StrategyName.FEDAVG, "Aggregation: fedavg (example-weighted) or fedprox.",
                                     key="strategy")
    proximal_mu: float = setting(0.0, "FedProx proximal weight mu (> 0 with --strategy fedprox).", key="proximal-mu")
    personal: PersonalParts = setting(
        PersonalParts.NONE, "Parts each site keeps its own of: none, norm (GroupNorm/LayerNorm affine parameters, "
        "FedBN's idea), head (the task head, FedPer/FedRep) or norm+head. A site trains from its own copy and never "
        "loads the global one back; the global model still holds the sites' average (evaluated as before), and "
        "each site's personalised model is evaluated too (report.md).", key="personal")
    fraction_train: float = setting(1.0, "Fraction of sites sampled each round.", key="fraction-train", site=False)
    fraction_evaluate: float = setting(0.0, "Fraction of sites sampled for federated evaluation each round, in "
                                       "(0, 1]; 0: the same as fraction-train.", key="fraction-evaluate",
                                       site=False)
    min_sites: int = setting(0, "Sites a round needs: it starts once this many are connected and fails (resumable) "
                             "unless this many answer with a valid update (a site refusing at its privacy budget "
                             "answers too: recorded, not waited for); 0 = every site, so a site that dies or sends "
                             "an invalid update fails the round. Below num-sites, such a site is left out and may "
                             "rejoin later.",
                             key="min-sites", site=False)
    round_timeout: float = setting(DEFAULT_ROUND_TIMEOUT, "Seconds a round waits for the sites' replies.",
                                   key="round-timeout", site=False)
    client_cpus: int = setting(0, "CPU cores per simulated site (0 = all cores, so sites train one after another).",
                               key="client-cpus", site=False)
    client_gpus: float = setting(0.0, "GPUs per simulated site (Ray's client resources): 0.25 runs four sites on "
                                 "each GPU at once; 0: the sites share whatever device --device names, without "
                                 "Ray counting GPUs.", key="client-gpus", site=False)
    ray_address: str = setting("", "Run the simulated sites on an existing Ray cluster at this address (passed to "
                               "ray.init; e.g. 127.0.0.1:6379): its nodes must see the data, run and cache folders at "
                               "the same paths. Empty: a Ray instance of this machine. See docs/DEPLOYMENT.md on "
                               "who can reach a Ray cluster.", key="ray-address", site=False)

    def check(self) -> None:
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal-mu must be >= 0; got {self.proximal_mu}")
        if self.strategy == StrategyName.FEDPROX and self.proximal_mu == 0:
            raise ConfigError("strategy fedprox needs proximal-mu > 0 (with 0 it is FedAvg)")
        if self.strategy != StrategyName.FEDPROX and self.proximal_mu > 0:
            raise ConfigError(f"proximal-mu > 0 needs --strategy fedprox; got strategy {self.strategy}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1]; got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in (0, 1], or 0 for fraction-train; got "
                              f"{self.fraction_evaluate}")
        if self.client_gpus < 0:
            raise ConfigError(f"client-gpus must be >= 0; got {self.client_gpus}")
        if self.client_gpus > 1 and not float(self.client_gpus).is_integer():
            raise ConfigError(f"client-gpus above 1 must be a whole number of GPUs (Ray's rule); got "
                              f"{self.client_gpus}")
        if self.ray_address != self.ray_address.strip() or any(c.isspace() for c in self.ray_address):
            raise ConfigError(f"ray-address must be an address without spaces (host:port, ray://host:port or auto); "
                              f"got {self.ray_address!r}")
        if not self.round_timeout > 0:
            raise ConfigError(f"round-timeout must be > 0 seconds; got {self.round_timeout}")
        if self.client_cpus < 0:
            raise ConfigError(f"client-cpus must be >= 0; got {self.client_cpus}")


@dataclass(frozen=True)
class RobustSettings(Part):
    """How the centre combines accepted updates of the shared weights, and which updates it screens out."""

    TITLE: ClassVar[str] = "robust"

    rule: AggregationRule = setting(AggregationRule.MEAN, "How accepted updates are combined: mean (the strategy's "
                                    "example-weighted average), or a Byzantine-robust rule, unweighted: trimmed-mean "
                                    "or median (coordinate-wise, Yin et al. 2018) or krum (Blanchard et al. 2017). "
                                    "Applies to the shared weights only (the encoder in pretraining).",
                                    key="aggregation", site=False)
    trim_fraction: float = setting(0.2, "trimmed-mean: fraction of the sites' values dropped at EACH end of every "
                                   "coordinate, in [0, 0.5); at least one site per end must be dropped.",
                                   key="trim-fraction", site=False)
    krum_byzantine: int = setting(1, "krum: number f of faulty sites tolerated; needs at least 2f+3 sites per round.",
                                  key="krum-byzantine", site=False)
    krum_select: int = setting(1, "krum: Multi-Krum averages the m best-scored updates (1 = Krum); m <= sites per "
                               "round - f.", key="krum-select", site=False)
    norm_outlier_factor: float = setting(0.0, "Reject an update whose L2 distance from the global weights exceeds this "
                                         "factor times the median distance of the other updates (0 = off, else > 1; "
                                         "needs at least 3 sites per round).", key="norm-outlier-factor", site=False)

    def check(self) -> None:
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(
                f"trim-fraction must be in [0, 0.5) (the fraction dropped at each end); got {self.trim_fraction}"
            )
        if self.krum_byzantine < 0:
            raise ConfigError(f"krum-byzantine must be >= 0; got {self.krum_byzantine}")
        if self.krum_select < 1:
            raise ConfigError(f"krum-select must be >= 1; got {self.krum_select}")
        if self.norm_outlier_factor != 0 and not self.norm_outlier_factor > 1:
            raise ConfigError(f"norm-outlier-factor must be 0 (off) or > 1; got {self.norm_outlier_factor}")
