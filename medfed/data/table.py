"""A site's labels table: one row per case, read and checked before any image is opened.

A CSV with a header row; columns are found by name, in any order; LF or CRLF line ends:

=========  ====================================================================================
``image``  path relative to the CSV: a PNG/JPEG/TIFF (2D), a NIfTI ``.nii``/``.nii.gz``, or a folder
           holding one DICOM series (one volume; a single-file DICOM is a 2D image). Required.
``label``  an integer class, or ``;``-separated 0/1 flags for a multi-label task; empty: unlabelled
           (used for self-supervised pretraining only).
``split``  train, val or test; empty or missing: split later with the run's seed.
``site``   the hospital the row belongs to (``--partition natural`` gives each its own rows).
``patient`` every row of one patient must land in one split and one site.
=========  ====================================================================================

The number of classes is given, or else the labels must be 0..K-1 with every class present among the
labelled rows (a gap names the row of the largest label). A table without any label is valid (pretraining
only). Errors name the table, the row (1-based, the header being row 1) and the rule, never a patient's
identifier: the ``patient`` column is compared, never printed.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medfed.constants import TaskType
from medfed.exceptions import DataError

IMAGE, LABEL, SPLIT, SITE, PATIENT = "image", "label", "split", "site", "patient"
COLUMNS = (IMAGE, LABEL, SPLIT, SITE, PATIENT)
SPLITS = ("train", "val", "test")
MULTI_LABEL_SEPARATOR = ";"
ANY_CLASSES = -1
"""``num_classes`` for a check that takes the labels as they are (`task_and_classes`)."""


@dataclass(frozen=True)
class Case:
    """One row: the image's resolved path, its label (None: unlabelled), and where it belongs.

    ``label`` is a class index for single-label tasks, a tuple of 0/1 flags for multi-label ones.
    """

    row: int  # the CSV line it came from (1-based; the header is row 1)
    image: Path
    label: int | tuple[int, ...] | None
    split: str  # train | val | test | "" (split later with the run's seed)
    site: str  # "" when the table names no site
    patient: str  # "" when the table names no patient; compared, never printed


@dataclass(frozen=True)
class LabelsTable:
    """A checked labels table."""

    path: Path
    cases: tuple[Case, ...]
    task: TaskType | None  # None: no row is labelled (pretraining only)
    num_classes: int  # 0 when no row is labelled
    class_names: tuple[str, ...] = ()  # the classes' names in label order, where the source names them
    row_names: RowNames | None = field(default=None, compare=False)  # how errors name rows (CSV: "row N")

    def rows(self, rows: Sequence[int]) -> str:
        """``row 2`` for a CSV; ``training entry 3`` for a datalist; ``file '0/a.png'`` for class folders."""
        return (self.row_names or csv_rows)(rows)

    @property
    def labelled(self) -> tuple[Case, ...]:
        return tuple(c for c in self.cases if c.label is not None)

    @property
    def sites(self) -> list[str]:
        """The hospitals the table names, in order of first appearance (empty when it names none)."""
        return list(dict.fromkeys(c.site for c in self.cases if c.site))


def read_labels_table(path: str | Path, *, num_classes: int = 0) -> LabelsTable:
    """Read and check a labels table (no image is opened here).

    Args:
        path: the CSV file.
        num_classes: the number of classes (0: from the labels, which must then be 0..K-1, all present).

    Returns:
        The table's cases, task and number of classes.

    Raises:
        DataError: naming the table, the row and the rule: a missing or unreadable file, no header or no
            ``image`` column, an unknown or repeated column, an empty table, a duplicate row or image, a bad
            label or split, a gap in the classes, multi-label rows of different lengths mixed with single labels,
            a patient in two splits or two sites. (Whether each image exists and reads is checked when the
            images are read, every bad row reported.)
    """
    path = Path(path)
    where = f"labels table {path.name!r}"
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"{where} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{where} is empty: it needs a header row naming at least the image column") from None
    except csv.Error as exc:
        raise DataError(f"{where} row 1: not CSV ({exc})") from None
    columns = [h.strip().lower() for h in header]
    unknown = sorted(set(columns) - set(COLUMNS) - {""})
    if unknown:
        raise DataError(f"{where}: unknown column(s) {', '.join(unknown)}; the columns are {', '.join(COLUMNS)}")
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        raise DataError(f"{where}: column(s) {', '.join(repeated)} appear more than once")
    if IMAGE not in columns:
        raise DataError(f"{where}: the header row must name an {IMAGE!r} column (paths relative to the table)")
    cases: list[Case] = []
    seen: dict[tuple[tuple[str, str], ...], int] = {}
    images: dict[Path, int] = {}
    try:
        for row_number, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue  # a blank line
            if len(values) != len(columns):
                raise DataError(f"{where} row {row_number}: {len(values)} fields, the header has {len(columns)}")
            fields = {c: v.strip() for c, v in zip(columns, values, strict=True) if c}
            key = tuple(sorted(fields.items()))
            if key in seen:
                raise DataError(f"{where} row {row_number}: the same row as row {seen[key]} (duplicate rows)")
            seen[key] = row_number
            case = _case(fields, row_number, path.parent, where)
            if case.image in images:
                raise DataError(f"{where} row {row_number}: the same image as row {images[case.image]} (one row per "
                                "case: a case in two rows would be trained and evaluated on twice)")
            images[case.image] = row_number
            cases.append(case)
    except csv.Error as exc:
        raise DataError(f"{where}: not CSV ({exc})") from None
    if not cases:
        raise DataError(f"{where} holds no rows (only a header)")
    check_patients(cases, where)
    task, classes = task_and_classes(cases, num_classes, where)
    return LabelsTable(path, tuple(cases), task, classes)


def _case(fields: dict[str, str], row: int, folder: Path, where: str) -> Case:
    image = fields.get(IMAGE, "")
    if not image:
        raise DataError(f"{where} row {row}: the image column is empty")
    # whether the image exists and reads is checked when it is read (every row's problem reported, by row:
    # a path is not repeated in an error, folders are often named after the patient)
    resolved = (folder / image).resolve() if not Path(image).is_absolute() else Path(image)
    split = fields.get(SPLIT, "").lower()
    if split and split not in SPLITS:
        raise DataError(f"{where} row {row}: split must be one of {', '.join(SPLITS)} or empty")
    return Case(row, resolved, _label(fields.get(LABEL, ""), row, where), split, fields.get(SITE, ""),
                fields.get(PATIENT, ""))


def _label(text: str, row: int, where: str) -> int | tuple[int, ...] | None:
    if not text:
        return None
    if MULTI_LABEL_SEPARATOR in text:
        flags = [f.strip() for f in text.split(MULTI_LABEL_SEPARATOR)]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(f"{where} row {row}: a multi-label label is ';'-separated 0/1 flags")  # cell not echoed
        return tuple(int(f) for f in flags)
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{where} row {row}: label must be a whole number >= 0, ';'-separated 0/1 flags, or empty "
                        "(unlabelled)") from None  # the cell is not echoed: it may hold anything
    if value < 0:
        raise DataError(f"{where} row {row}: label must be >= 0; got {value}")
    return value


RowNames = Callable[[Sequence[int]], str]
"""Names rows in an error from their ``Case.row`` numbers: ``csv_rows`` for a CSV, another for other sources."""


def csv_rows(rows: Sequence[int]) -> str:
    """``row 2``, or ``rows 2, 3``: a CSV's rows (1-based, the header being row 1)."""
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"


