"""The server's round checkpoint: round trip, settings that must not change, rows of unfinished rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medfed.constants import Phase
from medfed.exceptions import ConfigError
from medfed.experiment.resume import (
    CHECKPOINT_DIR,
    check_same_settings,
    drop_unfinished_rows,
    load_round_checkpoint,
    save_round_checkpoint,
)


def test_checkpoint_round_trip_keeps_only_the_latest_weights(tmp_path: Path) -> None:
    for rnd in (1, 2):
        save_round_checkpoint(tmp_path, run_id="r-1", arm="federated-none", phase=Phase.FINETUNE, completed_round=rnd,
                              settings={"width": 8, "resume-from": "/x"}, weights={"w": torch.full((2,), float(rnd))})
    ckpt = load_round_checkpoint(tmp_path)
    assert (ckpt.run_id, ckpt.arm, ckpt.phase, ckpt.completed_round) == ("r-1", "federated-none", Phase.FINETUNE, 2)
    assert torch.equal(ckpt.weights["w"], torch.full((2,), 2.0))
    assert ckpt.settings == {"width": 8}  # resume-from is never part of the settings
    assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()) == [
        "global-finetune-2.safetensors", "state.json"]


def test_missing_or_broken_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint/state.json"):
        load_round_checkpoint(tmp_path)
    save_round_checkpoint(tmp_path, run_id="r", arm="a", phase=Phase.PRETRAIN, completed_round=1, settings={},
                          weights={"w": torch.zeros(1)})
    next((tmp_path / CHECKPOINT_DIR).glob("*.safetensors")).write_bytes(b"broken")
    with pytest.raises(ConfigError, match="unreadable checkpoint"):
        load_round_checkpoint(tmp_path)


def test_a_resumed_run_must_keep_its_settings(tmp_path: Path) -> None:
    save_round_checkpoint(tmp_path, run_id="r", arm="a", phase=Phase.PRETRAIN, completed_round=1,
                          settings={"width": 8, "seed": 0}, weights={"w": torch.zeros(1)})
    ckpt = load_round_checkpoint(tmp_path)
    check_same_settings(ckpt, {"width": 8, "seed": 0, "resume-from": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"width \(8 -> 16\)"):
        check_same_settings(ckpt, {"width": 16, "seed": 0})
    # a checkpoint written before a setting existed had its default: resuming at the default is the same run
    check_same_settings(ckpt, {"width": 8, "seed": 0, "pretrain-server-momentum": 0.0})
    with pytest.raises(ConfigError, match=r"pretrain-server-momentum \(0.0 -> 0.9\)"):
        check_same_settings(ckpt, {"width": 8, "seed": 0, "pretrain-server-momentum": 0.9})


def test_rows_after_the_checkpoint_are_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    rows = [("a", "pretrain", 2), ("a", "finetune", 1), ("a", "finetune", 2), ("a", "finetune", 3),
            ("b", "finetune", 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"arm": a, "phase": p, "round": r}) + "\n" for a, p, r in rows))
    assert drop_unfinished_rows(path, "a", Phase.FINETUNE, 1) == 2
    kept = [(r["arm"], r["phase"], r["round"]) for r in map(json.loads, path.read_text().splitlines())]
    assert kept == [("a", "pretrain", 2), ("a", "finetune", 1), ("b", "finetune", 3)]
    # a checkpoint in pretraining drops every fine-tuning row of the arm
    assert drop_unfinished_rows(path, "a", Phase.PRETRAIN, 1) == 2


def test_a_resumed_run_drops_the_arms_earlier_choice_of_round(tmp_path: Path) -> None:
    """A run stopped after writing its `selected` row (finetune-select best-validation) chooses again when resumed:
    the old row goes, even though its round is not after the checkpoint; other arms' choices stay."""
    rows = [{"arm": "a", "phase": "finetune", "round": 2, "split": "test"},
            {"arm": "a", "phase": "finetune", "round": 2, "split": "selected", "site": "global"},
            {"arm": "b", "phase": "finetune", "round": 1, "split": "selected", "site": "global"}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert drop_unfinished_rows(path, "a", Phase.FINETUNE, 3) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == [rows[0], rows[2]]
