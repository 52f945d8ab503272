"""A persistent, content-keyed cache of prepared cases (decoded, oriented, resampled, resized), built once
with a DataLoader's workers and read back one entry at a time during training.

Layout: ``root/<prep fingerprint[:16]>/<key[:2]>/<key>.npy`` (float16, values in [0, 1]) and ``<key>.json``
(the case's :class:`~medfed.data.images.ImageInfo`), where ``key`` is the sha256 of the case's content
digest (its file's bytes, or for a DICOM series folder each file's relative name and bytes) and the
Preprocess fingerprint. So a file whose bytes change gets a new key and is prepared again, a changed
Preprocess writes into another folder, and identical files share one entry. Entries hold pixels and
shapes only: no path, no header tag. Every file is written to a temporary file in its own folder and
renamed into place (``os.replace``), so an entry is complete or absent; nothing is ever written beside
the data, and a cache folder that is (or leads through) a symbolic link out of the root is refused.
The content digest and the safe file reads and writes are in `medfed.data.case_files` (`content_digest`
and `default_cache_dir` are re-exported here).

Why not MONAI's ``PersistentDataset`` (checked in monai 1.6.1, ``monai/data/dataset.py``):

* it keys an item by a hash of the item dict itself, not of the file it names:
  ``data_item_hash = self.hash_func(item_transformed)`` (``_cachecheck``, line 387), with
  ``hash_func=pickle_hashing`` (line 232), which is ``sha256(pickle.dumps(sorted_dict(item)))``
  (``monai/data/utils.py`` line 1377-1390): the path string, so a file rewritten in place keeps its
  key and the stale tensor is served (checked: same path, new bytes, same cached tensor);
  transforms enter the key only when ``hash_transform`` is given (line 291, warning at line 379-382);
* it stores the whole transformed item with ``torch.save(convert_to_tensor(item, track_meta=...))``
  (line 413-418): every other key of the dict (a patient ID kept there is saved verbatim) and, with
  ``track_meta=True``, the MetaTensor with its meta dict: ``filename_or_obj``, the source path
  (``monai/transforms/io/array.py`` line 321) and, for DICOM, the header tags the reader copies
  (``PydicomReader._get_meta_dict``: ``img.to_json_dict()`` less the pixel data,
  ``monai/data/image_reader.py`` line 719-743; ``ITKReader._get_meta_dict`` every non-ITK key,
  line 327-344), so patient name, ID and birth date land in the cache;
* its temporary file is written in a system temp folder (``tempfile.TemporaryDirectory``, line 411) and
  moved with ``shutil.move`` (line 419-425): outside the cache folder, a copy rather than an atomic rename
  across file systems; its cache folder is created with the default mode (line 285-286);
* it pickles through ``torch.load`` and stores float32 tensors, twice the bytes of float16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medfed.data.case_files import atomic_write, content_digest, default_cache_dir, digest_or_reason, plain_file
from medfed.data.images import ImageInfo, Preprocess, UnreadableImage, read_image
from medfed.exceptions import DataError

__all__ = ["BadCase", "CacheBuild", "CaseCache", "CaseEntry", "Reader", "content_digest", "default_cache_dir"]

Reader = Callable[[Path, Preprocess], tuple[np.ndarray, ImageInfo]]

_KEY = re.compile(r"[0-9a-f]{64}")
_RANGE_SLACK = 1e-3  # a reader's values may overshoot [0, 1] by rounding; more is a reader bug


@dataclass(frozen=True)
class CaseEntry:
    """One prepared case in the cache."""

    key: str  # sha256 hex of (content digest of the case's file(s), prep.fingerprint())
    info: ImageInfo


@dataclass(frozen=True)
class BadCase:
    """A case that could not be prepared."""

    index: int  # position in the list of cases given
    reason: str  # UnreadableImage's message (never a path)


@dataclass(frozen=True)
class CacheBuild:
    """What :meth:`CaseCache.build` did. ``built + reused + len(bad) == len(entries)``."""

    entries: list[CaseEntry | None]  # per case, None where bad
    bad: list[BadCase]
    built: int  # cases prepared now (cold); identical files prepared once count once here ...
    reused: int  # ... and the others here, with the cases found in the cache (warm)
    seconds: float


def no_collate(item: Any) -> Any:
    """DataLoader collate function that leaves a case as the Dataset returned it (numpy, not tensors)."""
    return item


class _Missing(Dataset[tuple[int, np.ndarray | None, ImageInfo | str]]):
    """torch Dataset over the cases to prepare: ``(index, float16 array or None, info or reason)``.
    Arrays cross the worker boundary as float16 (half the bytes of the reader's float32)."""

    def __init__(self, cases: list[tuple[int, Path]], prep: Preprocess, reader: Reader) -> None:
        self.cases = cases
        self.prep = prep
        self.reader = reader

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, ImageInfo | str]:
        index, path = self.cases[i]
        try:
            array, info = self.reader(path, self.prep)
        except UnreadableImage as e:
            return index, None, str(e)
        return index, _to_float16(array), info


