"""Bad data given to `medfed simulate` and `medfed inspect-data`: a clear error naming the row and the rule, exit
2, no traceback, no run directory, nothing written beside the data. Real images: BreastMNIST pixels as PNG,
AdrenalMNIST3D volumes as NIfTI and as DICOM series."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import run_config
from medfed.data.sources import load_dataset
from tests.imaging_fixtures import medmnist_images, write_dicom_series, write_nifti, write_png

PATIENT = "MRN-00042"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real BreastMNIST PNGs (labels alternate 0/1), two real volumes as NIfTI (one truncated), a DICOM folder
    mixing two series, a corrupt PNG."""
    root = tmp_path_factory.mktemp("cases")
    for i, image in enumerate(medmnist_images("breastmnist", count=24)):
        write_png(image, root / f"c{i}.png")
    volumes = medmnist_images("adrenalmnist3d", count=2)
    write_nifti(volumes[0], root / "vol.nii.gz")
    whole = gzip.compress(np.ascontiguousarray(volumes[1]).tobytes())  # a real .nii.gz, then cut in half
    write_nifti(volumes[1], root / "cut.nii.gz")
    data = (root / "cut.nii.gz").read_bytes()
    (root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    assert len(whole) > 0
    write_dicom_series(volumes[0][:4].astype(np.int16), root / "mixed")
    for path in write_dicom_series(volumes[1][:4].astype(np.int16), root / "other", first_instance=5):
        path.rename(root / "mixed" / f"other_{path.name}")  # a second series in the same folder
    (root / "other").rmdir()
    (root / "broken.png").write_bytes((root / "c0.png").read_bytes()[:60])
    return root


def table(folder: Path, name: str, rows: list[str], header: str = "image,label,split") -> Path:
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def good_rows(n: int = 24) -> list[str]:
    return [f"c{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]}" for i in range(n)]


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


CASES = [
    ("missing", [*good_rows(), "nowhere.png,1,train"], "row 26: the case's file or folder does not exist"),
    ("corrupt", [*good_rows(), "broken.png,1,train"], "row 26:"),
    ("mixed-dims", [*good_rows(), "vol.nii.gz,1,train"], "row 26: 3D images among 2D rows"),
    ("truncated", ["vol.nii.gz,0,train", "cut.nii.gz,1,train"], "row 3:"),
    ("mixed-series", ["vol.nii.gz,0,train", "mixed,1,train"], "mixes 2 series"),
    ("label", [*good_rows(), "c0.png,2,train"], "row 26"),
    ("empty", [], "holds no rows"),
    ("duplicate", [*good_rows(), "c1.png,1,val"], "row 26: the same row as row 3"),
    ("unlabelled-test", [*good_rows(), "vol.nii.gz,,test"], "row 26"),
]


@pytest.mark.parametrize(("name", "rows", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_refused_before_anything_is_written(folder: Path, tmp_path: Path, name: str, rows: list[str],
                                                        message: str) -> None:
    path = table(folder, f"{name}.csv", rows)
    before = sorted(p.name for p in folder.rglob("*"))
    extra = ["--num-classes", "2"] if name == "label" else []
    code, said = run_cli("simulate", "--data", str(path), "--out-dir", str(tmp_path / "runs"), "--image-size", "28",
                         "--loader-workers", "0", *extra)
    assert code == 2 and message in said, said
    assert "Traceback" not in said and "error: " in said
    assert not (tmp_path / "runs").exists()
    code, shown = run_cli("inspect-data", str(path), "--loader-workers", "0", *extra)
    assert code == 2 and "Traceback" not in shown
    assert sorted(p.name for p in folder.rglob("*")) == before  # nothing beside the data, also not the table's


def test_inspect_data_reports_every_case_and_skip_lets_bad_cases_through(folder: Path) -> None:
    path = table(folder, "report.csv", [*[f"c{i}.png,{i % 2},,site{i % 2},p{i}" for i in range(20)],
                                         "c20.png,,,site0,p20", "nowhere.png,1,,site1,p21", "broken.png,0,,site1,p22"],
                 header="image,label,split,site,patient")
    code, said = run_cli("inspect-data", str(path), "--loader-workers", "0")
    assert code == 2
    for fact in ("cases: 23", "readable: 21", "unlabelled: 1", "per site: site0: 11, site1: 12", "dimensions: 2D: 21",
                 "shapes: 28x28: 21", "modalities: photo: 21", "unreadable: row 23 (nowhere.png): file not found",
                 "unreadable: row 24 (broken.png)"):
        assert fact in said, fact
    code, _ = run_cli("inspect-data", str(path), "--loader-workers", "0", "--on-bad-case", "skip")
    assert code == 0
    result = CliRunner().invoke(app, ["inspect-data", str(path), "--json", "--on-bad-case", "skip",
                                      "--loader-workers", "0"])
    report = json.loads(result.stdout)
    assert report["per_class"] == {"0": 11, "1": 11} and len(report["unreadable_cases"]) == 2  # the table's labels


def test_skipping_bad_cases_leaves_them_out_and_counts_them(folder: Path) -> None:
    path = table(folder, "skip.csv", [*good_rows(), "nowhere.png,1,train", "broken.png,0,train"])
    cfg = run_config(data=str(path), on_bad_case="skip", loader_workers=0)
    data = load_dataset(cfg, progress=False)
    assert sum(len(data.split(s)) for s in ("train", "val", "test")) == 24
    assert data.notes["skipped_rows"] == [26, 27]
    with pytest.raises(Exception, match=r"2 case\(s\) cannot be read \(row 26: the case.s file or folder does not "
                                        r"exist; row 27"):
        load_dataset(cfg.replace(on_bad_case="fail"), progress=False)


def test_a_patients_rows_stay_in_one_split_when_the_run_splits_them(folder: Path) -> None:
    rows = [f"c{i}.png,{i % 2},p{i // 3}" for i in range(24)]  # 8 patients, 3 rows each
    path = table(folder, "patients.csv", rows, header="image,label,patient")
    data = load_dataset(run_config(data=str(path), loader_workers=0, val_fraction=0.25, test_fraction=0.25),
                        progress=False)
    sizes = {s: len(data.split(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 6, "test": 6}  # whole patients: 4, 2 and 2 of them
    again = load_dataset(run_config(data=str(path), loader_workers=0, val_fraction=0.25, test_fraction=0.25),
                         progress=False)
    assert again.sha256 == data.sha256  # the seed decides the split
    other = load_dataset(run_config(data=str(path), loader_workers=0, val_fraction=0.25, test_fraction=0.25,
                                    seed=1), progress=False)
    assert other.sha256 != data.sha256


def test_split_sites_cuts_a_table_into_site_tables_by_hospital_or_by_patient(folder: Path, tmp_path: Path) -> None:
    rows = [f"c{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]},{('north', 'south')[i % 2]},p{i // 2}"
            for i in range(24)]
    path = table(folder, "hospitals.csv", rows, header="image,label,split,site,patient")
    code, said = run_cli("split-sites", "--data", str(path), "--partition", "natural", "--out", str(tmp_path / "n"),
                         "--min-site-size", "1")
    assert code == 2 and "rows 2, 3: one patient in more than one" in said  # p0 = rows c0 and c1
    rows = [f"c{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]},{('north', 'south')[i % 2]},p{i}" for i in range(24)]
    path = table(folder, "hospitals.csv", rows, header="image,label,split,site,patient")
    code, said = run_cli("split-sites", "--data", str(path), "--partition", "natural", "--out", str(tmp_path / "n"))
    assert code == 0, said
    sites = json.loads((tmp_path / "n" / "sites.json").read_text())["sites"]
    assert {k: v["rows"] for k, v in sites.items()} == {"north": 12, "south": 12}
    north = (tmp_path / "n" / "site0" / "labels.csv").read_text().splitlines()
    assert north[0] == "image,label,split,patient" and north[1] == f"{folder / 'c0.png'},0,train,p0"
    code, said = run_cli("split-sites", "--data", str(path), "--sites", "h1,h2,h3", "--out", str(tmp_path / "i"),
                         "--min-site-size", "4")
    assert code == 0, said
    cut = [(tmp_path / "i" / s / "labels.csv").read_text().splitlines()[1:] for s in ("h1", "h2", "h3")]
    expected = [f"{folder / f'c{i}.png'},{i % 2},{('train', 'val', 'test')[i % 3]},p{i}" for i in range(24)]
    assert sorted(r for part in cut for r in part) == sorted(expected)
    assert [len(p) for p in cut] == [8, 8, 8]
    site = load_dataset(run_config(data=str(tmp_path / "i" / "h1" / "labels.csv"), loader_workers=0), progress=False)
    assert sum(len(site.split(s)) for s in ("train", "val", "test")) == 8


def test_the_same_image_under_two_names_in_two_splits_is_refused(folder: Path, tmp_path: Path) -> None:
    copy = folder / "copy_of_c0.png"
    copy.write_bytes((folder / "c0.png").read_bytes())
    try:
        path = table(folder, "leak.csv", [*good_rows(), "copy_of_c0.png,0,test"])
        with pytest.raises(Exception, match=r"row 2 and row 26: the same image \(identical bytes\) in train and test"):
            load_dataset(run_config(data=str(path), loader_workers=0), progress=False)
        same_split = table(folder, "twice.csv", [*good_rows(), "copy_of_c0.png,0,train"])
        assert len(load_dataset(run_config(data=str(same_split), loader_workers=0), progress=False).train) == 9
    finally:
        copy.unlink()


def test_identical_images_in_two_splits_are_left_out_with_skip(folder: Path) -> None:
    copy = folder / "again_c0.png"
    copy.write_bytes((folder / "c0.png").read_bytes())
    try:
        path = table(folder, "leak-skip.csv", [*good_rows(), "again_c0.png,0,test"])
        data = load_dataset(run_config(data=str(path), loader_workers=0, on_bad_case="skip"), progress=False)
        assert data.notes["skipped_rows"] == [26] and len(data.test) == 8
    finally:
        copy.unlink()


@pytest.mark.parametrize(("column", "values", "rule"), [
    ("split", ("train", "test"), "one patient in more than one split"),
    ("site", ("north", "south"), "one patient in more than one site"),
])
def test_a_patient_in_two_splits_or_sites_is_refused_by_the_cli(folder: Path, tmp_path: Path, column: str,
                                                                values: tuple[str, str], rule: str) -> None:
    rows = [f"c{i}.png,{i % 2},{values[i % 2]},{PATIENT if i < 2 else f'p{i}'}" for i in range(24)]
    path = table(folder, f"patient-{column}.csv", rows, header=f"image,label,{column},patient")
    code, said = run_cli("simulate", "--data", str(path), "--out-dir", str(tmp_path / "runs"), "--loader-workers", "0")
    assert code == 2 and f"rows 2, 3: {rule}" in said and PATIENT not in said
    assert not (tmp_path / "runs").exists()


def test_the_report_names_the_rows_left_out() -> None:
    from medfed.experiment.report import _skipped

    assert _skipped({"notes": {}}) == ""
    said = _skipped({"notes": {"skipped_rows": [26, 27]}})
    assert said == " Left out (on-bad-case skip): 2 row(s) of the table: 26, 27."
    assert _skipped({"notes": {"skipped_rows": list(range(2, 30))}}).endswith("21 and 8 more.")
