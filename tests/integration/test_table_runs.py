"""Federated runs end to end on a site's own kind of data, built from real images: a PNG labels table with
natural hospitals, a NIfTI table and a DICOM-series table (real MedMNIST pixels and volumes, real labels), run
through the `medfed` command; and what must never leave a site: no DICOM patient tag and no case path in any
output, log or error.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.imaging_fixtures import LEAK_TAGS, medmnist_npz, write_dicom_series, write_nifti, write_png

HOSPITALS = ("St Mary", "Uni Clinic", "North")
SMALL = ["--pretrain-rounds", "1", "--finetune-rounds", "1", "--baselines", "none", "--width", "8",
         "--min-site-size", "2", "--loader-workers", "0"]


def write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def real_cases(name: str, counts: dict[str, int]) -> list[tuple[str, np.ndarray, int]]:
    """(split, image, label) for the first ``counts[split]`` images of each split of a pinned MedMNIST file."""
    with np.load(medmnist_npz(name)) as data:
        return [(split, data[f"{split}_images"][k], int(data[f"{split}_labels"][k, 0]))
                for split, n in counts.items() for k in range(n)]


@pytest.fixture(scope="module")
def png_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BreastMNIST as PNGs in three hospitals; every fourth train row unlabelled; patients named."""
    root = tmp_path_factory.mktemp("png")
    (root / "images").mkdir()
    rows = []
    for i, (split, image, label) in enumerate(real_cases("breastmnist", {"train": 120, "val": 30, "test": 45})):
        write_png(image, root / "images" / f"case{i:04d}.png")
        rows.append({"image": f"images/case{i:04d}.png", "label": "" if split == "train" and i % 4 == 0 else
                     str(label), "split": split, "site": HOSPITALS[i % 3], "patient": f"MRN-{900000 + i}"})
    return write_table(root / "labels.csv", rows)


@pytest.fixture(scope="module")
def nifti_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AdrenalMNIST3D volumes as .nii.gz (1.5 mm voxels); no split column: split with the run's seed."""
    root = tmp_path_factory.mktemp("nifti")
    rows = []
    for i, (_, volume, label) in enumerate(real_cases("adrenalmnist3d", {"train": 40, "val": 10, "test": 14})):
        write_nifti(volume, root / f"vol{i:03d}.nii.gz", spacing=(1.5, 1.5, 1.5))
        rows.append({"label": str(label), "image": f"vol{i:03d}.nii.gz"})  # columns in another order
    return write_table(root / "table.csv", rows)


@pytest.fixture(scope="module")
def dicom_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AdrenalMNIST3D volumes as CT DICOM series (one folder per case, HU = 4 * pixel - 1024) carrying the leak
    test's patient tags; the folders are named after a fake patient, as hospital exports often are."""
    root = tmp_path_factory.mktemp("dicom")
    rows = []
    for i, (split, volume, label) in enumerate(real_cases("adrenalmnist3d", {"train": 12, "val": 6, "test": 6})):
        folder = root / f"LEAKTEST_PATIENT_{i:02d}"
        write_dicom_series(volume.astype(np.int16) * 4, folder)
        rows.append({"image": folder.name, "label": str(label), "split": split})
    return write_table(root / "series.csv", rows)


def medfed(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medfed.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}, timeout=600)


def only_run_dir(out: Path) -> Path:
    runs = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def every_text(folder: Path) -> str:
    """Every file under ``folder`` as text (binary files decoded leniently: names can hide anywhere)."""
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.timeout(600)
def test_a_png_table_with_natural_hospitals_runs_end_to_end(png_table: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in png_table.parent.rglob("*"))
    done = medfed("simulate", "--data", str(png_table), "--partition", "natural", "--out-dir", str(tmp_path / "runs"),
                  *SMALL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    info = json.loads((run_dir / "data.json").read_text())
    assert info["source"] == "table" and info["sites_in_table"] == list(HOSPITALS)
    assert [s["hospital"] for s in info["sites"]] == list(HOSPITALS)  # num-sites came from the table: 3
    assert info["sizes"] == {"train": 120, "val": 30, "test": 45} and info["unlabelled"] == 30
    assert [s["train"] for s in info["sites"]] == [40, 40, 40]
    report = (run_dir / "report.md").read_text()
    assert "natural: the table's hospitals St Mary, Uni Clinic, North" in report and "0 (St Mary)" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["arms"]["federated-simclr"]["test"]["auc"] <= 1.0
    # the labelled subsets hold no unlabelled case, and every site trained on its own hospital's rows only
    split = json.loads((run_dir / "split.json").read_text())
    assert split["scheme"] == "natural" and split["site_names"] == list(HOSPITALS)
    outputs = every_text(run_dir) + done.stdout + done.stderr
    assert "MRN-9" not in outputs and "case0" not in outputs and "images/" not in outputs
    assert sorted(p.name for p in png_table.parent.rglob("*")) == before  # nothing written beside the data


@pytest.mark.timeout(600)
def test_a_nifti_table_runs_end_to_end_and_its_cache_is_reused(nifti_table: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["simulate", "--data", str(nifti_table), "--num-sites", "2", "--partition", "iid", "--image-size", "32",
            "--out-dir", str(tmp_path / "runs"), *SMALL]
    done = medfed(*args, cwd=tmp_path, env={"MEDFED_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((only_run_dir(tmp_path / "runs") / "data.json").read_text())
    assert info["spatial_shape"] == [32, 32, 32] and info["preprocessing"]["modalities_seen"] == ["nifti"]
    assert sum(info["sizes"].values()) == 64 and info["sizes"]["val"] >= 1 and info["sizes"]["test"] >= 1
    entries = sorted(cache.rglob("*.npy"))
    assert len(entries) == 64  # every case prepared once, at 32^3
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    again = medfed(*args, "--run-name", "again", cwd=tmp_path, env={"MEDFED_CACHE_DIR": str(cache)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in sorted(cache.rglob("*.npy"))} == stamps  # reused, not rebuilt


@pytest.mark.timeout(600)
def test_a_dicom_series_table_runs_and_no_patient_tag_or_path_leaves(dicom_table: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    done = medfed("simulate", "--data", str(dicom_table), "--num-sites", "2", "--partition", "iid",
                  "--image-size", "28", "--modality", "ct", "--ct-window-low", "-1024", "--ct-window-high", "0",
                  "--out-dir", str(tmp_path / "runs"), *SMALL, cwd=tmp_path, env={"MEDFED_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    info = json.loads((run_dir / "data.json").read_text())
    assert info["spatial_shape"] == [28, 28, 28] and info["preprocessing"]["modalities_seen"] == ["CT"]
    outputs = every_text(run_dir) + every_text(cache) + done.stdout + done.stderr
    for tag in LEAK_TAGS:
        assert tag not in outputs, tag
    assert "LEAKTEST_PATIENT" not in outputs  # the case folders' names (named after the patient)
    # inspection prints on the site's own machine: it may name the rows' folders, never a tag
    shown = medfed("inspect-data", str(dicom_table), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "cases: 24" in shown.stdout and "CT: 24" in shown.stdout and "3D: 24" in shown.stdout
    for tag in LEAK_TAGS:
        assert tag not in shown.stdout + shown.stderr, tag
