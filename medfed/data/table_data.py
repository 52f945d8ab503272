"""A labels table, datalist or class folders made into a `Dataset`: every case read, checked and prepared into
the site's persistent cache, split into train/val/test, and served a batch at a time from that cache.

What happens, in order (nothing is written beside the data; only the cache, on this machine's disk, grows):

1. the source is read and checked without opening an image (`medfed.data.datalists.read_source`);
2. every row's image dimensionality is read from its header (a table holds 2D or 3D images, not both);
3. every case is fully decoded and prepared with the run's `Preprocess` (`medfed.data.cache.CaseCache.build`,
   a DataLoader's workers; cases already cached under the same content and preprocessing are reused);
   unreadable cases stop the run naming each row and its reason, or with ``on-bad-case skip`` are left out
   and counted;
4. rows without a split are split with the run's seed, by patient, inside each hospital (`assign_splits`).

The dataset's identity (``sha256``) covers every case's content key, label, split and hospital and the
preprocessing, never a path: a site checks it reads what the partition was cut from.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfed.config import RunConfig
from medfed.config.images import ImageSettings
from medfed.constants import OnBadCase
from medfed.data.cache import CacheBuild, CaseCache, default_cache_dir
from medfed.data.datalists import read_source
from medfed.data.dataset import SPLITS, UNLABELLED, Dataset, Split
from medfed.data.images import Preprocess, image_kind
from medfed.data.stores import CachedImages
from medfed.data.table import Case, LabelsTable
from medfed.exceptions import DataError

MAX_LISTED = 20
"""Bad rows named one by one in an error before the rest are counted."""


def preprocess_for(settings: ImageSettings, spatial_dims: int, size: tuple[int, ...] | None = None) -> Preprocess:
    """The run's `Preprocess` for ``spatial_dims``-D cases: to ``size`` (the run's input shape, at a deployed site)
    when it has that many dimensions, else to the image settings' size."""
    own = (settings.size_for(spatial_dims),) * spatial_dims
    shape = size if size is not None and len(size) == spatial_dims else own
    return Preprocess(size=shape, fit=settings.image_fit, modality=settings.modality,
                      ct_window=(settings.ct_window_low, settings.ct_window_high),
                      mr_percentiles=(settings.mr_percentile_low, settings.mr_percentile_high),
                      spacing=settings.voxel_spacing)


def cache_root(settings: ImageSettings) -> Path:
    return Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()


