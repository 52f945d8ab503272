"""RunConfig: defaults, flat round trip, pyproject agreement, and a table of bad values."""

from __future__ import annotations

import math

import tomllib
from pathlib import Path

import pytest

from medfed.config import RunConfig
from medfed.exceptions import ConfigError


def test_defaults_are_the_documented_default_run() -> None:
    cfg = RunConfig()
    assert (cfg.data, cfg.num_sites, cfg.partition, cfg.alpha, cfg.label_fraction) == (
        "pneumoniamnist", 5, "dirichlet", 0.5, 0.1,
    )
    assert cfg.ssl_methods == ["simclr"] and cfg.mode == "federated"


def test_dp_run_share_defaults() -> None:
    """A run may spend all that is left of a site's budget unless dp-run-epsilon says less; a planned sigma above
    20 is refused (the documented default, which the accountant's constant must agree with)."""
    from medfed.privacy.accounting import DEFAULT_MAX_PLANNED_NOISE

    cfg = RunConfig()
    assert (cfg.dp_run_epsilon, cfg.dp_max_planned_noise) == (0.0, 20.0) == (0.0, DEFAULT_MAX_PLANNED_NOISE)
    assert RunConfig(dp="finetune", dp_epsilon=8.0, dp_run_epsilon=8.0).dp_run_epsilon == 8.0


def test_finetune_recipe_follows_dp_unless_set() -> None:
    from medfed.config import DP_FINETUNE_RECIPE, FINETUNE_RECIPE, FinetuneRecipe

    assert RunConfig().finetune_recipe == FINETUNE_RECIPE == FinetuneRecipe(lr=3e-4, batch_size=32, rounds=25)
    for mode in ("full", "lora", "linear"):
        assert RunConfig(dp="finetune", finetune_mode=mode).finetune_recipe == DP_FINETUNE_RECIPE[mode]
    assert RunConfig(dp="pretrain", pretrain="mae").finetune_recipe == FINETUNE_RECIPE  # fine-tuning is not DP
    dp = RunConfig(dp="all", pretrain="mae", finetune_lr=0.5, finetune_rounds=3)
    assert dp.finetune_recipe == FinetuneRecipe(lr=0.5, batch_size=DP_FINETUNE_RECIPE["full"].batch_size, rounds=3)
    # replace re-resolves: the recipe is derived, never frozen into the settings
    assert RunConfig().replace(dp="finetune").finetune_recipe == DP_FINETUNE_RECIPE["full"]
    chosen = RunConfig(dp="finetune", finetune_lr_schedule="constant", dp_augment_multiplicity=3).finetune_recipe
    assert (chosen.lr_schedule, chosen.augment_multiplicity) == ("constant", 3)


def test_cosine_learning_rate_over_rounds() -> None:
    from medfed.config import FinetuneRecipe

    cosine = FinetuneRecipe(lr=0.01, batch_size=64, rounds=10, lr_schedule="cosine")
    got = [cosine.lr_at_round(r) for r in range(1, 11)]
    assert got[0] == 0.01 and got[5] == pytest.approx(0.005)  # full rate first, half way at round 6 of 10
    assert got[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.9)))  # 0.000245: the last step is small
    assert all(a > b for a, b in zip(got, got[1:]))
    constant = FinetuneRecipe(lr=0.01, batch_size=64, rounds=10)
    assert {constant.lr_at_round(r) for r in range(1, 11)} == {0.01}


def test_flat_round_trip_and_kebab_keys() -> None:
    cfg = RunConfig(num_sites=3, pretrain="simclr+restore", pretrain_weights="1,0.5")
    flat = cfg.to_flat()
    assert flat["num-sites"] == 3 and "num_sites" not in flat
    assert RunConfig.from_flat(flat) == cfg
    assert cfg.ssl_methods == ["simclr", "restore"] and cfg.ssl_weights == [1.0, 0.5]


def test_pyproject_flwr_defaults_match_runconfig() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_flat()


