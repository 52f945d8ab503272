"""The default command on a 3D table at 64^3: wall time, peak memory of the whole process tree, AUC.

Builds a NIfTI labels table from ../shared's AdrenalMNIST3D volumes, each resampled from 28^3 to 64^3
(MONAI `Resize`, trilinear, then rounded back to the file's uint8 scale), keeping the official split of every
volume, then runs `medfed simulate --data TABLE` with no other setting (so: image-size auto = 64 for a table,
pretraining batch sized by medfed for the memory, 5 sites, SimCLR 10 rounds, fine-tuning, the default
baselines), in a subprocess, sampling the resident memory of the process tree (Ray workers included).
Issue 14's target: finishes on 2 cores with peak memory of the process tree at most 8 GB.

    python benchmarks/volume_run.py [--train 250 --val 50 --test 100]

The first ``--train/--val/--test`` volumes of each official split are used (AdrenalMNIST3D has 1188/98/298);
the whole file is `--train 1188 --val 98 --test 298` (some hours on 2 cores: 64^3 SimCLR costs about
0.5 s per volume per epoch there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_md import write_section

import medfed._monai  # noqa: F401  (MONAI without transformers)
from medfed.resources import ResourceMonitor
from tests.imaging_fixtures import write_nifti

SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" /
                             "medmnist"))
TARGET_GB = 8.0


def write_table(root: Path, counts: dict[str, int]) -> Path:
    """AdrenalMNIST3D volumes resampled to 64^3 as .nii.gz (1 mm voxels), with a labels table."""
    from monai.transforms import Resize

    resize = Resize((64, 64, 64), mode="trilinear")
    rows = ["image,label,split"]
    with np.load(SHARED / "adrenalmnist3d.npz") as data:
        for split, n in counts.items():
            images, labels = data[f"{split}_images"][:n], data[f"{split}_labels"][:n, 0]
            for i, (volume, label) in enumerate(zip(images, labels, strict=True)):
                big = resize(torch.as_tensor(volume[None], dtype=torch.float32))[0].numpy()
                name = f"{split}{i:04d}.nii.gz"
                write_nifti(np.clip(np.rint(big), 0, 255).astype(np.uint8), root / name)
                rows.append(f"{name},{int(label)},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=250)
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    counts = {"train": args.train, "val": args.val, "test": args.test}
    work = Path(tempfile.mkdtemp(prefix="medfed-volume-"))
    try:
        print(f"writing {sum(counts.values())} volumes at 64^3 ...", file=sys.stderr)
        table = write_table(work, counts)
        medfed = shutil.which("medfed") or str(Path(sys.executable).with_name("medfed"))
        env = {**os.environ, "MEDFED_CACHE_DIR": str(work / "cache"), "FLWR_TELEMETRY_ENABLED": "0"}
        with ResourceMonitor(interval=0.5) as monitor:
            done = subprocess.run([medfed, "simulate", "--data", str(table), "--out-dir", str(work / "runs")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"medfed simulate failed:\n{done.stderr[-3000:]}")
        run_dir = next(p for p in (work / "runs").iterdir() if not p.name.startswith("."))
        summary = json.loads((run_dir / "summary.json").read_text())
        config = summary["config"]
        peak_gb = monitor.peak_bytes / 1e9
        rows = [f"| {name} | {arm['test']['auc']:.3f} | {arm['test']['accuracy']:.3f} | {arm['wall_seconds']:.0f} | "
                f"{arm['peak_memory_mb']:.0f} |" for name, arm in summary["arms"].items()]
        command = "python benchmarks/volume_run.py" + "".join(
            f" --{k} {v}" for k, v in counts.items())
        text = "\n".join([
            "## The default command on a 3D table at 64^3",
            "",
            f"Command: `{command}` (writes {sum(counts.values())} AdrenalMNIST3D volumes resampled to 64^3 as NIfTI "
            "with a labels table, then runs `medfed simulate --data labels.csv`, nothing else set).",
            f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores "
            f"({os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.1f} GB), torch {torch.__version__}: "
            f"wall time {monitor.wall_seconds:.0f} s, peak memory of the process tree {peak_gb:.2f} GB "
            f"({'within' if peak_gb <= TARGET_GB else 'OVER'} the {TARGET_GB:.0f} GB target). "
            f"Splits {counts}; image size {config['image-size'] or 64}^3; pretraining batch chosen by medfed: "
            f"{config['pretrain-batch-size']}; {config['num-sites']} sites ({config['partition']}), "
            f"{config['pretrain']} {config['pretrain-rounds']} rounds.",
            "",
            "| arm | test AUC | test accuracy | arm wall time (s) | arm peak memory (MB) |",
            "|---|---|---|---|---|",
            *rows,
        ])
        print(text)
        if not args.no_write:
            write_section("volume_run", text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
