"""Files written safely: folders that are complete or absent (built under a temporary name, renamed
into place), files replaced atomically and durably, and secrets that are never readable by others."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from medfed.exceptions import ConfigError

if TYPE_CHECKING:
    import torch

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


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(path: Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` atomically: ``write`` fills a temporary file beside it, which is fsynced, renamed
    over ``path`` and the rename made durable. A crash leaves the old file or the new one, never half of
    one; a failing ``write`` leaves the old file and no temporary."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_safetensors_durably(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`replace_durably` for a safetensors file of ``tensors`` (moved to contiguous CPU memory), its folder made
    if need be: checkpoints, models, a site's kept releases."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    replace_durably(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))
