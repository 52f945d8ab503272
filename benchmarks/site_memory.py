"""Peak memory of one site against its number of cases: a labels table of 2D PNG files read through the
persistent case cache, with the MedMNIST .npz path as a reference.

Real PneumoniaMNIST images (train, val and test: 5856 distinct images) are written as PNG files under new names,
as many as the largest site needs: file i holds real image i mod 5856, so beyond 5856 files the bytes repeat and
identical files share one cache entry. For each number of cases N, a table of the first N files is measured in
fresh subprocesses (peak resident memory, ``ru_maxrss``):

* cold: ``load_dataset`` with an empty cache (decode, preprocess, write the cache; loader-workers ``--workers``);
* steady (the same cache, now warm): ``load_dataset``, ``site_from_own_file(data, 0, 1.0, 0)``, one pass over
  every train case in batches of 128 through the site's store, then ``--steps`` SimCLR steps (AdamW, random
  batches of 128, width 8) built as ``SiteAlgo.pretrain_round`` builds them.

Reference lines: the interpreter with torch and medfed imported, and the PneumoniaMNIST .npz (its whole train
split) through the same steady steps. Writes into docs/RESULTS.md (section ``site_memory``); ``--no-write``
only prints.

    python benchmarks/site_memory.py
    python benchmarks/site_memory.py --cases 1000,5000,10000,20000 --workers 2 --steps 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.imaging_fixtures
from results_md import write_section

from medfed.config import run_config
from medfed.data.site import site_from_own_file
from medfed.data.sources import load_dataset
from medfed.task.algo import SiteAlgo
from medfed.task.model_setup import initial_encoder_state
from tests.imaging_fixtures import write_png

ROOT = Path(__file__).resolve().parents[1]
NPZ = Path(os.environ.get("MEDFED_SHARED_DATA", ROOT.parent / "shared" / "data" / "medmnist")) / "pneumoniamnist.npz"
DISTINCT = 4708 + 524 + 624  # PneumoniaMNIST's train, val and test images
READ_BATCH = 128
WIDTH = 8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_mb() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now."""
    return psutil.Process().memory_info().rss / 2**20


def workers_peak_mb() -> float:
    """The largest peak of this process's finished children (the cache build's loader workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---- the child: one measurement per process ------------------------------------------------------------------


def child(phase: str, source: str, cache: str, image_size: int, workers: int, steps: int) -> dict[str, Any]:
    """What one fresh process measures: its own peak (ru_maxrss) and resident memory after each stage."""
    start = time.perf_counter()
    out: dict[str, Any] = {"phase": phase, "after_import_mb": peak_mb(), "rss_after_import_mb": rss_mb()}
    if phase == "baseline":
        return {**out, "peak_mb": peak_mb(), "seconds": time.perf_counter() - start}
    is_npz = phase == "npz"
    cfg = run_config(data=source, pretrain_rounds=1, pretrain_batch_size=128, width=WIDTH,
                     loader_workers=workers if phase == "cold" else 0,
                     **({} if is_npz else {"image_size": image_size, "on_bad_case": "skip"}))
    data = load_dataset(cfg, source, download=False, cache_dir=None if is_npz else Path(cache), progress=False)
    out["after_load_mb"], out["rss_after_load_mb"] = peak_mb(), rss_mb()
    out["rows"] = len(data.train) + len(data.val) + len(data.test)
    if phase == "cold":
        return {**out, "peak_mb": peak_mb(), "workers_peak_mb": workers_peak_mb(),
                "seconds": time.perf_counter() - start}
    site = site_from_own_file(data, 0, 1.0, 0)
    images = site.train_images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(order), READ_BATCH):
        images[order[i:i + READ_BATCH]]
    out["train_cases"] = len(images)
    out["after_pass_mb"], out["rss_after_pass_mb"] = peak_mb(), rss_mb()
    method = SiteAlgo(cfg, site).build_method(initial_encoder_state(cfg, site.spec), None)
    method.train()
    trainable = [p for p in method.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=cfg.ssl.lr)
    gen = torch.Generator().manual_seed(0)
    batch = min(cfg.ssl.batch, len(images))
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=gen)[:batch]
        optimiser.zero_grad()
        method.loss(images[idx], gen).backward()
        optimiser.step()
        method.on_step_end()
    out["after_steps_mb"] = peak_mb()
    return {**out, "peak_mb": peak_mb(), "seconds": time.perf_counter() - start}


# ---- the parent ----------------------------------------------------------------------------------------------


def split_of(i: int, distinct: int) -> str:
    """Row i's split: among the distinct images every tenth is val and the next test; repeats are train."""
    if i >= distinct:
        return "train"
    return {0: "val", 1: "test"}.get(i % 10, "train")


