"""The arms of an experiment: the main arm and its baselines, and each arm's settings.

An arm is one line of the comparison in report.md: where it trains (federated, centralized, local-only)
and how its encoder is pretrained (a self-supervised method, or none).
"""

from __future__ import annotations

from dataclasses import dataclass

from medfed.config import RunConfig
from medfed.constants import (
    NO_PRETRAIN,
    Baselines,
    DPScope,
    FinetuneMode,
    Mode,
    PersonalParts,
    Phase,
    SSLAggregation,
)
from medfed.selfsup.registry import resolve_encoder_kind


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: where it trains and how it is pretrained."""

    mode: str
    pretrain: str

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.pretrain}"


def arms_for(cfg: RunConfig) -> list[Arm]:
    """The main arm first, then the baselines asked for (duplicates dropped)."""
    arms = [Arm(cfg.experiment.mode, cfg.ssl.method)]
    if cfg.experiment.baselines != Baselines.NONE:
        arms += [Arm(Mode.LOCAL_ONLY.value, NO_PRETRAIN), Arm(Mode.FEDERATED.value, NO_PRETRAIN)]
        if cfg.experiment.baselines == Baselines.ALL and cfg.ssl.method != NO_PRETRAIN:
            arms += [Arm(mode.value, cfg.ssl.method) for mode in (Mode.FEDERATED, Mode.CENTRALIZED, Mode.LOCAL_ONLY)]
    unique: list[Arm] = []
    for arm in arms:
        if arm not in unique:
            unique.append(arm)
    return unique


def arm_config(main: RunConfig, arm: Arm) -> RunConfig:
    """Settings of one arm: the main settings with the arm's mode and pretraining.

    FedEMA/FedU (``ssl-aggregation``) and the server step (``pretrain-server-lr``/``-momentum``) apply to the
    federated arm that pretrains as the main one, personal parts to
    federated arms; the others run with FedAvg and no personal parts. Baselines keep the main arm's resolved
    encoder (so a MAE run compares ViTs with ViTs), and a supervised-from-scratch baseline always fine-tunes fully
    (a linear probe on a random encoder measures nothing).
    """
    same_ssl = arm.pretrain == main.ssl.method
    baseline_from_scratch = arm.pretrain == NO_PRETRAIN and main.ssl.method != NO_PRETRAIN
    federated_ssl = arm.mode == Mode.FEDERATED and same_ssl
    return main.replace(
        mode=arm.mode,
        # how sites take the global encoder, and which parts they keep, mean something only to a federation's
        # sites (personal parts also to a federation without pretraining)
        ssl_aggregation=main.ssl.aggregation if federated_ssl else SSLAggregation.FEDAVG.value,
        personal=main.federation.personal if arm.mode == Mode.FEDERATED else PersonalParts.NONE.value,
        # the centre's FedAvgM step acts on the federated pretraining it was set for; the others average plainly
        pretrain_server_lr=main.ssl.server_lr if federated_ssl else 1.0,
        pretrain_server_momentum=main.ssl.server_momentum if federated_ssl else 0.0,
        pretrain=arm.pretrain,
        pretrain_weights=main.ssl.weights if same_ssl else "",
        encoder_init=main.model.encoder_init if same_ssl and arm.pretrain != NO_PRETRAIN else "",
        encoder=resolve_encoder_kind(main.model.encoder, main.ssl.methods).value,
        finetune_mode=FinetuneMode.FULL.value if baseline_from_scratch else main.finetune.mode,
        dp=_arm_dp(main, arm),
    )


def _arm_dp(main: RunConfig, arm: Arm) -> str:
    """An arm without pretraining keeps DP only for fine-tuning (there is no pretraining to protect)."""
    scope = DPScope(main.privacy.scope)
    if arm.pretrain != NO_PRETRAIN and not (arm.pretrain == main.ssl.method and main.model.encoder_init):
        return scope.value
    return DPScope.FINETUNE.value if scope.covers(Phase.FINETUNE) else DPScope.NONE.value


def progress_units(cfg: RunConfig) -> int:
    """Site-rounds the whole experiment will train (for a progress bar)."""
    total = 0
    for arm in arms_for(cfg):
        sites = (1 if arm.mode == Mode.CENTRALIZED else cfg.sites_per_round if arm.mode == Mode.FEDERATED
                 else cfg.dataset.num_sites)  # a federated round trains the sites it samples
        pre = cfg.ssl.rounds if arm.pretrain != NO_PRETRAIN and not cfg.model.encoder_init else 0
        total += sites * (pre + cfg.finetune_recipe.rounds)
    return total
