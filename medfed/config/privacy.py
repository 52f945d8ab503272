"""Settings parts for privacy: DP-SGD at the sites (with each site's budget and ledger), Flower's SecAgg+,
and central (site-level) DP on the server. Each part checks its own values; the combinations they cannot
honour are checked across parts in `medfed.config.run.RunConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medfed.config.base import Part, setting
from medfed.config.rules import (
    DEFAULT_MAX_PLANNED_NOISE,
    MIN_NOISE,
    PLANNER_MAX_NOISE,
    check_accountant,
    check_budget,
)
from medfed.constants import CentralDP, DPScope, GradSampleMode, SecureAggregation
from medfed.exceptions import ConfigError

MAX_AUGMENT_MULTIPLICITY = 64  # views per example under DP: the batch's compute grows K-fold


@dataclass(frozen=True)
class DPSettings(Part):
    """DP-SGD at every site (Opacus): which phases, each site's lifetime budget, and the mechanism's knobs."""

    TITLE: ClassVar[str] = "privacy"

    scope: DPScope = setting(DPScope.NONE, "Phases trained with DP-SGD at every site: none, finetune, pretrain or all. "
                             "DP pretraining needs a per-example method (mae, byol, restore); SimCLR's in-batch "
                             "negatives are refused.", key="dp")
    epsilon: float = setting(8.0, "Each site's lifetime epsilon budget, across rounds and runs (a site's node config "
                             "may lower it).", key="dp-epsilon")
    delta: float = setting(1e-5, "Each site's delta; must be below 1/(examples at the site).", key="dp-delta")
    accountant: str = setting("rdp", "Site accountant: rdp (Mironov 2017) or prv (Gopi et al. 2021).",
                              key="dp-accountant")
    max_grad_norm: float = setting(1.0, "Per-example gradient clipping bound C.", key="dp-max-grad-norm")
    noise_multiplier: float = setting(0.0, "Noise multiplier sigma; 0 plans it so the run's planned rounds spend this "
                                      "run's share of the budget (--dp-run-epsilon).", key="dp-noise-multiplier")
    run_epsilon: float = setting(0.0, "This run's share of each site's lifetime budget: a site's cumulative epsilon "
                                 "may rise by at most this much during the run, and the noise is planned for it. 0 "
                                 "(default): all that is left, so one run spends the whole budget; set it (e.g. half "
                                 "of --dp-epsilon) to keep budget for later runs (docs/PRIVACY.md).",
                                 key="dp-run-epsilon")
    max_planned_noise: float = setting(DEFAULT_MAX_PLANNED_NOISE, "A site refuses a DP round whose planned noise "
                                       "multiplier exceeds this: the budget left (or this run's share) is too small to "
                                       "train anything useful (docs/PRIVACY.md; not applied to a --dp-noise-multiplier "
                                       "you set).", key="dp-max-planned-noise")
    grad_sample_mode: GradSampleMode = setting(GradSampleMode.AUTO, "How per-example gradients are computed (the same "
                                               "clipped step, at different speeds): Opacus' hooks or functorch, "
                                               "PyTorch's expanded weights (ew; fine-tuning a CNN) or Opacus' ghost "
                                               "clipping (ghost; fine-tuning, augmentation multiplicity 1); auto: on "
                                               "the CPU ew for fine-tuning a CNN, else hooks (docs/RESULTS.md "
                                               "dp_cost_cpu); on a GPU the fastest, timed on the site's model.",
                                               key="dp-grad-sample-mode")
    secure_rng: bool = setting(False, "Draw Poisson sampling and noise from OS entropy (not reproducible) with Opacus' "
                               "floating-point-attack-resistant noise.", key="dp-secure-rng")
    augment_multiplicity: int = setting(0, "Augmentation multiplicity K under DP-SGD (De et al. 2022): each sampled "
                                        "example is augmented K times and its K gradients are averaged before "
                                        "clipping, at no privacy cost and K times the compute (0: the DP recipe's).",
                                        key="dp-augment-multiplicity")
    ledger_dir: str = setting("", "Folder of the simulated sites' privacy ledgers and signing keys, kept across runs "
                              "(default: RUN_DIR/ledgers, one budget per run).", key="ledger-dir", site=False)

    def check(self) -> None:
        if self.scope == DPScope.NONE:
            return
        check_budget(self.epsilon, self.delta)
        check_accountant(self.accountant)
        if not 0 <= self.augment_multiplicity <= MAX_AUGMENT_MULTIPLICITY:
            raise ConfigError(f"dp-augment-multiplicity must be in [1, {MAX_AUGMENT_MULTIPLICITY}] (0: the recipe's); "
                              f"got {self.augment_multiplicity}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"dp-max-grad-norm must be > 0; got {self.max_grad_norm}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"dp-noise-multiplier must be >= 0 (0 plans it from the budget); got "
                              f"{self.noise_multiplier}")
        if not 0 <= self.run_epsilon <= self.epsilon:
            raise ConfigError(f"dp-run-epsilon (this run's share of each site's budget) must be in [0, dp-epsilon = "
                              f"{self.epsilon:g}] (0: all that is left); got {self.run_epsilon:g}")
        if not MIN_NOISE < self.max_planned_noise <= PLANNER_MAX_NOISE:
            raise ConfigError(f"dp-max-planned-noise must be in ({MIN_NOISE:g}, {PLANNER_MAX_NOISE:g}] (the planner's "
                              f"range); got {self.max_planned_noise:g}")


@dataclass(frozen=True)
class SecAggSettings(Part):
    """Flower's SecAgg+ (Bell et al., CCS 2020): the server learns only the sum of the sites' updates."""

    TITLE: ClassVar[str] = "secagg"

    mode: SecureAggregation = setting(SecureAggregation.NONE, "none, or secagg+: Flower's SecAgg+, the server learns "
                                      "only the sum of the sites' updates.", key="secure-aggregation")
    num_shares: float = setting(1.0, "secagg+: each site's secrets are shared with this fraction of the sampled sites.",
                                key="secagg-num-shares", site=False)
    threshold: float = setting(0.67, "secagg+: fraction of those shares needed to unmask (>= 2); fewer sites: the "
                               "round fails.", key="secagg-threshold", site=False)
    clipping_range: float = setting(8.0, "secagg+: values are quantised in [-r, r]; a shared weight outside fails the "
                                    "round.", key="secagg-clipping-range")

    def check(self) -> None:
        if not 0 < self.num_shares <= 1:
            raise ConfigError(f"secagg-num-shares must be a fraction in (0, 1] of the sites sampled; got "
                              f"{self.num_shares}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"secagg-threshold must be a fraction in (0, 1] of the shares; got {self.threshold}")
        if not self.clipping_range > 0:
            raise ConfigError(f"secagg-clipping-range must be > 0; got {self.clipping_range}")


@dataclass(frozen=True)
class CentralDPSettings(Part):
    """Central, site-level DP on the server (McMahan et al., ICLR 2018): clipped updates, Gaussian noise on their
    mean. The unit of privacy is a whole site."""

    TITLE: ClassVar[str] = "central-dp"

    mode: CentralDP = setting(CentralDP.NONE, "none, server-clip (the server clips each site's update) or client-clip "
                              "(each site clips its own; works under secagg+).", key="central-dp")
    noise_multiplier: float = setting(1.0, "z: noise std on the mean is z x clipping norm / sites aggregated.",
                                      key="central-dp-noise-multiplier", site=False)
    clipping_norm: float = setting(1.0, "C: L2 bound on one site's update (local minus global shared weights).",
                                   key="central-dp-clipping-norm")
    delta: float = setting(1e-3, "Delta of the site-level guarantee; must be < 1 / num-sites.", key="central-dp-delta")

    def check(self) -> None:
        if self.mode == CentralDP.NONE:
            return
        if not self.noise_multiplier > 0:
            raise ConfigError(f"central-dp-noise-multiplier must be > 0; got {self.noise_multiplier}")
        if not self.clipping_norm > 0:
            raise ConfigError(f"central-dp-clipping-norm must be > 0; got {self.clipping_norm}")