def load_table_dataset(cfg: RunConfig, source: str | Path | None = None, *, num_classes: int | None = None,
                       cache_dir: Path | None = None, size: tuple[int, ...] | None = None,
                       progress: bool = True) -> Dataset:
    """Read, check, prepare (into the cache) and split a labels table, datalist or class folders.

    Args:
        cfg: the run's settings (preprocessing, seed, split fractions, on-bad-case, workers).
        source: the table (default: ``cfg.dataset.source``).
        num_classes: overrides ``cfg.dataset.num_classes`` (a deployed site takes the run's).
        cache_dir: overrides the cache folder (simulated sites use the centre's).
        size: the run's input shape a deployed site prepares its cases to (a shape of other dimensions is left to
            the site's check against the run's input, which names both).
        progress: show a progress bar while cases are prepared.

    Raises:
        DataError: naming the table, the rows and the rule: a bad table, 2D rows mixed with 3D rows, rows of
            different channels, unreadable cases (unless skipped), a val or test row without a label, no label at
            all (a run needs labelled val and test cases).
    """
    table = read_source(source or cfg.dataset.source,
                        num_classes=cfg.dataset.num_classes if num_classes is None else num_classes)
    where = f"data source {table.path.name!r}"
    if table.task is None:
        raise DataError(f"{where} holds no labelled row: a run fine-tunes and evaluates on labels (a table without "
                        "labels can be inspected with `medfed inspect-data`, and pretrained on by a deployed site "
                        "whose run gives the labels elsewhere)")
    dims = table_dims(table, where)
    prep = preprocess_for(cfg.images, dims, size)
    cache = CaseCache(cache_dir or cache_root(cfg.images), prep)
    build = cache.build([c.image for c in table.cases], workers=cfg.images.loader_workers, progress=progress,
                        desc=f"preparing {len(table.cases)} cases")
    cases, keys, skipped = usable_cases(table, build, cfg.images.on_bad_case, where)
    channels = check_channels(table, cases, build, keys, where)
    splits = assign_splits(table, cases, cfg.dataset.val_fraction, cfg.dataset.test_fraction, cfg.experiment.seed,
                           where)
    leaks = check_no_leak(table, cases, keys, splits, where, cfg.images.on_bad_case)
    if leaks:  # skipped: the later case of each pair
        skipped = sorted([*skipped, *(cases[i].row for i in leaks)])
        keep = sorted(set(range(len(cases))) - set(leaks))
        cases, keys, splits = [cases[i] for i in keep], [keys[i] for i in keep], [splits[i] for i in keep]
    width = table.num_classes if table.task == "multi-label" else 1
    by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
    unused = 0
    for i, (case, split) in enumerate(zip(cases, splits, strict=True)):
        if split != "train" and case.label is None:
            unused += 1  # an unlabelled row of a val/test patient: kept out of training, no label to evaluate
            continue
        by_split[split].append(i)

    def labels_of(index: list[int]) -> np.ndarray:
        rows = [_label_row(cases[i].label, width) for i in index]
        return np.asarray(rows, dtype=np.int64).reshape(len(index), width)

    parts = {s: Split(CachedImages(cache, [keys[i] for i in idx], channels, prep.size), labels_of(idx),
                      tuple(cases[i].site for i in idx)) for s, idx in by_split.items()}
    train, val, test = (parts[s] for s in SPLITS)
    for s in ("val", "test"):
        if not len(parts[s]):
            raise DataError(f"{where}: no labelled {s} case (give rows split {s}, or raise {s}-fraction)")
    identity = hashlib.sha256(prep.fingerprint().encode())
    for s, idx in by_split.items():
        identity.update(json.dumps([[s, keys[i], cases[i].label, cases[i].site] for i in idx]).encode())
    infos = [e.info for e in build.entries if e is not None]
    return Dataset(
        name=table.path.stem.lower() if table.path.is_file() else table.path.name.lower(),
        path=table.path, sha256=identity.hexdigest(), task=table.task, num_classes=table.num_classes,
        source="table", site_names=tuple(table.sites), class_names=table.class_names,
        preprocessing={**prep.to_dict(), "modalities_seen": sorted({i.modality for i in infos})},
        notes={k: v for k, v in (("skipped_rows", skipped), ("unused_unlabelled_rows", unused)) if v},
        train=train, val=val, test=test,
    )


def table_dims(table: LabelsTable, where: str) -> int:
    """2 or 3: the table's image dimensionality, read from each image's kind and header.

    Raises:
        DataError: 2D rows mixed with 3D rows (the rows of the rarer kind named).
    """
    dims: dict[int, list[int]] = defaultdict(list)
    for case in table.cases:
        dims[case_dims(case.image)].append(case.row)
    if len(dims) > 1:
        minority = min(dims, key=lambda d: len(dims[d]))
        majority = 5 - minority
        raise DataError(f"{where} {table.rows(dims[minority][:MAX_LISTED])}: {minority}D images among {majority}D "
                        f"rows (e.g. {table.rows(dims[majority][:1])}); a table holds 2D or 3D images, not both")
    return next(iter(dims)) if dims else 2


def case_dims(path: Path) -> int:
    """2 or 3 from a case's kind and header only (a NIfTI's shape, a DICOM's number of frames); what cannot be
    read here is reported by the reader later, as 2D."""
    try:
        kind = image_kind(path)
    except DataError:
        return 2
    if kind == "dicom-series":
        return 3
    if kind == "nifti":
        import nibabel

        try:
            shape = nibabel.load(str(path)).shape  # type: ignore[attr-defined]  # header only
        except Exception:  # the reader reports it with its reason
            return 2
        return 3 if len(shape) >= 3 and shape[2] > 1 else 2
    if kind == "dicom":
        import pydicom

        from medfed.data.dicom import quiet_pydicom

        try:
            with quiet_pydicom():
                ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["NumberOfFrames"])
            return 3 if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else 2
        except Exception:  # the reader reports it
            return 2
    return 2


