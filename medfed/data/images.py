"""Read one medical image case with MONAI and prepare it for a run: ``(C, *size)`` float32 in [0, 1].

Policy (every site prepares every case the same way, as the centre decided in `Preprocess`):

Reading. `monai.transforms.LoadImage` with one explicit reader per kind, given at call time so that
LoadImage never falls back to its other registered readers (ITK among them):

* ``.png .jpg .jpeg .tif .tiff``: `PILReader` with ``reverse_indexing=False``. MONAI's default swaps
  the two axes (a PNG would come back as ``(width, height)``); here a picture's rows stay rows, so the
  array reads as the picture looks. EXIF orientation is applied (as an image viewer shows it), alpha is
  dropped, palette and other colour modes become RGB, 1-bit becomes 8-bit; multi-page files are refused.
* ``.nii .nii.gz``: `NibabelReader` (nibabel applies the header's ``scl_slope``/``scl_inter``).
* ``.dcm`` (or any other file with the ``DICM`` preamble): `PydicomReader`; a FOLDER is one DICOM
  series (one volume). MONAI applies ``RescaleSlope``/``RescaleIntercept`` slice by slice (CT in HU),
  stacks the slices in ``InstanceNumber`` order and derives the slice axis of the affine from the first
  and last slice positions. Because it only warns (and then silently skips a slice or assumes even
  spacing), every file's header is checked first: one series only, all DICOM, single-frame, one size,
  an ``InstanceNumber`` each (no repeats) and, for volumes, positions that step evenly along the slice
  normal in that order (a missing slice is refused, not stretched over). ``swap_ij=False`` keeps a 2D
  DICOM's rows as rows, like a PNG; volumes are reoriented anyway.

Identity. DICOM headers are read for pixels and geometry only. Nothing read from a header reaches
`ImageInfo` except the Modality code (``CT``, ``MR``, ...); MONAI's metadata (`MetaTensor.meta`,
which names the file) is dropped and plain numpy is returned. Reader warnings are silenced (they name
files and tag values; what they warn about is checked beforehand and refused). Error messages name the
rule or reason only: reader exceptions become `UnreadableImage` with the exception type and its text,
with the file and folder paths and names replaced by ``<file>``, UIDs by ``<uid>``, and, for DICOM,
quoted values, long digit runs and the file's own identifying tag values (read for this redaction only)
struck out. The original exception is not chained (its text carries the same paths and values).

Geometry. A case is 2D (PNG/JPEG/TIFF, a single-frame DICOM, a NIfTI shaped ``(H, W)`` or
``(H, W, 1)``) or 3D (a DICOM series, a 3D NIfTI); 4D and larger are refused. 2D images keep their
stored row/column order. Volumes are reoriented to RAS with `Orientation` and, when
``Preprocess.spacing > 0``, resampled to that isotropic spacing with `Spacing`.

Intensity, to [0, 1] and clipped (`Modality`): CT maps the HU window with `ScaleIntensityRange`; MR
(also X-ray, ultrasound, NIfTI) maps the percentiles with `ScaleIntensityRangePercentiles`, falling
back to min..max when both percentiles are equal and to zeros for a constant image; PHOTO divides by
the stored type's maximum (255 or 65535; other types are refused). AUTO: DICOM ``CT`` -> CT, any other
DICOM -> MR-style percentiles, PNG/JPEG/TIFF -> PHOTO, NIfTI -> percentiles. DICOM ``MONOCHROME1``
(bright = low values) is inverted after scaling so that bone is bright as in ``MONOCHROME2``.

Size. The image must have the run's dimensionality. ``fit=resize`` interpolates the whole field of view
with `Resize` (bilinear / trilinear, anti-aliased when shrinking); ``fit=crop-pad`` keeps the pixel
scale with `ResizeWithPadOrCrop` (centre crop, zero padding = black after scaling).

Modules. This one is the entry: kinds, the loading dispatch, intensity scaling, sizing, `probe_image` and
`read_image`, and it re-exports the settings. `medfed.data.image_settings`: `Preprocess`, `ImageInfo`,
`UnreadableImage`, the limits. `medfed.data.image_loaders`: MONAI's `LoadImage` and its readers, the
PNG/JPEG/TIFF and NIfTI loaders. `medfed.data.dicom`: DICOM headers, checks, error redaction, a file and a
series.
"""

