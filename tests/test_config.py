"""RunConfig: defaults, flat round trip, pyproject agreement, a table of bad values, run.toml, flags, and the
settings a site is sent."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from medfed.config import RunConfig, run_config
from medfed.config.flags import setting_parameters, settings_from_flags
from medfed.config.run import read_toml
from medfed.constants import DPScope
from medfed.exceptions import ConfigError
from medfed.selfsup.compat import check_methods_fit


def test_defaults_are_the_documented_default_run() -> None:
    cfg = RunConfig()
    d = cfg.dataset
    assert (d.source, d.num_sites, d.partition, d.alpha, d.label_fraction) == (
        "pneumoniamnist", 5, "dirichlet", 0.5, 0.1,
    )
    assert cfg.ssl.methods == ["simclr"] and cfg.experiment.mode == "federated"


def test_dp_run_share_defaults() -> None:
    """A run may spend all that is left of a site's budget unless dp-run-epsilon says less; a planned sigma above
    20 is refused (the documented default, which the accountant's constant must agree with)."""
    from medfed.privacy.accounting import DEFAULT_MAX_PLANNED_NOISE

    cfg = RunConfig()
    assert (cfg.privacy.run_epsilon, cfg.privacy.max_planned_noise) == (0.0, 20.0) == (0.0, DEFAULT_MAX_PLANNED_NOISE)
    assert run_config(dp="finetune", dp_epsilon=8.0, dp_run_epsilon=8.0).privacy.run_epsilon == 8.0


def test_finetune_recipe_follows_dp_unless_set() -> None:
    from medfed.config import DP_FINETUNE_RECIPE, FINETUNE_RECIPE, FinetuneRecipe

    assert RunConfig().finetune_recipe == FINETUNE_RECIPE == FinetuneRecipe(lr=3e-4, batch_size=32, rounds=25)
    for mode in ("full", "lora", "linear"):
        assert run_config(dp="finetune", finetune_mode=mode).finetune_recipe == DP_FINETUNE_RECIPE[mode]
    assert run_config(dp="pretrain", pretrain="mae").finetune_recipe == FINETUNE_RECIPE  # fine-tuning is not DP
    dp = run_config(dp="all", pretrain="mae", finetune_lr=0.5, finetune_rounds=3)
    assert dp.finetune_recipe == FinetuneRecipe(lr=0.5, batch_size=DP_FINETUNE_RECIPE["full"].batch_size, rounds=3)
    # replace re-resolves: the recipe is derived, never frozen into the settings
    assert RunConfig().replace(dp="finetune").finetune_recipe == DP_FINETUNE_RECIPE["full"]
    chosen = run_config(dp="finetune", finetune_lr_schedule="constant", dp_augment_multiplicity=3).finetune_recipe
    assert (chosen.lr_schedule, chosen.augment_multiplicity) == ("constant", 3)


def test_cosine_learning_rate_over_rounds() -> None:
    from medfed.config import FinetuneRecipe

    cosine = FinetuneRecipe(lr=0.01, batch_size=64, rounds=10, lr_schedule="cosine")
    got = [cosine.lr_at_round(r) for r in range(1, 11)]
    assert got[0] == 0.01 and got[5] == pytest.approx(0.005)  # full rate first, half way at round 6 of 10
    assert got[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.9)))  # 0.000245: the last step is small
    assert all(a > b for a, b in zip(got, got[1:], strict=False))
    constant = FinetuneRecipe(lr=0.01, batch_size=64, rounds=10)
    assert {constant.lr_at_round(r) for r in range(1, 11)} == {0.01}


def test_flat_round_trip_and_kebab_keys() -> None:
    cfg = run_config(num_sites=3, pretrain="simclr+restore", pretrain_weights="1,0.5")
    flat = cfg.to_flat()
    assert flat["num-sites"] == 3 and "num_sites" not in flat
    assert RunConfig.from_flat(flat) == cfg
    assert cfg.ssl.methods == ["simclr", "restore"] and cfg.ssl.method_weights == [1.0, 0.5]


