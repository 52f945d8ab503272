"""The settings every site prepares its images by and the facts a read reports; no MONAI, no image code.

* `Preprocess`: how every case of a run is prepared (size, fit, modality, CT window, MR percentiles,
  spacing), decided at the centre and checked here; its `fingerprint` (with `READER_VERSION`) names the
  case cache's folder (`medfed.data.cache`).
* `ImageInfo`: what was seen in a case (dimensions, channels, shape, spacing, modality code, kind), never
  a tag value that identifies anyone.
* `UnreadableImage`: a case that cannot be read or prepared; its message names the rule only.
* the limits: `SIZE_LIMITS` (sides of `Preprocess.size`), `MAX_RESAMPLED_VOXELS` (what `spacing` may
  blow a volume up to).

`medfed.data.images` reads and prepares by these and re-exports every name here.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medfed.constants import ImageFit, Modality
from medfed.exceptions import ConfigError, DataError

READER_VERSION = 1
"""Part of `Preprocess.fingerprint`: bump it whenever the reading or preparing code changes its output."""

SIZE_LIMITS = {2: (28, 224), 3: (28, 128)}
"""Allowed side lengths of `Preprocess.size` by spatial dimensionality."""

MAX_RESAMPLED_VOXELS = 512**3
"""`Preprocess.spacing` may not blow a volume up beyond this many voxels (about 0.5 GB as float32)."""


class UnreadableImage(DataError):
    """A case's image cannot be read or prepared. Its message names the RULE/reason only, never the file
    path and never any DICOM tag value (callers prefix it with 'row N' or the file name where that is safe)."""


def _pair(name: str, value: Any) -> tuple[float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
    ):
        raise ConfigError(f"{name} must be two finite numbers (low, high), got {value!r}")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class Preprocess:
    """How every case of a run is prepared, decided at the centre (part of the run settings).

    ``size`` is the spatial size of the prepared arrays: 2 ints (2D, each 28..224) or 3 ints (3D, each
    28..128); `read_image` returns ``(C, *size)``. Strings are accepted for ``fit`` and ``modality``
    and lists for the tuples (as read back from JSON); they are stored normalised.
    """

    size: tuple[int, ...]  # target spatial size: 2 ints (2D, each 28..224) or 3 ints (3D, each 28..128)
    fit: ImageFit = ImageFit.RESIZE  # resize (interpolate whole field of view) | crop-pad (centre crop/pad)
    modality: Modality = Modality.AUTO
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU mapped to [0,1], clipped
    mr_percentiles: tuple[float, float] = (1.0, 99.0)  # percentiles mapped to [0,1], clipped
    spacing: float = 0.0  # isotropic voxel spacing in mm for volumes (0 = keep native)

    def __post_init__(self) -> None:
        size = self.size
        if not isinstance(size, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) for s in size):
            raise ConfigError(f"size must be 2 (2D) or 3 (3D) whole numbers, e.g. (64, 64), got {size!r}")
        if len(size) not in SIZE_LIMITS:
            raise ConfigError(f"size must have 2 (2D) or 3 (3D) entries, got {len(size)}: {tuple(size)}")
        low, high = SIZE_LIMITS[len(size)]
        if any(not low <= s <= high for s in size):
            raise ConfigError(f"size: each side of a {len(size)}D image must be {low}..{high}, got {tuple(size)}")
        try:
            fit = ImageFit(self.fit)
        except ValueError:
            raise ConfigError(f"fit must be one of {', '.join(f.value for f in ImageFit)}, got {self.fit!r}") from None
        try:
            modality = Modality(self.modality)
        except ValueError:
            raise ConfigError(
                f"modality must be one of {', '.join(m.value for m in Modality)}, got {self.modality!r}"
            ) from None
        window = _pair("ct_window", self.ct_window)
        if not window[0] < window[1]:
            raise ConfigError(f"ct_window: the low HU must be below the high HU, got {window}")
        pct = _pair("mr_percentiles", self.mr_percentiles)
        if not 0.0 <= pct[0] < pct[1] <= 100.0:
            raise ConfigError(f"mr_percentiles must satisfy 0 <= lower < upper <= 100, got {pct}")
        spacing = self.spacing
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not math.isfinite(spacing):
            raise ConfigError(f"spacing must be a finite number of mm (0 = native), got {spacing!r}")
        if spacing < 0:
            raise ConfigError(f"spacing must be 0 (keep native) or a positive number of mm, got {spacing}")
        for name, value in (
            ("size", tuple(int(s) for s in size)),
            ("fit", fit),
            ("modality", modality),
            ("ct_window", window),
            ("mr_percentiles", pct),
            ("spacing", float(spacing)),
        ):
            object.__setattr__(self, name, value)

    @property
    def dims(self) -> int:
        """2 or 3: the run's spatial dimensionality."""
        return len(self.size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings, for the run directory (`from_dict` reads them back)."""
        return {
            "size": list(self.size),
            "fit": self.fit.value,
            "modality": self.modality.value,
            "ct_window": list(self.ct_window),
            "mr_percentiles": list(self.mr_percentiles),
            "spacing": self.spacing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """The inverse of `to_dict`; ConfigError for unknown or missing keys or bad values."""
        known = {"size", "fit", "modality", "ct_window", "mr_percentiles", "spacing"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"preprocess settings have unknown keys: {', '.join(unknown)}")
        if "size" not in data:
            raise ConfigError("preprocess settings need a size")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    def fingerprint(self) -> str:
        """sha256 hex of a canonical JSON of every field and `READER_VERSION`: equal fingerprints, equal arrays."""
        canonical = json.dumps(
            {"reader_version": READER_VERSION, "preprocess": self.to_dict()}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ImageInfo:
    """What was seen in a case, for inspection and checks: never a tag value that identifies anyone."""

    dims: int  # 2 or 3 (spatial dimensions of the source)
    channels: int  # 1 (grayscale) or 3 (RGB)
    shape: tuple[int, ...]  # native spatial shape after orientation to RAS (volumes); (rows, columns) in 2D
    spacing: tuple[float, ...]  # native spacing in mm (2D PNG etc: (1.0, 1.0))
    modality: str  # "CT", "MR", "DX", "CR", "US", ... from DICOM's Modality tag; "photo" for PNG/JPEG/TIFF; "nifti"
    kind: str  # "png"|"jpeg"|"tiff"|"nifti"|"dicom"|"dicom-series"
