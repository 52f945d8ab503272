"""The README's main job: `medfed simulate` with its defaults (slow: run with --runslow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app


@pytest.mark.slow
@pytest.mark.timeout(600)  # the bound: at most 10 minutes on 2 CPU cores
def test_default_simulate_runs_and_reports(tmp_path: Path, data_path_env: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "pneumoniamnist-federated-simclr-s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["arms"]) == ["federated-simclr", "local-only-none", "federated-none"]
    assert summary["config"]["num-sites"] == 5 and summary["config"]["label-fraction"] == 0.1
    for arm in summary["arms"].values():
        assert 0.5 < arm["test"]["auc"] <= 1.0
    assert "## Comparison on the official test split" in (run_dir / "report.md").read_text()
