"""Run an experiment: the main arm plus its baselines, on one partition, into one run directory.

Everything that can be wrong with the input (settings, data file, split) is checked before
anything is written. The run directory is then built under a hidden ``.NAME.partial-PID``
name and renamed into place only when the run finished; on any failure it is removed, so
no half-written run directory is ever left behind.

Run directory::

    config.json        resolved settings (flat, as `medfed simulate` and `flwr run` take them)
    data.json          the data file (path, sha256, task, shapes) and per-site counts
    split.json         the partition: every site's train, labelled and val indices
    metrics.jsonl      per-round, per-site metrics of every arm
    summary.json       each arm's final test metrics, wall time and peak memory
    report.md          comparison table, site table, plots
    plots/*.png        loss per site per round, test AUC per round
    arms/<arm>/*.safetensors   pretrained encoder and final model of each arm
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfed.client.algo import check_loss_fits_task, initial_encoder_state
from medfed.config import RunConfig
from medfed.constants import NO_PRETRAIN, Baselines, DPScope, EncoderKind, FinetuneMode, Mode, Phase
from medfed.data.medmnist import MedMNISTData, load_medmnist
from medfed.data.transforms import scale_intensity
from medfed.exceptions import ConfigError
from medfed.models.encoders import InputSpec, resolve_encoder_kind, vit_patch_size
from medfed.resources import ResourceMonitor
from medfed.server.evaluation import TestSet
from medfed.server.phases import ArmContext
from medfed.server.recorder import Listener, Recorder, json_safe
from medfed.simulations.partition import SPLIT_FILE, SitePlan, make_site_plan, summarize


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
    arms = [Arm(cfg.mode, cfg.pretrain)]
    if cfg.baselines != Baselines.NONE:
        arms += [Arm(Mode.LOCAL_ONLY.value, NO_PRETRAIN), Arm(Mode.FEDERATED.value, NO_PRETRAIN)]
        if cfg.baselines == Baselines.ALL and cfg.pretrain != NO_PRETRAIN:
            arms += [Arm(mode.value, cfg.pretrain) for mode in (Mode.FEDERATED, Mode.CENTRALIZED, Mode.LOCAL_ONLY)]
    unique: list[Arm] = []
    for arm in arms:
        if arm not in unique:
            unique.append(arm)
    return unique


@dataclass(frozen=True)
class Prepared:
    """A validated experiment, ready to run."""

    cfg: RunConfig
    data: MedMNISTData
    plan: SitePlan | None  # None in a deployment (site-data own): the sites' data are theirs
    test: TestSet


def prepare(cfg: RunConfig) -> Prepared:
    """Load and check the data, make the partition, check the model fits the data: no writes."""
    data = load_medmnist(cfg.data)
    spec = InputSpec(data.channels, data.spatial_shape)
    kind = resolve_encoder_kind(cfg.encoder, cfg.ssl_methods)
    if kind == EncoderKind.VIT:
        vit_patch_size(spec)  # raises ConfigError when no patch size divides the image
    initial_encoder_state(cfg, spec)  # raises ConfigError when encoder-init does not fit
    check_loss_fits_task(cfg, data.task)
    check_out_dir(Path(cfg.out_dir).expanduser())
    if cfg.site_data == "own":  # deployment: every site reads its own file; the server holds only its test split
        test = TestSet(scale_intensity(data.test.images, data.intensity_range), torch.as_tensor(data.test.labels),
                       data.task, data.num_classes)
        return Prepared(cfg, data, None, test)
    plan = make_site_plan(
        data.train.labels, data.val.labels, data.task, test_labels=data.test.labels, scheme=cfg.partition,
        num_sites=cfg.num_sites,
        alpha=cfg.alpha, label_fraction=cfg.label_fraction, seed=cfg.seed, data_sha256=data.sha256,
        min_site_size=cfg.min_site_size,
    )
    check_delta_fits_sites(cfg, plan)
    test = TestSet(
        scale_intensity(data.test.images, data.intensity_range), torch.as_tensor(data.test.labels), data.task,
        data.num_classes, site_indices={s.site_id: np.asarray(s.test, dtype=np.int64) for s in plan.sites},
    )
    return Prepared(cfg, data, plan, test)


def check_delta_fits_sites(cfg: RunConfig, plan: SitePlan) -> None:
    """Under DP every site's delta must be below 1/n for the n examples its DP phases train on."""
    if cfg.dp == DPScope.NONE:
        return
    from medfed.privacy.accounting import check_budget

    scope = DPScope(cfg.dp)
    for site in plan.sites:
        sizes = []
        if scope.covers(Phase.PRETRAIN) and cfg.ssl_methods:
            sizes.append(len(site.train))
        if scope.covers(Phase.FINETUNE):
            sizes.append(len(site.labelled))
        for n in sizes:
            try:
                check_budget(cfg.dp_epsilon, cfg.dp_delta, site_size=n)
            except ConfigError as exc:
                raise ConfigError(f"site {site.site_id}: {exc}") from None


