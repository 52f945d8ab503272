"""The resolved settings of one medfed run.

`RunConfig` is a frozen dataclass. It converts to and from Flower's flat run config
(kebab-case keys such as ``num-sites``) exactly once, at the edges, and validates every
value on construction: a bad value raises `ConfigError` naming the setting and its rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from medfed.constants import (
    DEFAULT_ROUND_TIMEOUT,
    NO_PRETRAIN,
    RESUME_KEY,
    AggregationRule,
    Baselines,
    CentralDP,
    DPScope,
    EncoderKind,
    FinetuneMode,
    GradSampleMode,
    Mode,
    PartitionScheme,
    SecureAggregation,
    StrategyName,
)
from medfed.exceptions import ConfigError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class FinetuneRecipe:
    """How federated fine-tuning steps: AdamW learning rate, (Poisson) batch size, rounds."""

    lr: float
    batch_size: int
    rounds: int
    augment_multiplicity: int = 1  # under DP-SGD: views per example, gradients averaged before clipping
    lr_schedule: str = "constant"  # constant | cosine (over rounds; `lr_at_round`)

    def lr_at_round(self, server_round: int) -> float:
        """The learning rate of fine-tuning round ``server_round`` (1-based) of ``rounds``: constant, or cosine
        decay from ``lr`` in round 1 towards 0 after the last round (Loshchilov and Hutter, ICLR 2017, one cycle,
        stepped per round). Decaying shrinks the last rounds' noisy steps, so the final model sits nearer the
        optimum than DP noise at the full rate would let it (the released model is the last round's)."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(max(server_round - 1, 0), self.rounds) / self.rounds
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


FINETUNE_RECIPE = FinetuneRecipe(lr=3e-4, batch_size=32, rounds=25)
"""Fine-tuning without DP (sized with `benchmarks/default_run.py`)."""

LR_SCHEDULES = ("constant", "cosine")
MAX_AUGMENT_MULTIPLICITY = 64  # views per example under DP: the batch's compute grows K-fold

DP_FINETUNE_RECIPE: dict[str, FinetuneRecipe] = {
    FinetuneMode.FULL.value: FinetuneRecipe(lr=1e-2, batch_size=64, rounds=10),
    FinetuneMode.LORA.value: FinetuneRecipe(lr=3e-2, batch_size=64, rounds=20),
    FinetuneMode.LINEAR.value: FinetuneRecipe(lr=1e-2, batch_size=64, rounds=10),  # not searched: full's recipe
}
"""Fine-tuning under DP-SGD, per fine-tuning mode: chosen on the sites' validation data (never the test
split) by `benchmarks/dp_recipe.py` at epsilon 8 (PneumoniaMNIST, 5 sites, delta 1e-5); its table is in
docs/RESULTS.md (dp_recipe)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; defaults are those of `medfed simulate` with no flags.

    Defaults were sized so that the default run (5 sites, PneumoniaMNIST, 10 % labels,
    pretraining then fine-tuning, plus the default baselines) finishes within 10 minutes
    on 2 CPU cores; `benchmarks/default_run.py` measures it into docs/RESULTS.md.
    """

    # data and sites
    data: str = "pneumoniamnist"
    num_sites: int = 5
    partition: str = PartitionScheme.DIRICHLET.value
    alpha: float = 0.5
    label_fraction: float = 0.1
    min_site_size: int = 10
    seed: int = 0
    # what to run
    mode: str = Mode.FEDERATED.value
    pretrain: str = "simclr"
    pretrain_weights: str = ""  # comma list, one weight per method in `pretrain` (a+b)
    encoder: str = EncoderKind.AUTO.value
    width: int = 16
    encoder_init: str = ""  # safetensors of a pretrained encoder: skip pretraining, start from it
    baselines: str = Baselines.DEFAULT.value
    # pretraining
    pretrain_rounds: int = 10
    pretrain_epochs: int = 1
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 128
    temperature: float = 0.2
    byol_momentum: float = 0.99
    mask_ratio: float = 0.75
    # fine-tuning
    finetune_mode: str = FinetuneMode.FULL.value
    finetune_rounds: int = 0  # 0: the recipe's (see `finetune_recipe`)
    finetune_epochs: int = 1
    finetune_lr: float = 0.0  # 0: the recipe's
    finetune_batch_size: int = 0  # 0: the recipe's
    finetune_lr_schedule: str = ""  # '': the recipe's | constant | cosine (decay over the fine-tuning rounds)
    finetune_loss: str = "ce"  # ce | logit-adjusted (label-skew-robust, Menon et al. 2021)
    lora_rank: int = 4  # finetune-mode lora: rank of the adapters on every encoder conv/linear layer
    lora_alpha: float = 8.0  # adapter scaling is lora-alpha / lora-rank
    # differential privacy at the sites (DP-SGD with Opacus; a signed ledger per site)
    dp: str = DPScope.NONE.value  # none | finetune | pretrain | all
    dp_epsilon: float = 8.0  # each site's lifetime budget across rounds and runs
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"  # rdp | prv
    dp_max_grad_norm: float = 1.0
    dp_noise_multiplier: float = 0.0  # 0: planned from this run's share of the budget and the planned rounds
    dp_run_epsilon: float = 0.0  # this run's share: a site's epsilon may rise this much in the run (0: all left)
    dp_max_planned_noise: float = 20.0  # a planned sigma above this: the site refuses (too little budget left)
    dp_grad_sample_mode: str = GradSampleMode.AUTO.value
    dp_secure_rng: bool = False
    dp_augment_multiplicity: int = 0  # K views per example, gradients averaged before clipping; 0: the recipe's
    ledger_dir: str = ""  # where simulated sites keep their ledgers; '': <run dir>/ledgers
    # federation
    strategy: str = StrategyName.FEDAVG.value
    aggregation: str = AggregationRule.MEAN.value  # mean | trimmed-mean | median | krum (robust rules: unweighted)
    trim_fraction: float = 0.2  # trimmed-mean: fraction dropped at EACH end of every coordinate, in [0, 0.5)
    krum_byzantine: int = 1  # krum: f, the faulty sites tolerated (needs >= 2f+3 sites per round)
    krum_select: int = 1  # krum: m, Multi-Krum averages the m best-scored updates (1: Krum)
    norm_outlier_factor: float = 0.0  # 0: off; else reject an update > factor x the others' median distance
    proximal_mu: float = 0.0
    fraction_train: float = 1.0
    min_sites: int = 0  # a round needs this many sites connected and this many valid updates or refusals (0: every site)
    round_timeout: float = DEFAULT_ROUND_TIMEOUT  # seconds a round waits for the sites' replies
    # secure aggregation and central (site-level) DP, on the server's side (docs/PRIVACY.md)
    secure_aggregation: str = SecureAggregation.NONE.value  # none | secagg+ (Flower's SecAgg+)
    secagg_num_shares: float = 1.0  # secagg+: each site's secrets are shared with this fraction of the sampled sites
    secagg_threshold: float = 0.67  # secagg+: fraction of those shares needed to unmask (>= 2); fewer sites: round fails
    secagg_clipping_range: float = 8.0  # secagg+: values are quantised in [-r, r]; a shared weight outside fails the round
    central_dp: str = CentralDP.NONE.value  # none | server-clip | client-clip
    central_dp_noise_multiplier: float = 1.0  # z: noise std on the mean is z x clipping norm / sites aggregated
    central_dp_clipping_norm: float = 1.0  # C: L2 bound on one site's update (local minus global shared weights)
    central_dp_delta: float = 1e-3  # delta of the site-level guarantee; must be < 1 / num-sites
    # deployment (Flower's deployment runtime, `medfed run`)
    site_data: str = "partition"  # partition: the server splits --data (simulation) | own: each site's data-path
    resume_from: str = ""  # a deployment run directory to continue from its last completed round
    site_keys: str = ""  # deployment: the centre's registry, "site=sha256,..." in site-id order (set by `medfed run`)
    client_cpus: int = 0  # 0: all cores of this machine for each simulated site
    # outputs
    out_dir: str = "runs"
    run_name: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    # ---- conversions -------------------------------------------------------------
    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flower-style flat run config: kebab-case keys, scalar values."""
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RunConfig":
        """Build from a flat kebab-case mapping; unknown keys are an error, missing keys default."""
        known = {_kebab(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in flat.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
            f = known[key]
            kwargs[f.name] = _coerce(key, value, f.type)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def registered_sites(self) -> list[tuple[str, str]]:
        """The deployment's registry from `site_keys`: (site name, SHA-256 of its SuperNode public key
        as Flower sends it), in site-id order; empty in a simulation."""
        return parse_site_keys(self.site_keys)

    def run_settings(self) -> dict[str, bool | int | float | str]:
        """The flat settings that define what a run computes: all but ``resume-from`` (a resumed run asks the
        sites the same questions and is checked against the same settings)."""
        return without_resume(self.to_flat())

    def to_json(self) -> str:
        return json.dumps(self.to_flat(), indent=2, sort_keys=True)

    # ---- derived -------------------------------------------------------------------
    @property
    def ssl_methods(self) -> list[str]:
        """The SSL methods named by `pretrain` ('simclr+restore' -> ['simclr', 'restore'])."""
        return [] if self.pretrain == NO_PRETRAIN else self.pretrain.split("+")

    @property
    def ssl_weights(self) -> list[float]:
        methods = self.ssl_methods
        if not self.pretrain_weights:
            return [1.0] * len(methods)
        return [float(w) for w in self.pretrain_weights.split(",")]

    @property
    def finetune_recipe(self) -> FinetuneRecipe:
        """Learning rate, batch size and rounds of fine-tuning: those set, the recipe's for those left at 0.

        The recipe is `FINETUNE_RECIPE` without DP and `DP_FINETUNE_RECIPE[finetune_mode]` when DP-SGD
        covers fine-tuning: clipped, noised gradients want a larger step and fewer, larger batches.
        """
        auto = DP_FINETUNE_RECIPE[self.finetune_mode] if DPScope(self.dp).covers_finetune else FINETUNE_RECIPE
        return FinetuneRecipe(
            lr=self.finetune_lr or auto.lr,
            batch_size=self.finetune_batch_size or auto.batch_size,
            rounds=self.finetune_rounds or auto.rounds,
            augment_multiplicity=self.dp_augment_multiplicity or auto.augment_multiplicity,
            lr_schedule=self.finetune_lr_schedule or auto.lr_schedule,
        )

    @property
    def sites_per_round(self) -> int:
        """How many sites the server samples for a training round (as the strategy does)."""
        return max(1, min(self.num_sites, int(self.num_sites * self.fraction_train)))

    @property
    def run_dir_name(self) -> str:
        return self.run_name or f"{self.data_stem}-{self.mode}-{self.pretrain}-s{self.seed}"

    @property
    def data_stem(self) -> str:
        return Path(self.data).stem if self.data.endswith(".npz") else self.data


def without_resume(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings without ``resume-from``: where a run continues from does not change what it computes."""
    return {k: v for k, v in settings.items() if k != RESUME_KEY}


