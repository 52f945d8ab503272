"""Data throughput in cases per second: MedMNIST .npz arrays against labels tables of real image files (2D PNG,
3D NIfTI) prepared into the persistent case cache, as a site reads them.

Real PneumoniaMNIST images are written as PNG files and real AdrenalMNIST3D volumes as .nii.gz files, each with
a labels table, into a temporary folder (not timed). Then, in this one run, per row (2D 28x28, 3D 28^3, 3D 64^3):

a. npz: ``load_dataset`` on the MedMNIST .npz plus one shuffled pass over its whole train split in batches of
   128 through its ``ArrayImages``;
b. cold prepare: ``load_dataset`` on the table with an empty cache folder (hash, decode, preprocess, write);
c. warm load: ``load_dataset`` again on the same cache (hash and reuse);
d. cached pass: one shuffled pass over every train case through the dataset's ``CachedImages`` (batches of 128
   in 2D, 16 in 3D), as pretraining reads them.

Writes into docs/RESULTS.md (section ``data_throughput``); ``--no-write`` only prints.

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --cases-2d 4000 --cases-3d 400 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.imaging_fixtures
from results_md import write_section

from medfed.config import run_config
from medfed.data.sources import load_dataset
from medfed.data.stores import ArrayImages, CachedImages, ImageStore
from tests.imaging_fixtures import write_nifti, write_png

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", ROOT.parent / "shared" / "data" / "medmnist"))
NPZ_2D, NPZ_3D = SHARED / "pneumoniamnist.npz", SHARED / "adrenalmnist3d.npz"
NPZ_BATCH = 128
CACHED_BATCH = {2: 128, 3: 16}
T = TypeVar("T")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def real_images(npz: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images (uint8) and labels of the file's train, val and test splits, in that order.
    Refuses more than the file holds: a repeated image has the same bytes, which the cache prepares once."""
    with np.load(npz) as data:
        images = np.concatenate([data[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([data[f"{s}_labels"] for s in ("train", "val", "test")])[:, 0]
    if count > len(images):
        raise SystemExit(f"{npz.name} holds {len(images)} distinct images; asked for {count} (repeats would share one "
                         "cache entry and flatter the cold prepare)")
    return images[:count], labels[:count]


def write_table(folder: Path, npz: Path, count: int, suffix: str) -> Path:
    """``count`` real images of ``npz`` as files (PNG or .nii.gz) under ``folder`` and a labels table (no split
    column: the run's seed splits it) beside them."""
    images, labels = real_images(npz, count)
    files = folder / "images"
    files.mkdir(parents=True)
    table = folder / "labels.csv"
    with table.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "label"])
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = f"images/case{i:05d}{suffix}"
            if suffix == ".png":
                write_png(image, folder / name)
            else:
                write_nifti(image, folder / name)
            out.writerow([name, int(label)])
    return table


def one_pass(store: ImageStore, batch: int, seed: int = 0) -> int:
    """Read every case of ``store`` once, in shuffled batches; returns the cases read."""
    order = torch.randperm(len(store), generator=torch.Generator().manual_seed(seed))
    read = 0
    for start in range(0, len(order), batch):
        read += len(store[order[start:start + batch]])
    return read


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@dataclass
class NpzFigures:
    cases: int
    load_s: float
    pass_s: float

    @property
    def rate(self) -> float:
        return self.cases / (self.load_s + self.pass_s)


@dataclass
class TableFigures:
    rows: int
    train: int
    cold_s: float
    warm_s: float
    pass_s: float


def measure_npz(npz: Path) -> NpzFigures:
    cfg = run_config(data=str(npz))
    data, load_s = timed(lambda: load_dataset(cfg, str(npz), download=False, progress=False))
    assert isinstance(data.train.images, ArrayImages)
    read, pass_s = timed(lambda: one_pass(data.train.images, NPZ_BATCH))
    return NpzFigures(read, load_s, pass_s)


def measure_table(table: Path, size: int, workers: int, cache: Path) -> TableFigures:
    # PneumoniaMNIST holds a few identical images in two splits: the later of each pair is left out (on-bad-case skip)
    cfg = run_config(data=str(table), image_size=size, loader_workers=workers, on_bad_case="skip")
    cold, cold_s = timed(lambda: load_dataset(cfg, str(table), cache_dir=cache, progress=False))
    warm, warm_s = timed(lambda: load_dataset(cfg, str(table), cache_dir=cache, progress=False))
    if warm.sha256 != cold.sha256:
        raise SystemExit(f"{table}: the warm load differs from the cold one")
    assert isinstance(warm.train.images, CachedImages)
    rows = len(cold.train) + len(cold.val) + len(cold.test)
    batch = CACHED_BATCH[len(warm.spatial_shape)]
    read, pass_s = timed(lambda: one_pass(warm.train.images, batch))
    return TableFigures(rows, read, cold_s, warm_s, pass_s)


def filesystem_of(path: Path) -> str:
    """The file system type the folder lives on (from /proc/mounts), or 'unknown'."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases-2d", type=int, default=4000, help="PneumoniaMNIST images written as PNG (<= 5856)")
    parser.add_argument("--cases-3d", type=int, default=400, help="AdrenalMNIST3D volumes written as .nii.gz (<= 1584)")
    parser.add_argument("--workers", type=int, default=2, help="loader-workers of the cold prepare")
    parser.add_argument("--no-write", action="store_true", help="print the section only; leave docs/RESULTS.md")
    args = parser.parse_args()
    for name in ("cases_2d", "cases_3d"):
        if getattr(args, name) < 10:
            parser.error(f"--{name.replace('_', '-')} must be at least 10 (val and test need cases)")

    work = Path(tempfile.mkdtemp(prefix="medfed-throughput-"))
    try:
        log(f"writing {args.cases_2d} PNG and {args.cases_3d} NIfTI files under {work} (not timed)")
        table_2d = write_table(work / "png", NPZ_2D, args.cases_2d, ".png")
        table_3d = write_table(work / "nifti", NPZ_3D, args.cases_3d, ".nii.gz")
        log("npz: PneumoniaMNIST")
        npz_2d = measure_npz(NPZ_2D)
        log("npz: AdrenalMNIST3D")
        npz_3d = measure_npz(NPZ_3D)
        rows: list[tuple[str, NpzFigures, TableFigures]] = []
        for label, table, size, npz in (("2D 28x28 PNG", table_2d, 28, npz_2d), ("3D 28^3 NIfTI", table_3d, 28, npz_3d),
                                        ("3D 64^3 NIfTI", table_3d, 64, npz_3d)):
            log(f"table: {label} (cold, warm, cached pass)")
            cache = Path(tempfile.mkdtemp(prefix="medfed-throughput-cache-"))
            try:
                rows.append((label, npz, measure_table(table, size, args.workers, cache)))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        fs = filesystem_of(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    command = ("python benchmarks/data_throughput.py "
               f"--cases-2d {args.cases_2d} --cases-3d {args.cases_3d} --workers {args.workers}")
    lines = []
    for label, npz, t in rows:
        cached = t.train / t.pass_s
        lines.append(f"| {label} | {t.rows} ({t.train} train) | {npz.rate:,.0f} | {t.rows / t.cold_s:,.0f} | "
                     f"{t.rows / t.warm_s:,.0f} | {cached:,.0f} | {cached / npz.rate:.2f} |")
    text = "\n".join([
        "## Data throughput: npz arrays against prepared image files",
        "",
        f"Command: `{command}`",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__}, one run; "
        f"files, tables and caches in fresh temporary folders on {fs}.",
        "",
        "Cases per second. npz: `load_dataset` on the MedMNIST .npz plus one shuffled pass over its whole train "
        f"split ({npz_2d.cases} PneumoniaMNIST, {npz_3d.cases} AdrenalMNIST3D cases, all 28 per side) in batches of "
        f"{NPZ_BATCH} through `ArrayImages`. Cold prepare: `load_dataset` on the labels table with an empty cache "
        f"(hash, decode, preprocess, write; loader-workers {args.workers}), per table row. Warm load: the same call "
        "again on that cache (hash and reuse), per row. Cached pass: one shuffled pass over the table's train split "
        f"through `CachedImages` in batches of {CACHED_BATCH[2]} (2D) or {CACHED_BATCH[3]} (3D), as pretraining "
        "reads it. The tables are real PneumoniaMNIST images written as PNG and real AdrenalMNIST3D volumes (28^3) "
        "written as .nii.gz, split by the run's seed (no split column); the 3D rows read the same files, prepared "
        "to 28^3 and resampled to 64^3.",
        "",
        "| data | table rows | npz load + pass | cold prepare | warm load | cached pass | cached pass / npz |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"npz load alone: {npz_2d.load_s:.2f} s (2D), {npz_3d.load_s:.2f} s (3D); the 3D 64^3 row is compared with "
        "the 28^3 npz (no 64^3 file is used). The cached pass reads entries just written, so from the OS page "
        "cache, not from a cold disk.",
    ])
    if not args.no_write:
        write_section("data_throughput", text)
    print(text)


if __name__ == "__main__":
    main()
