"""A site's cases from a MONAI/Decathlon datalist or from class folders (`medfed.data.datalists`): real
BreastMNIST pixels written out as PNG, listed in a dataset.json or sorted into class folders; the conventions a
user relies on, and bad inputs refused naming the file, the entry and the rule (never a patient's identifier)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.constants import TaskType
from medfed.data.datalists import (
    is_table_source,
    natural_key,
    read_class_folders,
    read_decathlon_datalist,
    read_source,
)
from medfed.exceptions import DataError

PATIENT_ID = "MRN-0042-Doe"  # must never appear in an error


@pytest.fixture(scope="module")
def pixels(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Eight real BreastMNIST training images (28x28 uint8), four of label 0 then four of label 1."""
    data = np.load(shared_data / "breastmnist.npz")
    images, labels = data["train_images"], data["train_labels"].ravel()
    order = [*np.flatnonzero(labels == 0)[:4], *np.flatnonzero(labels == 1)[:4]]
    return images[order], labels[order]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, pixels: tuple[np.ndarray, np.ndarray]) -> Path:
    """A site folder: images/case0.png .. case7.png (labels 0,0,0,0,1,1,1,1)."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "images").mkdir()
    for i, image in enumerate(pixels[0]):
        Image.fromarray(image).save(folder / "images" / f"case{i}.png")
    return folder


def datalist(folder: Path, content: object, name: str = "dataset.json") -> Path:
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_a_datalist_with_training_validation_and_test_lists(site: Path, pixels: tuple[np.ndarray, np.ndarray],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = [int(v) for v in pixels[1]]
    absolute = str((site / "images" / "case5.png").resolve())
    content = {
        "name": "BreastMNIST as PNG", "numTraining": 4,  # metadata: ignored
        "training": [
            {"image": "images/case0.png", "label": labels[0], "site": "St Mary", "patient": PATIENT_ID},
            {"image": "./images/../images/case4.png", "label": labels[4], "site": "St Mary",
             "patient": PATIENT_ID},
            {"image": "images/case1.png", "label": labels[1], "split": "Test", "site": "Charité", "patient": 17},
            {"image": "images/case6.png", "label": labels[6], "fold": 2},
        ],
        "validation": [{"image": absolute, "label": labels[5]}, {"image": "images/case2.png", "label": None}],
        "test": [{"image": "images/case3.png", "label": labels[3]}, {"image": "images/case7.png"}],
    }
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the JSON's folder, not the working folder
    t = read_decathlon_datalist(datalist(site, content))
    assert t.task == TaskType.BINARY and t.num_classes == 2 and t.class_names == ()
    assert [c.row for c in t.cases] == list(range(1, 9))
    assert [c.image.name for c in t.cases] == [f"case{i}.png" for i in (0, 4, 1, 6, 5, 2, 3, 7)]
    assert [c.label for c in t.cases] == [0, 1, 0, 1, 1, None, 0, None]
    # training: split later unless the entry names one; validation: val; test: test, but unlabelled -> ""
    assert [c.split for c in t.cases] == ["", "", "test", "", "val", "val", "test", ""]
    assert t.cases[0].image == (site / "images" / "case0.png").resolve()
    assert t.cases[1].image == (site / "images" / "case4.png").resolve()  # normalised by MONAI
    assert str(t.cases[4].image) == absolute  # absolute paths kept
    assert all(c.image.is_file() and np.asarray(Image.open(c.image)).shape == (28, 28) for c in t.cases)
    assert t.sites == ["St Mary", "Charité"] and t.cases[2].patient == "17" and t.cases[3].site == ""
    assert len(t.labelled) == 6


def test_msd_test_lists_of_bare_paths_are_unlabelled_pretraining_cases(site: Path) -> None:
    content = {"training": [{"image": "images/case0.png", "label": 0}, {"image": "images/case4.png", "label": 1}],
               "test": ["images/case1.png", "images/case5.png"]}
    t = read_decathlon_datalist(datalist(site, content))
    assert [(c.image.name, c.label, c.split) for c in t.cases[2:]] == [("case1.png", None, ""),
                                                                       ("case5.png", None, "")]
    t = read_decathlon_datalist(datalist(site, {"training": [{"image": "images/case0.png"}]}))
    assert t.task is None and t.num_classes == 0  # no label at all: pretraining only


def test_a_multi_label_datalist_and_a_given_number_of_classes(site: Path) -> None:
    content = {"training": [{"image": "images/case0.png", "label": [1, 0, 1]},
                            {"image": "images/case1.png", "label": [0, 0, 0]}],
               "validation": [{"image": "images/case2.png", "label": [0, 1, 0]}]}
    t = read_decathlon_datalist(datalist(site, content))
    assert t.task == TaskType.MULTILABEL and t.num_classes == 3
    assert [c.label for c in t.cases] == [(1, 0, 1), (0, 0, 0), (0, 1, 0)]
    content = {"training": [{"image": "images/case0.png", "label": 0}, {"image": "images/case1.png", "label": 2}]}
    t = read_decathlon_datalist(datalist(site, content), num_classes=4)
    assert t.task == TaskType.MULTICLASS and t.num_classes == 4


def _entries(*labels: object) -> list[dict[str, object]]:
    return [{"image": f"images/case{i}.png", "label": label} for i, label in enumerate(labels)]


BAD_DATALISTS: list[tuple[object, str]] = [
    ('{"training": [', "is not JSON (Expecting value, line 1"),
    ([{"image": "images/case0.png", "label": 0}], "must be a JSON object with a 'training' list"),
    ({"validation": _entries(0, 1)}, "has no 'training' key"),
    ({"training": {"image": "images/case0.png"}}, "'training' must be a list of entries; got a JSON object"),
    ({"training": []}, "holds no entries"),
    ({"training": ["images/case0.png"]}, "training entry 1: an entry is an object with an 'image' key"),
    ({"training": [*_entries(0, 1), {"image": ["images/case2.png", "images/case3.png"], "label": 0}]},
     "training entry 3: one image per case; 'image' holds a list of 2 paths"),
    ({"training": [{"label": 0}]}, "training entry 1: 'image' must be a path string"),
    ({"training": [{"image": "images/case0.png", "lable": 1}]}, "training entry 1: unknown key(s) 'lable'"),
    ({"training": _entries(0, "labelsTr/case1.nii.gz")}, "training entry 2: label must be a whole number"),
    ({"training": _entries(0, -1)}, "training entry 2: label must be >= 0"),
    ({"training": _entries(0, True)}, "training entry 2: label must be a whole number"),
    ({"training": _entries([1, 0], [1, 2])}, "training entry 2: a multi-label label is a list of 0/1 flags"),
    ({"training": _entries([1, 0], 1)}, "training entry 2: a single label among multi-label rows"),
    ({"training": _entries([1, 0], [1, 0, 1])}, "training entry 2: 3 flags where training entry 1 holds 2"),
    ({"training": _entries(0, 1), "validation": [{"image": "images/case2.png", "label": 3}]},
     "validation entry 1: label 3 means 4 classes, but class(es) 2 have no labelled row"),
    ({"training": _entries(0, 0)}, "one class only"),
    ({"training": [{"image": "images/case0.png", "label": 0, "split": "training"}]},
     "training entry 1: split must be one of train, val, test or empty; got 'training'"),
    ({"training": _entries(0), "validation": [{"image": "images/case1.png", "label": 1, "split": "train"}]},
     "validation entry 1: a 'split' key belongs in 'training' entries only"),
    ({"training": _entries(0, 1), "test": ["images/case2.png", {"image": "images/case3.png"}]},
     "the 'test' list mixes bare image paths and objects"),
    ({"training": _entries(0, 1), "test": [{"image": "images/../images/case0.png", "label": 0}]},
     "test entry 1: the same image as training entry 1"),
    ({"training": [{"image": "images/case0.png", "label": 0, "patient": PATIENT_ID},
                   {"image": "images/case1.png", "label": 1}],
      "test": [{"image": "images/case2.png", "label": 1, "patient": PATIENT_ID}]},
     "training entry 1 and test entry 1: one patient in more than one split"),
    ({"training": [{"image": "images/case0.png", "label": 0, "patient": PATIENT_ID, "site": "a"},
                   {"image": "images/case1.png", "label": 1, "patient": PATIENT_ID, "site": "b"}]},
     "training entries 1, 2: one patient in more than one site"),
    ({"training": [{"image": "images/case0.png", "label": 0, "patient": [PATIENT_ID]}]},
     "training entry 1: 'patient' must be a string or a whole number"),
]


@pytest.mark.parametrize(("content", "message"), BAD_DATALISTS, ids=[m for _, m in BAD_DATALISTS])
def test_bad_datalists_are_refused_naming_the_entry_and_the_rule(site: Path, content: object, message: str) -> None:
    with pytest.raises(DataError) as info:
        read_decathlon_datalist(datalist(site, content, "bad.json"))
    assert message in str(info.value) and str(info.value).startswith("datalist 'bad.json'")
    assert PATIENT_ID not in str(info.value)  # a patient's identifier never leaves, not even in an error


def test_a_label_outside_the_given_classes_and_an_unreadable_datalist(site: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"training entry 2: label 2 is outside the 2 classes \(0..1\)"):
        read_decathlon_datalist(datalist(site, {"training": _entries(0, 2)}), num_classes=2)
    with pytest.raises(DataError, match="datalist 'missing.json' cannot be read"):
        read_decathlon_datalist(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes('{"training": [{"image": "H\xf4pital.png"}]}'.encode("latin-1"))
    with pytest.raises(DataError, match="datalist 'latin1.json' is not UTF-8 text"):
        read_decathlon_datalist(tmp_path / "latin1.json")


def save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture()
def classes(tmp_path: Path, pixels: tuple[np.ndarray, np.ndarray]) -> Path:
    """root/{1,2,10}/ with real images (PNG, JPEG, TIFF, upper-case suffix) and hidden clutter."""
    images = pixels[0]
    root = tmp_path / "classes"
    save(root / "10" / "img10.png", images[0])
    save(root / "10" / "img2.PNG", images[1])
    save(root / "2" / "scan.jpg", images[2])
    save(root / "2" / "scan.tiff", images[3])
    save(root / "1" / "a.png", images[4])
    (root / "1" / ".DS_Store").write_bytes(b"\0\0")  # hidden files and folders are ignored
    (root / ".cache").mkdir()
    (root / ".cache" / "notes.txt").write_text("ignored")
    (root / ".hidden.txt").write_text("ignored")
    return root


def test_class_folders_in_natural_order_labels_from_the_folder(classes: Path) -> None:
    t = read_class_folders(classes)
    assert t.class_names == ("1", "2", "10")  # natural order: a plain sort would put "10" before "2"
    assert t.task == TaskType.MULTICLASS and t.num_classes == 3 and t.path == classes
    assert [(c.image.parent.name, c.image.name, c.label) for c in t.cases] == [
        ("1", "a.png", 0), ("2", "scan.jpg", 1), ("2", "scan.tiff", 1), ("10", "img2.PNG", 2),
        ("10", "img10.png", 2)]
    assert all(t.class_names[c.label] == c.image.parent.name for c in t.cases if isinstance(c.label, int))
    assert [c.row for c in t.cases] == [1, 2, 3, 4, 5] and {c.split for c in t.cases} == {""}
    assert t.sites == [] and all(c.patient == "" for c in t.cases)
    assert all(np.asarray(Image.open(c.image)).shape == (28, 28) for c in t.cases)  # real pixels there
    assert read_class_folders(classes, num_classes=3).num_classes == 3


def test_natural_order() -> None:
    names = ["10", "2", "1", "b2", "B10", "a", "scan_10.png", "scan_9.png"]
    assert sorted(names, key=natural_key) == ["1", "2", "10", "a", "b2", "B10", "scan_9.png", "scan_10.png"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda root: (root / "10" / "notes.txt").write_text("x"), "'10/notes.txt' is not an image file"),
    (lambda root: (root / "2" / "more").mkdir(), "'2/more' is a folder; a class folder holds images only"),
    (lambda root: (root / "readme.md").write_text("x"), "'readme.md' is a file; the folder holds one folder per class"),
    (lambda root: (root / "3").mkdir(), "class folder '3' holds no image"),
    (lambda root: (root / "0").mkdir() or (root / "0" / ".keep").write_text(""), "class folder '0' holds no image"),
], ids=["stray .txt", "nested folder", "file beside the classes", "empty class", "only hidden files"])
def test_bad_class_folders_are_refused_naming_the_file_and_the_rule(classes: Path, change: Callable[[Path], object],
                                                                   message: str) -> None:
    change(classes)
    with pytest.raises(DataError) as info:
        read_class_folders(classes)
    assert message in str(info.value) and str(info.value).startswith("class folders 'classes'")


def test_fewer_than_two_classes_a_class_count_mismatch_and_not_a_folder(
        tmp_path: Path, pixels: tuple[np.ndarray, np.ndarray], classes: Path) -> None:
    save(tmp_path / "one" / "benign" / "a.png", pixels[0][0])
    with pytest.raises(DataError, match="'one' holds 1 class folder\\(s\\); a classifier needs at least 2"):
        read_class_folders(tmp_path / "one")
    with pytest.raises(DataError, match="num-classes is 4 but there are 3 class folders"):
        read_class_folders(classes, num_classes=4)
    with pytest.raises(DataError, match="is not a folder"):
        read_class_folders(classes / "1" / "a.png")


def test_read_source_dispatches_on_what_the_path_is(site: Path, classes: Path, tmp_path: Path) -> None:
    (site / "labels.CSV").write_text("image,label\nimages/case0.png,0\nimages/case4.png,1\n")
    t = read_source(site / "labels.CSV")
    assert [c.row for c in t.cases] == [2, 3] and t.num_classes == 2  # CSV rows: the header is row 1
    t = read_source(datalist(site, {"training": _entries(0, 1), "test": ["images/case7.png"]}))
    assert [c.split for c in t.cases] == ["", "", ""] and t.cases[2].label is None
    assert read_source(classes).class_names == ("1", "2", "10")
    with pytest.raises(DataError, match="labels table 'gone.csv' cannot be read"):
        read_source(tmp_path / "gone.csv")
    (tmp_path / "data.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"'data.npz' is not a folder and has neither suffix: give a labels table "
                                        r"\(.csv\), a MONAI/Decathlon datalist \(.json\), or a folder"):
        read_source(tmp_path / "data.npz")
    with pytest.raises(DataError, match="'nowhere' does not exist: give a labels table"):
        read_source(tmp_path / "nowhere")


def test_is_table_source(classes: Path, tmp_path: Path) -> None:
    assert is_table_source("site/labels.csv") and is_table_source("dataset.JSON")  # need not exist yet
    assert is_table_source(str(classes))
    assert not is_table_source("breastmnist") and not is_table_source(str(tmp_path / "breastmnist.npz"))
    assert not is_table_source(str(tmp_path / "missing_folder")) and not is_table_source("")
    assert not is_table_source("  ")
