"""Checks across the parts of a run's settings about how the sites learn: linear probing within fine-tuning,
personal parts against what a fine-tuning mode trains and sends."""

from __future__ import annotations

from medfed.config.training import FinetuneSettings
from medfed.constants import FinetuneMode, PersonalParts
from medfed.exceptions import ConfigError


def check_learning(ft: FinetuneSettings, rounds: int, personal: PersonalParts | str) -> None:
    """Raise `ConfigError` for learning settings that cannot work together.

    Args:
        ft: the fine-tuning settings.
        rounds: the fine-tuning rounds the run will have (the recipe's when the setting is 0).
        personal: the run's ``personal`` setting.

    Raises:
        ConfigError: ``finetune-probe-rounds`` not below the fine-tuning rounds (the encoder would never train),
            probing with ``finetune-mode linear`` (which never trains the encoder), or personal norms with
            ``finetune-mode lora`` (the adapters freeze the encoder's norms) or ``linear``.
    """
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
