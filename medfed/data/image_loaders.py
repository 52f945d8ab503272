"""MONAI's `LoadImage` with one explicit reader per call, and the loaders of pictures and NIfTI files.

* `load_with`: the process's one `LoadImage`, handed its reader at call time, so LoadImage never falls
  back to its other registered readers (ITK among them); it keeps the stored type (PHOTO scaling needs it).
* the native-byte-order readers: MONAI hands a reader's array to torch as it is, and torch refuses
  big-endian data (`NativeOrderPydicomReader` serves `medfed.data.dicom`).
* `Loaded`: what every loader hands `medfed.data.images` (the image, its `ImageInfo`, the stored type's
  maximum, whether to invert).
* `orient` and `spatial_spacing`: a volume in RAS order and its voxel spacing from the affine.
* `load_photo` (PNG/JPEG/TIFF with PILReader: rows stay rows, EXIF orientation applied, modes settled
  on L / I;16 / RGB, multi-page refused) and `load_nifti` (NibabelReader: 2D and 3D only).

DICOM is loaded in `medfed.data.dicom`; the policy all of them follow is in `medfed.data.images`.
"""

from __future__ import annotations

import medfed._monai  # noqa: F401  (first: MONAI without transformers, see medfed/_monai.py)

# isort: split
import functools
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage, Orientation
from monai.utils import convert_to_numpy
from PIL import Image, ImageOps

from medfed.data.image_settings import ImageInfo, UnreadableImage


@dataclass
class Loaded:
    """A case as a loader read it, before scaling and sizing, with what `medfed.data.images` needs to know."""

    image: torch.Tensor  # (C, *spatial); a MetaTensor carrying the affine for volumes
    info: ImageInfo
    photo_max: float | None  # 255 / 65535 for unsigned 8/16-bit stored pixels, else None
    invert: bool = False  # DICOM MONOCHROME1


@functools.lru_cache(maxsize=1)
def _loader() -> LoadImage:
    # The reader is always given at call time: LoadImage then uses that reader only (the default readers it
    # registers, ITK among them, are never tried). dtype=None keeps the stored type (PHOTO needs to know it).
    # Registering the defaults instantiates MONAI's nvImageCodec DICOM reader, which logs a warning on every
    # machine without that GPU decoder: silenced here, once per process.
    log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True, dtype=None, ensure_channel_first=True)
    finally:
        log.setLevel(level)


def load_with(reader: ImageReader, source: Path) -> torch.Tensor:
    image = _loader()(str(source), reader=reader)
    if not isinstance(image, torch.Tensor):  # pragma: no cover - LoadImage returns a MetaTensor
        raise UnreadableImage("the reader returned no image")
    return image


_PIL_TO_RGB = {"P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_PIL_16 = {"I;16", "I;16L", "I;16B", "I;16N"}


def _pil_converter(modes: list[str]) -> Callable[[Image.Image], Image.Image]:
    """PILReader's converter: decode fully, apply EXIF orientation, settle on L / I;16 / RGB (noted in modes)."""

    def convert(img: Image.Image) -> Image.Image:
        if getattr(img, "n_frames", 1) > 1:
            raise UnreadableImage("a multi-page or animated image; only single images are read")
        img.load()  # decode now: a truncated file fails here
        img = ImageOps.exif_transpose(img)
        if img.mode == "1" or img.mode in ("LA", "La"):
            img = img.convert("L")
        elif img.mode in _PIL_TO_RGB:
            img = img.convert("RGB")
        elif img.mode in _PIL_16 and img.mode != "I;16":
            img = img.convert("I;16")
        modes.append(img.mode)
        return img

    return convert


def load_photo(path: Path, kind: str) -> Loaded:
    modes: list[str] = []
    image = load_with(PILReader(converter=_pil_converter(modes), reverse_indexing=False), path)
    mode = modes[-1] if modes else ""
    if image.shape[0] not in (1, 3) or image.ndim != 3:
        raise UnreadableImage(f"a picture of {image.shape[0]} channels (mode {mode}); only grayscale and RGB")
    photo_max = {"L": 255.0, "RGB": 255.0, "I;16": 65535.0}.get(mode)
    info = ImageInfo(2, int(image.shape[0]), tuple(int(s) for s in image.shape[1:]), (1.0, 1.0), "photo", kind)
    return Loaded(image, info, photo_max)


def spatial_spacing(image: torch.Tensor, dims: int) -> tuple[float, ...]:
    affine = image.affine if isinstance(image, MetaTensor) else torch.eye(4)
    return tuple(float(s) for s in affine_to_spacing(convert_to_numpy(affine), r=dims))


def orient(image: torch.Tensor) -> torch.Tensor:
    """A volume ``(C, X, Y, Z)`` with its affine -> the same voxels in RAS order."""
    out = Orientation(axcodes="RAS")(image)
    assert isinstance(out, torch.Tensor)
    return out


def _native(data: Any) -> Any:
    """An array in native byte order: MONAI hands the reader's array to torch as it is, and torch refuses
    big-endian data (nibabel's own anatomical.nii and pydicom's MR_small_bigendian.dcm are big-endian)."""
    if isinstance(data, np.ndarray) and not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data


class _NativeOrderNibabelReader(NibabelReader):
    """NibabelReader giving native byte order (see `_native`)."""

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        return _native(super()._get_array_data(img, filename))


class NativeOrderPydicomReader(PydicomReader):
    """PydicomReader giving native byte order (see `_native`), slice by slice (a rescaled slice is float32 already)."""

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        return _native(super()._get_array_data(img, filename))


def load_nifti(path: Path) -> Loaded:
    header_img = nib.load(path)  # header only: the shape and the stored type
    if not isinstance(header_img, nib.Nifti1Image):  # Nifti2Image is one too
        raise UnreadableImage("not a NIfTI-1 or NIfTI-2 image")
    raw_shape = tuple(int(s) for s in header_img.shape)
    shape = raw_shape
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise UnreadableImage(
            f"a {len(shape)}D image (a time series or vector volume, shape {raw_shape}); only 2D and 3D images"
        )
    if len(shape) < 2:
        raise UnreadableImage(f"a 1D image (shape {raw_shape}); only 2D and 3D images")
    slope, inter = header_img.header.get_slope_inter()
    stored = np.dtype(header_img.get_data_dtype())
    unscaled = slope in (None, 1.0) and inter in (None, 0.0)
    photo_max = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(stored.newbyteorder("="))
    image = load_with(_NativeOrderNibabelReader(mmap=False), path)
    if image.numel() != math.prod(shape):
        raise UnreadableImage(f"the pixel data do not match the header's shape {raw_shape}")
    if len(shape) == 2:
        image = image.as_tensor().reshape(1, *shape) if isinstance(image, MetaTensor) else image.reshape(1, *shape)
        spacing = tuple(float(z) for z in header_img.header.get_zooms()[:2])
    else:
        image = orient(image.reshape(1, *shape))
        spacing = spatial_spacing(image, 3)
    info = ImageInfo(len(shape), 1, tuple(int(s) for s in image.shape[1:]), spacing, "nifti", "nifti")
    return Loaded(image, info, photo_max if unscaled else None)
