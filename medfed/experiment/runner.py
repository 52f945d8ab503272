"""Run an experiment: the main arm plus its baselines, on one partition, into one run directory.

Both the simulation launcher (`medfed.simulations.launcher`, behind ``medfed simulate``) and the
ServerApp inside a Flower runtime (`medfed.server_app`, behind ``medfed run``) call `run_experiment`;
they differ only in how a federated arm reaches its sites (``federate`` or ``grid``).

Everything that can be wrong with the input (settings, data file, split) is checked before
anything is written (`medfed.experiment.prepare`). The run directory is then built under a hidden
``.NAME.partial-PID`` name and renamed into place only when the run finished; on any failure it is
removed, so no half-written run directory is ever left behind.

Run directory::

    config.json        resolved settings (flat, as `medfed simulate` and `flwr run` take them)
    config.toml        the same, by part: `medfed simulate --config RUN_DIR/config.toml` reruns the run
    data.json          the data file (path, sha256, task, shapes), per-site counts and their distribution
                       (``site_sizes``: min, quartiles, max; sites without val), the min-site-size applied
    split.json         the partition: every site's train, labelled and val indices
    metrics.jsonl      per-round, per-site metrics of every arm
    summary.json       each arm's final test metrics, wall time and peak memory
    report.md          comparison table, site table, plots
    plots/*.png        loss per site per round, test AUC per round
    arms/<arm>/*.safetensors   pretrained encoder and final model of each arm
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from flwr.serverapp import Grid

from medfed.config import RunConfig
from medfed.constants import Mode
from medfed.data.partition import SPLIT_FILE, size_distribution, summarize
from medfed.exceptions import ConfigError
from medfed.experiment.arms import Arm, arm_config, arms_for
from medfed.experiment.deployment import run_deployment
from medfed.experiment.phases import ArmContext, run_federated
from medfed.experiment.prepare import Prepared, prepare
from medfed.experiment.recorder import Listener, Recorder
from medfed.experiment.run_dir import (
    arm_summary,
    partial_dir,
    publish,
    run_summary,
    unique_dir,
    write_summary_and_report,
)
from medfed.experiment.site_means import site_means
from medfed.experiment.standalone import run_standalone
from medfed.resources import ResourceMonitor

Federate = Callable[[ArmContext], dict[str, float]]
"""Runs one federated arm somewhere (Flower's simulation runtime) and returns its final test metrics."""


def run_arm(
    prep: Prepared, arm: Arm, run_dir: Path, recorder: Recorder, *, federate: Federate | None = None,
    grid: Grid | None = None, run_id: str = "",
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Run one arm; returns its test metrics and (local-only) per-site test metrics.

    A federated arm runs on ``grid`` when the caller is a ServerApp already inside a Flower runtime
    (``flwr run``), else through ``federate`` (`medfed.simulations.launcher` starts Flower's simulation
    runtime); the other arms train here, without a federation (`medfed.experiment.standalone`).

    Raises:
        ConfigError: a federated arm with neither a grid nor a way to federate.
    """
    cfg = arm_config(prep.cfg, arm)
    ctx = ArmContext(arm.name, cfg, run_dir, prep.data.path, prep.test, recorder, run_id or run_dir.name)
    if arm.mode == Mode.FEDERATED:
        if grid is not None:
            return run_federated(grid, ctx), {}
        if federate is None:
            raise ConfigError(f"arm {arm.name} is federated: run it with `medfed simulate` or inside a Flower runtime")
        return federate(ctx), {}
    if prep.plan is None:  # a deployment (site-data own): the server holds no site's data
        raise ConfigError(f"arm {arm.name} trains on the sites' data: it cannot run in a deployment")
    return run_standalone(ctx, prep.data, prep.plan)


def arms_for_flower_runtime(cfg: RunConfig, arms: list[Arm], grid: Grid) -> list[Arm]:
    """Inside a Flower runtime only federated arms run: the others would train on the server's
    own copy of the data, which in a deployment is not the sites' data."""
    nodes = len(list(grid.get_node_ids()))
    if nodes < cfg.dataset.num_sites:
        raise ConfigError(f"num-sites is {cfg.dataset.num_sites} but only {nodes} SuperNodes are connected")
    if arms[0].mode != Mode.FEDERATED:
        raise ConfigError(f"mode {arms[0].mode} trains outside the federation; run it with `medfed simulate`")
    return [a for a in arms if a.mode == Mode.FEDERATED]


def run_experiment(
    cfg: RunConfig,
    *,
    federate: Federate | None = None,
    listener: Listener | None = None,
    arms: list[Arm] | None = None,
    grid: Grid | None = None,
) -> Path:
    """Run every arm of ``cfg`` (or the given ``arms``) and return the finished run directory.

    Args:
        cfg: the run's settings.
        federate: how a federated arm reaches its simulated sites (`medfed.simulations.launcher`).
        listener: told of every metrics row as it is written (a progress bar).
        arms: the arms to run, instead of the main arm and the baselines ``cfg`` asks for.
        grid: the Flower Grid when called from a ServerApp inside a Flower runtime; then only federated
            arms run, and with ``site-data own`` the run is a deployment run (`run_deployment`).

    Raises:
        ConfigError, DataError: bad settings or input, before anything is written.
    """
    if cfg.dataset.site_data == "own":
        if grid is None:
            raise ConfigError("site-data own needs a Flower deployment (`medfed run`); simulation partitions --data")
        return run_deployment(cfg, grid, listener=listener)
    if cfg.privacy.ledger_dir:  # the audit may run from another folder: record where the ledgers really are
        cfg = cfg.replace(ledger_dir=str(Path(cfg.privacy.ledger_dir).expanduser().resolve()))
    prep = prepare(cfg)
    cfg = prep.cfg  # its automatic settings decided
    assert prep.plan is not None  # site-data partition
    arms = arms or arms_for(cfg)
    if grid is not None:
        arms = arms_for_flower_runtime(cfg, arms, grid)
    for arm in arms:  # every arm's settings checked before anything trains or is written
        arm_config(cfg, arm)
    out = Path(cfg.output.out_dir).expanduser()
    final = unique_dir(out / cfg.run_dir_name)
    partial = partial_dir(out, final.name, os.getpid())
    run_id = f"{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
        run_dir = partial.resolve()
        (run_dir / "config.json").write_text(cfg.to_json())
        (run_dir / "config.toml").write_text(cfg.to_toml())
        prep.plan.save(run_dir / SPLIT_FILE)
        sites = summarize(prep.plan, prep.data.train.labels, prep.data.val.labels, prep.data.task)
        data_info = {**prep.data.describe(), "min_site_size": prep.plan.min_site_size,
                     "site_sizes": {**size_distribution(sites), "iid_floor": prep.plan.iid_floor}, "sites": sites}
        (run_dir / "data.json").write_text(json.dumps(data_info, indent=1))
        recorder = Recorder(run_dir / "metrics.jsonl", listener)
        summary = run_summary(cfg, run_id)
        for arm in arms:
            with ResourceMonitor() as monitor:
                metrics, per_site = run_arm(prep, arm, run_dir, recorder, federate=federate, grid=grid, run_id=run_id)
            test_sizes = {s["site"]: float(s.get("test", 0)) for s in sites}
            summary["arms"][arm.name] = {**arm_summary(arm, metrics, per_site, monitor),
                                         **site_means(recorder.rows, arm.name, test_sizes)}
        write_summary_and_report(run_dir, summary, recorder.rows, data_info, final.name)
        final = publish(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final
