"""Bad input to `medfed server | site | run`: a one-line error naming the thing and the rule, exit 2,
and no process started (these fail before Flower is touched)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.deploy.provision import ProvisionPlan, provision

runner = CliRunner()


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(ProvisionPlan(sites=["h1"], out=tmp_path_factory.mktemp("k") / "kits"))


def test_server_without_a_kit_names_the_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["server", "--kit", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "server.json" in said(result) and "not found" in said(result)


def test_site_with_the_template_data_path_asks_for_data(kits: Path) -> None:
    result = runner.invoke(app, ["site", "--kit", str(kits / "h1")])
    assert result.exit_code == 2 and "no data file" in said(result)
    assert not (kits / "h1" / "state").exists()  # nothing started, nothing written


def test_site_with_a_corrupt_data_file_names_it(kits: Path, tmp_path: Path) -> None:
    bad = tmp_path / "h1.npz"
    bad.write_bytes(b"not an npz")
    result = runner.invoke(app, ["site", "--kit", str(kits / "h1"), "--data", str(bad)])
    assert result.exit_code == 2 and "site h1" in said(result) and "h1.npz" in said(result)


def test_site_with_a_bad_superlink_address(kits: Path, shared_data: Path) -> None:
    result = runner.invoke(app, ["site", "--kit", str(kits / "h1"), "--data", str(shared_data / "breastmnist.npz"),
                                 "--superlink", "no-port"])
    assert result.exit_code == 2 and "--superlink must be HOST:PORT" in said(result)


def test_run_needs_a_kit_unless_insecure() -> None:
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2 and "--kit" in said(result)


def test_resume_warns_about_ignored_settings_and_needs_a_checkpoint(kits: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--kit", str(kits / "server"), "--resume", str(tmp_path), "--width", "8"])
    assert result.exit_code == 2
    assert "ignoring --width" in said(result) and "no checkpoint/state.json" in said(result)


def test_run_rejects_bad_settings_before_submitting(kits: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--kit", str(kits / "server"), "--min-sites", "9", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "min-sites must be in [0, num-sites" in said(result)
    assert not (tmp_path / "w").exists()
