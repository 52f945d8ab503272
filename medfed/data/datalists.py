"""A site's cases from a MONAI/Decathlon datalist or from class folders, checked as a labels table is.

Besides the CSV labels table (`medfed.data.table`), a site's ``--data`` may be:

* a MONAI datalist (``.json``) in the Medical Segmentation Decathlon ``dataset.json`` layout, read with
  ``monai.data.load_decathlon_datalist`` (``is_segmentation=False``: a classification datalist)::

      {"training":   [{"image": "imagesTr/a.png", "label": 1, "site": "St Mary", "patient": "p1"}, ...],
       "validation": [{"image": "imagesVa/b.png", "label": 0}, ...],
       "test":       ["imagesTs/c.png", {"image": "/data/d.png", "label": 1}, ...]}

  ``training`` is required; ``validation`` and ``test`` are optional; other top-level keys (``name``,
  ``description``, ``modality``, ...) are metadata and ignored. An entry is an object with ``image`` (one path
  string, relative to the JSON's folder or absolute; a list of paths is refused: one image per case),
  ``label`` (a whole number >= 0, or a list of 0/1 flags for a multi-label task; absent or null: unlabelled),
  and optionally ``site`` and ``patient`` (strings or whole numbers); ``fold`` is allowed and ignored.
  Splits: a ``training`` entry is split later with the run's seed unless it names its own ``split``
  (train, val or test); ``validation`` entries are ``val``; labelled ``test`` entries are ``test``.
  **Unlabelled test entries** (MSD test lists are usually bare paths, without labels) become unlabelled
  cases with split ``""``: they serve self-supervised pretraining only, never evaluation. Only ``test`` may
  list bare paths (MONAI's rule), and then all its entries must be bare paths, or all objects. An image listed
  twice, in any lists, is refused (it would leak into evaluation).
* a folder of class folders, ``root/<class>/<image>`` with PNG/JPEG/TIFF images one level deep: the classes
  are the folders in natural order (``2`` before ``10``), a case's label the index of its folder in that
  order, and the names are kept in ``LabelsTable.class_names``. Hidden files and folders (``.name``) are
  ignored; anything else (another file, a nested folder, an empty class, fewer than 2 classes) is refused.

As for a CSV, image paths are not opened here, and not checked for existence either (images are read
elsewhere); labels, splits and patients are checked by the same rules (`medfed.data.table.task_and_classes`,
`medfed.data.table.check_patients`). ``Case.row`` numbers the cases in file order from 1 (a datalist:
``training``, then ``validation``, then ``test``; class folders: class by class); errors name them as the
source does: ``training entry 3`` (1-based within its list), or a file ``'10/case7.png'``, and the rule,
never a patient's identifier.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from medfed.data.table import (
    IMAGE,
    LABEL,
    PATIENT,
    SITE,
    SPLIT,
    SPLITS,
    Case,
    LabelsTable,
    RowNames,
    check_patients,
    read_labels_table,
    task_and_classes,
)
from medfed.exceptions import DataError

PARTS = (("training", ""), ("validation", "val"), ("test", "test"))  # a datalist's lists and their split
FOLD = "fold"  # MONAI's cross-validation key: allowed, ignored
ENTRY_KEYS = (IMAGE, LABEL, SPLIT, SITE, PATIENT, FOLD)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".json")
ACCEPTED = ("a labels table (.csv), a MONAI/Decathlon datalist (.json), or a folder holding one folder of "
            "images per class")


def read_source(path: str | Path, *, num_classes: int = 0) -> LabelsTable:
    """Read a site's cases from a labels table, a Decathlon datalist or class folders, whichever ``path`` is.

    Args:
        path: a ``.csv`` file (`medfed.data.table.read_labels_table`), a ``.json`` file
            (`read_decathlon_datalist`) or a folder (`read_class_folders`).
        num_classes: the number of classes (0: from the labels).

    Raises:
        DataError: ``path`` is none of these (the message lists the accepted forms), or the reader's own.
    """
    path = Path(path)
    if path.is_dir():
        return read_class_folders(path, num_classes=num_classes)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_labels_table(path, num_classes=num_classes)
    if suffix == ".json":
        return read_decathlon_datalist(path, num_classes=num_classes)
    state = "is not a folder and has neither suffix" if path.exists() else "does not exist"
    raise DataError(f"data source {path.name!r} {state}: give {ACCEPTED}")


def is_table_source(text: str) -> bool:
    """Whether ``--data text`` is for `read_source`: a ``.csv`` or ``.json`` path (existing or not, so that a
    mistyped one is reported by its reader) or an existing folder; False for anything else (MedMNIST flags
    and ``.npz`` files are read elsewhere)."""
    if not text.strip():
        return False
    path = Path(text)
    return path.suffix.lower() in TABLE_SUFFIXES or path.is_dir()


def read_decathlon_datalist(path: str | Path, *, num_classes: int = 0) -> LabelsTable:
    """Read and check a MONAI datalist in the Decathlon ``dataset.json`` layout (no image is opened).

    Args:
        path: the JSON file; relative image paths are resolved against its folder.
        num_classes: the number of classes (0: from the labels, which must then be 0..K-1, all present).

    Returns:
        The cases (``training``, then ``validation``, then ``test``), task and number of classes.

    Raises:
        DataError: naming the file, the entry (``training entry 3``) and the rule: an unreadable file, not
            JSON, not a JSON object, no ``training`` key, a list that is not a JSON list, an entry that is not an
            object, an unknown key, no image or a list of images, a bad label, split, site or patient, an
            image listed twice, a gap in the classes, a patient in two splits or two sites.
    """
    path = Path(path)
    where = f"datalist {path.name!r}"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise DataError(f"{where} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where} must be a JSON object with a 'training' list (the Decathlon dataset.json "
                        f"layout); got a JSON {_kind(data)}")
    if "training" not in data:
        raise DataError(f"{where} has no 'training' key: a Decathlon datalist lists its cases under 'training' "
                        f"(and optionally 'validation' and 'test')")
    cases: list[Case] = []
    entries: dict[int, tuple[str, int]] = {}  # Case.row -> (list, 1-based entry within it)
    first: dict[Path, int] = {}  # image -> the row that listed it first
    names = _entry_names(entries)
    for key, split in PARTS:
        if key not in data:
            continue
        items = data[key]
        if not isinstance(items, list):
            raise DataError(f"{where}: {key!r} must be a list of entries; got a JSON {_kind(items)}")
        if not items:
            continue
        if key == "test" and len({isinstance(item, str) for item in items}) > 1:
            raise DataError(f"{where}: the 'test' list mixes bare image paths and objects; use one form")
        checked = [_entry(item, key, number, where) for number, item in enumerate(items, start=1)]
        resolved = _monai_images(path, key, len(items), where)
        for number, (entry, image) in enumerate(zip(checked, resolved, strict=True), start=1):
            row = len(cases) + 1
            entries[row] = (key, number)
            if not Path(entry.image).is_absolute():
                image = image.resolve()  # as a CSV's relative paths are
            case_split = entry.split if key == "training" else split
            if key == "test" and entry.label is None:
                case_split = ""  # unlabelled test entries: pretraining only
            if image in first:
                raise DataError(f"{where} {names([row])}: the same image as {names([first[image]])} (each image "
                                f"once: an image in two lists would leak into evaluation)")
            first[image] = row
            cases.append(Case(row, image, entry.label, case_split, entry.site, entry.patient))
    if not cases:
        raise DataError(f"{where} holds no entries (its 'training', 'validation' and 'test' lists are empty)")
    check_patients(cases, where, names)
    task, classes = task_and_classes(cases, num_classes, where, names)
    return LabelsTable(path, tuple(cases), task, classes, row_names=names)


def read_class_folders(root: str | Path, *, num_classes: int = 0) -> LabelsTable:
    """Read and check a 2D dataset laid out as ``root/<class>/<image>`` (no image is opened).

    Args:
        root: the folder of class folders; each holds PNG/JPEG/TIFF images (``.png``, ``.jpg``, ``.jpeg``,
            ``.tif``, ``.tiff``, any case), one level deep.
        num_classes: the number of classes (0: the number of class folders; else it must equal it, since a
            label is its folder's place in the natural order, which a missing class would shift).

    Returns:
        The cases (class by class, files in natural order; split ``""``, no site or patient), the task, the
        number of classes and ``class_names``: the folders' names in label order.

    Raises:
        DataError: naming the folder, the file and the rule: not a folder, a file beside the class folders,
            a file that is not an image, a folder inside a class folder, an empty class folder, fewer than 2
            classes, ``num_classes`` other than the number of class folders.
    """
    root = Path(root)
    where = f"class folders {root.resolve().name or str(root)!r}"
    if not root.is_dir():
        raise DataError(f"{where} is not a folder (the layout is root/<class>/<image>)")
    classes: list[Path] = []
    for entry in _listing(root, where):
        if not entry.is_dir():
            raise DataError(f"{where}: {entry.name!r} is a file; the folder holds one folder per class "
                            f"(root/<class>/<image>) and nothing else")
        classes.append(entry)
    if len(classes) < 2:
        raise DataError(f"{where} holds {len(classes)} class folder(s); a classifier needs at least 2 "
                        f"(one folder per class)")
    if num_classes > 0 and num_classes != len(classes):
        raise DataError(f"{where}: num-classes is {num_classes} but there are {len(classes)} class folders "
                        f"(a label is its folder's place in the sorted folders, so every class needs its folder)")
    cases: list[Case] = []
    files: dict[int, str] = {}  # Case.row -> 'class/file'
    for label, folder in enumerate(classes):
        count = len(cases)
        for entry in _listing(folder, where):
            name = f"{folder.name}/{entry.name}"
            if entry.is_dir():
                raise DataError(f"{where}: {name!r} is a folder; a class folder holds images only (one level)")
            if entry.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{where}: {name!r} is not an image file; the images are "
                                f"{', '.join(IMAGE_SUFFIXES)}")
            files[len(cases) + 1] = name
            cases.append(Case(len(cases) + 1, entry.resolve(), label, "", "", ""))
        if len(cases) == count:
            raise DataError(f"{where}: class folder {folder.name!r} holds no image; every class needs at least one")

    def names(rows: Sequence[int]) -> str:
        return f"file{'s' if len(rows) > 1 else ''} {', '.join(repr(files[r]) for r in rows)}"

    task, k = task_and_classes(cases, len(classes), where, names)
    return LabelsTable(root, tuple(cases), task, k, tuple(c.name for c in classes), row_names=names)


def natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key putting ``2`` before ``10`` (runs of digits compare as numbers, text case-blind)."""
    parts = re.split(r"([0-9]+)", name)  # text, digits, text, ...: every position holds one kind
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


def _listing(folder: Path, where: str) -> list[Path]:
    """A folder's entries but hidden ones, in natural order."""
    try:
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    except OSError as exc:
        raise DataError(f"{where}: folder {folder.name!r} cannot be read ({exc.strerror or exc})") from None
    return sorted(entries, key=lambda e: natural_key(e.name))


def _entry_names(entries: dict[int, tuple[str, int]]) -> RowNames:
    """Names rows as a datalist's entries: ``training entry 3``, ``training entries 1, 2 and test entry 1``."""

    def names(rows: Sequence[int]) -> str:
        groups: dict[str, list[int]] = {}
        for row in rows:
            key, number = entries[row]
            groups.setdefault(key, []).append(number)
        return " and ".join(f"{key} {'entries' if len(numbers) > 1 else 'entry'} {', '.join(map(str, numbers))}"
                            for key, numbers in groups.items())

    return names


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {dict: "object", list: "list", str: "string", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


class _Entry(NamedTuple):
    image: str  # as written; resolved by MONAI (`_monai_images`)
    label: int | tuple[int, ...] | None
    split: str  # a training entry's own split, else ""
    site: str
    patient: str


def _entry(item: object, key: str, number: int, where: str) -> _Entry:
    """Check one entry of the list ``key``."""
    at = f"{where} {key} entry {number}"
    if isinstance(item, str) and key == "test":
        item = {IMAGE: item}  # MSD test lists: bare image paths
    if not isinstance(item, dict):
        bare = " (or, in 'test', a bare image path)" if key == "test" else ""
        raise DataError(f"{at}: an entry is an object with an 'image' key{bare}; got a JSON {_kind(item)}")
    unknown = sorted(set(item) - set(ENTRY_KEYS))
    if unknown:
        # quoted: a site's errors reach the server with quoted values blanked (a key may be anything)
        raise DataError(f"{at}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                        f"{', '.join(ENTRY_KEYS[:-1])} "
                        f"({FOLD!r} is allowed and ignored)")
    image = item.get(IMAGE)
    if isinstance(image, list):
        raise DataError(f"{at}: one image per case; 'image' holds a list of {len(image)} paths")
    if not isinstance(image, str) or not image.strip():
        got = "none" if image is None or image == "" else f"a JSON {_kind(image)}"
        raise DataError(f"{at}: 'image' must be a path string (relative to the datalist, or absolute); got {got}")
    split = item.get(SPLIT)
    if split is not None and key != "training":
        raise DataError(f"{at}: a 'split' key belongs in 'training' entries only ({key} entries are split "
                        f"{dict(PARTS)[key]!r})")
    if split is None:
        split = ""
    if not isinstance(split, str) or split.strip().lower() not in (*SPLITS, ""):
        raise DataError(f"{at}: split must be one of {', '.join(SPLITS)} or empty; got {_shown(split)}")
    label = _label(item.get(LABEL), at)
    return _Entry(image, label, split.strip().lower(), _name(item.get(SITE), SITE, at),
                  _name(item.get(PATIENT), PATIENT, at))


def _name(value: object, key: str, at: str) -> str:
    """A site's or patient's name: a string or a whole number (never printed: it may identify a patient)."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{at}: {key!r} must be a string or a whole number; got a JSON {_kind(value)}")
    return value.strip()


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else f"a JSON {_kind(value)}"


def _label(value: object, at: str) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) < 2 or any(not isinstance(f, int) or isinstance(f, bool) or f not in (0, 1) for f in value):
            raise DataError(f"{at}: a multi-label label is a list of 0/1 flags, one per class (at least 2); "
                            f"got a list of {len(value)} values")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (a segmentation mask? this reads classification datalists)" if isinstance(value, str) else ""
        raise DataError(f"{at}: label must be a whole number >= 0, a list of 0/1 flags, or absent/null "
                        f"(unlabelled); got {_shown(value)}{hint}")
    if value < 0:
        raise DataError(f"{at}: label must be >= 0; got {value}")
    return value


def _monai_images(path: Path, key: str, count: int, where: str) -> list[Path]:
    """One list's image paths as MONAI resolves them (against the datalist's folder; absolute ones kept)."""
    import medfed._monai  # noqa: F401  (first: MONAI without transformers, see medfed/_monai.py)

    # isort: split
    from monai.data import load_decathlon_datalist  # here: importing MONAI takes seconds, routing --data none

    try:
        items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=key,
                                        base_dir=path.parent.resolve())
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise DataError(f"{where}: MONAI's load_decathlon_datalist refused the {key!r} list ({exc})") from None
    if len(items) != count:
        raise DataError(f"{where}: MONAI read {len(items)} {key!r} entries where the file lists {count}")
    return [Path(item[IMAGE]) for item in items]