def check_out_dir(out: Path) -> None:
    """The output folder must be a writable folder (or creatable under one)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out-dir {str(out)!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out-dir {str(out)!r}: {str(existing)!r} is not writable")


def unique_dir(path: Path) -> Path:
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def arm_config(main: RunConfig, arm: Arm) -> RunConfig:
    """Settings of one arm: the main settings with the arm's mode and pretraining.

    Baselines keep the main arm's resolved encoder (so a MAE run compares ViTs with ViTs), and
    a supervised-from-scratch baseline always fine-tunes fully (a linear probe on a random
    encoder measures nothing).
    """
    same_ssl = arm.pretrain == main.pretrain
    baseline_from_scratch = arm.pretrain == NO_PRETRAIN and main.pretrain != NO_PRETRAIN
    return main.replace(
        mode=arm.mode,
        pretrain=arm.pretrain,
        pretrain_weights=main.pretrain_weights if same_ssl else "",
        encoder_init=main.encoder_init if same_ssl and arm.pretrain != NO_PRETRAIN else "",
        encoder=resolve_encoder_kind(main.encoder, main.ssl_methods).value,
        finetune_mode=FinetuneMode.FULL.value if baseline_from_scratch else main.finetune_mode,
        dp=_arm_dp(main, arm),
    )


def _arm_dp(main: RunConfig, arm: Arm) -> str:
    """An arm without pretraining keeps DP only for fine-tuning (there is no pretraining to protect)."""
    scope = DPScope(main.dp)
    if arm.pretrain != NO_PRETRAIN and not (arm.pretrain == main.pretrain and main.encoder_init):
        return scope.value
    return DPScope.FINETUNE.value if scope.covers(Phase.FINETUNE) else DPScope.NONE.value


def run_arm(
    prep: Prepared, arm: Arm, run_dir: Path, recorder: Recorder, *, verbose: bool = False, grid: Any = None,
    run_id: str = "",
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Run one arm; returns its test metrics and (local-only) per-site test metrics.

    A federated arm runs on ``grid`` when the caller is a ServerApp already inside a Flower
    runtime (``flwr run``), else on Flower's simulation runtime started here.
    """
    cfg = arm_config(prep.cfg, arm)
    ctx = ArmContext(arm.name, cfg, run_dir, prep.data.path, prep.test, recorder, run_id or run_dir.name)
    if arm.mode == Mode.FEDERATED:
        if grid is not None:
            from medfed.server.phases import run_federated

            return run_federated(grid, ctx), {}
        return run_federated_simulation(ctx, verbose=verbose), {}
    from medfed.simulations.standalone import run_standalone

    return run_standalone(ctx, prep.data, prep.plan)


def run_federated_simulation(ctx: ArmContext, *, verbose: bool = False) -> dict[str, float]:
    """The federated arm on Flower's simulation runtime (Ray backend), one virtual SuperNode per site."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from medfed.client.app import app as client_app
    from medfed.server.app import make_server_app

    holder: list[dict[str, float]] = []
    cpus = ctx.cfg.client_cpus or os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": "WARNING" if verbose else "ERROR", "log_to_driver": verbose, "num_cpus": max(cpus, os.cpu_count() or 1)},
    }
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:  # Flower logs every round at INFO and warns that run_simulation is deprecated
        flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=make_server_app(ctx, holder.append), client_app=client_app, num_supernodes=ctx.cfg.num_sites,
            backend_config=backend, verbose_logging=False,
        )
    finally:
        flwr_logger.setLevel(level)
    if not holder:
        from medfed.exceptions import FederationError

        raise FederationError(f"federated arm {ctx.arm} ended without a result (see the log above)")
    return holder[0]


def arms_for_flower_runtime(cfg: RunConfig, arms: list[Arm], grid: Any) -> list[Arm]:
    """Inside a Flower runtime only federated arms run: the others would train on the server's
    own copy of the data, which in a deployment is not the sites' data."""
    nodes = len(list(grid.get_node_ids()))
    if nodes < cfg.num_sites:
        raise ConfigError(f"num-sites is {cfg.num_sites} but only {nodes} SuperNodes are connected")
    if arms[0].mode != Mode.FEDERATED:
        raise ConfigError(f"mode {arms[0].mode} trains outside the federation; run it with `medfed simulate`")
    return [a for a in arms if a.mode == Mode.FEDERATED]


