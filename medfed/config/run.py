"""`RunConfig`: a run's settings as nested, frozen, self-checking parts, and their flat and file forms.

Parts (each owning its defaults, help and checks; `medfed.config.base`):

===============  ==================================================================================
``dataset``      the data file and how it is cut into sites (`DatasetSettings`)
``images``       how cases are read and prepared: size, intensity policy, cache (`ImageSettings`)
``experiment``   seed, the main arm's mode, the baselines (`ExperimentSettings`)
``model``        the encoder (`ModelSettings`)
``ssl``          self-supervised pretraining (`PretrainSettings`)
``finetune``     supervised fine-tuning (`FinetuneSettings`); ``lora`` its adapters (`LoRASettings`)
``privacy``      DP-SGD at the sites (`DPSettings`)
``federation``   the strategy and its rounds (`FederationSettings`); ``robust`` the aggregation rule
``secagg``       Flower's SecAgg+ (`SecAggSettings`); ``central`` central DP (`CentralDPSettings`)
``deployment``   a deployment's registry and resume (`DeploymentSettings`); ``output`` the run directory
``compute``      the device and the precision (`ComputeSettings`)
===============  ==================================================================================

Every setting also has a flat kebab-case key (``dp-epsilon``): Flower's run config, ``config.json``, the CLI
flags and ``run.toml`` use those. `RunConfig.replace` and `run_config` take them in snake_case
(``dp_epsilon=1.0``). A run directory's ``config.toml`` reproduces the run: ``medfed simulate --config``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medfed.config.base import FlatValue, Part, Setting
from medfed.config.compute import ComputeSettings
from medfed.config.experiment import (
    DatasetSettings,
    DeploymentSettings,
    ExperimentSettings,
    ModelSettings,
    OutputSettings,
)
from medfed.config.federation import FederationSettings, RobustSettings
from medfed.config.images import ImageSettings
from medfed.config.learning_rules import check_learning
from medfed.config.privacy import CentralDPSettings, DPSettings, SecAggSettings
from medfed.config.rules import MIN_UPDATES_TO_SCREEN, krum_problem, trim_count
from medfed.config.training import (
    DP_FINETUNE_RECIPE,
    FINETUNE_RECIPE,
    FinetuneRecipe,
    FinetuneSettings,
    LoRASettings,
    PretrainSettings,
)
from medfed.constants import (
    NO_PRETRAIN,
    RESUME_KEY,
    AggregationRule,
    CentralDP,
    DPScope,
    FinetuneLoss,
    FinetuneSelect,
    GradSampleMode,
    Mode,
    SecureAggregation,
    SiteData,
    StrategyName,
)
from medfed.exceptions import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; the defaults are `medfed simulate` with no flags.

    Defaults were sized so that the default run (5 sites, PneumoniaMNIST, 10 % labels, pretraining then
    fine-tuning, plus the default baselines) finishes within 10 minutes on 2 CPU cores;
    `benchmarks/default_run.py` measures it into docs/RESULTS.md.

    Raises:
        ConfigError: on construction, naming the setting and the rule, for a value out of its part's range
            or a combination of parts that cannot run together.
    """

    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    experiment: ExperimentSettings = field(default_factory=ExperimentSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    ssl: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    privacy: DPSettings = field(default_factory=DPSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    robust: RobustSettings = field(default_factory=RobustSettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    central: CentralDPSettings = field(default_factory=CentralDPSettings)
    deployment: DeploymentSettings = field(default_factory=DeploymentSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), Part):
                raise ConfigError(f"RunConfig.{f.name} must be settings of its part, got {getattr(self, f.name)!r}")
        _check_across_parts(self)

    # ---- the parts and their flat keys ------------------------------------------------
    def parts(self) -> Iterator[tuple[str, Part]]:
        """(attribute, part) in declaration order."""
        for f in fields(self):
            yield f.name, getattr(self, f.name)

    @classmethod
    def settings(cls) -> dict[str, tuple[str, Setting]]:
        """Every flat key -> (the part's attribute, the setting)."""
        return _SETTINGS

    def to_flat(self) -> dict[str, FlatValue]:
        """Flower-style flat run config: kebab-case keys, scalar values."""
        flat: dict[str, FlatValue] = {}
        for _, part in self.parts():
            flat.update(part.flat())
        return flat

    def site_settings(self) -> dict[str, FlatValue]:
        """The flat settings a site trains by, and no others: what the ServerApp sends the sites."""
        return {key: value for key, value in self.to_flat().items() if _SETTINGS[key][1].site}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from a flat kebab-case mapping; unknown keys are an error, missing keys default.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or a value or combination out of range.
        """
        grouped: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            if key not in _SETTINGS:
                raise ConfigError(f"unknown setting {key!r}; known settings: {', '.join(sorted(_SETTINGS))}")
            attr, s = _SETTINGS[key]
            grouped.setdefault(attr, {})[s.name] = s.coerce(value)
        parts: dict[str, Any] = {attr: _PART_TYPES[attr](**values) for attr, values in grouped.items()}
        return cls(**parts)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some settings changed, named as their flat keys in snake_case (``dp_epsilon=1.0``), or
        whole parts by attribute (``privacy=DPSettings(...)``); checked again.

        Raises:
            ConfigError: an unknown setting name, or values out of range.
        """
        parts: dict[str, Any] = {attr: part for attr, part in self.parts()}
        flat_changes: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name in _PART_TYPES:
                parts[name] = value
                continue
            key = name.replace("_", "-")
            if key not in _SETTINGS:
                raise ConfigError(f"unknown setting {key!r}; known settings: {', '.join(sorted(_SETTINGS))}")
            attr, s = _SETTINGS[key]
            flat_changes.setdefault(attr, {})[s.name] = s.coerce(value)
        for attr, values in flat_changes.items():
            parts[attr] = dataclasses.replace(parts[attr], **values)
        return RunConfig(**parts)

    def to_json(self) -> str:
        """The flat settings as ``config.json`` holds them."""
        return json.dumps(self.to_flat(), indent=2, sort_keys=True)

    def to_toml(self) -> str:
        """The settings as a run.toml: one table per part, flat keys; `from_toml` reads it back to the same."""
        lines = ["# medfed run settings: `medfed simulate --config FILE` reruns them; flags given beside it win."]
        for attr, part in self.parts():
            lines += ["", f"[{attr}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in part.flat().items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a run.toml (`read_toml`); ``overrides`` (flat keys in snake_case, as flags give them) win.

        Raises:
            ConfigError: a bad file (naming it), or bad values.
        """
        try:
            cfg = cls.from_flat(read_toml(path))
        except ConfigError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc}") from None
        return cfg.replace(**overrides) if overrides else cfg

    def run_settings(self) -> dict[str, FlatValue]:
        """The flat settings that define what a run computes: all but ``resume-from`` (a resumed run asks the
        sites the same questions and is checked against the same settings)."""
        return without_resume(self.to_flat())

    # ---- derived ------------------------------------------------------------------------
    @property
    def finetune_recipe(self) -> FinetuneRecipe:
        """Learning rate, batch size and rounds of fine-tuning: those set, the recipe's for those left at 0.

        The recipe is `FINETUNE_RECIPE` without DP and `DP_FINETUNE_RECIPE[finetune_mode]` when DP-SGD covers
        fine-tuning: clipped, noised gradients want a larger step and fewer, larger batches.
        """
        ft = self.finetune
        auto = DP_FINETUNE_RECIPE[ft.mode] if DPScope(self.privacy.scope).covers_finetune else FINETUNE_RECIPE
        return FinetuneRecipe(
            lr=ft.lr or auto.lr,
            batch_size=ft.batch_size or auto.batch_size,
            rounds=ft.rounds or auto.rounds,
            augment_multiplicity=self.privacy.augment_multiplicity or auto.augment_multiplicity,
            lr_schedule=ft.lr_schedule or auto.lr_schedule,
        )

    @property
    def sites_per_round(self) -> int:
        """How many sites the server samples for a training round (as the strategy does)."""
        return max(1, min(self.dataset.num_sites, int(self.dataset.num_sites * self.federation.fraction_train)))

    @property
    def sites_per_evaluation(self) -> int:
        """How many sites the server samples for a round's federated evaluation (fraction-evaluate, 0: as many as
        fraction-train), as the strategy does."""
        n, f = self.dataset.num_sites, self.federation
        return max(1, min(n, int(n * (f.fraction_evaluate or f.fraction_train))))

    @property
    def run_dir_name(self) -> str:
        """The run directory's name: ``run-name``, else DATA-MODE-PRETRAIN-sSEED."""
        e = self.experiment
        return self.output.run_name or f"{self.dataset.stem}-{e.mode}-{self.ssl.method}-s{e.seed}"


_PART_TYPES: dict[str, type[Part]] = {f.name: f.default_factory for f in fields(RunConfig)}  # type: ignore[misc]
_SETTINGS: dict[str, tuple[str, Setting]] = {s.key: (attr, s) for attr, part_type in _PART_TYPES.items()
                                             for s in part_type.settings()}


def run_config(**settings: Any) -> RunConfig:
    """The default settings with some changed, named as their flat keys in snake_case (``num_sites=3``)."""
    return RunConfig().replace(**settings) if settings else RunConfig()


def read_toml(path: str | Path) -> dict[str, Any]:
    """The flat settings of a run.toml: flat keys at the top level or inside a table named after their part
    (as `RunConfig.to_toml` writes them). Values are checked when a `RunConfig` is built from them.

    Raises:
        ConfigError: a file that cannot be read or parsed, a table that names no part, a key in the wrong
            part's table, or a key that names no setting.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    flat: dict[str, Any] = {}
    for name, value in document.items():
        entries = value.items() if isinstance(value, dict) else [(name, value)]
        if isinstance(value, dict) and name not in _PART_TYPES:
            raise ConfigError(f"config file {str(path)!r}: [{name}] is not a part of the settings; parts: "
                              f"{', '.join(_PART_TYPES)}")
        for key, item in entries:
            if key not in _SETTINGS:
                raise ConfigError(f"config file {str(path)!r}: unknown setting {key!r}")
            if isinstance(value, dict) and _SETTINGS[key][0] != name:
                raise ConfigError(f"config file {str(path)!r}: {key} belongs in [{_SETTINGS[key][0]}], not [{name}]")
            flat[key] = item
    return flat


def without_resume(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings without ``resume-from``: where a run continues from does not change what it computes."""
    return {k: v for k, v in settings.items() if k != RESUME_KEY}


def _toml_value(value: FlatValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    # a TOML basic string: JSON's escapes are TOML's; DEL, which JSON leaves as it is, TOML wants escaped
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _check_across_parts(c: RunConfig) -> None:
    """The combinations of parts that cannot run together."""
    d, ssl, fed = c.dataset, c.ssl, c.federation
    if c.model.encoder_init and ssl.method == NO_PRETRAIN:
        raise ConfigError("encoder-init needs --pretrain naming how that encoder was pretrained (not 'none')")
    if not 0 <= fed.min_sites <= d.num_sites:
        raise ConfigError(f"min-sites must be in [0, num-sites = {d.num_sites}] (0: every site); got {fed.min_sites}")
    if c.deployment.resume_from and d.site_data != SiteData.OWN:
        raise ConfigError("resume-from continues a deployment run (site-data own, `medfed run --resume`); "
                          "a simulation is re-run instead")
    registry = c.deployment.registered_sites
    if registry and (d.site_data != SiteData.OWN or len(registry) != d.num_sites):
        raise ConfigError(f"site-keys lists {len(registry)} sites: it is the deployment's registry (site-data own) "
                          f"and must name num-sites = {d.num_sites} sites")
    _check_aggregation(c)
    _check_compute(c)
    _check_privacy(c)
    _check_secure_aggregation(c)
    check_learning(c.finetune, c.finetune_recipe.rounds, fed.personal, mode=c.experiment.mode, pretrain=ssl.method,
                   ssl_aggregation=ssl.aggregation, secagg=c.secagg.mode == SecureAggregation.SECAGG_PLUS,
                   server_step=(ssl.server_lr, ssl.server_momentum))
    if (c.finetune.select == FinetuneSelect.BEST_VALIDATION and c.experiment.mode == Mode.FEDERATED
            and c.sites_per_evaluation < d.num_sites):
        raise ConfigError(f"finetune-select best-validation compares the rounds' models on the same validation data, "
                          f"but each round's federated evaluation samples {c.sites_per_evaluation} of {d.num_sites} "
                          "sites (fraction-evaluate): rounds would be scored on different sites; use fraction-evaluate "
                          "1, or finetune-select last")


def _check_aggregation(c: RunConfig) -> None:
    """The aggregation rule and the norm-outlier screen, checked against the sites sampled per round."""
    n, r = c.sites_per_round, c.robust
    rule = AggregationRule(r.rule)
    if rule in (AggregationRule.TRIMMED_MEAN, AggregationRule.MEDIAN) and n < 3:
        raise ConfigError(f"aggregation {rule.value} needs at least 3 sites per round (num-sites x fraction-train; "
                          f"with fewer it is the mean); got {n}")
    if rule == AggregationRule.TRIMMED_MEAN and trim_count(n, r.trim_fraction) < 1:
        raise ConfigError(
            f"aggregation trimmed-mean with trim-fraction {r.trim_fraction:g} drops "
            f"floor({r.trim_fraction:g} x {n}) = 0 of the {n} sites per round at each end, which is the plain mean; "
            f"use trim-fraction 1/{n} or more"
        )
    if rule == AggregationRule.KRUM:
        problem = krum_problem(n, r.krum_byzantine, r.krum_select)
        if problem:
            raise ConfigError(f"aggregation krum with {n} sites per round (num-sites x fraction-train): {problem}")
    if r.norm_outlier_factor > 0 and n < MIN_UPDATES_TO_SCREEN:
        raise ConfigError(f"norm-outlier-factor needs at least {MIN_UPDATES_TO_SCREEN} sites per round to compare an "
                          f"update with the others; got {n}")


def _check_compute(c: RunConfig) -> None:
    """The device and Ray's GPU share per simulated site."""
    gpus, device = c.federation.client_gpus, c.compute.device
    if gpus > 0 and device == "cpu":
        raise ConfigError(f"client-gpus {gpus:g} gives each simulated site a GPU share, but device is cpu; use "
                          "--device auto or cuda, or client-gpus 0")
    if gpus > 0 and device.startswith("cuda:"):
        raise ConfigError(f"device {device} names one GPU, but with client-gpus {gpus:g} Ray chooses each simulated "
                          "site's GPU (it sees only that one, as cuda); use --device cuda or auto")


def _check_privacy(c: RunConfig) -> None:
    """The combinations DP-SGD cannot honour."""
    dp = c.privacy
    if dp.scope == DPScope.NONE:
        return
    scope = DPScope(dp.scope)
    pretrains = bool(c.ssl.methods) and not c.model.encoder_init
    if scope == DPScope.PRETRAIN and not pretrains:
        raise ConfigError("dp pretrain needs a pretraining phase (a pretrain method and no encoder-init)")
    if scope in (DPScope.PRETRAIN, DPScope.ALL) and pretrains:
        if dp.grad_sample_mode in (GradSampleMode.EW, GradSampleMode.GHOST):
            raise ConfigError(f"dp-grad-sample-mode {dp.grad_sample_mode} needs the loss to go through the model's "
                              "forward (fine-tuning, not SSL losses); use hooks or functorch with dp pretrain or all")
        if any(w == 0 for w in c.ssl.method_weights):
            raise ConfigError("pretrain-weights of 0 under dp: a method's heads get no per-example gradient; drop it")
    if dp.grad_sample_mode == GradSampleMode.GHOST and c.finetune_recipe.augment_multiplicity > 1:
        raise ConfigError("dp-grad-sample-mode ghost needs dp-augment-multiplicity 1: it cannot clip a mean of K views")
    if c.federation.strategy == StrategyName.FEDPROX:
        raise ConfigError("strategy fedprox cannot be combined with dp: Opacus clips per-example gradients and would "
                          "drop the proximal term's gradient; use fedavg under dp")
    if scope.covers_finetune and c.finetune.loss == FinetuneLoss.LOGIT_ADJUSTED:
        raise ConfigError("finetune-loss logit-adjusted uses the site's label counts, which DP-SGD does not protect; "
                          "use finetune-loss ce under dp")


def _check_secure_aggregation(c: RunConfig) -> None:
    """SecAgg+ and central DP, and the combinations Flower or the mathematics cannot honour."""
    secagg = c.secagg.mode == SecureAggregation.SECAGG_PLUS
    central, rule = CentralDP(c.central.mode), c.robust.rule
    if secagg:
        if c.sites_per_round < 2:
            raise ConfigError(f"secure-aggregation secagg+ needs at least 2 sites per round (num-sites x "
                              f"fraction-train); got {c.sites_per_round}")
        if rule != AggregationRule.MEAN:
            raise ConfigError(f"secure-aggregation secagg+ cannot be combined with aggregation {rule}: a robust "
                              "rule needs every site's update, and SecAgg+ shows the server only their sum")
        if c.robust.norm_outlier_factor > 0:
            raise ConfigError("secure-aggregation secagg+ cannot be combined with norm-outlier-factor: the screen "
                              "compares each site's update, and SecAgg+ shows the server only their sum")
        if central == CentralDP.SERVER_CLIP:
            raise ConfigError("central-dp server-clip cannot be combined with secure-aggregation secagg+: the server "
                              "would have to clip each site's update, which SecAgg+ hides; use central-dp client-clip")
    if central == CentralDP.NONE:
        return
    n = c.dataset.num_sites
    if not 0 < c.central.delta < 1 / n:
        raise ConfigError(f"central-dp-delta must be in (0, 1/num-sites = {1 / n:.3g}): the unit of privacy is "
                          f"a whole site; got {c.central.delta}")
    if rule != AggregationRule.MEAN:
        raise ConfigError(f"central-dp cannot be combined with aggregation {rule}: the noise is calibrated to the "
                          "sensitivity of the mean of clipped updates (C / sites), not of a robust rule")
    if c.federation.fraction_train < 1 and secagg:  # Poisson sampling: medfed.strategies.central_dp
        raise ConfigError("central-dp at fraction-train < 1 samples each site independently and releases every round, "
                          "even when none or one site is drawn or one drops out; secure-aggregation secagg+ needs 2 "
                          "or more sites and halts when too few finish; use fraction-train 1 with secagg+")
    if c.federation.fraction_train < 1 and c.robust.norm_outlier_factor > 0:
        raise ConfigError("central-dp at fraction-train < 1 cannot be combined with norm-outlier-factor: the screen "
                          "rejects an update by comparing it with the others, so one site could remove others from "
                          "the sum, beyond the C / (q num-sites) the noise is calibrated to")
