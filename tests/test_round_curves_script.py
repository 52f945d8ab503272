"""benchmarks/round_curves.py: the per-round validation AUC it reports is the one best-validation chooses on."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def rc() -> ModuleType:
    return load_script("round_curves")


def test_curves_weigh_sites_by_images_and_mark_the_kept_round(rc: ModuleType, tmp_path: Path) -> None:
    rows = [
        {"phase": "finetune", "split": "val", "round": 1, "site": 0, "auc": 0.6, "num-examples": 30},
        {"arm": "other", "phase": "finetune", "split": "val", "round": 1, "site": 0, "auc": 0.1, "num-examples": 90},
        {"arm": "other", "phase": "finetune", "split": "test", "round": 2, "site": "global", "auc": 0.2},
        {"arm": "other", "phase": "finetune", "split": "selected", "round": 2, "site": "global"},
        {"phase": "finetune", "split": "selected", "round": 2, "site": 0},  # a local-only site's choice
        {"phase": "finetune", "split": "val", "round": 1, "site": 1, "auc": 0.9, "num-examples": 10},
        {"phase": "finetune", "split": "val", "round": 1, "site": 2, "auc": None, "num-examples": 50},  # one class
        {"phase": "finetune", "split": "val", "round": 2, "site": 0, "auc": 0.5, "num-examples": 30,
         "accepted": False},  # a rejected reply does not count
        {"phase": "finetune", "split": "val", "round": 2, "site": 1, "auc": 0.7, "num-examples": 10},
        {"phase": "finetune", "split": "test", "round": 1, "site": "global", "auc": 0.8},
        {"phase": "finetune", "split": "test", "round": 2, "site": "global", "auc": 0.75},
        {"phase": "finetune", "split": "test-site", "round": 2, "site": 0, "auc": 0.1},
        {"phase": "pretrain", "split": "val", "round": 1, "site": 0, "auc": 0.0, "num-examples": 99},
        {"phase": "finetune", "split": "selected", "round": 1, "site": "global"},
    ]
    rows = [{"arm": "fed", **r} for r in rows]  # "other" keeps its own arm
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="federated arms fed, other: name one with --arm"):
        rc.curves(tmp_path)
    val, test, kept = rc.curves(tmp_path, "fed")
    assert val == pytest.approx({1: (0.6 * 30 + 0.9 * 10) / 40, 2: 0.7}) and test == {1: 0.8, 2: 0.75} and kept == 1
    lines = rc.table([("run", val, test, kept)])
    assert lines[2] == "| 1 | **0.675** | **0.800** |" and lines[3] == "| 2 | 0.700 | 0.750 |"
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        rc.curves(tmp_path / "gone")
