"""`medfed inspect-data`: what a data source holds, and every case that cannot be read, before any run.

For a labels table, datalist or class folders every image is fully decoded (`medfed.data.images.probe_image`,
in a DataLoader's worker processes) and nothing is written anywhere: not beside the data, not in the cache. The
report counts cases per split, class and hospital and the unlabelled ones, and lists the shapes, spacings and
modalities seen and each unreadable case with its reason. It is printed on the machine that holds the data, so it
names each bad case's row and its image as the table spells it. A MedMNIST file is described as it is read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medfed.data.cache import no_collate
from medfed.data.datalists import is_table_source, read_source
from medfed.data.images import ImageInfo, UnreadableImage, probe_image
from medfed.data.table import Case, LabelsTable

Probe = tuple[int, "ImageInfo | str"]


@dataclass
class Inspection:
    """What `inspect_source` found; ``bad`` holds (row, image as written, reason)."""

    summary: dict[str, Any]
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    row_names: dict[int, str] = field(default_factory=dict)  # how the source names each bad row


class _Probes(Dataset[Probe]):
    def __init__(self, cases: tuple[Case, ...]) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> Probe:
        try:
            return i, probe_image(self.cases[i].image)
        except UnreadableImage as exc:
            return i, str(exc)
        except Exception as exc:  # a reader bug must not hide the other cases
            return i, f"cannot be read ({type(exc).__name__})"


def inspect_source(source: str, *, num_classes: int = 0, workers: int = 2, progress: bool = True) -> Inspection:
    """Read and fully decode every case of ``source`` (a table, datalist, class folders or a MedMNIST file).

    Raises:
        DataError: a source that cannot be read as a whole (a bad table, a missing file), naming it and the rule.
    """
    if not is_table_source(source):
        from medfed.data.medmnist import load_medmnist

        return Inspection(load_medmnist(source).describe())
    table = read_source(source, num_classes=num_classes)
    loader = DataLoader(_Probes(table.cases), batch_size=None, num_workers=min(workers, len(table.cases)),
                        collate_fn=no_collate)
    infos: dict[int, ImageInfo] = {}
    bad: list[tuple[int, str, str]] = []
    for i, result in tqdm(loader, total=len(table.cases), desc="reading cases", unit="case",
                          disable=not progress, leave=False):
        if isinstance(result, ImageInfo):
            infos[i] = result
        else:
            bad.append((table.cases[i].row, _as_written(table, table.cases[i]), result))
    bad.sort()
    return Inspection(summarize(table, infos), bad, {row: table.rows([row]) for row, _, _ in bad})


def summarize(table: LabelsTable, infos: dict[int, ImageInfo]) -> dict[str, Any]:
    """Counts and what was seen, for the report."""
    cases = table.cases
    labelled = [c for c in cases if c.label is not None]
    per_class: Counter[str] = Counter()
    for c in labelled:
        if isinstance(c.label, tuple):
            per_class.update(_class_name(table, k) for k, flag in enumerate(c.label) if flag)
        else:
            per_class[_class_name(table, int(c.label))] += 1  # type: ignore[arg-type]
    dims = Counter(f"{i.dims}D" for i in infos.values())
    common = max((i.dims for i in infos.values()), key=lambda d: dims[f"{d}D"], default=2)
    spacings = np.asarray([i.spacing for i in infos.values() if len(i.spacing) == common]) if infos else None
    return {
        "source": table.path.name,
        "cases": len(cases),
        "readable": len(infos),
        "unreadable": len(cases) - len(infos),
        "task": table.task.value if table.task else "none (no labels: pretraining only)",
        "num_classes": table.num_classes,
        "unlabelled": len(cases) - len(labelled),
        "per_split": dict(Counter(c.split or "unassigned (split with the run's seed)" for c in cases)),
        "per_class": dict(sorted(per_class.items())),
        "per_site": dict(Counter(c.site or "(none)" for c in cases)),
        "patients": len({c.patient for c in cases if c.patient}),
        "dimensions": dict(dims),
        "channels": dict(Counter(str(i.channels) for i in infos.values())),
        "shapes": dict(Counter("x".join(map(str, i.shape)) for i in infos.values()).most_common(10)),
        "spacing_mm": ({"min": spacings.min(axis=0).round(3).tolist(),
                        "median": np.median(spacings, axis=0).round(3).tolist(),
                        "max": spacings.max(axis=0).round(3).tolist()} if spacings is not None else {}),
        "modalities": dict(Counter(i.modality for i in infos.values())),
        "kinds": dict(Counter(i.kind for i in infos.values())),
    }


def render(inspection: Inspection) -> str:
    """The report as text: one line per figure, then each unreadable case."""
    lines = []
    for key, value in inspection.summary.items():
        if isinstance(value, dict):
            shown = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        else:
            shown = str(value)
        lines.append(f"{key.replace('_', ' ')}: {shown}")
    if _several(inspection.summary, "dimensions"):
        lines.append("problem: 2D rows mixed with 3D rows; a table holds 2D or 3D images, not both")
    if _several(inspection.summary, "channels"):
        lines.append("problem: cases with different channels; every case needs the same")
    for row, image, reason in inspection.bad:
        lines.append(f"unreadable: {inspection.row_names.get(row, f'row {row}')} ({image}): {reason}")
    return "\n".join(lines)


def problems(inspection: Inspection, *, skip_bad_cases: bool = False) -> list[str]:
    """What makes the source unusable as it stands (empty: none): each unreadable case (unless skipped) and cases
    that do not fit together."""
    out = [] if skip_bad_cases else [f"{inspection.row_names.get(row, f'row {row}')}: {reason}"
                                     for row, _, reason in inspection.bad]
    if _several(inspection.summary, "dimensions"):
        out.append("2D rows mixed with 3D rows")
    if _several(inspection.summary, "channels"):
        out.append("cases with different channels")
    return out


def _several(summary: dict[str, Any], key: str) -> bool:
    """Whether a table's cases differ in ``key`` (counted as a dict of value -> cases)."""
    value = summary.get(key)
    return isinstance(value, dict) and len(value) > 1


def _class_name(table: LabelsTable, k: int) -> str:
    return table.class_names[k] if k < len(table.class_names) else str(k)


def _as_written(table: LabelsTable, case: Case) -> str:
    """The case's image relative to the table's folder (as the table spells it), shown only on this machine."""
    try:
        return str(case.image.relative_to(table.path.parent if table.path.is_file() else table.path))
    except ValueError:
        return str(case.image)
