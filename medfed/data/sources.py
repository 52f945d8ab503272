"""What ``--data`` names, read into a `Dataset`: a MedMNIST flag or ``.npz`` (`medfed.data.medmnist`), or a
labels table (``.csv``), a MONAI datalist (``.json``) or a folder of class folders (`medfed.data.table_data`)."""

from __future__ import annotations

from pathlib import Path

from medfed.config import RunConfig
from medfed.data.datalists import is_table_source
from medfed.data.dataset import Dataset
from medfed.data.medmnist import load_medmnist
from medfed.exceptions import ConfigError


def load_dataset(cfg: RunConfig, source: str | None = None, *, download: bool = True, num_classes: int | None = None,
                 cache_dir: Path | None = None, size: tuple[int, ...] | None = None, progress: bool = True) -> Dataset:
    """The run's data (``source`` or ``cfg.dataset.source``), read and checked.

    A MedMNIST file keeps its own size (image-size must be 0 or that size) and needs no cache; a table's cases
    are prepared with the run's image settings into the cache, to ``size`` when given (a deployed site: the run's
    input shape).

    Raises:
        DataError: bad data (named, with the rule); ConfigError: image-size other than a MedMNIST file's own.
    """
    text = source or cfg.dataset.source
    if is_table_source(text):
        from medfed.data.table_data import load_table_dataset

        return load_table_dataset(cfg, text, num_classes=num_classes, cache_dir=cache_dir, size=size,
                                  progress=progress)
    data = load_medmnist(text, download=download)
    side = cfg.images.image_size
    if side and any(s != side for s in data.spatial_shape):
        raise ConfigError(f"image-size {side} differs from {data.name}'s own size "
                          f"{'x'.join(map(str, data.spatial_shape))}: MedMNIST files are used at their own size (use "
                          f"the file of that size, e.g. {data.name.split('_')[0]}_{side}.npz, or image-size 0)")
    return data