def image_of(i: int, distinct: int) -> int:
    """The real image row i holds: image i, and beyond the distinct ones a repeat of a train image only (an image in
    two splits is refused as a leak)."""
    if i < distinct:
        return i
    train = [k for k in range(10) if k not in (0, 1)]
    j = i - distinct
    return ((j // len(train)) * 10 + train[j % len(train)]) % (distinct - distinct % 10 or distinct)


def write_files(folder: Path, count: int) -> tuple[list[str], np.ndarray, int]:
    """``count`` PNG files of real images (`image_of`); their names relative to ``folder``, their labels, and the
    number of distinct images."""
    with np.load(NPZ) as data:
        images = np.concatenate([data[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([data[f"{s}_labels"] for s in ("train", "val", "test")])[:, 0]
    distinct = len(images)
    if distinct != DISTINCT:
        raise SystemExit(f"{NPZ} holds {distinct} images, not the pinned file's {DISTINCT}")
    (folder / "images").mkdir(parents=True)
    names = []
    which = [image_of(i, distinct) for i in range(count)]
    for i, k in enumerate(which):
        name = f"images/case{i:06d}.png"
        write_png(images[k], folder / name)
        names.append(name)
    return names, labels[np.asarray(which, dtype=np.int64)], distinct


def write_table(folder: Path, names: list[str], labels: np.ndarray, n: int) -> Path:
    table = folder / f"site_{n}.csv"
    with table.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "label", "split"])
        out.writerows([name, int(label), split_of(i, DISTINCT)]
                      for i, (name, label) in enumerate(zip(names[:n], labels[:n], strict=True)))
    return table


def run_child(phase: str, args: argparse.Namespace, source: str = "", cache: str = "", n: int = 0) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--phase", phase,
               "--source", source, "--cache-dir", cache, "--image-size", str(args.image_size),
               "--workers", str(args.workers), "--steps", str(args.steps)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="1000,5000,10000,20000", help="comma-separated numbers of cases")
    parser.add_argument("--workers", type=int, default=2, help="loader-workers of the cold build")
    parser.add_argument("--steps", type=int, default=20, help="SimCLR steps after the pass")
    parser.add_argument("--image-size", type=int, default=28, help="side the PNG cases are prepared to")
    parser.add_argument("--no-write", action="store_true", help="print the section only; leave docs/RESULTS.md")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("baseline", "cold", "steady", "npz"), help=argparse.SUPPRESS)
    parser.add_argument("--source", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = child(args.phase, args.source, args.cache_dir, args.image_size, args.workers, args.steps)
        print(json.dumps({"cases": args.child, **result}))
        return
    try:
        cases = sorted({int(c) for c in args.cases.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--cases takes comma-separated whole numbers; got {args.cases!r}")
    if not cases or cases[0] < 10:
        parser.error("--cases needs numbers of at least 10 (val and test need cases)")

    work = Path(tempfile.mkdtemp(prefix="medfed-site-memory-"))
    results: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    try:
        log(f"writing {cases[-1]} PNG files under {work} (not measured)")
        names, labels, distinct = write_files(work, cases[-1])
        log("reference: interpreter with torch and medfed imported")
        baseline = run_child("baseline", args)
        log("reference: PneumoniaMNIST npz")
        npz = run_child("npz", args, source=str(NPZ))
        for n in cases:
            table = write_table(work, names, labels, n)
            cache = work / f"cache_{n}"
            log(f"{n} cases: cold build")
            cold = run_child("cold", args, str(table), str(cache), n)
            log(f"{n} cases: steady state (warm cache)")
            steady = run_child("steady", args, str(table), str(cache), n)
            shutil.rmtree(cache, ignore_errors=True)
            results.append((n, cold, steady))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    command = (f"python benchmarks/site_memory.py --cases {','.join(map(str, cases))} --workers {args.workers} "
               f"--steps {args.steps} --image-size {args.image_size}")
    def growth(r: dict[str, Any]) -> float:
        return r["rss_after_pass_mb"] - r["rss_after_import_mb"]

    rows = [
        f"| {n} ({min(n, distinct)} distinct) | {s['train_cases']} | {s['rss_after_pass_mb']:.0f} | {growth(s):+.0f} | "
        f"{s['peak_mb']:.0f} | {c['peak_mb']:.0f} | {c['workers_peak_mb']:.0f} |"
        for n, c, s in results
    ]
    first, last = results[0], results[-1]
    text = "\n".join([
        "## Peak memory of one site against its number of cases",
        "",
        f"Command: `{command}`",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__}, one run; "
        "every figure in MB, each from a fresh Python process: peaks are `ru_maxrss`, the resident memory now is "
        "psutil's RSS.",
        "",
        f"A labels table of N real PneumoniaMNIST images written as PNG files (prepared to {args.image_size}x"
        f"{args.image_size}; every tenth distinct image val, the next test). There are {distinct} distinct images; "
        f"beyond {distinct} cases the files repeat train images' bytes under new names (train rows only: an image in "
        "two splits is refused; PneumoniaMNIST itself holds a few identical images in two official splits, left out "
        "with on-bad-case skip), and "
        f"identical files share one cache entry: the cache never holds more than {distinct} entries (and a cold "
        "build decodes each distinct image once), while the site's store still lists one key per case. Steady: with "
        "the cache already built by the cold run, `load_dataset` (hash and reuse), `site_from_own_file(data, 0, 1.0, "
        f"0)`, one pass over every train case in shuffled batches of {READ_BATCH} through the site's `CachedImages`, "
        f"then {args.steps} SimCLR steps of the width-{WIDTH} encoder (AdamW, random batches of 128, loader-workers "
        f"0). Cold build: `load_dataset` with an empty cache, loader-workers {args.workers}; the peak of the main "
        "process and, separately, of its largest loader worker (a forked process: most of its resident pages are "
        "shared with the main process, so the two are not to be added). Importing torch, MONAI and medfed sets a "
        f"high-water mark ({baseline['peak_mb']:.0f} MB here) that a peak hides smaller growth under, so the "
        "resident memory after the pass, and its growth since the imports, are given as well.",
        "",
        "| cases N | train cases | steady: RSS after load, site and pass | growth since imports | "
        "steady: peak after the steps | cold build: peak, main | cold build: peak, largest worker |",
        "|---|---|---|---|---|---|---|",
        *rows,
        f"| reference: PneumoniaMNIST npz, whole train split (`ArrayImages`) | {npz['train_cases']} | "
        f"{npz['rss_after_pass_mb']:.0f} | {growth(npz):+.0f} | {npz['peak_mb']:.0f} | - | - |",
        f"| reference: Python with torch and medfed imported, nothing run | - | {baseline['rss_after_import_mb']:.0f} "
        f"| - | {baseline['peak_mb']:.0f} | - | - |",
        "",
        f"Ratios at {last[0]} cases to {first[0]} cases ({last[0] / first[0]:.0f}x the cases): RSS after the pass "
        f"{last[2]['rss_after_pass_mb'] / first[2]['rss_after_pass_mb']:.2f}x, steady peak after the steps "
        f"{last[2]['peak_mb'] / first[2]['peak_mb']:.2f}x, cold-build peak (main) "
        f"{last[1]['peak_mb'] / first[1]['peak_mb']:.2f}x.",
    ])
    if not args.no_write:
        write_section("site_memory", text)
    print(text)


if __name__ == "__main__":
    main()
