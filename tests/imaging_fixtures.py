"""Real medical images for the image-reader tests (plain helpers, importable by any test; not a conftest).

pydicom's and nibabel's own test files, the pinned MedMNIST files beside the project, and writers that put
real pixels (never synthetic noise) into PNG, NIfTI and DICOM series files.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

DEFAULT_STUDY_DATE = "19990909"

LEAK_TAGS = (
    "LEAKTEST^PATIENT",
    "LEAKTEST",
    "LEAK-ID-4711",
    "19010101",
    "ACC-LEAK-99",
    "LEAK HOSPITAL",
    DEFAULT_STUDY_DATE,
)
"""Identifying values `write_dicom_series` writes by default: none may appear in an ImageInfo or error text."""


def pydicom_ct() -> Path:
    """pydicom's CT_small.dcm: one 128x128 CT slice, int16 with RescaleIntercept -1024."""
    return Path(get_testdata_file("CT_small.dcm"))


def pydicom_mr() -> Path:
    """pydicom's MR_small.dcm: one 64x64 MR slice, int16, no rescale."""
    return Path(get_testdata_file("MR_small.dcm"))


def pydicom_file(name: str) -> Path:
    """Any file bundled in pydicom/data/test_files (no download)."""
    found = get_testdata_file(name, download=False)
    if found is None:
        raise FileNotFoundError(name)
    return Path(found)


def nibabel_file(name: str) -> Path:
    """A file of nibabel/tests/data, e.g. ``anatomical.nii``, ``example4d.nii.gz``, ``standard.nii.gz``."""
    path = Path(nib.__file__).parent / "tests" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(name)
    return path


def medmnist_npz(name: str) -> Path:
    """A pinned MedMNIST file (pneumoniamnist, breastmnist, adrenalmnist3d) from ``MEDFED_SHARED_DATA``."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
    return Path(os.environ.get("MEDFED_SHARED_DATA", default)) / f"{name}.npz"


def medmnist_images(name: str, split: str = "train", count: int = 1) -> np.ndarray:
    """The first ``count`` images of a split: uint8 ``(count, 28, 28)`` or ``(count, 28, 28, 28)``."""
    with np.load(medmnist_npz(name)) as data:
        return np.asarray(data[f"{split}_images"][:count])


def write_png(image: np.ndarray, path: Path) -> Path:
    """uint8 ``(H, W)`` (grayscale), ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA) -> a PNG, rows as rows."""
    path = Path(path)
    Image.fromarray(np.asarray(image)).save(path)
    return path


def write_nifti(volume: np.ndarray, path: Path, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Path:
    """An array -> NIfTI-1 with a diagonal (RAS) affine of ``spacing``; gzipped when the name ends ``.gz``."""
    path = Path(path)
    volume = np.asarray(volume)
    affine = np.eye(4)
    for i, s in enumerate(spacing[:3]):
        affine[i, i] = s
    img = nib.Nifti1Image(volume, affine)
    img.header.set_zooms(tuple(spacing[: volume.ndim]) + (1.0,) * max(0, volume.ndim - len(spacing)))
    nib.save(img, path)
    return path


def write_dicom_series(
    volume: np.ndarray,
    folder: Path,
    *,
    patient_name: str = "LEAKTEST^PATIENT",
    patient_id: str = "LEAK-ID-4711",
    birth_date: str = "19010101",
    accession: str = "ACC-LEAK-99",
    institution: str = "LEAK HOSPITAL",
    study_date: str = DEFAULT_STUDY_DATE,
    series_uid: str | None = None,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    spacing: tuple[float, float, float] = (2.0, 0.75, 0.75),
    first_instance: int = 1,
) -> list[Path]:
    """Write one valid DICOM file per slice of ``volume`` (stored pixel values, ``(D, H, W)``, int16-able).

    Values in the file's units are ``stored * slope + intercept`` (HU for CT). Slice ``k`` is an axial image
    (ImageOrientationPatient 1,0,0,0,1,0: rows run towards patient posterior, columns towards patient left)
    at z = ``k * spacing[0]`` mm, with PixelSpacing ``spacing[1:]`` (row, column) and InstanceNumber
    ``first_instance + k``. CT Image Storage for CT (MR Image Storage for MR), explicit VR little endian,
    with the given patient tags. Returns the files written, in slice order.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError("volume must be (D, H, W)")
    stored = volume.astype(np.int16)
    if not np.array_equal(stored, volume):
        raise ValueError("volume values must fit int16")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    now = datetime.datetime(2020, 1, 2, 3, 4, 5)
    paths: list[Path] = []
    for k, plane in enumerate(stored):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth_date
        ds.PatientSex = "O"
        ds.AccessionNumber = accession
        ds.InstitutionName = institution
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.ContentDate = study_date
        ds.StudyTime = now.strftime("%H%M%S")
        ds.StudyID = "1"
        ds.Modality = modality
        ds.SeriesNumber = 1
        ds.InstanceNumber = first_instance + k
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[0])]
        ds.SliceLocation = float(k * spacing[0])
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.PixelData = np.ascontiguousarray(plane, dtype="<i2").tobytes()
        path = folder / f"slice_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
