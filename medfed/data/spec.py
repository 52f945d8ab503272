"""What a run's input looks like, and the check that a site's own data fits it.

In a deployment every site reads its own file, and nothing else ties that file to the run: a 32x32
file would train and be averaged silently into a 28x28 federation (the CNN pools globally), an RGB
file would fail deep inside torch, and another task or class count would train a head of the wrong
meaning. The ServerApp therefore sends the run's input spec with every message (flat kebab-case
keys, `DataSpec.to_flat`), and a site checks its data against it (`check_matches`) before it trains
or evaluates anything.

`DataSpec` holds only shapes, channels, task and class count (plus the *run's* data name, which is
the centre's, never a site's): `check_matches`' message is sent to the server, so it must carry no
site file path and no patient identifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from medfed.constants import TaskType
from medfed.data.dataset import Dataset
from medfed.exceptions import ConfigError, DataMismatch

INPUT_NAME, INPUT_CHANNELS, INPUT_SHAPE, INPUT_TASK, INPUT_CLASSES = (
    "input-name", "input-channels", "input-shape", "input-task", "input-classes")
INPUT_KEYS = (INPUT_NAME, INPUT_CHANNELS, INPUT_SHAPE, INPUT_TASK, INPUT_CLASSES)
"""Message-config keys of the run's input spec (the ServerApp adds them to every message)."""

COLOURS = {1: "grayscale", 3: "RGB"}


@dataclass(frozen=True)
class DataSpec:
    """The input of a run or of a site's data: channels, spatial shape (2D or 3D), task and number of
    classes (labels, for multi-label). ``name`` names the run's data (the centre's flag or file stem,
    e.g. ``pneumoniamnist``) and is empty for a site's own data: a site's file name is never shown."""

    channels: int
    spatial_shape: tuple[int, ...]
    task: TaskType
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ConfigError(f"{INPUT_CHANNELS} must be an integer >= 1; got {self.channels!r}")
        if len(self.spatial_shape) not in (2, 3) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.spatial_shape):
            raise ConfigError(f"{INPUT_SHAPE} must be 2 or 3 sizes >= 1 (2D or 3D images); got {self.spatial_shape!r}")
        if not isinstance(self.task, TaskType):
            raise ConfigError(f"{INPUT_TASK} must be a TaskType; got {self.task!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(f"{INPUT_CLASSES} must be an integer >= 2; got {self.num_classes!r}")
        if self.task == TaskType.BINARY and self.num_classes != 2:
            raise ConfigError(f"{INPUT_CLASSES} must be 2 for a binary task; got {self.num_classes}")

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def of(cls, data: Dataset, name: str = "") -> DataSpec:
        """The spec of a loaded file; ``name`` only for the run's (centre's) data, never a site's."""
        return cls(data.channels, data.spatial_shape, data.task, data.num_classes, name)

    def to_flat(self) -> dict[str, int | str]:
        """Flat kebab-case message-config entries (``input-shape`` as ``"28x28"``)."""
        return {INPUT_NAME: self.name, INPUT_CHANNELS: self.channels,
                INPUT_SHAPE: "x".join(str(s) for s in self.spatial_shape), INPUT_TASK: self.task.value,
                INPUT_CLASSES: self.num_classes}

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> DataSpec:
        """Read the spec from a message config (or a TOML table); `ConfigError` naming the key when one is
        missing or malformed."""
        missing = [k for k in INPUT_KEYS if k not in flat]
        if missing:
            raise ConfigError(f"the run config carries no input spec ({', '.join(missing)} missing): the server "
                              "must send the run's input so a site can check its data against it")
        channels = _integer(flat, INPUT_CHANNELS)
        shape_text = flat[INPUT_SHAPE]
        try:
            if not isinstance(shape_text, str):
                raise ValueError
            shape = tuple(int(s) for s in shape_text.split("x"))
        except ValueError:
            raise ConfigError(f"{INPUT_SHAPE} must be sizes joined by 'x' (e.g. 28x28 or 28x28x28); "
                              f"got {shape_text!r}") from None
        try:
            task = TaskType(str(flat[INPUT_TASK]))
        except ValueError:
            raise ConfigError(f"{INPUT_TASK} must be one of {', '.join(t.value for t in TaskType)}; "
                              f"got {flat[INPUT_TASK]!r}") from None
        name = flat[INPUT_NAME]
        if not isinstance(name, str):
            raise ConfigError(f"{INPUT_NAME} must be a string; got {name!r}")
        return cls(channels, shape, task, _integer(flat, INPUT_CLASSES), name)

    # ---- description ----------------------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    def describe(self) -> str:
        """``1x28x28 grayscale, binary``; ``3x28x28 RGB, multi-class (9 classes)``; ``1x28x28x28 grayscale 3D,
        multi-label (14 labels)``: shapes, channels and task only."""
        colour = COLOURS.get(self.channels, f"{self.channels}-channel")
        dims = " 3D" if self.spatial_dims == 3 else ""
        size = "x".join(str(s) for s in (self.channels, *self.spatial_shape))
        return f"{size} {colour}{dims}, {self.task_text()}"

    def task_text(self) -> str:
        if self.task == TaskType.BINARY:
            return "binary"
        unit = "labels" if self.task == TaskType.MULTILABEL else "classes"
        return f"{self.task.value} ({self.num_classes} {unit})"

    def differences(self, other: DataSpec) -> list[str]:
        """What differs from ``other``: among channels, image dimensions, image size, task, number of classes."""
        out = []
        if self.channels != other.channels:
            out.append("channels")
        if self.spatial_dims != other.spatial_dims:
            out.append("image dimensions (2D/3D)")
        elif self.spatial_shape != other.spatial_shape:
            out.append("image size")
        if self.task != other.task:
            out.append("task")
        elif self.num_classes != other.num_classes:
            out.append("number of classes" if self.task != TaskType.MULTILABEL else "number of labels")
        return out


def _integer(flat: Mapping[str, object], key: str) -> int:
    value = flat[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    return value


def check_matches(site_spec: DataSpec, run_spec: DataSpec, site: str = "this site") -> None:
    """Return if a site's data fit the run's input; else raise `DataMismatch` (a `DataError`) naming both, e.g.
    ``site h2's data is 3x32x32 RGB, binary; the run's input is 1x28x28 grayscale, binary (pneumoniamnist):
    they differ in channels, image size``. The message holds only shapes, channels, task and class counts (and
    the run's data name), so a site may send it to the server as its refusal."""
    diffs = site_spec.differences(run_spec)
    if not diffs:
        return
    run_name = f" ({run_spec.name})" if run_spec.name else ""
    raise DataMismatch(f"site {site}'s data is {site_spec.describe()}; the run's input is {run_spec.describe()}"
                       f"{run_name}: they differ in {', '.join(diffs)}")
