"""Every patch of Flower's internals is checked against the pinned Flower (`medfed.flower_patches`)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from medfed import flower_patches
from medfed.flower_patches import FLOWER_VERSION, SEAMS, changed_seams, fingerprint

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_flower_is_the_one_the_patches_were_checked_against() -> None:
    assert importlib.metadata.version("flwr") == FLOWER_VERSION
    pinned = re.search(r'"flwr\[simulation\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None and pinned.group(1) == FLOWER_VERSION


def test_no_seam_a_patch_relies_on_has_changed() -> None:
    changed = changed_seams()
    assert not changed, ("Flower source under medfed's patches changed; read each again, then update "
                         f"medfed.flower_patches.SEAMS: {changed}")


def test_a_changed_seam_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    seam = next(iter(SEAMS))
    monkeypatch.setitem(flower_patches.SEAMS, seam, "0" * 16)
    assert set(changed_seams()) == {seam}
    monkeypatch.setitem(flower_patches.SEAMS, "flwr.no_such_module:gone", fingerprint(seam))
    assert changed_seams()["flwr.no_such_module:gone"][1] == "missing"


def test_only_the_patch_folder_reaches_into_flower_internals_it_changes() -> None:
    """Assigning to a Flower module's attribute (a patch) happens only under medfed/flower_patches/."""
    patching = re.compile(r"^\s*(?:fleet_handlers|sql_mixin|superexec|start_client_internal|run_clientapp|"
                          r"inflatable_utils|ProtobufClient)\.[A-Za-z_]+(?:\.[A-Za-z_]+)*\s*=[^=]", re.M)
    offenders = []
    for path in (ROOT / "medfed").rglob("*.py"):
        if "flower_patches" in path.parts:
            continue
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in patching.finditer(path.read_text())]
    assert not offenders, offenders
