"""The server's checkpoint after every completed round, and resuming a run from it.

After each round the server writes ``RUN_DIR/checkpoint/`` atomically: the global weights
(``global.safetensors``) and ``state.json`` (run id, arm, phase, the round just completed,
the settings). `medfed run --resume RUN_DIR` starts a new Flower run whose ServerApp reads it
and continues with the next round, under the same run id and round numbers: sites answer a
round they had already released with that same release (`medfed.task.replay`), so no
privacy is spent twice. Rows of unfinished rounds are dropped from ``metrics.jsonl`` first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medfed.config import RunConfig, without_resume
from medfed.constants import Phase
from medfed.exceptions import ConfigError
from medfed.experiment.model_selection import SELECTED_SPLIT
from medfed.files import replace_durably, save_safetensors_durably

CHECKPOINT_DIR = "checkpoint"
STATE_FILE, WEIGHTS_FILE = "state.json", "global.safetensors"


@dataclass(frozen=True)
class RoundCheckpoint:
    """Where a run stood after its last completed round."""

    run_id: str
    arm: str
    phase: Phase
    completed_round: int
    settings: dict[str, object]
    weights: dict[str, torch.Tensor]


def save_round_checkpoint(run_dir: Path, *, run_id: str, arm: str, phase: Phase, completed_round: int,
                          settings: Mapping[str, object], weights: dict[str, torch.Tensor]) -> None:
    """Write the checkpoint of a completed round: weights first, then the state naming them, each
    by temporary file + fsync + rename, so a crash leaves the previous checkpoint or this one."""
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"global-{phase.value}-{completed_round}.safetensors"
    save_safetensors_durably(folder / name, weights)
    state = {"run_id": run_id, "arm": arm, "phase": phase.value, "completed_round": completed_round,
             "weights": name, "settings": without_resume(settings)}
    replace_durably(folder / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=1, sort_keys=True)))
    for old in folder.glob("global-*.safetensors"):  # only the named weights are needed
        if old.name != name:
            old.unlink(missing_ok=True)


def load_round_checkpoint(run_dir: Path) -> RoundCheckpoint:
    """The checkpoint of ``run_dir``; a clear error if there is none or it is unreadable."""
    state_path = run_dir / CHECKPOINT_DIR / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(f"resume-from {str(run_dir)!r}: no {CHECKPOINT_DIR}/{STATE_FILE} (no round of that run "
                          "completed, or it is not a medfed deployment run directory)")
    try:
        state = json.loads(state_path.read_text())
        weights = load_file(str(run_dir / CHECKPOINT_DIR / state["weights"]))
        return RoundCheckpoint(run_id=state["run_id"], arm=state["arm"], phase=Phase(state["phase"]),
                               completed_round=int(state["completed_round"]), settings=dict(state["settings"]),
                               weights=weights)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ConfigError(
            f"resume-from {str(run_dir)!r}: unreadable checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def check_same_settings(checkpoint: RoundCheckpoint, settings: Mapping[str, object]) -> None:
    """A resumed run must have the settings it started with (only ``resume-from`` may differ)."""
    now = without_resume(settings)
    defaults = RunConfig().to_flat()  # a setting added since the checkpoint was written: the run had its default
    before = {k: checkpoint.settings[k] if k in checkpoint.settings else defaults.get(k)
              for k in set(now) | set(checkpoint.settings)}
    changed = sorted(k for k in before if now.get(k) != before[k])
    if changed:
        raise ConfigError("a resumed run must keep its settings; these differ from the checkpoint: " + ", ".join(
            f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed))


def drop_unfinished_rows(metrics_path: Path, arm: str, phase: Phase, completed_round: int,
                         phase_order: tuple[Phase, ...] = (Phase.PRETRAIN, Phase.FINETUNE)) -> int:
    """Remove the rows of rounds after the checkpoint (they will be run again), and the arm's ``selected`` row (the
    resumed run chooses its kept round again at its end); returns how many."""
    if not metrics_path.is_file():
        return 0
    rank = {p.value: i for i, p in enumerate(phase_order)}
    kept, dropped = [], 0
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        later = row.get("arm") == arm and ((rank.get(row.get("phase"), -1), int(row.get("round", 0))) > (
            rank[phase.value], completed_round) or row.get("split") == SELECTED_SPLIT)
        if later:
            dropped += 1
        else:
            kept.append(line)
    replace_durably(metrics_path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))
    return dropped