def test_pyproject_flwr_defaults_match_runconfig() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_flat()


def test_from_flat_accepts_ints_for_floats_and_rejects_unknown_keys() -> None:
    assert RunConfig.from_flat({"alpha": 1}).dataset.alpha == 1.0
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
    ({"finetune_lr_schedule": "step"}, "finetune-lr-schedule"),
    ({"dp": "finetune", "dp_noise_multiplier": -0.5}, "dp-noise-multiplier must be >= 0"),
    ({"dp": "finetune", "dp_run_epsilon": -1.0},
     "dp-run-epsilon (this run's share of each site's budget) must be in [0, dp-epsilon = 8]"),
    ({"dp": "finetune", "dp_epsilon": 4.0, "dp_run_epsilon": 5.0},
     "must be in [0, dp-epsilon = 4] (0: all that is left); got 5"),
    ({"dp": "finetune", "dp_max_planned_noise": 0.1}, "dp-max-planned-noise must be in (0.1, 50]"),
    ({"dp": "finetune", "dp_max_planned_noise": 60.0}, "dp-max-planned-noise must be in (0.1, 50]"),
    ({"dp": "pretrain", "pretrain": "none"}, "dp pretrain needs a pretraining phase"),
    ({"dp": "finetune", "strategy": "fedprox", "proximal_mu": 0.1}, "fedprox cannot be combined with dp"),
    ({"dp": "finetune", "finetune_loss": "logit-adjusted"}, "DP-SGD does not protect"),
    ({"dp_grad_sample_mode": "ghosts"}, "dp-grad-sample-mode must be one of auto, hooks, functorch, ew, ghost"),
    ({"lora_rank": 0}, "lora-rank must be >= 1"),
    ({"ssl_aggregation": "fedprox"}, "ssl-aggregation must be one of fedavg, fedema, fedu"),
    ({"ssl_aggregation": "fedu"}, "ssl-aggregation fedu shares BYOL's predictor: it needs byol"),
    ({"fedema_tau": 0.0}, "fedema-tau must be in (0, 1]"),
    ({"fedema_tau": 1.5}, "fedema-tau must be in (0, 1]"),
    ({"fedu_threshold": 0.0}, "fedu-threshold must be > 0"),
    ({"pretrain_server_lr": 0.0}, "pretrain-server-lr must be > 0"),
    ({"pretrain_server_momentum": 1.0}, "pretrain-server-momentum must be in [0, 1)"),
    ({"pretrain_server_momentum": -0.1}, "pretrain-server-momentum must be in [0, 1)"),
    ({"pretrain_server_momentum": 0.9, "mode": "centralized"}, "mode centralized has none (use 1 and 0)"),
    ({"pretrain_server_lr": 2.0, "pretrain": "none"}, "act on the pretraining rounds; --pretrain none has none"),
    ({"finetune_probe_rounds": -1}, "finetune-probe-rounds must be >= 0"),
    ({"finetune_probe_rounds": 25}, "finetune-probe-rounds (25) must be below the fine-tuning rounds (25)"),
    ({"finetune_probe_rounds": 2, "finetune_mode": "linear"}, "finetune-probe-rounds needs finetune-mode full"),
    ({"personal": "bn"}, "personal must be one of none, norm, head, norm+head"),
    ({"personal": "norm", "finetune_mode": "lora"}, "finetune-mode lora does not train them"),
    ({"personal": "norm+head", "finetune_mode": "linear"}, "finetune-mode linear does not train them"),
    ({"personal": "head", "mode": "centralized"}, "personal head concerns a federation's sites; mode centralized"),
    ({"ssl_aggregation": "fedema", "mode": "local-only"}, "ssl-aggregation fedema concerns a federation's sites"),
    ({"ssl_aggregation": "fedema", "pretrain": "none"}, "--pretrain none has no pretraining"),
    ({"personal": "head", "secure_aggregation": "secagg+"}, "personal head cannot be combined with secure-aggregation"),
    ({"ssl_aggregation": "fedema", "secure_aggregation": "secagg+"}, "fedema cannot be combined with secure-agg"),
    ({"lora_alpha": 0.0}, "lora-alpha must be > 0"),
    ({"finetune_select": "best"}, "finetune-select must be one of last, best-validation"),
    ({"finetune_select": "best-validation", "personal": "head"}, "each site keeps its own parts of the last round"),
    ({"finetune_select": "best-validation", "num_sites": 10, "fraction_evaluate": 0.5},
     "samples 5 of 10 sites (fraction-evaluate): rounds would be scored on different sites"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[str(c) for c, _ in BAD])
