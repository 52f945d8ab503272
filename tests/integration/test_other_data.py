"""MedMNIST-style files medfed has not seen: RGB multi-label and multi-class, through a whole run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medfed.config import run_config
from medfed.simulations.launcher import simulate as run_experiment


def synthetic(path: Path, *, channels: int, labels_fn) -> Path:
    """Images whose mean brightness depends on the label, so a model can learn something."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 160), ("val", 40), ("test", 60)):
        labels = labels_fn(rng, n)
        signal = labels.reshape(n, -1).argmax(axis=1) if labels.shape[1] > 1 else labels[:, 0]
        base = rng.integers(0, 120, (n, 28, 28, channels))
        arrays[f"{split}_images"] = np.clip(base + 40 * signal[:, None, None, None], 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez_compressed(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("name", "channels", "labels_fn", "task", "classes"),
    [
        ("rgbmultilabel.npz", 3, lambda rng, n: rng.integers(0, 2, (n, 4)), "multi-label", 4),
        ("threeclass.npz", 1, lambda rng, n: (np.arange(n) % 3).reshape(-1, 1), "multi-class", 3),
    ],
)
def test_unseen_layouts_run_end_to_end(
    tmp_path: Path, name: str, channels: int, labels_fn, task: str, classes: int
) -> None:
    data = synthetic(tmp_path / name, channels=channels, labels_fn=labels_fn)
    cfg = run_config(
        data=str(data), num_sites=3, partition="dirichlet", alpha=1.0, label_fraction=0.5, mode="local-only",
        pretrain="byol", pretrain_rounds=1, finetune_rounds=2, width=8, pretrain_batch_size=32,
        baselines="none", out_dir=str(tmp_path / "runs"), min_site_size=5,
    )
    run_dir = run_experiment(cfg)
    info = json.loads((run_dir / "data.json").read_text())
    assert (info["task"], info["num_classes"], info["channels"]) == (task, classes, channels)
    summary = json.loads((run_dir / "summary.json").read_text())["arms"]["local-only-byol"]
    assert set(summary["per_site_test"]) == {"0", "1", "2"}
    for metric in ("auc", "accuracy", "sensitivity", "specificity", "fpr"):
        assert math.isfinite(summary["test"][metric])
    assert 0.0 <= summary["test"]["auc"] <= 1.0
