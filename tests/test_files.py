"""medfed.files: atomic, durable replacement and private files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfed.files import replace_durably, save_safetensors_durably, write_private


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        replace_durably(target, half_then_crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    replace_durably(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    weights = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.int64)}  # "a" not contiguous
    save_safetensors_durably(path, weights, {"k": "v"})
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], weights["a"]) and torch.equal(loaded["b"], weights["b"])


def test_private_files_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_private(path, b"x", fsync=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_private(path, b"y")
    assert path.read_bytes() == b"x"
