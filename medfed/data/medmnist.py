"""Reader for MedMNIST-format ``.npz`` files (MedMNIST v2/v3 layout, Yang et al., Sci. Data 2023).

A file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images`` and ``test_labels``. Images are ``(N, H, W)`` (2D grayscale),
``(N, H, W, C)`` with C in {1, 3} (2D colour), ``(N, D, H, W)`` (3D) or ``(N, D, H, W, C)``.
Labels are ``(N,)`` or ``(N, K)`` integers: one column for binary / multi-class /
ordinal tasks, K columns of 0/1 for multi-label tasks.

The official train/val/test splits are kept as they are. Every check raises `DataError`
naming the file, the key and the rule.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from medfed.constants import TaskType
from medfed.data.dataset import Dataset, Split
from medfed.data.stores import ArrayImages
from medfed.exceptions import DataError

Arrays = tuple[np.ndarray, np.ndarray]
"""A split as read: channel-first pixels ``(N, C, *S)`` and int64 labels ``(N, K)``."""

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))
DATA_PATH_ENV = "MEDFED_DATA_PATH"
"""Colon-separated folders searched for ``<flag>.npz`` before ``~/.medmnist``."""

# MedMNIST's own flags: (task, number of classes or labels). Ordinal regression
# (retinamnist) is read as multi-class. Source: medmnist/info.py (MedMNIST v2).
KNOWN_FLAGS: dict[str, tuple[TaskType, int]] = {
    "pathmnist": (TaskType.MULTICLASS, 9),
    "chestmnist": (TaskType.MULTILABEL, 14),
    "dermamnist": (TaskType.MULTICLASS, 7),
    "octmnist": (TaskType.MULTICLASS, 4),
    "pneumoniamnist": (TaskType.BINARY, 2),
    "retinamnist": (TaskType.MULTICLASS, 5),
    "breastmnist": (TaskType.BINARY, 2),
    "bloodmnist": (TaskType.MULTICLASS, 8),
    "tissuemnist": (TaskType.MULTICLASS, 8),
    "organamnist": (TaskType.MULTICLASS, 11),
    "organcmnist": (TaskType.MULTICLASS, 11),
    "organsmnist": (TaskType.MULTICLASS, 11),
    "organmnist3d": (TaskType.MULTICLASS, 11),
    "nodulemnist3d": (TaskType.BINARY, 2),
    "adrenalmnist3d": (TaskType.BINARY, 2),
    "fracturemnist3d": (TaskType.MULTICLASS, 3),
    "vesselmnist3d": (TaskType.BINARY, 2),
    "synapsemnist3d": (TaskType.BINARY, 2),
}

# Official MedMNIST v2 (28-pixel) files and their MD5 checksums, as published in MedMNIST's
# medmnist/info.py; the three pinned files in ../shared/data/medmnist match these values.
OFFICIAL_URL = "https://zenodo.org/record/6496656/files/{flag}.npz?download=1"
OFFICIAL_MD5: dict[str, str] = {
    "pathmnist": "a8b06965200029087d5bd730944a56c1",
    "chestmnist": "02c8a6516a18b556561a56cbdd36c4a8",
    "dermamnist": "0744692d530f8e62ec473284d019b0c7",
    "octmnist": "c68d92d5b585d8d81f7112f81e2d0842",
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "bloodmnist": "7053d0359d879ad8a5505303e11de1dc",
    "tissuemnist": "ebe78ee8b05294063de985d821c1c34b",
    "organamnist": "866b832ed4eeba67bfb9edee1d5544e6",
    "organcmnist": "0afa5834fb105f7705a7d93372119a21",
    "organsmnist": "e5c39f1af030238290b9557d9503af9d",
    "organmnist3d": "21f0a239e7f502e6eca33c3fc453c0b6",
    "nodulemnist3d": "8755a7e9e05a4d9ce80a24c3e7a256f3",
    "adrenalmnist3d": "bbd3c5a5576322bc4cdfea780653b1ce",
    "fracturemnist3d": "6aa7b0143a6b42da40027a9dda61302f",
    "vesselmnist3d": "2ba5b80617d705141f3f85627108fce8",
    "synapsemnist3d": "1235b78a3cd6280881dd7850a78eadb6",
}


def is_path_like(data: str) -> bool:
    return data.endswith(".npz") or os.sep in data or "/" in data


def flag_base(flag: str) -> str:
    """'pneumoniamnist_64' -> 'pneumoniamnist' (MedMNIST+ size suffixes)."""
    base, _, size = flag.rpartition("_")
    return base if base and size.isdigit() else flag


def medmnist_home() -> Path:
    return Path("~/.medmnist").expanduser()


def resolve_data_path(data: str, *, download: bool = True) -> Path:
    """Turn ``--data`` into a file path.

    A path (ends with ``.npz`` or contains a separator) must exist. A flag such as
    ``pneumoniamnist`` is looked up in the folders of ``$MEDFED_DATA_PATH``, then at
    ``~/.medmnist/<flag>.npz`` (the medmnist package's layout); if missing there and
    ``download`` is set, the official file is downloaded there and MD5-checked; offline, the
    error names the path to place it at.
    """
    if is_path_like(data):
        path = Path(data).expanduser()
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist (or is not a file)")
        return path
    flag = data.lower()
    for folder in os.environ.get(DATA_PATH_ENV, "").split(os.pathsep):
        if folder and (Path(folder).expanduser() / f"{flag}.npz").is_file():
            return Path(folder).expanduser() / f"{flag}.npz"
    home_path = medmnist_home() / f"{flag}.npz"
    if home_path.is_file():
        return home_path
    if flag_base(flag) not in KNOWN_FLAGS:
        raise DataError(
            f"{data!r} is neither a .npz path nor a known MedMNIST flag "
            f"({', '.join(sorted(KNOWN_FLAGS))}), and {home_path} does not exist"
        )
    reason = "download disabled"
    if download:
        reason = download_official(flag, home_path.parent)
        if home_path.is_file():
            return home_path
    raise DataError(
        f"{flag}: no file at {home_path} ({reason}). Place the official MedMNIST file there, "
        f"add its folder to ${DATA_PATH_ENV}, or pass --data PATH/TO/{flag}.npz"
    )


def download_official(flag: str, root: Path) -> str:
    """Download the official MedMNIST v2 file for ``flag`` into ``root``; returns what happened.

    The file is streamed to a temporary name, its MD5 checked against MedMNIST's published
    value, then renamed into place, so a failed or partial download never leaves a file.
    """
    if flag not in OFFICIAL_MD5:
        return f"no official download is known for {flag!r} (MedMNIST v2 28-pixel flags only)"
    url = OFFICIAL_URL.format(flag=flag)
    target = root / f"{flag}.npz"
    tmp = root / f".{flag}.npz.download-{os.getpid()}"
    digest = hashlib.md5()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as fh:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != OFFICIAL_MD5[flag]:
            return f"download from {url} failed its MD5 check ({digest.hexdigest()} != {OFFICIAL_MD5[flag]})"
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        return f"download from {url} failed ({type(exc).__name__}: {exc})"
    finally:
        tmp.unlink(missing_ok=True)
    return "downloaded"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_medmnist(data: str | Path, *, download: bool = True) -> Dataset:
    """Resolve, read and validate a MedMNIST-style file (see module docstring for layouts).

    The pixels stay in their own dtype (uint8 for the official files) and are scaled to [0, 1] a batch at a
    time with the file's one intensity range (`medfed.data.stores.ArrayImages`).
    """
    path = resolve_data_path(str(data), download=download)
    name = path.stem.lower()
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single array (.npy), not a .npz archive with {', '.join(REQUIRED_KEYS)}")
        with loaded as npz:
            missing = [k for k in REQUIRED_KEYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing keys {', '.join(missing)}; a MedMNIST file needs {', '.join(REQUIRED_KEYS)}"
                )
            raw = {k: npz[k] for k in REQUIRED_KEYS}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc

    splits = {s: _read_split(path, s, raw[f"{s}_images"], raw[f"{s}_labels"]) for s in SPLITS}
    shapes = {s: splits[s][0].shape[1:] for s in SPLITS}
    if len(set(shapes.values())) != 1:
        raise DataError(f"{path}: image shapes differ between splits ({shapes}); all splits must match")
    widths = {s: splits[s][1].shape[1] for s in SPLITS}
    if len(set(widths.values())) != 1:
        raise DataError(f"{path}: label widths differ between splits ({widths}); all splits must match")
    task, num_classes = _task_of(path, flag_base(name), splits)
    value_range = _intensity_range(path, splits)
    return Dataset(
        name=name,
        path=path.resolve(),
        sha256=sha256_of(path),
        task=task,
        num_classes=num_classes,
        preprocessing={"intensity_range": list(value_range)},
        train=Split(ArrayImages(*splits["train"][:1], value_range), splits["train"][1]),
        val=Split(ArrayImages(*splits["val"][:1], value_range), splits["val"][1]),
        test=Split(ArrayImages(*splits["test"][:1], value_range), splits["test"][1]),
    )


def _intensity_range(path: Path, splits: dict[str, Arrays]) -> tuple[float, float]:
    """0..255 for 8-bit files; otherwise the train split's min and max, used for every split (and site)."""
    if all(splits[s][0].dtype == np.uint8 for s in SPLITS):
        return 0.0, 255.0
    low, high = float(splits["train"][0].min()), float(splits["train"][0].max())
    if not high > low:
        raise DataError(f"{path}: train_images are constant ({low}); there is nothing to learn from")
    return low, high


def _read_split(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Arrays:
    key = f"{split}_images"
    numeric = np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
    if images.dtype == object or not numeric:
        raise DataError(f"{path}: {key} must hold numbers, got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise DataError(f"{path}: {key} is empty; every official split needs at least one image")
    if images.ndim == 3:  # (N, H, W)
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C)
        images = np.moveaxis(images, -1, 1)
    elif images.ndim == 4:  # (N, D, H, W)
        images = images[:, None]
    elif images.ndim == 5 and images.shape[-1] in (1, 3):  # (N, D, H, W, C)
        images = np.moveaxis(images, -1, 1)
    else:
        raise DataError(
            f"{path}: {key} has shape {images.shape}; expected (N,H,W), (N,H,W,C) with C in 1 or 3, "
            "(N,D,H,W) or (N,D,H,W,C)"
        )
    if min(images.shape[2:]) < 8:
        raise DataError(f"{path}: {key} spatial size {images.shape[2:]} is below the minimum of 8 pixels per side")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise DataError(f"{path}: {key} contains NaN or infinite values")
    lkey = f"{split}_labels"
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise DataError(f"{path}: {lkey} has shape {labels.shape}; expected (N,) or (N, K)")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {lkey} has {labels.shape[0]} rows but {key} has {images.shape[0]} images")
    if not (np.issubdtype(labels.dtype, np.integer)
            or (np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0))):
        raise DataError(f"{path}: {lkey} must hold whole numbers (class indices or 0/1), got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: {lkey} has negative label {int(labels.min())}; labels must be >= 0")
    return np.ascontiguousarray(images), labels


def _task_of(path: Path, base: str, splits: dict[str, Arrays]) -> tuple[TaskType, int]:
    width = splits["train"][1].shape[1]
    all_labels = np.concatenate([splits[s][1] for s in SPLITS])
    if base in KNOWN_FLAGS:
        task, n = KNOWN_FLAGS[base]
        expected_width = n if task == TaskType.MULTILABEL else 1
        if width != expected_width:
            raise DataError(f"{path}: {base} labels must have {expected_width} column(s); found {width}")
    elif width > 1:
        task, n = TaskType.MULTILABEL, width
    else:
        n = int(all_labels.max()) + 1
        task = TaskType.BINARY if n == 2 else TaskType.MULTICLASS
    if task == TaskType.MULTILABEL:
        if not np.isin(all_labels, (0, 1)).all():
            raise DataError(f"{path}: multi-label labels must be 0 or 1; found values {np.unique(all_labels)[:10]}")
    else:
        for s in SPLITS:
            top = int(splits[s][1].max())
            if top >= n:
                raise DataError(
                    f"{path}: {s}_labels has label {top}, out of range for {n} classes (labels must be 0..{n - 1})"
                )
        if n < 2 or len(np.unique(splits["train"][1])) < 2:
            raise DataError(f"{path}: train_labels hold a single class; a classification task needs at least two")
    return task, n
