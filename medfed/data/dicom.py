"""Everything DICOM: telling a DICOM file, reading its header, refusing what MONAI would get wrong,
loading one file or one series folder, and keeping paths and tag values out of reader errors.

* `is_dicom_file`: the 128-byte preamble followed by ``DICM``.
* `Redactor`: strikes the file and folder paths and names, UIDs and, for DICOM, quoted values, long
  digit runs and the file's own identifying tag values (read for this only) out of a reader exception's
  text; `medfed.data.images` uses it for every kind.
* the header: pixel and geometry tags only (and the identifying ones for the redactor); of its values
  only the Modality code leaves this module (in `ImageInfo`).
* the checks: MONAI's `PydicomReader` only warns (and then silently skips a slice or assumes even
  spacing), so a file needs pixels, one frame, grayscale or RGB, a photometric interpretation MONAI
  decodes and no Modality LUT; a series folder one series only, all DICOM, one size, an
  ``InstanceNumber`` each (no repeats) and, for volumes, positions that step evenly along the slice
  normal in that order.
* `load_dicom_file` and `load_dicom_series`: `PydicomReader` with ``swap_ij=False`` (a 2D DICOM's rows
  stay rows); volumes are reoriented to RAS.
"""

from __future__ import annotations

import medfed._monai  # noqa: F401  (first: MONAI without transformers, see medfed/_monai.py)

# isort: split
import contextlib
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
import pydicom.misc
from monai.data.meta_tensor import MetaTensor

from medfed.data.image_loaders import Loaded, NativeOrderPydicomReader, load_with, orient, spatial_spacing
from medfed.data.image_settings import ImageInfo, UnreadableImage


def is_dicom_file(path: Path) -> bool:
    """The 128-byte preamble followed by ``DICM``."""
    try:
        return bool(pydicom.misc.is_dicom(path))
    except OSError:
        return False


MODALITIES = frozenset((
    "AR", "AS", "ASMT", "AU", "BDUS", "BI", "BMD", "CD", "CF", "CP", "CR", "CS", "CT", "DD", "DF", "DG", "DM", "DOC",
    "DS", "DX", "EC", "ECG", "EPS", "ES", "FA", "FID", "FS", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER",
    "KO", "LEN", "LP", "LS", "MA", "MG", "MR", "MS", "NM", "OAM", "OCT", "OP", "OPM", "OPR", "OPT", "OPTBSV", "OPTENF",
    "OPV", "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT",
    "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "ST", "STAIN",
    "TEXTUREMAP", "TG", "US", "VA", "VF", "XA", "XAPROTOCOL", "XC",
))
"""DICOM's defined terms for Modality (PS3.3 C.7.3.1.1.1): the only values of the tag that leave this module."""
DEFINED_PHOTOMETRIC = frozenset((
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
    "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
))
"""DICOM's defined terms for PhotometricInterpretation (PS3.3 C.7.6.3.1.2)."""


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom warns about invalid values through its logger as well as Python warnings, quoting the value (a
    malformed PatientBirthDate, say): while medfed reads headers, values are not validated and its logger is silent."""
    logger = logging.getLogger("pydicom")
    level, mode = logger.level, pydicom.config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL + 1)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        logger.setLevel(level)
        pydicom.config.settings.reading_validation_mode = mode


_UID = re.compile(r"\d+(?:\.\d+){3,}")  # 1.2.840.10008... (also catches dotted versions: harmless)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_DIGITS = re.compile(r"\d{6,}")  # dates (19010101), times, IDs


class Redactor:
    """Strikes paths, file names and (for DICOM) identifying values out of a reader's exception text."""

    def __init__(self, path: Path) -> None:
        self.paths: set[str] = set()
        self.names: set[str] = set()
        self.values: set[str] = set()
        self.dicom = False
        self.add_path(path)

    def add_path(self, path: Path) -> None:
        for p in (path, path.expanduser(), path.absolute()):
            # as written, and as a library quotes it (repr escapes quotes and backslashes, ascii() non-ASCII)
            self.paths.update({str(p), p.as_posix(), repr(str(p))[1:-1], ascii(str(p))[1:-1]})
        try:
            self.paths.add(str(path.resolve()))
        except OSError:  # pragma: no cover - a broken link
            pass
        if path.name:
            self.names.update({path.name, repr(path.name)[1:-1], ascii(path.name)[1:-1]})

    def add_values(self, values: Iterable[str]) -> None:
        for v in values:
            v = v.strip()
            if len(v) >= 2:
                self.values.add(v)
                self.values.update(part for part in re.split(r"[\^=\\]", v) if len(part.strip()) >= 3)

    def __call__(self, error: BaseException) -> str:
        text = self.text(str(error))
        name = type(error).__name__
        return f"{name}: {text}" if text else name

    def text(self, text: str, *, names: bool = True) -> str:
        """``text`` with this file's paths, names (unless ``names`` is False: medfed's own messages name no file, and a
        file called ``empty`` must not blank the word) and (DICOM) identifying values struck out; <= 200 characters."""
        for p in sorted(self.paths, key=len, reverse=True):
            if p:
                text = text.replace(p, "<file>")
        for n in sorted(self.names, key=len, reverse=True) if names else ():
            text = re.sub(rf"(?<![\w.]){re.escape(n)}(?![\w])", "<file>", text)
        if self.dicom:
            for v in sorted(self.values, key=len, reverse=True):
                text = re.sub(re.escape(v), "<value>", text, flags=re.IGNORECASE)
            text = _QUOTED.sub(lambda m: m[0] if m[0][1:-1] == "<file>" else "'<value>'", text)
        text = _UID.sub("<uid>", text)
        if self.dicom:
            text = _DIGITS.sub("<value>", text)
        text = " ".join(text.split())
        if len(text) > 200:
            text = text[:197] + "..."
        return text


