"""A site's labels table (`medfed.data.table`): real BreastMNIST pixels written out as PNG, read through a CSV;
the conventions a user relies on, and a table of bad tables, each refused naming the row and the rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.constants import TaskType
from medfed.data.table import read_labels_table
from medfed.exceptions import DataError

PATIENT_ID = "MRN-0042-Doe"  # must never appear in an error


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, list[int]]:
    """Six real BreastMNIST test images as PNG files (two of each label present: 0 and 1), with their labels."""
    data = np.load(shared_data / "breastmnist.npz")
    images, labels = data["test_images"], data["test_labels"].ravel()
    order = [*np.flatnonzero(labels == 0)[:3], *np.flatnonzero(labels == 1)[:3]]
    folder = tmp_path_factory.mktemp("site") / "images"
    folder.mkdir()
    for i, index in enumerate(order):
        Image.fromarray(images[index]).save(folder / f"case{i}.png")
    return folder.parent, [int(labels[i]) for i in order]


def table(folder: Path, text: str, name: str = "labels.csv") -> Path:
    path = folder / name
    path.write_bytes(text.encode())
    return path


def test_columns_by_name_in_any_order_crlf_unlabelled_rows_and_splits(pngs: tuple[Path, list[int]]) -> None:
    folder, labels = pngs
    rows = [f"{s},images/case{i}.png,{lab if i != 5 else ''}" for i, (lab, s) in
            enumerate(zip(labels, ["train", "", "val", "test", "train", ""], strict=True))]
    t = read_labels_table(table(folder, "\r\n".join(["split,image,label", *rows]) + "\r\n"))
    assert t.task == TaskType.BINARY and t.num_classes == 2
    assert [c.row for c in t.cases] == [2, 3, 4, 5, 6, 7]
    assert [c.split for c in t.cases] == ["train", "", "val", "test", "train", ""]
    assert t.cases[5].label is None and len(t.labelled) == 5  # empty label: pretraining only
    assert t.cases[0].image == (folder / "images" / "case0.png").resolve() and t.cases[0].image.is_file()
    assert np.asarray(Image.open(t.cases[0].image)).shape == (28, 28)  # the real pixels are there


def test_a_table_without_labels_is_valid_and_sites_come_in_table_order(pngs: tuple[Path, list[int]]) -> None:
    folder, _ = pngs
    text = "image,site\nimages/case0.png,St Mary\nimages/case1.png,Charité\nimages/case2.png,St Mary\n"
    t = read_labels_table(table(folder, text))
    assert t.task is None and t.num_classes == 0 and t.sites == ["St Mary", "Charité"]


def test_multi_label_rows_and_a_given_number_of_classes(pngs: tuple[Path, list[int]]) -> None:
    folder, _ = pngs
    t = read_labels_table(table(folder, "image,label\nimages/case0.png,1;0;1\nimages/case1.png,0;0;0\n"))
    assert t.task == TaskType.MULTILABEL and t.num_classes == 3 and t.cases[0].label == (1, 0, 1)
    t = read_labels_table(table(folder, "image,label\nimages/case0.png,0\nimages/case1.png,2\n"), num_classes=4)
    assert t.task == TaskType.MULTICLASS and t.num_classes == 4  # classes 1 and 3 have no row: given, so fine


def test_rows_of_one_patient_sharing_split_and_site_are_fine(pngs: tuple[Path, list[int]]) -> None:
    folder, _ = pngs
    text = (f"image,label,patient,split,site\nimages/case0.png,0,{PATIENT_ID},train,a\n"
            f"images/case1.png,1,{PATIENT_ID},train,a\nimages/case2.png,1,other,val,b\n")
    assert len(read_labels_table(table(folder, text)).cases) == 3


BAD = [
    ("", "is empty"),
    ("image,label\n", "holds no rows"),
    ("path,label\nimages/case0.png,0\n", "unknown column(s) path"),
    ("label\n0\n", "must name an 'image' column"),
    ("image,image\nimages/case0.png,images/case1.png\n", "column(s) image appear more than once"),
    ("image,label\nimages/case0.png,0\nimages/./case0.png,1\n", "row 3: the same image as row 2"),
    ("image,label\n,0\n", "row 2: the image column is empty"),
    ("image,label\nimages/case0.png,0\nimages/case1.png,1\nimages/case0.png,0\n", "row 4: the same row as row 2"),
    ("image,label\nimages/case0.png,0,extra\n", "row 2: 3 fields, the header has 2"),
    ("image,label\nimages/case0.png,cat\n", "row 2: label must be a whole number"),
    ("image,label\nimages/case0.png,-1\n", "row 2: label must be >= 0"),
    ("image,label\nimages/case0.png,1;2\n", "row 2: a multi-label label is ';'-separated 0/1 flags"),
    ("image,label\nimages/case0.png,1;0\nimages/case1.png,1\n", "row 3: a single label among multi-label rows"),
    ("image,label\nimages/case0.png,1;0\nimages/case1.png,1;0;1\n", "row 3: 3 flags where row 2 holds 2"),
    ("image,label\nimages/case0.png,0\nimages/case1.png,3\nimages/case2.png,1\n",
     "row 3: label 3 means 4 classes, but class(es) 2 have no labelled row"),
    ("image,label\nimages/case0.png,0\nimages/case1.png,0\n", "one class only"),
    ("image,label,split\nimages/case0.png,0,training\n", "row 2: split must be one of train, val, test"),
    (f"image,label,patient,split\nimages/case0.png,0,{PATIENT_ID},train\nimages/case1.png,1,{PATIENT_ID},test\n",
     "rows 2, 3: one patient in more than one split"),
    (f"image,label,patient,site\nimages/case0.png,0,{PATIENT_ID},a\nimages/case1.png,1,{PATIENT_ID},b\n",
     "rows 2, 3: one patient in more than one site"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_tables_are_refused_naming_the_row_and_the_rule(pngs: tuple[Path, list[int]], text: str,
                                                            message: str) -> None:
    folder, _ = pngs
    with pytest.raises(DataError) as info:
        read_labels_table(table(folder, text, "bad.csv"))
    assert message in str(info.value) and "labels table 'bad.csv'" in str(info.value)
    assert PATIENT_ID not in str(info.value)  # a patient's identifier never leaves, not even in an error


def test_a_label_outside_the_given_classes_and_an_unreadable_table(pngs: tuple[Path, list[int]],
                                                                   tmp_path: Path) -> None:
    folder, _ = pngs
    with pytest.raises(DataError, match=r"row 3: label 2 is outside the 2 classes \(0..1\)"):
        read_labels_table(table(folder, "image,label\nimages/case0.png,0\nimages/case1.png,2\n"), num_classes=2)
    with pytest.raises(DataError, match="cannot be read"):
        read_labels_table(tmp_path / "missing.csv")
    (tmp_path / "latin1.csv").write_bytes("image,site\nx.png,H\xf4pital\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_labels_table(tmp_path / "latin1.csv")