def usable_cases(table: LabelsTable, build: CacheBuild, on_bad: OnBadCase, where: str
                 ) -> tuple[list[Case], list[str], list[int]]:
    """The readable cases and their cache keys; the rows skipped.

    Raises:
        DataError: with ``on-bad-case fail``, naming every bad row (up to `MAX_LISTED`) and its reason.
    """
    if build.bad and on_bad == OnBadCase.FAIL:
        listed = [f"{table.rows([table.cases[b.index].row])}: {b.reason}" for b in build.bad[:MAX_LISTED]]
        more = f"; and {len(build.bad) - MAX_LISTED} more" if len(build.bad) > MAX_LISTED else ""
        raise DataError(f"{where}: {len(build.bad)} case(s) cannot be read ({'; '.join(listed)}{more}); fix or "
                        "remove them, or pass --on-bad-case skip to leave them out")
    cases, keys = [], []
    for case, entry in zip(table.cases, build.entries, strict=True):
        if entry is not None:
            cases.append(case)
            keys.append(entry.key)
    if not cases:
        raise DataError(f"{where}: no case can be read")
    return cases, keys, [table.cases[b.index].row for b in build.bad]


def check_channels(table: LabelsTable, cases: Sequence[Case], build: CacheBuild, keys: Sequence[str], where: str
                   ) -> int:
    """The channels every case has (1 or 3); `DataError` naming the rows that differ from the first."""
    info = {e.key: e.info for e in build.entries if e is not None}
    first = info[keys[0]].channels
    odd = [(c.row, info[k].channels) for c, k in zip(cases, keys, strict=True) if info[k].channels != first]
    if odd:
        raise DataError(f"{where} {table.rows([r for r, _ in odd][:MAX_LISTED])}: {odd[0][1]}-channel images among "
                        f"{first}-channel rows (e.g. {table.rows([cases[0].row])}); every case needs the same channels")
    return first


def assign_splits(table: LabelsTable, cases: Sequence[Case], val_fraction: float, test_fraction: float, seed: int,
                  where: str) -> list[str]:
    """Each case's split: its own, else drawn with ``seed`` by patient (a row without one is its own patient)
    inside each hospital: of the patients with a labelled row, ``val_fraction`` go to val and ``test_fraction``
    to test (at least one each when a hospital has three or more), the rest and every unlabelled-only patient
    to train.

    Raises:
        DataError: a val or test row without a label.
    """
    for case in cases:
        if case.split in ("val", "test") and case.label is None:
            raise DataError(f"{where} {table.rows([case.row])}: a {case.split} case needs a label (unlabelled cases "
                            "are for pretraining: leave their split empty or train)")
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, case in enumerate(cases):
        groups[(case.site, case.patient or f"\0row{case.row}")].append(i)
    out = [c.split for c in cases]
    rng = np.random.default_rng([seed, 14])
    by_site: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for group, members in groups.items():
        given = {cases[i].split for i in members} - {""}
        if given:  # a patient with a split on some rows: its other rows follow it
            for i in members:
                out[i] = out[i] or next(iter(given))
        elif any(cases[i].label is not None for i in members):
            by_site[group[0]].append(group)
        else:
            for i in members:
                out[i] = "train"
    for site in sorted(by_site):
        labelled_groups = by_site[site]
        order = rng.permutation(len(labelled_groups))
        n = len(labelled_groups)
        n_val = _share(val_fraction, n)
        n_test = _share(test_fraction, n)
        for rank, g in enumerate(order):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            for i in groups[labelled_groups[g]]:
                out[i] = split
    return out


def check_no_leak(table: LabelsTable, cases: Sequence[Case], keys: Sequence[str], splits: Sequence[str],
                  where: str, on_bad: OnBadCase) -> list[int]:
    """Identical images (the same bytes under two names) must not sit in two splits: a test case seen in training.
    Public datasets have such pairs (PneumoniaMNIST's official splits do). Returns the positions to leave out with
    ``on-bad-case skip``: the later case of each pair.

    Raises:
        DataError: with ``on-bad-case fail``, naming two rows that hold the same image in different splits.
    """
    first: dict[str, int] = {}
    dropped = []
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if splits[j] == splits[i]:
            continue
        if on_bad == OnBadCase.FAIL:
            raise DataError(f"{where} {table.rows([cases[j].row])} and {table.rows([cases[i].row])}: the same image "
                            f"(identical bytes) in {splits[j]} and {splits[i]}; an image must not be trained on and "
                            "evaluated on (remove one, or pass --on-bad-case skip to leave the later one out)")
        dropped.append(i)
    return dropped


def _share(fraction: float, n: int) -> int:
    """Patients for a held-out split: ``round(fraction * n)``, at least one when the fraction is > 0 and n >= 3."""
    if fraction <= 0:
        return 0
    return max(1 if n >= 3 else 0, int(round(fraction * n)))


def _label_row(label: int | tuple[int, ...] | None, width: int) -> list[int]:
    if label is None:
        return [UNLABELLED] * width
    return list(label) if isinstance(label, tuple) else [label]
