"""Time the README's main job: `medfed simulate` with its defaults, as a user would run it.

Runs the installed `medfed` command in a subprocess (data from ../shared/data/medmnist),
measures wall time and the peak resident memory of the whole process tree (Ray workers
included), and writes them with the arms' test metrics into docs/RESULTS.md.

    python benchmarks/default_run.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.resources import ResourceMonitor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
LIMIT_S = 600


def main() -> None:
    medfed = shutil.which("medfed") or str(Path(sys.executable).with_name("medfed"))
    out = Path(tempfile.mkdtemp(prefix="medfed-default-"))
    env = {**os.environ, "MEDFED_DATA_PATH": str(SHARED)}
    with ResourceMonitor(interval=0.5) as monitor:
        subprocess.run([medfed, "simulate", "--out-dir", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    run_dir = next(p for p in out.iterdir() if not p.name.startswith("."))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [
        f"| {name} | {arm['test']['auc']:.3f} | {arm['test']['accuracy']:.3f} | {arm['wall_seconds']:.0f} |"
        for name, arm in summary["arms"].items()
    ]
    verdict = "within" if monitor.wall_seconds <= LIMIT_S else "OVER"
    text = "\n".join([
        "## The default run (`medfed simulate` with no options)",
        "",
        "Command: `python benchmarks/default_run.py` "
        "(runs `MEDFED_DATA_PATH=../shared/data/medmnist medfed simulate`).",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores: wall time "
        f"{monitor.wall_seconds:.0f} s ({verdict} the {LIMIT_S} s bound), peak memory of the process tree "
        f"{monitor.peak_bytes / 2**20:.0f} MB. 5 sites, Dirichlet alpha 0.5, PneumoniaMNIST, 10 % labels, "
        "SimCLR 10 rounds, fine-tuning 25 rounds x 1 epoch, seed 0.",
        "",
        "| arm | test AUC | test accuracy | arm wall time (s) |",
        "|---|---|---|---|",
        *rows,
    ])
    write_section("default_run", text)
    shutil.rmtree(out, ignore_errors=True)
    print(text)


if __name__ == "__main__":
    main()
