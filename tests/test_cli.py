"""The command line: --help everywhere, and bad input -> clear message, exit 2, no run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["simulate"], ["methods"], ["inspect-data"], ["audit"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_simulate_help_lists_settings_with_defaults() -> None:
    out = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--data", "--num-sites", "--label-fraction", "--pretrain", "--mode", "--baselines", "--strategy"):
        assert flag in out


def _write(path: Path, **overrides: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    arrays.update(overrides)
    np.savez_compressed(path, **arrays)
    return path


def bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip archive")
    missing_key = tmp / "nokey.npz"
    np.savez_compressed(missing_key, train_images=np.zeros((4, 28, 28), np.uint8))
    return {
        "missing file": (["--data", str(tmp / "nowhere.npz")], "does not exist"),
        "corrupt file": (["--data", str(corrupt)], "not a readable .npz file"),
        "missing keys": (["--data", str(missing_key)], "missing keys train_labels"),
        "mismatched rows": (["--data", str(_write(tmp / "rows.npz", train_labels=np.zeros((39, 1), int)))],
                            "has 39 rows but train_images has 40"),
        "mismatched shapes": (["--data", str(_write(tmp / "shapes.npz", val_images=np.zeros((10, 32, 32), np.uint8)))],
                              "image shapes differ"),
        "label out of range": (["--data", str(_write(tmp / "breastmnist.npz", test_labels=np.full((10, 1), 2)))],
                               "out of range for 2 classes"),
        "fraction zero": (["--data", str(_write(tmp / "ok0.npz")), "--label-fraction", "0"],
                          "label-fraction must be in (0, 1]"),
        "fraction above one": (["--data", str(_write(tmp / "ok1.npz")), "--label-fraction", "1.5"],
                               "label-fraction must be in (0, 1]"),
        "more sites than images": (["--data", str(_write(tmp / "ok2.npz")), "--num-sites", "50"],
                                   "cannot give 50 sites"),
        "unknown method": (["--data", str(_write(tmp / "ok3.npz")), "--pretrain", "moco"],
                           "unknown self-supervised method 'moco'"),
        "mae on a cnn": (["--data", str(_write(tmp / "ok4.npz")), "--pretrain", "mae", "--encoder", "cnn"],
                         "needs a vit encoder"),
        "unknown flag": (["--data", "nosuchmnist"], "neither a .npz path nor a known MedMNIST flag"),
        "out-dir is a file": (["--data", str(_write(tmp / "ok5.npz")), "--out-dir", str(corrupt)], "is not a folder"),
        "logit-adjusted on multi-label": (
            ["--data", str(_write(tmp / "ml.npz", **{f"{sp}_labels": np.tile([[0, 1, 1]], (n, 1))
                                                     for sp, n in (("train", 40), ("val", 10), ("test", 10))})),
             "--finetune-loss", "logit-adjusted"],
            "needs a single-label task",
        ),
        "negative seed": (["--data", str(_write(tmp / "ok6.npz")), "--seed", "-1"], "seed must be >= 0"),
        "epsilon zero": (["--data", str(_write(tmp / "ok7.npz")), "--dp", "finetune", "--dp-epsilon", "0"], "epsilon"),
        "delta above one over site size": (
            ["--data", str(_write(tmp / "ok8.npz")), "--dp", "finetune", "--dp-delta", "0.2", "--num-sites", "2",
             "--pretrain", "none", "--label-fraction", "1"], "delta"),
        "unknown accountant": (
            ["--data", str(_write(tmp / "ok9.npz")), "--dp", "finetune", "--dp-accountant", "moments"],
            "unknown accountant"),
        "simclr under dp": (["--data", str(_write(tmp / "ok10.npz")), "--dp", "all"], "in-batch negatives"),
    }


CASES = [
    "missing file", "corrupt file", "missing keys", "mismatched rows", "mismatched shapes", "label out of range",
    "fraction zero", "fraction above one", "more sites than images", "unknown method", "mae on a cnn", "unknown flag",
    "out-dir is a file", "logit-adjusted on multi-label", "negative seed", "epsilon zero",
    "delta above one over site size", "unknown accountant", "simclr under dp",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.medmnist to fall back on
    cases = bad_cases(tmp_path)
    assert sorted(cases) == sorted(CASES)
    args, message = cases[case]
    out = tmp_path / "runs"
    extra = [] if "--out-dir" in args else ["--out-dir", str(out)]
    result = runner.invoke(app, ["simulate", *args, *extra], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists() or not any(out.iterdir())


def test_inspect_data_describes_a_file(shared_data: Path) -> None:
    result = runner.invoke(app, ["inspect-data", str(shared_data / "adrenalmnist3d.npz")])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert (info["task"], info["spatial_shape"], info["sizes"]) == (
        "binary-class", [28, 28, 28], {"train": 1188, "val": 98, "test": 298})


def test_methods_lists_dp_readiness() -> None:
    out = runner.invoke(app, ["methods"]).output
    assert "simclr" in out and "no (in-batch negatives)" in out and "mae" in out
