"""The ServerApp's job in a deployment: one federated arm over sites that read their own data.

Differences from simulation, all on the server's side (the ServerApp and ClientApp code that
trains is the same):

* no partition: each site's node config names its own file (``site-data own``); ``--data``
  is only the coordinating centre's evaluation file (its test split);
* one arm per run (baselines are separate runs: they cost the hospitals compute);
* a checkpoint after every completed round (`medfed.experiment.resume`), and the run directory is
  built under ``OUT/.NAME.partial`` and kept there if the run fails or the server dies, so
  ``medfed run --resume OUT/.NAME.partial`` can continue it; it is renamed to ``OUT/NAME``
  when the run finishes.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from medfed.config import RunConfig
from medfed.constants import Baselines, DPScope, Mode
from medfed.exceptions import ConfigError
from medfed.experiment.arms import arm_config, arms_for
from medfed.experiment.phases import ArmContext, run_federated
from medfed.experiment.prepare import prepare
from medfed.experiment.recorder import Listener, Recorder
from medfed.experiment.resume import check_same_settings, drop_unfinished_rows, load_round_checkpoint
from medfed.experiment.run_dir import (
    arm_summary,
    final_name,
    partial_dir,
    publish,
    record_flower_run,
    run_summary,
    unique_dir,
    write_summary_and_report,
)
from medfed.experiment.site_means import kept_round
from medfed.resources import ResourceMonitor

log = logging.getLogger(__name__)
def run_deployment(cfg: RunConfig, grid: Any, *, listener: Listener | None = None) -> Path:
    """Run (or resume) the deployment run of ``cfg`` on ``grid``; returns the finished run directory."""
    if cfg.experiment.mode != Mode.FEDERATED:
        raise ConfigError(f"mode {cfg.experiment.mode} trains outside the federation; a deployment runs mode federated")
    if cfg.experiment.baselines != Baselines.NONE:
        raise ConfigError("a deployment run trains one arm; run baselines as separate runs (baselines none)")
    prep = prepare(cfg)
    cfg = prep.cfg  # its automatic settings decided
    if cfg.privacy.scope != DPScope.NONE and cfg.privacy.run_epsilon == 0:
        log.warning("dp %s with dp-run-epsilon 0: this run plans its noise to spend all that is left of each site's "
                    "budget (dp-epsilon %g), and a later DP run at these sites will be refused as too noisy to train; "
                    "give a run its share with --dp-run-epsilon (docs/PRIVACY.md)",
                    cfg.privacy.scope, cfg.privacy.epsilon)
    arm = arms_for(cfg)[0]
    acfg = arm_config(cfg, arm)
    resume = None
    if cfg.deployment.resume_from:
        run_dir = Path(cfg.deployment.resume_from).expanduser().resolve()
        resume = load_round_checkpoint(run_dir)
        check_same_settings(resume, acfg.to_flat())
        if resume.arm != arm.name:
            raise ConfigError(f"resume-from {str(run_dir)!r}: checkpoint of arm {resume.arm}, this run is {arm.name}")
        run_id = resume.run_id
        dropped = drop_unfinished_rows(run_dir / "metrics.jsonl", resume.arm, resume.phase, resume.completed_round)
        log.warning("resuming %s after %s round %s (run id %s; %s rows of unfinished rounds dropped)", run_dir,
                    resume.phase.value, resume.completed_round, run_id, dropped)
        final = unique_dir(run_dir.parent / final_name(run_dir))
        data_info = json.loads((run_dir / "data.json").read_text())
    else:
        out = Path(cfg.output.out_dir).expanduser()
        final = unique_dir(out / cfg.run_dir_name)
        run_dir = partial_dir(out, final.name)
        if run_dir.exists():
            raise ConfigError(f"{run_dir} exists (an unfinished run): resume it with `medfed run --resume {run_dir}` "
                              "or move it away")
        run_id = f"{final.name}-{uuid.uuid4().hex[:8]}"
        run_dir.mkdir(parents=True)
        run_dir = run_dir.resolve()
        (run_dir / "config.json").write_text(cfg.to_json())
        (run_dir / "config.toml").write_text(cfg.to_toml())  # `medfed run --config` reruns it
        data_info = {**prep.data.describe(), "sites": [], "site-data": "own (each site's node config data-path)"}
        (run_dir / "data.json").write_text(json.dumps(data_info, indent=1))
    flower_run_id = int(grid.run.run_id)
    record_flower_run(run_dir.parent, flower_run_id, run_dir)  # `medfed run` finds it by the Flower run id
    print(f"run directory: {run_dir}", flush=True)  # for people reading the ServerApp's log
    recorder = Recorder(run_dir / "metrics.jsonl", listener)
    if resume is not None:  # the report covers the whole run, before and after the resume
        recorder.rows.extend(Recorder.load(run_dir / "metrics.jsonl"))
    ctx = ArmContext(arm.name, acfg, run_dir, prep.data.path, prep.test, recorder, run_id, checkpoints=True,
                     resume=resume)
    try:
        with ResourceMonitor() as monitor:
            metrics = run_federated(grid, ctx)
    except BaseException:
        log.error("the run stopped; its directory is kept: continue it with `medfed run --resume %s`", run_dir)
        raise
    summary = run_summary(cfg, run_id) | {"resumed": resume is not None}
    summary["arms"][arm.name] = arm_summary(arm, metrics, {}, monitor) | kept_round(recorder.rows, arm.name)
    write_summary_and_report(run_dir, summary, recorder.rows, data_info, final.name)
    final = publish(run_dir, final)
    record_flower_run(final.parent, flower_run_id, final)
    print(f"run directory: {final}", flush=True)
    return final