def _to_float16(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"the image reader returned a {array.dtype} array of shape {array.shape}, not (C, *size)")
    if not np.isfinite(array).all():
        raise DataError("the image reader returned NaN or infinite values")
    if array.size and (array.min() < -_RANGE_SLACK or array.max() > 1 + _RANGE_SLACK):
        raise DataError(f"the image reader returned values in [{array.min():g}, {array.max():g}], not [0, 1]")
    return np.clip(array, 0.0, 1.0).astype(np.float16)


class CaseCache:
    """Prepared cases of one Preprocess under ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path, prep: Preprocess, reader: Reader = read_image) -> None:
        self.root = Path(root).expanduser().absolute()
        self.prep = prep
        self.reader = reader
        self.fingerprint = prep.fingerprint()
        self.folder = self.root / self.fingerprint[:16]  # this Preprocess's entries

    # -- building -------------------------------------------------------------------------------

    def build(
        self, paths: Sequence[Path], *, workers: int = 2, progress: bool = True, desc: str = "preparing cases"
    ) -> CacheBuild:
        """Hash every case (:func:`content_digest`), then prepare those not yet cached with a DataLoader
        (``workers`` processes; 0 prepares in this process) and write each one as it arrives, so an
        interrupted build keeps what it finished. Unreadable cases are reported in ``bad`` (index and
        reason, no path); a reader that breaks its contract raises :class:`DataError`."""
        if workers < 0:
            raise DataError(f"workers must be 0 or more, not {workers}")
        start = time.perf_counter()
        paths = [Path(p) for p in paths]
        self._make_root()
        n = len(paths)
        reasons: dict[int, str] = {}
        keys: dict[int, str] = {}
        threads = max(1, min(8, workers, n))
        with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL on big chunks
            for index, result in enumerate(pool.map(digest_or_reason, paths)):
                if isinstance(result, UnreadableImage):
                    reasons[index] = str(result)
                else:
                    keys[index] = self._key(result)

        infos: dict[str, ImageInfo] = {}
        todo: dict[str, int] = {}  # key -> first case index with it
        for index, key in keys.items():
            if key in infos or key in todo:
                continue
            info = self._existing(key)
            if info is not None:
                infos[key] = info
            else:
                todo[key] = index
        reused_keys = set(infos)

        key_reasons: dict[str, str] = {}
        if todo:
            for index, array, outcome in self._prepare(todo, paths, workers, progress, desc):
                key = keys[index]
                if array is None or isinstance(outcome, str):
                    key_reasons[key] = str(outcome)
                    continue
                self._write(key, array, outcome)
                infos[key] = outcome

        entries: list[CaseEntry | None] = []
        bad: list[BadCase] = []
        built_keys: set[str] = set()
        reused = 0
        for index in range(n):
            case_key = keys.get(index)
            if case_key is None or case_key in key_reasons:
                bad.append(BadCase(index, reasons[index] if case_key is None else key_reasons[case_key]))
                entries.append(None)
                continue
            entries.append(CaseEntry(case_key, infos[case_key]))
            if case_key in reused_keys or case_key in built_keys:
                reused += 1
            else:
                built_keys.add(case_key)
        return CacheBuild(entries, bad, len(built_keys), reused, time.perf_counter() - start)

    def _prepare(
        self, todo: dict[str, int], paths: list[Path], workers: int, progress: bool, desc: str
    ) -> Iterator[tuple[int, np.ndarray | None, ImageInfo | str]]:
        """Yield ``(index, float16 array or None, info or reason)`` for each case in ``todo``."""
        dataset = _Missing([(i, paths[i]) for i in todo.values()], self.prep, self.reader)
        workers = min(workers, len(dataset)) if len(dataset) > 1 else 0  # one case: no worker start-up
        loader = DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=no_collate,
        )
        bar = tqdm(
            total=len(dataset), desc=desc, unit="case", disable=not progress or not sys.stderr.isatty(), leave=False
        )
        with bar:
            for item in loader:
                yield item
                bar.update(1)

    def _key(self, digest: str) -> str:
        return hashlib.sha256(f"{digest}\0{self.fingerprint}".encode()).hexdigest()

    def _existing(self, key: str) -> ImageInfo | None:
        """The info of a complete entry (its .npy whole, per its header), else None (removing what is left)."""
        npy, meta = self._files(key)
        if not (plain_file(npy) and plain_file(meta)):
            return None
        try:
            info = _info_from_json(meta.read_text(encoding="utf-8"))
            shape, dtype, offset = _npy_header(npy)
            whole = dtype == np.float16 and npy.stat().st_size == offset + 2 * int(np.prod(shape))
        except (OSError, ValueError, TypeError, KeyError):
            whole = False
        if not whole:
            self._remove(key)
            return None
        return info

    def _write(self, key: str, array: np.ndarray, info: ImageInfo) -> None:
        npy, meta = self._files(key, create=True)
        atomic_write(npy, lambda f: np.save(f, array, allow_pickle=False))
        text = json.dumps(dataclasses.asdict(info), sort_keys=True, default=_plain).encode()
        atomic_write(meta, lambda f: f.write(text))  # last: an entry with its .json has its whole .npy

    # -- loading --------------------------------------------------------------------------------

    def load(self, key: str) -> np.ndarray:
        """The case's float32 array (C, *size), read from disk now (nothing is kept in memory). A missing
        or damaged entry is deleted and raises :class:`DataError`; the next build prepares it again."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise DataError("a cache key is 64 lowercase hex characters")
        npy, _ = self._files(key)
        try:
            if not plain_file(npy):
                raise FileNotFoundError
            array = np.load(npy, allow_pickle=False)
            if array.dtype != np.float16 or array.ndim < 2:
                raise ValueError
        except (OSError, ValueError, EOFError):
            self._remove(key)
            raise DataError(
                f"the cache entry {key[:12]} is damaged or missing; it was deleted and will be rebuilt on the next "
                "build"
            ) from None
        return array.astype(np.float32)

    def load_batch(self, keys: Sequence[str]) -> np.ndarray:
        """The cases' arrays stacked, float32 (B, C, *size); all must have one shape."""
        if not keys:
            raise DataError("load_batch needs at least one key")
        first = self.load(keys[0])
        out = np.empty((len(keys), *first.shape), dtype=np.float32)
        out[0] = first
        for i, key in enumerate(keys[1:], start=1):
            array = self.load(key)
            if array.shape != first.shape:
                raise DataError(f"cases of a batch differ in shape: {first.shape} and {array.shape}")
            out[i] = array
        return out

    # -- folders --------------------------------------------------------------------------------

    def _make_root(self) -> None:
        if self.root.is_symlink():
            raise DataError(f"the cache folder {self.root} is a symbolic link; give the folder it points to instead")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise DataError(f"the cache folder {self.root} is not a folder")

    def _files(self, key: str, *, create: bool = False) -> tuple[Path, Path]:
        """The entry's .npy and .json paths, after checking (and with ``create``, making) their folders:
        no folder on the way may be a symbolic link out of the root."""
        if self.root.is_symlink():
            raise DataError(f"the cache folder {self.root} is a symbolic link; give the folder it points to instead")
        real_root = self.root.resolve()
        shard = self.folder / key[:2]
        for folder in (self.folder, shard):
            if folder.is_symlink() and not folder.resolve().is_relative_to(real_root):
                raise DataError(f"the cache folder {folder} is a symbolic link out of {self.root}; refusing to use it")
            if create:
                folder.mkdir(mode=0o700, exist_ok=True)
        return shard / f"{key}.npy", shard / f"{key}.json"

    def _remove(self, key: str) -> None:
        for path in self._files(key):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                path.unlink()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, reading only its header."""
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy version {version}")
        return tuple(shape), np.dtype(dtype), f.tell()


def _plain(value: object) -> object:
    """JSON for numpy scalars and arrays a reader may put in an ImageInfo."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _info_from_json(text: str) -> ImageInfo:
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    values: dict[str, Any] = {}
    for field in dataclasses.fields(ImageInfo):
        value = raw[field.name]
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return ImageInfo(**values)
