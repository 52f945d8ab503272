"""Files written safely: folders that are complete or absent (built under a temporary name, renamed
into place), and secrets that are never readable by others."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from medfed.exceptions import ConfigError

T = TypeVar("T")


def build_folder(out: Path, build: Callable[[Path], T], *, overwrite: bool, refusal: str) -> T:
    """Run ``build`` on a hidden temporary folder beside ``out`` and rename it to ``out`` when it
    returns; on any failure the temporary folder is removed and ``out`` is left as it was. An
    existing ``out`` is refused (``refusal`` says what would be lost) unless ``overwrite``."""
    out = out.expanduser()
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; {refusal} (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = build(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def write_private(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write a secret to a new file, created 0600 from the start (never world-readable, not even
    briefly); fails if ``path`` exists. ``fsync``: on disk before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        if fsync:
            out.flush()
            os.fsync(out.fileno())
