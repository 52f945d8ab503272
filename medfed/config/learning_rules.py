"""Checks across the parts of a run's settings about how the sites learn: linear probing within fine-tuning,
personal parts against what a fine-tuning mode trains and sends."""

from __future__ import annotations

from medfed.config.training import FinetuneSettings
from medfed.constants import NO_PRETRAIN, FinetuneMode, FinetuneSelect, Mode, PersonalParts, SSLAggregation
from medfed.exceptions import ConfigError


def check_learning(ft: FinetuneSettings, rounds: int, personal: PersonalParts | str, *, mode: Mode | str,
                   ssl_aggregation: SSLAggregation | str, pretrain: str, secagg: bool,
                   server_step: tuple[float, float] = (1.0, 0.0)) -> None:
    """Raise `ConfigError` for learning settings that cannot work together.

    Args:
        ft: the fine-tuning settings.
        rounds: the fine-tuning rounds the run will have (the recipe's when the setting is 0).
        personal: the run's ``personal`` setting.
        mode: the run's mode (federated, centralized, local-only).
        ssl_aggregation: how the sites take the global encoder in pretraining.
        pretrain: the pretraining method(s), or none.
        secagg: whether the run aggregates through SecAgg+.
        server_step: ``pretrain-server-lr`` and ``pretrain-server-momentum`` (FedAvgM on the pretraining rounds).

    Raises:
        ConfigError: ``finetune-probe-rounds`` not below the fine-tuning rounds (the encoder would never train),
            probing with ``finetune-mode linear`` (which never trains the encoder), or personal norms with
            ``finetune-mode lora`` (the adapters freeze the encoder's norms) or ``linear``; any personal parts
            with ``finetune-select best-validation`` (the sites' parts are the last round's); FedEMA/FedU or
            personal parts or server momentum outside a federation, FedEMA/FedU or server momentum without
            pretraining; FedEMA/FedU or personal parts
            with SecAgg+ (their per-site metrics, computed from the site's own weights, would show the server what
            SecAgg+ hides: the attack review recovered a site's personal head from its personal-* metrics).
    """
    if secagg:
        for key, value, off in (("ssl-aggregation", ssl_aggregation, SSLAggregation.FEDAVG),
                                ("personal", personal, PersonalParts.NONE)):
            if value != off:
                raise ConfigError(f"{key} {value} cannot be combined with secure-aggregation secagg+: each site's "
                                  f"{'divergence metrics' if key == 'ssl-aggregation' else 'personalised metrics'} "
                                  "are computed from its own weights, which SecAgg+ hides from the server")
    if Mode(mode) != Mode.FEDERATED:
        for key, value, off in (("ssl-aggregation", ssl_aggregation, SSLAggregation.FEDAVG),
                                ("personal", personal, PersonalParts.NONE)):
            if value != off:
                raise ConfigError(f"{key} {value} concerns a federation's sites; mode {mode} has none (use {off})")
    if tuple(server_step) != (1.0, 0.0):
        if Mode(mode) != Mode.FEDERATED:
            raise ConfigError(f"pretrain-server-lr {server_step[0]:g} / pretrain-server-momentum {server_step[1]:g} "
                              f"move the federation's aggregate; mode {mode} has none (use 1 and 0)")
        if pretrain == NO_PRETRAIN:
            raise ConfigError("pretrain-server-lr / pretrain-server-momentum act on the pretraining rounds; --pretrain "
                              "none has none (use 1 and 0)")
    if SSLAggregation(ssl_aggregation) != SSLAggregation.FEDAVG and pretrain == NO_PRETRAIN:
        raise ConfigError(f"ssl-aggregation {ssl_aggregation} is how sites take the global encoder in pretraining; "
                          "--pretrain none has no pretraining (use fedavg)")
    if ft.probe_rounds and ft.probe_rounds >= rounds:
        raise ConfigError(f"finetune-probe-rounds ({ft.probe_rounds}) must be below the fine-tuning rounds "
                          f"({rounds}), or the encoder never trains; use finetune-mode linear for a probe alone")
    if ft.probe_rounds and ft.mode != FinetuneMode.FULL:
        raise ConfigError(f"finetune-probe-rounds needs finetune-mode full (probing, then training the encoder "
                          f"too); got finetune-mode {ft.mode}")
    personal = PersonalParts(personal)
    if personal.norm and ft.mode != FinetuneMode.FULL:
        raise ConfigError(f"personal {personal} keeps each site's own normalisation parameters, but finetune-mode "
                          f"{ft.mode} does not train them; use finetune-mode full, or personal head")
    if personal != PersonalParts.NONE and ft.select != FinetuneSelect.LAST:
        raise ConfigError(f"finetune-select {ft.select} would keep an earlier round's global model, but with personal "
                          f"{personal} each site keeps its own parts of the last round, trained beside the last "
                          "round's global model, not that one; use finetune-select last")