def progress_units(cfg: RunConfig) -> int:
    """Site-rounds the whole experiment will train (for a progress bar)."""
    total = 0
    for arm in arms_for(cfg):
        sites = 1 if arm.mode == Mode.CENTRALIZED else cfg.num_sites
        pre = cfg.pretrain_rounds if arm.pretrain != NO_PRETRAIN and not cfg.encoder_init else 0
        total += sites * (pre + cfg.finetune_recipe.rounds)
    return total


def run_summary(cfg: RunConfig, run_id: str) -> dict[str, Any]:
    """summary.json before its arms: the settings, the resolved fine-tuning recipe, the run id."""
    return {"config": cfg.to_flat(), "finetune-recipe": dataclasses.asdict(cfg.finetune_recipe), "run_id": run_id,
            "arms": {}}


def arm_summary(arm: Arm, metrics: dict[str, float], per_site: dict[int, dict[str, float]],
                monitor: ResourceMonitor) -> dict[str, Any]:
    """One arm's entry in summary.json."""
    return {"mode": arm.mode, "pretrain": arm.pretrain, "test": metrics,
            "per_site_test": {str(k): v for k, v in per_site.items()}, "wall_seconds": monitor.wall_seconds,
            "peak_memory_mb": monitor.peak_bytes / 2**20}


def write_summary_and_report(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                             data_info: dict[str, Any], title: str) -> None:
    from medfed.server.report import write_report

    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    write_report(run_dir, summary, rows, data_info, title=title)


def publish(partial: Path, final: Path) -> Path:
    """Rename the finished partial directory into place; if another run took the name meanwhile,
    take the next free one instead of failing (and losing the finished run)."""
    for _ in range(100):
        try:
            partial.rename(final)
            return final
        except OSError:
            if not final.exists():
                raise
            final = unique_dir(final)
    raise FileExistsError(f"could not find a free run directory name near {final}")


def run_experiment(
    cfg: RunConfig,
    *,
    listener: Listener | None = None,
    verbose: bool = False,
    arms: list[Arm] | None = None,
    grid: Any = None,
) -> Path:
    """Run every arm of ``cfg`` (or the given ``arms``) and return the finished run directory.

    ``grid``: the Flower Grid when called from a ServerApp inside a Flower runtime.
    """
    if cfg.site_data == "own":
        from medfed.server.deployment import run_deployment

        if grid is None:
            raise ConfigError("site-data own needs a Flower deployment (`medfed run`); simulation partitions --data")
        return run_deployment(cfg, grid, listener=listener)
    if cfg.ledger_dir:  # the audit may run from another folder: record where the ledgers really are
        cfg = cfg.replace(ledger_dir=str(Path(cfg.ledger_dir).expanduser().resolve()))
    prep = prepare(cfg)
    arms = arms or arms_for(cfg)
    if grid is not None:
        arms = arms_for_flower_runtime(cfg, arms, grid)
    out = Path(cfg.out_dir).expanduser()
    final = unique_dir(out / cfg.run_dir_name)
    partial = out / f".{final.name}.partial-{os.getpid()}"
    run_id = f"{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
        run_dir = partial.resolve()
        (run_dir / "config.json").write_text(cfg.to_json())
        prep.plan.save(run_dir / SPLIT_FILE)
        data_info = {**prep.data.describe(), "sites": summarize(prep.plan, prep.data.train.labels, prep.data.val.labels, prep.data.task)}
        (run_dir / "data.json").write_text(json.dumps(data_info, indent=1))
        recorder = Recorder(run_dir / "metrics.jsonl", listener)
        summary = run_summary(cfg, run_id)
        for arm in arms:
            with ResourceMonitor() as monitor:
                metrics, per_site = run_arm(prep, arm, run_dir, recorder, verbose=verbose, grid=grid, run_id=run_id)
            summary["arms"][arm.name] = arm_summary(arm, metrics, per_site, monitor)
        write_summary_and_report(run_dir, summary, recorder.rows, data_info, final.name)
        final = publish(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
