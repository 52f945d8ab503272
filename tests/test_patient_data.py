"""Attacks on what leaves a site (found by review, each must stay fixed): a DICOM tag holding free text in an
error, a free-text Modality, pydicom logging a malformed birth date, a server choosing where a site writes, a
file name with quotes in a library's error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfed.config import run_config
from medfed.data.images import Preprocess, UnreadableImage, probe_image, read_image
from medfed.task.site_round import read_message_config
from tests.imaging_fixtures import medmnist_images, pydicom_ct, write_dicom_series, write_png

NAME = "DOE^JANE 4711"


def series(tmp_path: Path, **tags: str) -> Path:
    """A real AdrenalMNIST3D volume as a CT series, with ``tags`` set on every slice."""
    folder = tmp_path / "series"
    for path in write_dicom_series(medmnist_images("adrenalmnist3d", count=1)[0][:6].astype(np.int16), folder):
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return folder


def test_a_free_text_photometric_interpretation_is_not_quoted(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage) as info:
        probe_image(series(tmp_path, PhotometricInterpretation=NAME))
    said = str(info.value)
    assert "PhotometricInterpretation missing or not a defined term" in said
    assert "DOE" not in said and "4711" not in said


def test_a_free_text_modality_becomes_other(tmp_path: Path) -> None:
    info = probe_image(series(tmp_path, Modality="MRN4711DOE"))
    assert info.modality == "OT" and "4711" not in repr(info)
    assert probe_image(series(tmp_path / "b", Modality="MR")).modality == "MR"


def test_pydicom_does_not_log_malformed_identifying_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = pydicom.dcmread(pydicom_ct())
    ds.PatientBirthDate = "01/02/1960"  # a common non-standard form (DA wants YYYYMMDD)
    ds.AccessionNumber = "ACC-0000000000000000-DOE-JANE"  # longer than SH allows
    ds.StudyDate = "2020.01.02"
    ds.save_as(tmp_path / "x.dcm")
    caplog.clear()  # writing the fixture may warn; reading it must not
    with caplog.at_level(logging.DEBUG):
        read_image(tmp_path / "x.dcm", Preprocess(size=(64, 64)))
    # pydicom's validation messages quote values (or say which tag broke which rule): none while medfed reads
    assert not [r for r in caplog.records if r.name.startswith("pydicom")], caplog.text


def test_a_message_cannot_choose_a_sites_cache_folder_or_other_centre_settings() -> None:
    flat = {**run_config().site_settings(), "cache-dir": "/data/dicom/DOE_JANE_1960", "out-dir": "/tmp/x",
            "ledger-dir": "/elsewhere", "num-classes": 7}
    cfg, _ = read_message_config(flat)
    assert cfg.images.cache_dir == "" and cfg.output.out_dir == "runs" and cfg.privacy.ledger_dir == ""
    assert cfg.dataset.num_classes == 0


def test_a_file_name_with_quotes_is_struck_from_a_readers_error(tmp_path: Path) -> None:
    path = tmp_path / "O'Brien \"Pat\" 1960.png"
    write_png(medmnist_images("breastmnist", count=1)[0], path)
    path.write_bytes(path.read_bytes()[:50])  # truncated: PIL's error quotes the path
    with pytest.raises(UnreadableImage) as info:
        read_image(path, Preprocess(size=(28, 28)))
    assert "Brien" not in str(info.value) and "1960" not in str(info.value) and "Pat" not in str(info.value)