def test_from_flat_accepts_ints_for_floats_and_rejects_unknown_keys() -> None:
    assert RunConfig.from_flat({"alpha": 1}).alpha == 1.0
    with pytest.raises(ConfigError, match="unknown setting 'num-site'"):
        RunConfig.from_flat({"num-site": 3})
    with pytest.raises(ConfigError, match="'num-sites' must be of type int"):
        RunConfig.from_flat({"num-sites": "three"})


BAD = [
    ({"label_fraction": 0.0}, "label-fraction must be in (0, 1]"),
    ({"label_fraction": 1.5}, "label-fraction must be in (0, 1]"),
    ({"num_sites": 0}, "num-sites must be >= 1"),
    ({"alpha": 0.0}, "alpha (Dirichlet concentration) must be > 0"),
    ({"partition": "random"}, "partition must be one of iid, dirichlet, quantity"),
    ({"pretrain": "moco"}, "unknown self-supervised method 'moco'"),
    ({"pretrain": "simclr+simclr"}, "distinct methods"),
    ({"pretrain": "simclr+restore", "pretrain_weights": "1"}, "one weight per method"),
    ({"pretrain": "simclr+restore", "pretrain_weights": "0,0"}, "at least one > 0"),
    ({"pretrain_weights": "a"}, "comma-separated numbers"),
    ({"mode": "cloud"}, "mode must be one of federated, centralized, local-only"),
    ({"encoder": "resnet"}, "encoder must be one of"),
    ({"finetune_rounds": -1}, "finetune-rounds must be >= 1 (the run ends with a fine-tuned model), or 0"),
    ({"finetune_batch_size": -2}, "finetune-batch-size must be >= 1, or 0 for the recipe's"),
    ({"pretrain_rounds": 0}, "pretrain-rounds must be >= 1 when a pretrain method is set"),
    ({"pretrain_batch_size": 1}, "pretrain-batch-size must be >= 2 for simclr"),
    ({"finetune_lr": -1.0}, "finetune-lr must be > 0"),
    ({"byol_momentum": 1.0}, "byol-momentum must be in [0, 1)"),
    ({"mask_ratio": 1.0}, "mask-ratio must be in (0, 1)"),
    ({"strategy": "fedprox"}, "fedprox needs proximal-mu > 0"),
    ({"fraction_train": 0.0}, "fraction-train must be in (0, 1]"),
    ({"width": 6}, "width must be a multiple of 4"),
    ({"run_name": "../escape"}, "run-name must be a plain folder name"),
    ({"num_sites": True}, "must be of type int"),
    ({"pretrain": "none", "encoder_init": "enc.safetensors"}, "encoder-init needs --pretrain"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number"),
    ({"strategy": "fedprox", "proximal_mu": float("nan")}, "proximal-mu must be a finite number"),
    ({"pretrain_lr": float("inf")}, "pretrain-lr must be a finite number"),
    ({"proximal_mu": 0.1}, "proximal-mu > 0 needs --strategy fedprox"),
    ({"finetune_loss": "focal"}, "finetune-loss must be one of ce, logit-adjusted"),
    # robust aggregation and the norm-outlier screen
    ({"aggregation": "geomed"}, "aggregation must be one of mean, trimmed-mean, median, krum"),
    ({"trim_fraction": 0.5}, "trim-fraction must be in [0, 0.5)"),
    ({"trim_fraction": -0.1}, "trim-fraction must be in [0, 0.5)"),
    ({"krum_byzantine": -1}, "krum-byzantine must be >= 0"),
    ({"krum_select": 0}, "krum-select must be >= 1"),
    ({"norm_outlier_factor": 1.0}, "norm-outlier-factor must be 0 (off) or > 1"),
    ({"norm_outlier_factor": -2.0}, "norm-outlier-factor must be 0 (off) or > 1"),
    ({"aggregation": "trimmed-mean", "trim_fraction": 0.1}, "drops floor(0.1 x 5) = 0 of the 5 sites"),
    ({"aggregation": "median", "num_sites": 2}, "aggregation median needs at least 3 sites per round"),
    ({"aggregation": "trimmed-mean", "num_sites": 5, "fraction_train": 0.4}, "needs at least 3 sites per round"),
    ({"aggregation": "krum", "num_sites": 4}, "n >= 2f+3 = 5 updates"),
    ({"aggregation": "krum", "krum_byzantine": 2}, "n >= 2f+3 = 7 updates (Blanchard et al. 2017); got n=5"),
    ({"aggregation": "krum", "krum_select": 5}, "m <= n - f = 5 - 1 = 4"),
    ({"norm_outlier_factor": 3.0, "num_sites": 2}, "norm-outlier-factor needs at least 3 sites per round"),
    # differential privacy and LoRA
    ({"dp": "everything"}, "dp must be one of none, finetune, pretrain, all"),
    ({"dp": "finetune", "dp_epsilon": 0.0}, "epsilon"),
    ({"dp": "finetune", "dp_epsilon": -1.0}, "epsilon"),
    ({"dp": "finetune", "dp_delta": 0.0}, "delta"),
    ({"dp": "finetune", "dp_delta": 1.0}, "delta"),
    ({"dp": "finetune", "dp_accountant": "gdp"}, "unknown accountant 'gdp'"),
    ({"dp": "finetune", "dp_max_grad_norm": 0.0}, "dp-max-grad-norm must be > 0"),
    ({"dp": "finetune", "dp_augment_multiplicity": -1}, "dp-augment-multiplicity must be in [1, 64]"),
    ({"dp": "finetune", "dp_augment_multiplicity": 65}, "dp-augment-multiplicity must be in [1, 64]"),
    ({"dp": "all", "pretrain": "byol", "dp_grad_sample_mode": "ew"}, "dp-grad-sample-mode ew needs the loss"),
    ({"dp": "finetune", "encoder": "vit", "dp_grad_sample_mode": "ew"}, "ew works with the cnn encoder only"),
    ({"finetune_lr_schedule": "step"}, "finetune-lr-schedule"),
    ({"dp": "finetune", "dp_noise_multiplier": -0.5}, "dp-noise-multiplier must be >= 0"),
    ({"dp": "finetune", "dp_run_epsilon": -1.0}, "dp-run-epsilon (this run's share of each site's budget) must be in [0, "
                                                 "dp-epsilon = 8]"),
    ({"dp": "finetune", "dp_epsilon": 4.0, "dp_run_epsilon": 5.0}, "must be in [0, dp-epsilon = 4] (0: all that is left); "
                                                                   "got 5"),
    ({"dp": "finetune", "dp_max_planned_noise": 0.1}, "dp-max-planned-noise must be in (0.1, 50]"),
    ({"dp": "finetune", "dp_max_planned_noise": 60.0}, "dp-max-planned-noise must be in (0.1, 50]"),
    ({"dp": "all"}, "couples the examples of a batch"),  # simclr under DP
    ({"dp": "pretrain", "pretrain": "simclr+restore"}, "couples the examples of a batch"),
    ({"dp": "pretrain", "pretrain": "none"}, "dp pretrain needs a pretraining phase"),
    ({"dp": "finetune", "strategy": "fedprox", "proximal_mu": 0.1}, "fedprox cannot be combined with dp"),
    ({"dp": "finetune", "finetune_loss": "logit-adjusted"}, "DP-SGD does not protect"),
    ({"dp_grad_sample_mode": "ghost"}, "dp-grad-sample-mode must be one of auto, hooks, functorch, ew"),
    ({"lora_rank": 0}, "lora-rank must be >= 1"),
    ({"lora_alpha": 0.0}, "lora-alpha must be > 0"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[str(c) for c, _ in BAD])
def test_bad_values_raise_config_error_naming_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig(**changes)
    assert message in str(info.value)


def test_pretrain_none_needs_no_pretrain_rounds() -> None:
    assert RunConfig(pretrain="none", pretrain_rounds=0).ssl_methods == []


def test_per_example_pretraining_is_accepted_under_dp() -> None:
    for method in ("mae", "byol", "restore", "byol+restore"):
        assert RunConfig(dp="all", pretrain=method).dp == "all"
