"""A run's data, whatever its source: train, val and test splits of prepared images and their labels.

`Dataset` is what a MedMNIST file (`medfed.data.medmnist`) and a labels table, datalist or class folders
(`medfed.data.table_data`) both become. Its images are `ImageStore`s, read a batch at a time
(`medfed.data.stores`); labels are int64 ``(N, K)`` arrays (K = 1 unless multi-label). A table's train split
may hold unlabelled cases (label row of -1): they are pretrained on and never used as labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.constants import TaskType
from medfed.data.stores import ImageStore

SPLITS = ("train", "val", "test")
UNLABELLED = -1
"""The label row of a case without a label (every entry -1)."""


@dataclass(frozen=True)
class Split:
    """One split: ``images`` ``(N, C, *S)`` read on demand; ``labels`` int64 ``(N, K)`` (-1 rows: unlabelled);
    ``sites``: the hospital each case belongs to (a table's site column), or empty."""

    images: ImageStore
    labels: np.ndarray
    sites: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> np.ndarray:
        """Positions of the cases that have a label."""
        return np.flatnonzero(self.labels[:, 0] != UNLABELLED) if len(self.labels) else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Dataset:
    """A validated dataset with its train/val/test splits.

    ``sha256`` identifies the contents (a file's bytes; for a table, every case's image content, label and split,
    and the preprocessing), so a site can check it reads what the partition was cut from. ``path`` is where the
    centre read it (never written to a run directory for a table: the table's folder is the hospital's).
    """

    name: str
    path: Path
    sha256: str
    train: Split
    val: Split
    test: Split
    task: TaskType
    num_classes: int  # classes (binary/multi-class) or labels (multi-label)
    source: str = "medmnist"  # medmnist | table
    site_names: tuple[str, ...] = ()  # the hospitals a table names, in order of first appearance
    class_names: tuple[str, ...] = ()
    preprocessing: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # counts for the report: skipped cases, unused rows

    @property
    def channels(self) -> int:
        return self.train.images.channels

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.train.images.spatial_shape

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def describe(self) -> dict[str, object]:
        """What the run directory records about its data: shapes, task, sizes; a MedMNIST file's path, never a
        table's case paths."""
        info: dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "task": self.task.value,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "spatial_shape": list(self.spatial_shape),
            "sizes": {s: len(self.split(s)) for s in SPLITS},
        }
        if self.source == "medmnist":
            info["path"] = str(self.path)
        if self.train.labels.size:
            info["unlabelled"] = int(len(self.train) - len(self.train.labelled))
        for key, value in (("sites_in_table", list(self.site_names)), ("class_names", list(self.class_names)),
                           ("preprocessing", self.preprocessing), ("notes", self.notes)):
            if value:
                info[key] = value
        return info