from __future__ import annotations

import medfed._monai  # noqa: F401  (first: MONAI without transformers, see medfed/_monai.py)

# isort: split
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms import (
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_numpy

from medfed.constants import ImageFit, Modality
from medfed.data.dicom import Redactor, is_dicom_file, load_dicom_file, load_dicom_series, quiet_pydicom
from medfed.data.image_loaders import Loaded, load_nifti, load_photo
from medfed.data.image_settings import (
    MAX_RESAMPLED_VOXELS,
    READER_VERSION,
    SIZE_LIMITS,
    ImageInfo,
    Preprocess,
    UnreadableImage,
)

__all__ = [
    "DICOM_SUFFIXES",
    "MAX_RESAMPLED_VOXELS",
    "PHOTO_SUFFIXES",
    "READER_VERSION",
    "SIZE_LIMITS",
    "SUPPORTED_TYPES",
    "ImageInfo",
    "Preprocess",
    "UnreadableImage",
    "image_kind",
    "probe_image",
    "read_image",
]

PHOTO_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED_TYPES = (
    ".png .jpg .jpeg .tif .tiff .nii .nii.gz .dcm, a DICOM file without suffix, a folder of one DICOM series"
)


# --------------------------------------------------------------------------------------------------------------
# kinds and loading


def image_kind(path: Path) -> str:
    """``png|jpeg|tiff|nifti|dicom|dicom-series`` by suffix, folder (a DICOM series) or DICM preamble.

    Raises UnreadableImage for a missing file whose kind the suffix does not tell, and for other types.
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return "dicom-series"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in PHOTO_SUFFIXES:
        return PHOTO_SUFFIXES[suffix]
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if not path.exists():
        raise UnreadableImage("file not found")
    if path.is_file() and is_dicom_file(path):
        return "dicom"
    raise UnreadableImage(f"unsupported file type (supported: {SUPPORTED_TYPES})")


def _load(path: Path) -> Loaded:
    path = Path(path)
    if not path.exists():
        raise UnreadableImage("file not found")
    kind = image_kind(path)
    redact = Redactor(path)
    redact.dicom = kind.startswith("dicom")
    try:
        with warnings.catch_warnings(), quiet_pydicom():
            warnings.simplefilter("ignore")  # reader warnings name files and tag values: checked beforehand
            if kind == "nifti":
                loaded = load_nifti(path)
            elif kind == "dicom":
                loaded = load_dicom_file(path, redact)
            elif kind == "dicom-series":
                loaded = load_dicom_series(path, redact)
            else:
                loaded = load_photo(path, kind)
    except UnreadableImage as e:  # medfed's own words, struck of this file's paths and values all the same
        raise UnreadableImage(redact.text(str(e), names=False)) from None
    except Exception as e:  # any reader failure: corrupt, truncated, unsupported encoding, ...
        raise UnreadableImage(redact(e)) from None
    if not torch.isfinite(loaded.image.float()).all():
        raise UnreadableImage("the image holds NaN or infinite values")
    return loaded


def probe_image(path: Path) -> ImageInfo:
    """Read a case completely (every pixel decoded, so a truncated file fails here) and return what it is."""
    return _load(path).info


# --------------------------------------------------------------------------------------------------------------
# preparing


def _resolve_modality(prep: Preprocess, info: ImageInfo) -> Modality:
    if prep.modality is not Modality.AUTO:
        return prep.modality
    if info.kind in ("png", "jpeg", "tiff"):
        return Modality.PHOTO
    if info.kind.startswith("dicom") and info.modality == "CT":
        return Modality.CT
    return Modality.MR


def _scale(image: torch.Tensor, modality: Modality, loaded: Loaded, prep: Preprocess) -> torch.Tensor:
    """``(C, *spatial)`` float32 -> the same shape in [0, 1] by the modality's rule."""
    if modality is Modality.CT:
        low, high = prep.ct_window
        out = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)(image)
    elif modality is Modality.PHOTO:
        if loaded.photo_max is None:
            raise UnreadableImage(
                "modality photo needs unsigned 8- or 16-bit pixels without rescaling; use mr or ct for this image"
            )
        out = ScaleIntensityRange(a_min=0.0, a_max=loaded.photo_max, b_min=0.0, b_max=1.0, clip=True)(image)
    else:
        lower, upper = prep.mr_percentiles
        if float(percentile(image, upper)) > float(percentile(image, lower)):
            out = ScaleIntensityRangePercentiles(lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True)(image)
        elif float(image.max()) > float(image.min()):  # sparse image (e.g. a mask): both percentiles equal
            low_v, high_v = float(image.min()), float(image.max())
            out = ScaleIntensityRange(a_min=low_v, a_max=high_v, b_min=0.0, b_max=1.0, clip=True)(image)
        else:  # constant image
            out = torch.zeros_like(image)
    assert isinstance(out, torch.Tensor)
    if loaded.invert:
        out = 1.0 - out
    return out