_SENSITIVE_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
)
_HEADER_TAGS = [
    "SeriesInstanceUID",
    "InstanceNumber",
    "Modality",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "ModalityLUTSequence",
    "SegmentSequence",
    *_SENSITIVE_TAGS,
]


def _get(ds: pydicom.Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # an unparsable value counts as missing
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class _Header:
    """Pixel and geometry facts of one DICOM file; ``series`` is only compared, never shown."""

    series: str | None
    instance: int | None
    modality: str
    photometric: str
    samples: int
    frames: int
    rows: int | None
    columns: int | None
    photo_max: float | None
    pixel_spacing: tuple[float, ...] | None
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    modality_lut: bool
    segmentation: bool


def _read_header(path: Path, redact: Redactor) -> _Header:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    redact.add_values(str(v) for k in _SENSITIVE_TAGS if (v := _get(ds, k)) not in (None, ""))
    redact.add_values(str(v) for k in ("SeriesInstanceUID",) if (v := _get(ds, k)) not in (None, ""))
    modality = str(_get(ds, "Modality") or "").strip().upper()
    if modality not in MODALITIES:
        modality = "OT"  # DICOM's "other": only a defined term leaves this module
    bits, signed = _int(_get(ds, "BitsAllocated")), _int(_get(ds, "PixelRepresentation"))
    slope, inter = _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept")
    unscaled = (slope is None or _float(slope) == 1.0) and (inter is None or _float(inter) == 0.0)
    photo_max = {8: 255.0, 16: 65535.0}.get(bits or 0) if signed == 0 and unscaled else None
    spacing = _floats(_get(ds, "PixelSpacing"), 2) or _floats(_get(ds, "ImagerPixelSpacing"), 2)
    series = _get(ds, "SeriesInstanceUID")
    return _Header(
        series=str(series) if series is not None else None,
        instance=_int(_get(ds, "InstanceNumber")),
        modality=modality,
        photometric=str(_get(ds, "PhotometricInterpretation") or "").strip().upper(),
        samples=_int(_get(ds, "SamplesPerPixel")) or 1,
        frames=_int(_get(ds, "NumberOfFrames")) or 1,
        rows=_int(_get(ds, "Rows")),
        columns=_int(_get(ds, "Columns")),
        photo_max=photo_max,
        pixel_spacing=spacing,
        position=_floats(_get(ds, "ImagePositionPatient"), 3),
        orientation=_floats(_get(ds, "ImageOrientationPatient"), 6),
        modality_lut=_get(ds, "ModalityLUTSequence") is not None,
        segmentation=_get(ds, "SegmentSequence") is not None,
    )


_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
}  # pydicom decodes YBR to RGB; PALETTE COLOR would need its lookup table applied (MONAI does not)


def _check_pixels(h: _Header) -> None:
    if h.rows is None or h.columns is None:
        raise UnreadableImage("a DICOM file without image pixels (no Rows/Columns: a report, plan or DICOMDIR?)")
    if h.segmentation:
        raise UnreadableImage("a DICOM segmentation (SEG), not an image")
    if h.frames > 1:
        raise UnreadableImage(
            "a multi-frame DICOM file (cine loop or enhanced multi-frame); only single-frame files and "
            "folders of single-frame slices are read"
        )
    if h.samples not in (1, 3):
        raise UnreadableImage(f"a DICOM image of {h.samples} samples per pixel; only grayscale and RGB")
    if h.photometric not in _PHOTOMETRIC:
        # the tag's value is named only when it is one of DICOM's defined terms: a free-text value may hold anything
        named = h.photometric if h.photometric in DEFINED_PHOTOMETRIC else "missing or not a defined term"
        raise UnreadableImage(
            f"a DICOM image with PhotometricInterpretation {named}; only MONOCHROME1, "
            "MONOCHROME2, RGB and YBR colour are read"
        )
    if h.modality_lut:
        raise UnreadableImage("a DICOM Modality LUT Sequence (only RescaleSlope/RescaleIntercept are applied)")


