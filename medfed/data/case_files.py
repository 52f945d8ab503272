"""The files behind the case cache: what identifies a case's content, and reading and writing cache files
safely. No image code.

* `content_digest`: sha256 of a file's bytes, or for a folder (a DICOM series) of each regular file's
  relative name, size and bytes, streamed in 1 MiB chunks; `digest_or_reason` hands back the
  `UnreadableImage` instead of raising it (for a thread pool).
* `plain_file`: a regular file and not a symbolic link (an entry is never a link).
* `atomic_write`: through a temporary file in the target's own folder (0600), renamed into place.
* `default_cache_dir`: ``$MEDFED_CACHE_DIR`` or ``~/.cache/medfed/cases``.

`medfed.data.cache` keys and stores its entries with these and re-exports `content_digest` and
`default_cache_dir`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.data.image_settings import UnreadableImage

_CHUNK = 1 << 20  # hash files in 1 MiB chunks


def content_digest(path: Path) -> str:
    """sha256 hex of a file's bytes; for a folder (a DICOM series), of each regular file's name relative to
    the folder and bytes, sorted by name (so renaming, adding, removing or changing a file changes it).
    Files are streamed in 1 MiB chunks. Raises :class:`UnreadableImage` (no path in the message) when the
    path is missing or cannot be read."""
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            digest.update(b"medfed-folder\0")
            for name, file in _folder_files(path):
                encoded = name.encode("utf-8", "surrogateescape")
                digest.update(len(encoded).to_bytes(8, "big") + encoded)
                digest.update(file.stat().st_size.to_bytes(8, "big"))
                _hash_file(file, digest)
        elif path.is_file():
            _hash_file(path, digest)  # a file's digest is plain sha256 of its bytes (as ``sha256sum`` prints)
        else:
            raise UnreadableImage("the case's file or folder does not exist")
    except OSError as e:
        raise UnreadableImage(f"the case's file cannot be read ({e.strerror or type(e).__name__})") from None
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix name, path) of every regular file under ``folder`` (symlinked sub-folders are not
    followed), sorted by name."""
    files = []
    for here, dirs, names in os.walk(folder, followlinks=False, onerror=_raise):
        dirs.sort()
        for name in names:
            file = Path(here) / name
            if file.is_file():
                files.append((file.relative_to(folder).as_posix(), file))
    return sorted(files)


def _raise(error: OSError) -> None:
    raise error


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


def default_cache_dir() -> Path:
    """``$MEDFED_CACHE_DIR`` if set, else ``~/.cache/medfed/cases``."""
    env = os.environ.get("MEDFED_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "medfed" / "cases"


def digest_or_reason(path: Path) -> str | UnreadableImage:
    try:
        return content_digest(path)
    except UnreadableImage as e:
        return e


def plain_file(path: Path) -> bool:
    """A regular file, not a symbolic link (an entry is never a link: it could point anywhere)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    """Write ``path`` through a temporary file in its own folder (0600), renamed into place. No fsync: an
    entry can always be prepared again, and one cut short by a crash fails the size check and is rebuilt."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
