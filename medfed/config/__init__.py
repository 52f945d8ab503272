"""A run's settings: `RunConfig`, nested frozen parts that check themselves, and the rules they share.

`medfed.config.run` composes the parts and checks across them, and converts to and from flat keys and
run.toml; the parts live in `experiment`, `training`, `privacy` and `federation`; `medfed.config.rules`
holds the rules that the checks and the code carrying the settings out both apply. Checks that need to
know the self-supervised methods live with them (`medfed.selfsup.compat`).
"""

from medfed.config.base import FlatValue, Part, Setting
from medfed.config.compute import ComputeSettings, check_device_setting
from medfed.config.experiment import (
    DatasetSettings,
    DeploymentSettings,
    ExperimentSettings,
    ModelSettings,
    OutputSettings,
    parse_site_keys,
)
from medfed.config.federation import FederationSettings, RobustSettings
from medfed.config.images import ImageSettings
from medfed.config.privacy import MAX_AUGMENT_MULTIPLICITY, CentralDPSettings, DPSettings, SecAggSettings
from medfed.config.run import RunConfig, run_config, without_resume
from medfed.config.training import (
    DP_FINETUNE_RECIPE,
    FINETUNE_RECIPE,
    LR_SCHEDULES,
    FinetuneRecipe,
    FinetuneSettings,
    LoRASettings,
    PretrainSettings,
)

__all__ = [
    "DP_FINETUNE_RECIPE", "FINETUNE_RECIPE", "LR_SCHEDULES", "MAX_AUGMENT_MULTIPLICITY", "CentralDPSettings",
    "ComputeSettings", "DPSettings", "DatasetSettings", "DeploymentSettings", "ExperimentSettings",
    "FederationSettings", "FinetuneRecipe", "FinetuneSettings", "FlatValue", "ImageSettings", "LoRASettings",
    "ModelSettings", "OutputSettings", "Part", "PretrainSettings", "RobustSettings", "RunConfig", "SecAggSettings",
    "Setting", "check_device_setting", "parse_site_keys", "run_config", "without_resume",
]