def check_patients(cases: Sequence[Case], where: str, names: RowNames = csv_rows) -> None:
    """All rows of one patient in one split and one site (rows named; the patient never printed)."""
    rows: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        if case.patient:
            rows[case.patient].append(case)
    for same in rows.values():
        for attribute, what in (("split", "split"), ("site", "site")):
            values = {getattr(c, attribute) for c in same}
            if len(values) > 1:
                raise DataError(f"{where} {names([c.row for c in same])}: one patient in more than one {what}; "
                                f"every row of a patient must share its {what}")


def task_and_classes(cases: Sequence[Case], num_classes: int, where: str,
                     names: RowNames = csv_rows) -> tuple[TaskType | None, int]:
    """The task and number of classes the labelled rows hold (``None, 0`` when none is labelled).

    ``num_classes`` 0: from the labels (0..K-1, every class present); `ANY_CLASSES`: whatever they hold (a deployed
    site checking its table before it knows the run's classes: a hospital may lack a class, or hold one only).

    Raises:
        DataError: naming the row and the rule: a single label among multi-label rows, multi-label rows of
            different lengths, a label outside ``num_classes``, a gap in the classes, one class only.
    """
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        return None, 0
    flags = [(c, c.label) for c in labelled if isinstance(c.label, tuple)]
    if flags:
        if len(flags) != len(labelled):
            single = next(c for c in labelled if not isinstance(c.label, tuple))
            raise DataError(f"{where} {names([single.row])}: a single label among multi-label rows")
        width = len(flags[0][1])
        odd = next(((c, f) for c, f in flags if len(f) != width), None)
        if odd is not None:
            raise DataError(f"{where} {names([odd[0].row])}: {len(odd[1])} flags where "
                            f"{names([flags[0][0].row])} holds {width} (multi-label rows must hold one flag per class)")
        if num_classes > 0 and num_classes != width:
            raise DataError(f"{where}: num-classes is {num_classes} but the rows hold {width} flags")
        return TaskType.MULTILABEL, width
    ints = [(c, c.label) for c in labelled if isinstance(c.label, int)]
    largest, top = max(ints, key=lambda pair: pair[1])
    if num_classes == ANY_CLASSES:
        classes = max(2, top + 1)
        return (TaskType.BINARY if classes == 2 else TaskType.MULTICLASS), classes
    if num_classes:
        if top >= num_classes:
            raise DataError(f"{where} {names([largest.row])}: label {top} is outside the {num_classes} classes "
                            f"(0..{num_classes - 1})")
        classes = num_classes
    else:
        missing = sorted(set(range(top + 1)) - {label for _, label in ints})
        if missing:
            raise DataError(f"{where} {names([largest.row])}: label {top} means {top + 1} classes, but class(es) "
                            f"{', '.join(map(str, missing))} have no labelled row; give --num-classes or relabel")
        classes = top + 1
    if classes < 2:
        raise DataError(f"{where}: the labelled rows hold one class only; a classifier needs at least 2")
    return (TaskType.BINARY if classes == 2 else TaskType.MULTICLASS), classes
