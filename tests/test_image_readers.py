"""medfed.data.images: reading real medical images (DICOM, NIfTI, PNG) with MONAI and preparing them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from imaging_fixtures import (
    LEAK_TAGS,
    medmnist_images,
    nibabel_file,
    pydicom_ct,
    pydicom_file,
    pydicom_mr,
    write_dicom_series,
    write_nifti,
    write_png,
)
from PIL import Image
from pydicom.pixels import apply_modality_lut

from medfed.constants import ImageFit, Modality
from medfed.data.images import (
    READER_VERSION,
    ImageInfo,
    Preprocess,
    UnreadableImage,
    image_kind,
    probe_image,
    read_image,
)
from medfed.exceptions import ConfigError, DataError

CROP = ImageFit.CROP_PAD


def _no_leak(text: str, *paths: Path, extra: tuple[str, ...] = ()) -> None:
    """None of the identifying test values, UIDs or paths (nor file names) appear in ``text``."""
    for value in (*LEAK_TAGS, *extra):
        assert value.lower() not in text.lower(), (value, text)
    for p in paths:
        assert str(p) not in text, text
        assert p.name not in text, text


@pytest.fixture(scope="module")
def pneumonia() -> np.ndarray:
    """One real PneumoniaMNIST chest X-ray, uint8 (28, 28), rows as in the file."""
    return medmnist_images("pneumoniamnist")[0]


@pytest.fixture(scope="module")
def adrenal_hu() -> np.ndarray:
    """A real AdrenalMNIST3D shape mask (D, H, W) in plausible HU: adrenal tissue 40, surrounding fat -100."""
    mask = medmnist_images("adrenalmnist3d")[0]
    assert set(np.unique(mask).tolist()) == {0, 255}
    return np.where(mask > 0, 40, -100).astype(np.int16)


@pytest.fixture()
def series(tmp_path: Path, adrenal_hu: np.ndarray) -> Path:
    folder = tmp_path / "ct_study_folder"
    write_dicom_series(adrenal_hu + 1024, folder)  # stored = HU - intercept (-1024), slope 1
    return folder


def _ct_window(hu: np.ndarray, low: float = -1000.0, high: float = 1000.0) -> np.ndarray:
    return np.clip((np.asarray(hu, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- DICOM files


def test_ct_small_hounsfield_window() -> None:
    out, info = read_image(pydicom_ct(), Preprocess((128, 128), CROP, Modality.CT))
    ds = pydicom.dcmread(pydicom_ct())
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert out.shape == (1, 128, 128) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], _ct_window(hu), atol=1e-6)
    raw = ds.pixel_array
    for r, c in [(0, 0), (64, 64), (10, 100), (127, 5)]:  # by hand: HU = raw * 1 - 1024, window -1000..1000
        expected = min(max((int(raw[r, c]) - 1024 + 1000) / 2000, 0.0), 1.0)
        assert out[0, r, c] == pytest.approx(expected, abs=1e-6)
    assert np.abs(out[0] - _ct_window(raw)).max() > 0.4  # without the rescale it would differ
    assert out[0].min() == pytest.approx((-896 + 1000) / 2000, abs=1e-6)  # CT_small's lowest HU is -896
    assert info == ImageInfo(2, 1, (128, 128), (0.661468, 0.661468), "CT", "dicom")
    auto, _ = read_image(pydicom_ct(), Preprocess((128, 128), CROP))  # AUTO: DICOM CT -> the HU window
    np.testing.assert_array_equal(auto, out)
    identifying = [str(ds.get(k)) for k in ("PatientName", "PatientID", "InstitutionName", "StudyDate")]
    identifying += [str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)]
    assert all(v and v not in repr(info) for v in identifying)


def test_mr_small_auto_percentiles() -> None:
    out, info = read_image(pydicom_mr(), Preprocess((64, 64), CROP))
    px = pydicom.dcmread(pydicom_mr()).pixel_array.astype(np.float64)
    low, high = np.percentile(px, [1, 99])
    assert high > low + 100
    np.testing.assert_allclose(out[0], np.clip((px - low) / (high - low), 0, 1), atol=1e-5)
    assert out.min() == 0.0 and out.max() == 1.0
    assert (out == 1.0).mean() == pytest.approx(0.01, abs=0.005)  # the top 1 % is clipped to 1
    assert info.modality == "MR" and info.spacing == (0.3125, 0.3125)


def test_big_endian_dicom_reads_like_little_endian() -> None:
    prep = Preprocess((64, 64), CROP)
    big, _ = read_image(pydicom_file("MR_small_bigendian.dcm"), prep)
    little, _ = read_image(pydicom_mr(), prep)
    np.testing.assert_array_equal(big, little)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_ct())
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    prep = Preprocess((128, 128), CROP, Modality.CT)
    plain, _ = read_image(pydicom_ct(), prep)
    inverted, _ = read_image(tmp_path / "inverted.dcm", prep)
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def test_extensionless_dicom_found_by_preamble(tmp_path: Path) -> None:
    target = tmp_path / "IM0001"
    shutil.copy(pydicom_ct(), target)
    assert image_kind(target) == "dicom"
    assert probe_image(target).modality == "CT"


def test_truncated_dicom_refused_without_path(tmp_path: Path) -> None:
    target = tmp_path / "cut.dcm"
    shutil.copy(pydicom_file("MR_truncated.dcm"), target)
    with pytest.raises(UnreadableImage, match="pixel data") as err:
        probe_image(target)
    _no_leak(str(err.value), target)


def test_non_image_dicom_refused() -> None:
    with pytest.raises(UnreadableImage, match="without image pixels"):
        probe_image(pydicom_file("rtplan.dcm"))
    with pytest.raises(UnreadableImage, match="multi-frame"):
        probe_image(pydicom_file("SC_rgb_rle_2frame.dcm"))


# ---------------------------------------------------------------------------------------------- NIfTI


def test_nifti_reoriented_to_ras() -> None:
    path = nibabel_file("anatomical.nii")
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")  # stored LAS: RAS flips the first axis
    out, info = read_image(path, Preprocess((40, 48, 32), CROP))
    assert info == ImageInfo(3, 1, (33, 41, 25), (2.0, 2.0, 2.0), "nifti", "nifti")
    canonical = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float64)
    low, high = np.percentile(canonical, [1, 99])
    expected = np.clip((canonical - low) / (high - low), 0, 1)
    inner = out[0, 3:36, 3:44, 3:28]  # centre pad 33->40, 41->48, 25->32: 3 before each
    np.testing.assert_allclose(inner, expected, atol=1e-5)
    assert np.abs(inner - expected[::-1]).max() > 0.5  # the stored (LAS) order would not match
    assert out[0, :3].max() == 0.0 and out[0, 36:].max() == 0.0  # zero padding


def test_4d_nifti_refused() -> None:
    with pytest.raises(UnreadableImage, match=r"4D .*only 2D and 3D images"):
        probe_image(nibabel_file("example4d.nii.gz"))


def test_truncated_nifti_gz_fails_probe(tmp_path: Path) -> None:
    volume = medmnist_images("adrenalmnist3d")[0]
    whole = write_nifti(volume, tmp_path / "case.nii.gz", spacing=(1.0, 1.0, 2.0))
    assert probe_image(whole) == ImageInfo(3, 1, (28, 28, 28), (1.0, 1.0, 2.0), "nifti", "nifti")
    data = whole.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert nib.load(cut).shape == (28, 28, 28)  # the header still reads
    with pytest.raises(UnreadableImage) as err:
        probe_image(cut)
    assert "EOFError" in str(err.value)
    _no_leak(str(err.value), cut)


def test_nifti_photo_and_2d_nifti(tmp_path: Path, pneumonia: np.ndarray) -> None:
    volume = medmnist_images("adrenalmnist3d")[0]
    out, _ = read_image(write_nifti(volume, tmp_path / "v.nii"), Preprocess((28, 28, 28), modality=Modality.PHOTO))
    np.testing.assert_array_equal(out[0], volume / np.float32(255))
    flat = write_nifti(pneumonia[:, :, None], tmp_path / "flat.nii.gz")  # (H, W, 1) is a 2D image
    out, info = read_image(flat, Preprocess((28, 28), modality=Modality.PHOTO))
    assert info.dims == 2 and info.shape == (28, 28)
    np.testing.assert_array_equal(out[0], pneumonia / np.float32(255))


def test_sparse_and_constant_images_have_no_division_by_zero(tmp_path: Path) -> None:
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[14:16, 14:16, 14:16] = 200  # 8 voxels: the 1st and 99th percentiles are both 0
    out, _ = read_image(write_nifti(mask, tmp_path / "sparse.nii"), Preprocess((30, 30, 30), CROP))
    assert sorted(np.unique(out).tolist()) == [0.0, 1.0] and out.sum() == 8
    out, _ = read_image(write_nifti(np.full((30, 30), 7, np.int16), tmp_path / "c.nii"), Preprocess((28, 28)))
    assert np.isfinite(out).all() and out.max() == 0.0


# ---------------------------------------------------------------------------------------------- PNG / JPEG / TIFF


def test_png_rows_stay_rows(tmp_path: Path, pneumonia: np.ndarray) -> None:
    assert not np.array_equal(pneumonia, pneumonia.T)  # asymmetric: a transpose would show
    path = write_png(pneumonia, tmp_path / "xray.png")
    out, info = read_image(path, Preprocess((28, 28), modality=Modality.PHOTO))
    np.testing.assert_array_equal(out[0], pneumonia / np.float32(255))
    assert info == ImageInfo(2, 1, (28, 28), (1.0, 1.0), "photo", "png")
    auto, _ = read_image(path, Preprocess((28, 28)))  # AUTO: a picture -> PHOTO
    np.testing.assert_array_equal(auto, out)


def test_png_resize_keeps_content(tmp_path: Path, pneumonia: np.ndarray) -> None:
    path = write_png(pneumonia, tmp_path / "xray.png")
    big, _ = read_image(path, Preprocess((64, 64)))
    assert big.shape == (1, 64, 64) and big.dtype == np.float32 and 0.0 <= big.min() and big.max() <= 1.0
    double, _ = read_image(path, Preprocess((56, 56)))
    blocks = double[0].reshape(28, 2, 28, 2).mean(axis=(1, 3))  # 2x bilinear then 2x2 means ~ the original
    truth = pneumonia / 255.0
    assert np.abs(blocks - truth).mean() < 0.02
    assert np.abs(blocks - truth.T).mean() > 0.05


def test_png_colour_modes(tmp_path: Path, pneumonia: np.ndarray) -> None:
    rgb = np.stack([pneumonia, pneumonia[::-1], pneumonia.T], axis=-1)
    expected = np.moveaxis(rgb, -1, 0) / np.float32(255)
    prep = Preprocess((28, 28))
    out, info = read_image(write_png(rgb, tmp_path / "rgb.png"), prep)
    assert info.channels == 3
    np.testing.assert_array_equal(out, expected)
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 9, np.uint8)], axis=-1)
    out, info = read_image(write_png(rgba, tmp_path / "rgba.png"), prep)
    assert info.channels == 3
    np.testing.assert_array_equal(out, expected)  # alpha dropped, colours untouched
    Image.fromarray(np.stack([pneumonia, np.full_like(pneumonia, 255)], -1), "LA").save(tmp_path / "la.png")
    out, info = read_image(tmp_path / "la.png", prep)
    assert info.channels == 1
    np.testing.assert_array_equal(out[0], pneumonia / np.float32(255))
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    out, info = read_image(tmp_path / "palette.png", prep)
    assert info.channels == 3 and out.shape == (3, 28, 28)
    deep = pneumonia.astype(np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    out, _ = read_image(tmp_path / "deep.png", prep)
    np.testing.assert_array_equal(out[0], deep / np.float32(65535))


def test_tiff_and_jpeg(tmp_path: Path, pneumonia: np.ndarray) -> None:
    Image.fromarray(pneumonia).save(tmp_path / "x.tif")
    out, info = read_image(tmp_path / "x.tif", Preprocess((28, 28)))
    assert info.kind == "tiff"
    np.testing.assert_array_equal(out[0], pneumonia / np.float32(255))
    Image.fromarray(pneumonia).save(tmp_path / "x.jpg", quality=95)
    out, info = read_image(tmp_path / "x.jpg", Preprocess((28, 28)))
    assert info.kind == "jpeg" and np.abs(out[0] - pneumonia / 255.0).mean() < 0.02  # lossy


def test_corrupt_png_missing_and_unsupported(tmp_path: Path, pneumonia: np.ndarray) -> None:
    data = write_png(pneumonia, tmp_path / "good.png").read_bytes()
    for name, cut in (("half_patient.png", len(data) // 2), ("head_patient.png", 30)):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(UnreadableImage) as err:
            probe_image(tmp_path / name)
        _no_leak(str(err.value), tmp_path / name)
    with pytest.raises(UnreadableImage, match="^file not found$"):
        probe_image(tmp_path / "absent.png")
    with pytest.raises(UnreadableImage, match="^file not found$"):
        read_image(tmp_path / "absent", Preprocess((28, 28)))
    (tmp_path / "notes.Smith").write_text("not an image")
    with pytest.raises(UnreadableImage, match="unsupported file type") as err:
        probe_image(tmp_path / "notes.Smith")
    assert "Smith" not in str(err.value)
    assert issubclass(UnreadableImage, DataError)


# ---------------------------------------------------------------------------------------------- DICOM series


def test_dicom_series_volume_in_hu_and_ras(series: Path, adrenal_hu: np.ndarray) -> None:
    out, info = read_image(series, Preprocess((28, 28, 28), CROP, Modality.CT))
    assert info == ImageInfo(3, 1, (28, 28, 28), (0.75, 0.75, 2.0), "CT", "dicom-series")
    # Slices at z = 2k mm (superior with k); rows run to patient posterior and columns to patient left
    # (IOP 1,0,0,0,1,0), so RAS order is (column reversed, row reversed, slice).
    expected = _ct_window(adrenal_hu)[:, ::-1, ::-1].transpose(2, 1, 0)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    assert np.abs(out[0] - _ct_window(adrenal_hu).transpose(2, 1, 0)).max() > 0.05  # unoriented differs
    assert np.unique(out).astype(float).round(4).tolist() == [0.45, 0.52]  # -100 HU and 40 HU: rescale applied
    resampled, _ = read_image(series, Preprocess((28, 28, 28), CROP, Modality.CT, spacing=1.5))
    assert resampled.shape == (1, 28, 28, 28)
    # 0.75 x 0.75 x 2 mm -> 1.5 mm isotropic (14 x 14 x 37 voxels, all inside 28^3): a voxel holds 3x the volume
    ratio = (resampled[0] > 0.5).sum() / (out[0] > 0.5).sum()
    assert ratio == pytest.approx(1 / 3, abs=0.05)


def test_dicom_series_mixed_refused_without_uid(tmp_path: Path, adrenal_hu: np.ndarray) -> None:
    folder, other = tmp_path / "mixed", tmp_path / "other"
    files = write_dicom_series(adrenal_hu[:4] + 1024, folder)
    for i, p in enumerate(write_dicom_series(adrenal_hu[4:8] + 1024, other)):
        p.rename(folder / f"b_{i}.dcm")
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in folder.iterdir()}
    assert len(uids) == 2
    with pytest.raises(UnreadableImage, match="mixes 2 series; a folder must hold exactly one series") as err:
        probe_image(folder)
    _no_leak(str(err.value), folder, *files, extra=tuple(uids))


def test_dicom_folder_rules(tmp_path: Path, adrenal_hu: np.ndarray, pneumonia: np.ndarray) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnreadableImage, match="folder is empty"):
        probe_image(empty)
    assert image_kind(empty) == "dicom-series"
    folder = tmp_path / "with_png"
    write_dicom_series(adrenal_hu[:5] + 1024, folder)
    write_png(pneumonia, folder / "snapshot.png")
    with pytest.raises(UnreadableImage, match="1 file.* not DICOM") as err:
        probe_image(folder)
    _no_leak(str(err.value), folder, folder / "snapshot.png")
    gap = tmp_path / "gap"
    files = write_dicom_series(adrenal_hu[:6] + 1024, gap)
    files[3].unlink()
    with pytest.raises(UnreadableImage, match="unevenly spaced"):
        probe_image(gap)


def test_no_identifying_value_leaks_from_reader_errors(
    series: Path, monkeypatch: pytest.MonkeyPatch, adrenal_hu: np.ndarray
) -> None:
    ok = probe_image(series)
    _no_leak(repr(ok), series)

    def boom(ds: pydicom.Dataset) -> np.ndarray:  # a decoder whose message quotes the header, as some do
        raise ValueError(
            f"cannot decode {ds.filename}: {ds.PatientName} ({ds.PatientID}), born {ds.PatientBirthDate}, "
            f"accession {ds.AccessionNumber} at {ds.InstitutionName} on '{ds.StudyDate}', uid {ds.SOPInstanceUID}"
        )

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    uid = str(pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    with pytest.raises(UnreadableImage, match="ValueError: cannot decode <file>") as err:
        probe_image(series)
    _no_leak(str(err.value), series, *series.iterdir(), extra=(uid, "1.2.826.0.1.3680043"))
    assert err.value.__cause__ is None and err.value.__suppress_context__


# ---------------------------------------------------------------------------------------------- sizes and settings


def test_crop_pad_versus_resize() -> None:
    full, _ = read_image(pydicom_ct(), Preprocess((128, 128), CROP, Modality.CT))
    cropped, _ = read_image(pydicom_ct(), Preprocess((64, 64), CROP, Modality.CT))
    np.testing.assert_array_equal(cropped, full[:, 32:96, 32:96])
    resized, _ = read_image(pydicom_ct(), Preprocess((64, 64), ImageFit.RESIZE, Modality.CT))
    assert resized.shape == (1, 64, 64)
    assert abs(float(resized.mean()) - float(full.mean())) < 0.01  # the whole field of view, not its centre
    assert abs(float(cropped.mean()) - float(full.mean())) > 0.02
    padded, _ = read_image(pydicom_ct(), Preprocess((160, 96), CROP, Modality.CT))
    np.testing.assert_array_equal(padded[:, 16:144], full[:, :, 16:112])
    assert padded[:, :16].max() == 0.0


def test_dimension_mismatch_refused(tmp_path: Path, pneumonia: np.ndarray, series: Path) -> None:
    with pytest.raises(UnreadableImage, match="^a 2D image in a 3D run$"):
        read_image(write_png(pneumonia, tmp_path / "x.png"), Preprocess((28, 28, 28)))
    with pytest.raises(UnreadableImage, match="^a 3D image in a 2D run$"):
        read_image(series, Preprocess((28, 28)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size": (27, 64)}, "size"),
        ({"size": (225, 64)}, "size"),
        ({"size": (64, 64, 129)}, "size"),
        ({"size": (64,)}, "size"),
        ({"size": (64, 64, 64, 64)}, "size"),
        ({"size": (64.0, 64)}, "size"),
        ({"size": (64, 64), "fit": "stretch"}, "fit"),
        ({"size": (64, 64), "modality": "pet"}, "modality"),
        ({"size": (64, 64), "ct_window": (400.0, 400.0)}, "ct_window"),
        ({"size": (64, 64), "ct_window": (500.0, -500.0)}, "ct_window"),
        ({"size": (64, 64), "ct_window": (float("nan"), 1.0)}, "ct_window"),
        ({"size": (64, 64), "mr_percentiles": (99.0, 1.0)}, "mr_percentiles"),
        ({"size": (64, 64), "mr_percentiles": (-1.0, 99.0)}, "mr_percentiles"),
        ({"size": (64, 64), "mr_percentiles": (1.0, 100.5)}, "mr_percentiles"),
        ({"size": (64, 64), "spacing": -1.0}, "spacing"),
        ({"size": (64, 64), "spacing": float("inf")}, "spacing"),
    ],
)
def test_preprocess_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Preprocess(**kwargs)


def test_preprocess_fingerprint_and_dict() -> None:
    base = Preprocess((64, 64))
    assert base.fingerprint() == Preprocess((64, 64)).fingerprint()
    assert len(base.fingerprint()) == 64 and READER_VERSION >= 1
    assert Preprocess([64, 64], "resize", "auto", [-1000, 1000], [1, 99], 0) == base  # type: ignore[arg-type]
    variants = [
        Preprocess((64, 65)),
        Preprocess((64, 64, 64)),
        replace(base, fit=ImageFit.CROP_PAD),
        replace(base, modality=Modality.CT),
        replace(base, ct_window=(-1000.0, 999.0)),
        replace(base, mr_percentiles=(0.5, 99.0)),
        replace(base, spacing=1.0),
    ]
    prints = {v.fingerprint() for v in variants} | {base.fingerprint()}
    assert len(prints) == len(variants) + 1
    data = json.loads(json.dumps(base.to_dict()))
    assert data == {
        "size": [64, 64],
        "fit": "resize",
        "modality": "auto",
        "ct_window": [-1000.0, 1000.0],
        "mr_percentiles": [1.0, 99.0],
        "spacing": 0.0,
    }
    assert Preprocess.from_dict(data) == base and Preprocess.from_dict(data).fingerprint() == base.fingerprint()
    with pytest.raises(ConfigError, match="unknown keys: colour"):
        Preprocess.from_dict({**data, "colour": 1})