def test_bad_values_raise_config_error_naming_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_config(**changes)
    assert message in str(info.value)


BAD_FOR_THE_METHODS = [  # valid settings on their own, which the self-supervised methods cannot serve
    ({"dp": "finetune", "encoder": "vit", "dp_grad_sample_mode": "ew"}, "ew works with the cnn encoder only"),
    ({"dp": "all"}, "couples the examples of a batch"),  # simclr under DP
    ({"dp": "pretrain", "pretrain": "simclr+restore"}, "couples the examples of a batch"),
    ({"pretrain": "mae", "encoder": "cnn"}, "self-supervised method 'mae' needs a vit encoder"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_FOR_THE_METHODS, ids=[str(c) for c, _ in BAD_FOR_THE_METHODS])
def test_settings_the_methods_cannot_serve_are_refused_by_their_check(changes: dict, message: str) -> None:
    cfg = run_config(**changes)
    with pytest.raises(ConfigError) as info:
        check_methods_fit(cfg)
    assert message in str(info.value)


def test_pretrain_none_needs_no_pretrain_rounds() -> None:
    assert run_config(pretrain="none", pretrain_rounds=0).ssl.methods == []


def test_per_example_pretraining_is_accepted_under_dp() -> None:
    for method in ("mae", "byol", "restore", "byol+restore"):
        check_methods_fit(run_config(dp="all", pretrain=method))


# ---- parts, run.toml, flags and what a site is sent -----------------------------------------------------------

def test_a_run_toml_round_trips_and_names_every_part(tmp_path: Path) -> None:
    cfg = run_config(num_sites=3, pretrain="byol", dp="finetune", dp_epsilon=4.0, aggregation="median",
                     finetune_lr_schedule="cosine", dp_secure_rng=True, run_name="r1")
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.from_toml(path) == cfg
    assert [line for line in path.read_text().splitlines() if line.startswith("[")] == [
        f"[{attr}]" for attr, _ in RunConfig().parts()]
    assert read_toml(path)["dp-secure-rng"] is True and read_toml(path)["aggregation"] == "median"


def test_a_run_toml_keeps_any_string_a_setting_may_hold(tmp_path: Path) -> None:
    cfg = run_config(run_name="hôpital-\U0001f600", out_dir='runs/"quoted"\\back\x7fdel\ttab')
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert RunConfig.from_toml(path) == cfg


def test_a_run_toml_may_be_flat_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('data = "breastmnist"\nnum-sites = 4\n\n[privacy]\ndp = "finetune"\ndp-epsilon = 2.0\n')
    cfg = settings_from_flags(str(path), {"num_sites": 2, "seed": None, "dp_epsilon": None})
    assert (cfg.dataset.source, cfg.dataset.num_sites, cfg.privacy.scope, cfg.privacy.epsilon) == (
        "breastmnist", 2, "finetune", 2.0)
    assert cfg.experiment.seed == 0  # a flag left out (None) does not override anything
    # a command's own defaults sit under the file: `medfed run` defaults to no baselines
    assert settings_from_flags(None, {}, defaults={"baselines": "none"}).experiment.baselines == "none"
    assert settings_from_flags(str(path), {}, defaults={"num_sites": 9}).dataset.num_sites == 4


BAD_FILES = [
    ("num-sites = [", "cannot be read"),
    ("[sites]\nnum-sites = 3\n", "[sites] is not a part of the settings"),
    ("[privacy]\nnum-sites = 3\n", "num-sites belongs in [dataset], not [privacy]"),
    ("num-site = 3\n", "unknown setting 'num-site'"),
    ("[dataset]\nnum-sites = 0\n", "num-sites must be >= 1; got 0"),
    ("[experiment]\nmode = \"swarm\"\n", "mode must be one of federated, centralized, local-only; got 'swarm'"),
    ("[dataset]\nnum-sites = \"3\"\n", "setting 'num-sites' must be of type int"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_a_bad_run_toml_is_refused_naming_the_file_and_the_rule(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        settings_from_flags(str(path), {})
    assert message in str(info.value) and "bad.toml" in str(info.value)


def test_a_missing_run_toml_is_refused_by_the_cli_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app

    result = CliRunner().invoke(app, ["simulate", "--config", str(tmp_path / "none.toml"), "--out-dir",
                                      str(tmp_path / "runs")])
    said = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and "none.toml" in said and "cannot be read" in said
    assert not (tmp_path / "runs").exists()


def test_sites_are_sent_only_the_settings_they_train_by() -> None:
    cfg = run_config(data="breastmnist", out_dir="/secret/centre/path", run_name="r", aggregation="median",
                     ledger_dir="/centre/ledgers", dp="finetune", dp_epsilon=3.0, client_cpus=2)
    sent = cfg.site_settings()
    for centre_only in ("data", "out-dir", "run-name", "aggregation", "ledger-dir", "client-cpus", "site-keys",
                        "resume-from", "baselines", "partition", "fraction-train", "min-sites", "round-timeout",
                        "pretrain-server-lr", "pretrain-server-momentum", "finetune-select"):
        assert centre_only not in sent, centre_only
    assert {"dp", "dp-epsilon", "seed", "pretrain", "finetune-mode", "label-fraction"} <= set(sent)
    at_site = RunConfig.from_flat(sent)  # what the site rebuilds: the same training settings
    for attr in ("ssl", "finetune", "lora", "privacy", "model", "experiment"):
        sent_part, full_part = getattr(at_site, attr).flat(), getattr(cfg, attr).flat()
        assert {k: v for k, v in full_part.items() if k in sent} == {k: v for k, v in sent_part.items() if k in sent}
    assert at_site.finetune_recipe == cfg.finetune_recipe


def test_every_setting_has_help_and_a_part_and_the_flags_keep_their_names() -> None:
    settings = RunConfig.settings()
    assert len(settings) == 94  # 66 before issue 14 (image, table, memory settings: 81); issue 15: device, precision,
    # fraction-evaluate, client-gpus, ray-address; issue 16: ssl-aggregation, fedema-tau, fedu-threshold,
    # finetune-probe-rounds, personal, pretrain-server-lr, pretrain-server-momentum, finetune-select
    assert all(s.help for _, s in settings.values())
    for key in ("data", "num-sites", "pretrain", "dp", "dp-epsilon", "secure-aggregation", "central-dp",
                "central-dp-clipping-norm", "aggregation", "out-dir", "site-keys"):
        assert key in settings, key
    params = {p.name for p in setting_parameters()}
    assert {"config", "num_sites", "dp_epsilon", "secagg_num_shares"} <= params


def test_choices_are_enums_and_compare_as_their_names() -> None:
    cfg = run_config(dp="all", pretrain="mae")
    assert isinstance(cfg.privacy.scope, DPScope) and cfg.privacy.scope == "all" == DPScope.ALL
    assert cfg.to_flat()["dp"] == "all" and type(cfg.to_flat()["dp"]) is str