def load_dicom_file(path: Path, redact: Redactor) -> Loaded:
    h = _read_header(path, redact)
    _check_pixels(h)
    reader = NativeOrderPydicomReader(swap_ij=False, channel_dim=-1 if h.samples == 3 else None)
    image = load_with(reader, path)
    rows, columns = int(h.rows or 0), int(h.columns or 0)
    if tuple(image.shape) != (h.samples, rows, columns):
        raise UnreadableImage(f"the pixel data {tuple(image.shape)} do not match Rows x Columns {rows} x {columns}")
    if isinstance(image, MetaTensor):
        image = image.as_tensor()
    info = ImageInfo(2, h.samples, (rows, columns), h.pixel_spacing or (1.0, 1.0), h.modality, "dicom")
    return Loaded(image, info, h.photo_max, invert=h.photometric == "MONOCHROME1")


def _check_series(headers: list[_Header]) -> None:
    """Refuse what MONAI's series stacking would only warn about (or get wrong)."""
    series = {h.series for h in headers}
    if len(series) > 1:
        raise UnreadableImage(f"the DICOM folder mixes {len(series)} series; a folder must hold exactly one series")
    for h in headers:
        _check_pixels(h)
    if len(headers) == 1:
        return
    if any(h.samples != 1 for h in headers):
        raise UnreadableImage("a colour DICOM series; only grayscale volumes are read")
    if len({(h.rows, h.columns) for h in headers}) > 1:
        raise UnreadableImage("the slices of the DICOM series differ in size (Rows x Columns)")
    numbers = [h.instance for h in headers]
    if any(n is None for n in numbers):
        raise UnreadableImage("a slice of the DICOM series has no InstanceNumber (it orders the slices)")
    if len(set(numbers)) != len(numbers):
        raise UnreadableImage("two slices of the DICOM series share an InstanceNumber")
    if any(h.position is None or h.orientation is None for h in headers):
        raise UnreadableImage(
            "a slice of the DICOM series lacks ImagePositionPatient or ImageOrientationPatient (its geometry)"
        )
    if len({h.orientation for h in headers}) > 1:
        raise UnreadableImage("the slices of the DICOM series differ in ImageOrientationPatient")
    if len({h.pixel_spacing for h in headers}) > 1:
        raise UnreadableImage("the slices of the DICOM series differ in PixelSpacing")
    ordered = sorted(headers, key=lambda h: h.instance or 0)
    iop = np.asarray(ordered[0].orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    along = np.asarray([np.dot(normal, np.asarray(h.position, dtype=float)) for h in ordered])
    steps = np.diff(along)
    if np.any(np.abs(steps) < 1e-3) or not (np.all(steps > 0) or np.all(steps < 0)):
        raise UnreadableImage(
            "the slice positions of the DICOM series do not step one way in InstanceNumber order "
            "(repeated or shuffled slices)"
        )
    if np.ptp(np.abs(steps)) > max(0.01, 0.01 * float(np.median(np.abs(steps)))):
        raise UnreadableImage("the slices of the DICOM series are unevenly spaced (a slice missing?)")


def load_dicom_series(folder: Path, redact: Redactor) -> Loaded:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))  # what MONAI's glob('*') sees
    for p in entries:
        redact.add_path(p)
    if not entries:
        raise UnreadableImage("the DICOM folder is empty")
    if any(p.is_dir() for p in entries):
        raise UnreadableImage("the DICOM folder holds a subfolder; a folder must hold the files of one series only")
    headers: list[_Header] = []
    not_dicom = 0
    for p in entries:
        try:
            headers.append(_read_header(p, redact))
        except pydicom.errors.InvalidDicomError:
            not_dicom += 1
    if not_dicom:
        raise UnreadableImage(
            f"the DICOM folder holds {not_dicom} file(s) that are not DICOM (of {len(entries)}); "
            "a folder must hold the files of one series only"
        )
    _check_series(headers)
    first = headers[0]
    image = load_with(NativeOrderPydicomReader(swap_ij=False), folder)
    if len(headers) == 1:
        if isinstance(image, MetaTensor):
            image = image.as_tensor()
        dims = 2
        spacing = first.pixel_spacing or (1.0, 1.0)
    else:
        if image.ndim != 4 or image.shape[0] != 1:
            raise UnreadableImage(f"the DICOM series did not stack into one volume (got {tuple(image.shape)})")
        dims = 3
        image = orient(image)
        spacing = spatial_spacing(image, 3)
    info = ImageInfo(
        dims, int(image.shape[0]), tuple(int(s) for s in image.shape[1:]), spacing, first.modality, "dicom-series"
    )
    return Loaded(image, info, first.photo_max, invert=first.photometric == "MONOCHROME1")