SETTING_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
"""RunConfig field annotations (strings, under postponed evaluation) -> Python types."""


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    target = SETTING_TYPES[str(type_name)]
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(f"setting {key!r} must be of type {target.__name__}, got {value!r}")
    return value


def _choice(name: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{_kebab(name)} must be one of {', '.join(allowed)}; got {value!r}")


_SITE_KEY = re.compile(r"^([a-z0-9][a-z0-9_-]{0,31})=([0-9a-f]{64})$")


def parse_site_keys(text: str) -> list[tuple[str, str]]:
    """``"h1=<sha256 hex>,h2=..."`` -> [(site, fingerprint), ...]; a clear error for anything else."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        match = _SITE_KEY.match(item.strip())
        if not match:
            raise ConfigError(f"site-keys entry {item!r} must be SITE=SHA256 (64 lowercase hex digits)")
        pairs.append((match.group(1), match.group(2)))
    names = [n for n, _ in pairs]
    keys = [k for _, k in pairs]
    if len(set(names)) != len(names) or len(set(keys)) != len(keys):
        raise ConfigError("site-keys names a site or a key twice")
    return pairs


def _validate(c: RunConfig) -> None:
    # Imported here: the registry imports torch-heavy modules, the config must stay light.
    from medfed.selfsup.registry import available_methods

    for f in fields(c):
        value = _coerce(_kebab(f.name), getattr(c, f.name), f.type)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_kebab(f.name)} must be a finite number; got {value}")
    if c.seed < 0:
        raise ConfigError(f"seed must be >= 0; got {c.seed}")
    if not c.data:
        raise ConfigError("data must name a MedMNIST flag (e.g. pneumoniamnist) or a .npz path")
    if c.num_sites < 1:
        raise ConfigError(f"num-sites must be >= 1; got {c.num_sites}")
    _choice("partition", c.partition, [p.value for p in PartitionScheme])
    if not c.alpha > 0:
        raise ConfigError(f"alpha (Dirichlet concentration) must be > 0; got {c.alpha}")
    if not 0 < c.label_fraction <= 1:
        raise ConfigError(f"label-fraction must be in (0, 1]; got {c.label_fraction}")
    if c.min_site_size < 1:
        raise ConfigError(f"min-site-size must be >= 1; got {c.min_site_size}")
    _choice("mode", c.mode, [m.value for m in Mode])
    _choice("encoder", c.encoder, [e.value for e in EncoderKind])
    _choice("baselines", c.baselines, [b.value for b in Baselines])
    _choice("finetune_mode", c.finetune_mode, [m.value for m in FinetuneMode])
    _choice("strategy", c.strategy, [s.value for s in StrategyName])
    _choice("finetune_loss", c.finetune_loss, ["ce", "logit-adjusted"])
    if c.finetune_lr_schedule:
        _choice("finetune_lr_schedule", c.finetune_lr_schedule, list(LR_SCHEDULES))
    known = available_methods()
    methods = c.ssl_methods
    if c.pretrain != NO_PRETRAIN:
        if len(set(methods)) != len(methods) or not all(methods):
            raise ConfigError(f"pretrain must be 'none' or distinct methods joined by '+'; got {c.pretrain!r}")
        for m in methods:
            if m not in known:
                raise ConfigError(
                    f"unknown self-supervised method {m!r} in pretrain; known: {', '.join(known)}, or 'none'"
                )
    if c.encoder_init and c.pretrain == NO_PRETRAIN:
        raise ConfigError("encoder-init needs --pretrain naming how that encoder was pretrained (not 'none')")
    if c.pretrain_weights:
        try:
            weights = [float(w) for w in c.pretrain_weights.split(",")]
        except ValueError as exc:
            raise ConfigError(f"pretrain-weights must be comma-separated numbers; got {c.pretrain_weights!r}") from exc
        if len(weights) != len(methods):
            raise ConfigError(
                f"pretrain-weights needs one weight per method in pretrain ({len(methods)}); got {len(weights)}"
            )
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError(f"pretrain-weights must be >= 0 with at least one > 0; got {c.pretrain_weights!r}")
    if c.width < 4 or c.width % 4:
        raise ConfigError(f"width must be a multiple of 4 and >= 4 (GroupNorm groups); got {c.width}")
    if c.pretrain_rounds < 0:
        raise ConfigError(f"pretrain-rounds must be >= 0; got {c.pretrain_rounds}")
    if c.finetune_rounds < 0:
        raise ConfigError(f"finetune-rounds must be >= 1 (the run ends with a fine-tuned model), or 0 for the "
                          f"recipe's; got {c.finetune_rounds}")
    if c.pretrain != NO_PRETRAIN and c.pretrain_rounds < 1:
        raise ConfigError("pretrain-rounds must be >= 1 when a pretrain method is set (or use --pretrain none)")
    for name in ("pretrain_epochs", "finetune_epochs", "pretrain_batch_size"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{_kebab(name)} must be >= 1; got {getattr(c, name)}")
    if c.finetune_batch_size < 0:
        raise ConfigError(f"finetune-batch-size must be >= 1, or 0 for the recipe's; got {c.finetune_batch_size}")
    if "simclr" in methods and c.pretrain_batch_size < 2:
        raise ConfigError("pretrain-batch-size must be >= 2 for simclr (it needs in-batch negatives)")
    for name in ("pretrain_lr", "temperature"):
        if not getattr(c, name) > 0:
            raise ConfigError(f"{_kebab(name)} must be > 0; got {getattr(c, name)}")
    if c.finetune_lr < 0:
        raise ConfigError(f"finetune-lr must be > 0, or 0 for the recipe's; got {c.finetune_lr}")
    if not 0 <= c.byol_momentum < 1:
        raise ConfigError(f"byol-momentum must be in [0, 1); got {c.byol_momentum}")
    if not 0 < c.mask_ratio < 1:
        raise ConfigError(f"mask-ratio must be in (0, 1); got {c.mask_ratio}")
    if c.proximal_mu < 0:
        raise ConfigError(f"proximal-mu must be >= 0; got {c.proximal_mu}")
    if c.strategy == StrategyName.FEDPROX and c.proximal_mu == 0:
        raise ConfigError("strategy fedprox needs proximal-mu > 0 (with 0 it is FedAvg)")
    if c.strategy != StrategyName.FEDPROX and c.proximal_mu > 0:
        raise ConfigError(f"proximal-mu > 0 needs --strategy fedprox; got strategy {c.strategy}")
    if not 0 < c.fraction_train <= 1:
        raise ConfigError(f"fraction-train must be in (0, 1]; got {c.fraction_train}")
    if not 0 <= c.min_sites <= c.num_sites:
        raise ConfigError(f"min-sites must be in [0, num-sites = {c.num_sites}] (0: every site); got {c.min_sites}")
    if not c.round_timeout > 0:
        raise ConfigError(f"round-timeout must be > 0 seconds; got {c.round_timeout}")
    _choice("site_data", c.site_data, ["partition", "own"])
    if c.resume_from and c.site_data != "own":
        raise ConfigError("resume-from continues a deployment run (site-data own, `medfed run --resume`); "
                          "a simulation is re-run instead")
    if c.client_cpus < 0:
        raise ConfigError(f"client-cpus must be >= 0; got {c.client_cpus}")
    registry = parse_site_keys(c.site_keys)
    if registry and (c.site_data != "own" or len(registry) != c.num_sites):
        raise ConfigError(f"site-keys lists {len(registry)} sites: it is the deployment's registry (site-data own) "
                          f"and must name num-sites = {c.num_sites} sites")
    _validate_aggregation(c)
    _validate_privacy(c)
    _validate_secure_aggregation(c)
    if c.run_name and (Path(c.run_name).name != c.run_name or c.run_name.startswith(".")):
        raise ConfigError(f"run-name must be a plain folder name; got {c.run_name!r}")



def _validate_aggregation(c: RunConfig) -> None:
    """The aggregation rule and the norm-outlier screen, checked against the sites sampled per round."""
    from medfed.strategies.robust import MIN_UPDATES_TO_SCREEN, krum_problem, trim_count

    _choice("aggregation", c.aggregation, [r.value for r in AggregationRule])
    if not 0 <= c.trim_fraction < 0.5:
        raise ConfigError(
            f"trim-fraction must be in [0, 0.5) (the fraction dropped at each end); got {c.trim_fraction}"
        )
    if c.krum_byzantine < 0:
        raise ConfigError(f"krum-byzantine must be >= 0; got {c.krum_byzantine}")
    if c.krum_select < 1:
        raise ConfigError(f"krum-select must be >= 1; got {c.krum_select}")
    if c.norm_outlier_factor != 0 and not c.norm_outlier_factor > 1:
        raise ConfigError(f"norm-outlier-factor must be 0 (off) or > 1; got {c.norm_outlier_factor}")
    n = c.sites_per_round
    rule = AggregationRule(c.aggregation)
    if rule in (AggregationRule.TRIMMED_MEAN, AggregationRule.MEDIAN) and n < 3:
        raise ConfigError(f"aggregation {rule.value} needs at least 3 sites per round (num-sites x fraction-train; "
                          f"with fewer it is the mean); got {n}")
    if rule == AggregationRule.TRIMMED_MEAN and trim_count(n, c.trim_fraction) < 1:
        raise ConfigError(
            f"aggregation trimmed-mean with trim-fraction {c.trim_fraction:g} drops "
            f"floor({c.trim_fraction:g} x {n}) = 0 of the {n} sites per round at each end, which is the plain mean; "
            f"use trim-fraction 1/{n} or more"
        )
    if rule == AggregationRule.KRUM:
        problem = krum_problem(n, c.krum_byzantine, c.krum_select)
        if problem:
            raise ConfigError(f"aggregation krum with {n} sites per round (num-sites x fraction-train): {problem}")
    if c.norm_outlier_factor > 0 and n < MIN_UPDATES_TO_SCREEN:
        raise ConfigError(f"norm-outlier-factor needs at least {MIN_UPDATES_TO_SCREEN} sites per round to compare an "
                          f"update with the others; got {n}")


def _validate_privacy(c: RunConfig) -> None:
    """DP and LoRA settings, and the combinations DP-SGD cannot honour."""
    if c.lora_rank < 1:
        raise ConfigError(f"lora-rank must be >= 1; got {c.lora_rank}")
    if not c.lora_alpha > 0:
        raise ConfigError(f"lora-alpha must be > 0; got {c.lora_alpha}")
    _choice("dp", c.dp, [s.value for s in DPScope])
    _choice("dp_grad_sample_mode", c.dp_grad_sample_mode, [m.value for m in GradSampleMode])
    if c.dp == DPScope.NONE:
        return
    from medfed.models.encoders import resolve_encoder_kind
    from medfed.privacy.accounting import MIN_NOISE, PLANNER_MAX_NOISE, check_accountant, check_budget
    from medfed.selfsup.registry import method_class

    check_budget(c.dp_epsilon, c.dp_delta)
    check_accountant(c.dp_accountant)
    if not 0 <= c.dp_augment_multiplicity <= MAX_AUGMENT_MULTIPLICITY:
        raise ConfigError(f"dp-augment-multiplicity must be in [1, {MAX_AUGMENT_MULTIPLICITY}] (0: the recipe's); got "
                          f"{c.dp_augment_multiplicity}")
    if not c.dp_max_grad_norm > 0:
        raise ConfigError(f"dp-max-grad-norm must be > 0; got {c.dp_max_grad_norm}")
    if c.dp_noise_multiplier < 0:
        raise ConfigError(f"dp-noise-multiplier must be >= 0 (0 plans it from the budget); got {c.dp_noise_multiplier}")
    if not 0 <= c.dp_run_epsilon <= c.dp_epsilon:
        raise ConfigError(f"dp-run-epsilon (this run's share of each site's budget) must be in [0, dp-epsilon = "
                          f"{c.dp_epsilon:g}] (0: all that is left); got {c.dp_run_epsilon:g}")
    if not MIN_NOISE < c.dp_max_planned_noise <= PLANNER_MAX_NOISE:
        raise ConfigError(f"dp-max-planned-noise must be in ({MIN_NOISE:g}, {PLANNER_MAX_NOISE:g}] (the planner's "
                          f"range); got {c.dp_max_planned_noise:g}")
    scope = DPScope(c.dp)
    pretrains = bool(c.ssl_methods) and not c.encoder_init
    if c.dp_grad_sample_mode == GradSampleMode.EW and resolve_encoder_kind(c.encoder, c.ssl_methods) != EncoderKind.CNN:
        raise ConfigError("dp-grad-sample-mode ew works with the cnn encoder only (PyTorch's expanded-weights "
                          "convolution fails on the ViT's patch embedding); use auto, hooks or functorch")
    if scope == DPScope.PRETRAIN and not pretrains:
        raise ConfigError("dp pretrain needs a pretraining phase (a pretrain method and no encoder-init)")
    if scope in (DPScope.PRETRAIN, DPScope.ALL) and pretrains:
        if c.dp_grad_sample_mode == GradSampleMode.EW:
            raise ConfigError("dp-grad-sample-mode ew needs the loss to go through the model's forward, which only "
                              "fine-tuning does (the SSL losses call the encoder and heads directly); use hooks or "
                              "functorch with dp pretrain or all")
        if any(w == 0 for w in c.ssl_weights):
            raise ConfigError("pretrain-weights of 0 under dp: that method's heads would get no per-example gradient; "
                              "drop the method instead")
        coupled = [m for m in c.ssl_methods if not method_class(m).per_example_loss]
        if coupled:
            raise ConfigError(
                f"pretrain {c.pretrain!r} cannot run under DP-SGD: {', '.join(coupled)} couples the examples of a batch "
                "(in-batch negatives), so one image changes every other image's gradient and per-example clipping "
                "no longer bounds its influence. Use a per-example method under DP (mae, byol, restore) or --dp finetune."
            )
    if c.strategy == StrategyName.FEDPROX:
        raise ConfigError("strategy fedprox cannot be combined with dp: Opacus clips per-example gradients and would "
                          "drop the proximal term's gradient; use fedavg under dp")
    if scope.covers_finetune and c.finetune_loss == "logit-adjusted":
        raise ConfigError("finetune-loss logit-adjusted uses the site's label counts, which DP-SGD does not protect; "
                          "use finetune-loss ce under dp")


def _validate_secure_aggregation(c: RunConfig) -> None:
    """SecAgg+ and central DP, and the combinations Flower 1.41 or the mathematics cannot honour."""
    _choice("secure_aggregation", c.secure_aggregation, [s.value for s in SecureAggregation])
    _choice("central_dp", c.central_dp, [m.value for m in CentralDP])
    if not 0 < c.secagg_num_shares <= 1:
        raise ConfigError(f"secagg-num-shares must be a fraction in (0, 1] of the sites sampled; got {c.secagg_num_shares}")
    if not 0 < c.secagg_threshold <= 1:
        raise ConfigError(f"secagg-threshold must be a fraction in (0, 1] of the shares; got {c.secagg_threshold}")
    if not c.secagg_clipping_range > 0:
        raise ConfigError(f"secagg-clipping-range must be > 0; got {c.secagg_clipping_range}")
    secagg = c.secure_aggregation == SecureAggregation.SECAGG_PLUS
    central = CentralDP(c.central_dp)
    if secagg:
        if c.sites_per_round < 2:
            raise ConfigError(f"secure-aggregation secagg+ needs at least 2 sites per round (num-sites x fraction-train); "
                              f"got {c.sites_per_round}")
        if c.aggregation != AggregationRule.MEAN:
            raise ConfigError(f"secure-aggregation secagg+ cannot be combined with aggregation {c.aggregation}: a robust "
                              "rule needs every site's update, and SecAgg+ shows the server only their sum")
        if c.norm_outlier_factor > 0:
            raise ConfigError("secure-aggregation secagg+ cannot be combined with norm-outlier-factor: the screen compares "
                              "each site's update, and SecAgg+ shows the server only their sum")
        if central == CentralDP.SERVER_CLIP:
            raise ConfigError("central-dp server-clip cannot be combined with secure-aggregation secagg+: the server would "
                              "have to clip each site's update, which SecAgg+ hides; use central-dp client-clip")
    if central == CentralDP.NONE:
        return
    if not c.central_dp_noise_multiplier > 0:
        raise ConfigError(f"central-dp-noise-multiplier must be > 0; got {c.central_dp_noise_multiplier}")
    if not c.central_dp_clipping_norm > 0:
        raise ConfigError(f"central-dp-clipping-norm must be > 0; got {c.central_dp_clipping_norm}")
    if not 0 < c.central_dp_delta < 1 / c.num_sites:
        raise ConfigError(f"central-dp-delta must be in (0, 1/num-sites = {1 / c.num_sites:.3g}): the unit of privacy is "
                          f"a whole site; got {c.central_dp_delta}")
    if c.aggregation != AggregationRule.MEAN:
        raise ConfigError(f"central-dp cannot be combined with aggregation {c.aggregation}: the noise is calibrated to the "
                          "sensitivity of the mean of clipped updates (C / sites), not of a robust rule")