def read_image(path: Path, prep: Preprocess) -> tuple[np.ndarray, ImageInfo]:
    """Read one case and prepare it: float32 ``(C, *prep.size)`` in [0, 1] (C = the image's channels), and its info.

    Raises UnreadableImage when the file cannot be read, or its dimensionality is not the run's.
    """
    loaded = _load(path)
    info = loaded.info
    if info.dims != prep.dims:
        raise UnreadableImage(f"a {info.dims}D image in a {prep.dims}D run")
    image = loaded.image
    if info.dims == 3 and prep.spacing > 0:
        new_shape = [max(1, round(n * s / prep.spacing)) for n, s in zip(info.shape, info.spacing, strict=True)]
        if math.prod(new_shape) > MAX_RESAMPLED_VOXELS:
            raise UnreadableImage(
                f"resampling to {prep.spacing} mm would make a volume of {math.prod(new_shape)} voxels "
                f"(more than {MAX_RESAMPLED_VOXELS}); choose a larger spacing"
            )
        image = image.to(torch.float32)  # interpolation needs floats (MONAI keeps the affine)
        resampled = Spacing(pixdim=(prep.spacing,) * 3, mode="bilinear", dtype=np.float32)(image)
        assert isinstance(resampled, torch.Tensor)
        image = resampled
    image = (image.as_tensor() if isinstance(image, MetaTensor) else image).to(torch.float32)
    image = _scale(image, _resolve_modality(prep, info), loaded, prep)
    if prep.fit is ImageFit.RESIZE:
        # Linear interpolation keeps the field of view and stays within the input's range (so in [0, 1]); with
        # anti-aliasing MONAI first smooths each shrunk axis (Gaussian, sigma = (factor - 1) / 2, as skimage),
        # so downsampling a 512-pixel CT does not alias. "area" would anti-alias too but is nearest-neighbour
        # (blocky) when enlarging, which 28-pixel sources need. Same-size images pass through unchanged.
        mode = "bilinear" if info.dims == 2 else "trilinear"
        fitted = Resize(spatial_size=prep.size, mode=mode, align_corners=False, anti_aliasing=True)(image)
    else:
        fitted = ResizeWithPadOrCrop(spatial_size=prep.size)(image)  # centre crop / zero pad (black after scaling)
    out = np.ascontiguousarray(convert_to_numpy(fitted), dtype=np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    expected = (info.channels, *prep.size)
    if out.shape != expected:  # pragma: no cover - MONAI's transforms give the size asked for
        raise UnreadableImage(f"preparing gave shape {out.shape}, not {expected}")
    return out, info
