"""Run directories: names, the hidden partial directory a run is built in, and publishing it.

A run is built under a hidden partial name and renamed into place only when it finished:
``OUT/.NAME.partial-PID`` for a simulation (removed on failure: a simulation is re-run) and
``OUT/.NAME.partial`` for a deployment run (kept on failure: ``medfed run --resume`` continues it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from medfed.config import RunConfig
from medfed.devices import describe_device, library_versions, resolve_device
from medfed.exceptions import ConfigError
from medfed.experiment.arms import Arm
from medfed.experiment.recorder import json_safe
from medfed.files import replace_durably
from medfed.resources import ResourceMonitor

PARTIAL_SUFFIX = ".partial"
FLOWER_RUNS = ".flower-runs"  # OUT/.flower-runs/<Flower run id>.json: that run's directory (deployment)


def partial_dir(out: Path, name: str, pid: int | None = None) -> Path:
    """The hidden directory a run named ``name`` is built in: ``.NAME.partial``, or ``.NAME.partial-PID``."""
    return out / f".{name}{PARTIAL_SUFFIX}" if pid is None else out / f".{name}{PARTIAL_SUFFIX}-{pid}"


def record_flower_run(out: Path, flower_run_id: int, run_dir: Path) -> None:
    """Note in ``OUT/.flower-runs/ID.json`` which run directory Flower run ``ID`` writes (its partial directory
    while it runs, the finished one at the end): how `medfed run`, which knows the Flower run id and ``out-dir``,
    finds the results without reading the ServerApp's log."""
    index = out / FLOWER_RUNS
    index.mkdir(mode=0o700, parents=True, exist_ok=True)
    if index.is_symlink() or not index.is_dir() or index.stat().st_uid != os.getuid():
        raise ConfigError(f"{index} is not a folder of this user's: the record of Flower run {flower_run_id} is "
                          "not written there")
    text = json.dumps({"flower-run-id": flower_run_id, "run-dir": str(run_dir)})
    replace_durably(index / f"{int(flower_run_id)}.json", lambda tmp: tmp.write_text(text))


def flower_run_dir(out: Path, flower_run_id: int) -> Path | None:
    """The run directory Flower run ``flower_run_id`` recorded under ``out``, or None if it recorded none."""
    try:
        return Path(json.loads((out / FLOWER_RUNS / f"{int(flower_run_id)}.json").read_text())["run-dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def final_name(partial: Path) -> str:
    """The name a deployment's partial directory gets when its run finishes."""
    return partial.name.removeprefix(".").removesuffix(PARTIAL_SUFFIX)


def unique_dir(path: Path) -> Path:
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


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


def run_summary(cfg: RunConfig, run_id: str) -> dict[str, Any]:
    """summary.json before its arms: the settings, the resolved fine-tuning recipe, the run id, and where the centre
    computed (the device, its name, the library versions; `medfed.devices`)."""
    compute = {**describe_device(resolve_device(cfg.compute.device)), "precision": cfg.compute.precision,
               "libraries": library_versions()}
    return {"config": cfg.to_flat(), "finetune-recipe": dataclasses.asdict(cfg.finetune_recipe), "run_id": run_id,
            "compute": compute, "arms": {}}


def arm_summary(arm: Arm, metrics: dict[str, float], per_site: dict[int, dict[str, float]],
                monitor: ResourceMonitor) -> dict[str, Any]:
    """One arm's entry in summary.json."""
    return {"mode": arm.mode, "pretrain": arm.pretrain, "test": metrics,
            "per_site_test": {str(k): v for k, v in per_site.items()}, "wall_seconds": monitor.wall_seconds,
            "peak_memory_mb": monitor.peak_bytes / 2**20}


def write_summary_and_report(run_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                             data_info: dict[str, Any], title: str) -> None:
    """summary.json and report.md (with its plots) of a finished run."""
    from medfed.experiment.report import write_report

    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    write_report(run_dir, summary, rows, data_info, title=title)
