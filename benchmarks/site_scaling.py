"""Cost growth on CPU against the number of sites (issue 15): wall time per round and peak memory of medfed at 10,
100 and 1000 simulated sites with 10 sampled per round, beside a plain Flower FedAvg app of the same work.

For each number of sites N, alternately (medfed N, plain N, medfed next N, ...: the two share the machine's noise),
one fresh subprocess per run, its process tree (Ray's processes included) sampled with psutil every 0.25 s:

* medfed: ``medfed simulate`` on PneumoniaMNIST, N IID sites, ``--pretrain none --baselines none`` (fine-tuning
  only), ``--label-fraction 1`` (a site trains on its whole train share), ``--fraction-train`` and
  ``--fraction-evaluate`` 10/N, ``--client-cpus 1``, R fine-tuning rounds of one local epoch. Its seconds per round
  are those medfed records itself (metrics.jsonl rows with split "round": train-round-seconds plus
  evaluate-round-seconds, from configure_train to the end of the federated evaluation's aggregation).
* plain: `plain_flower_app.py`, the same model (medfed's classifier, same width and initial weights), data (IID
  shares of the same splits), sampling, optimiser, batch, epochs and Ray backend config, written with Flower alone;
  its rounds are timed at the same points (its ``TimedFedAvg``).

Measured per run: seconds per round (the mean of rounds 2..R: round 1 also pays the Ray workers' first imports, and
is given on its own), the whole subprocess's wall time (interpreter, Ray start, data, rounds, shutdown) and the peak
of the process tree's summed resident memory (shared pages counted once per process). A failed run is reported as
failed with its last log lines; the others go on. Writes the ``site_scaling`` section of docs/RESULTS.md
(``--no-write``: print only) and the raw figures as JSON (``--json``).

    python benchmarks/site_scaling.py --sites 10 100 1000 --rounds 3
    python benchmarks/site_scaling.py --sites 4 8 --rounds 2 --no-write     # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.resources import tree_rss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NPZ = Path(os.environ.get("MEDFED_SHARED_DATA", ROOT.parent / "shared" / "data" / "medmnist")) / "pneumoniamnist.npz"
SIDES = ("medfed", "plain")
GB = 1e9
ROUND_TARGET, MEMORY_TARGET = 1.3, 1.5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fraction_for(sampled: int, sites: int) -> float:
    """The fraction whose ``int(sites * fraction)`` (as Flower's FedAvg and medfed count) is min(sampled, sites)."""
    if sampled >= sites:
        return 1.0
    fraction = sampled / sites
    return fraction if int(sites * fraction) == sampled else (sampled + 1e-6) / sites


def medfed_command(args: argparse.Namespace, sites: int, out_dir: Path) -> list[str]:
    fraction = repr(fraction_for(args.sampled, sites))
    medfed = shutil.which("medfed") or str(Path(sys.executable).with_name("medfed"))
    return [medfed, "simulate", "--data", str(NPZ), "--num-sites", str(sites), "--partition", "iid",
            "--label-fraction", "1.0", "--pretrain", "none", "--baselines", "none",
            "--finetune-rounds", str(args.rounds), "--finetune-epochs", "1", "--fraction-train", fraction,
            "--fraction-evaluate", fraction, "--client-cpus", "1", "--width", str(args.width),
            "--seed", str(args.seed), "--out-dir", str(out_dir), "--run-name", f"sites-{sites}"]


def plain_command(args: argparse.Namespace, sites: int) -> list[str]:
    fraction = repr(fraction_for(args.sampled, sites))
    return [sys.executable, str(HERE / "plain_flower_app.py"), "--num-sites", str(sites), "--rounds", str(args.rounds),
            "--fraction-train", fraction, "--fraction-evaluate", fraction, "--local-epochs", "1",
            "--width", str(args.width), "--seed", str(args.seed), "--client-cpus", "1"]


def run_measured(command: list[str], log_path: Path, timeout: float) -> tuple[int, float, float]:
    """Run ``command``; its exit code, wall seconds and the peak summed RSS (bytes) of its process tree."""
    peak = 0
    with log_path.open("w") as output:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ})
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(child.pid))
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"  timed out after {timeout:.0f} s; stopping pid {child.pid} and its descendants")
            stop_tree(child.pid)
            code = child.wait()
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    return code, wall, float(peak)


def stop_tree(pid: int) -> None:
    """Terminate a process and its descendants, each by its own pid (then kill what is left)."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def medfed_rounds(run_dir: Path) -> tuple[dict[int, float], dict[str, float]]:
    """Seconds of each fine-tuning round from metrics.jsonl, and the final global test metrics (summary.json)."""
    rounds: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "round" and row.get("phase") == "finetune":
            rounds[int(row["round"])] = row["train-round-seconds"] + row["evaluate-round-seconds"]
    arms = json.loads((run_dir / "summary.json").read_text())["arms"]
    test = next(iter(arms.values())).get("test", {})
    return rounds, {k: float(test[k]) for k in ("auc", "accuracy") if k in test}


def plain_rounds(log_path: Path) -> tuple[dict[int, float], dict[str, float]]:
    """Seconds of each round from the app's JSON line, and its last round's aggregated metrics."""
    result = json.loads(log_path.read_text().strip().splitlines()[-1])
    rounds = {int(r): m["train-round-seconds"] + m["evaluate-round-seconds"] for r, m in result["rounds"].items()}
    last = result["rounds"][str(max(rounds))]
    return rounds, {k: float(last[k]) for k in ("train_loss", "eval_loss", "eval_acc") if k in last}


def measure(side: str, sites: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    log_path = work / f"{side}-{sites}.log"
    out_dir = work / f"{side}-{sites}"
    command = medfed_command(args, sites, out_dir) if side == "medfed" else plain_command(args, sites)
    log(f"{side}, {sites} sites: {' '.join(command)}")
    code, wall, peak = run_measured(command, log_path, args.timeout)
    result: dict[str, Any] = {"side": side, "sites": sites, "sampled": min(args.sampled, sites), "exit_code": code,
                              "wall_seconds": wall, "peak_bytes": peak, "command": command}
    try:
        if code != 0:
            raise RuntimeError(f"exit code {code}")
        rounds, metrics = medfed_rounds(out_dir / f"sites-{sites}") if side == "medfed" else plain_rounds(log_path)
    except (RuntimeError, OSError, ValueError, KeyError, StopIteration) as exc:
        result["error"] = f"{exc}: {tail(log_path)}"
        log(f"  FAILED ({exc}); last lines of {log_path}:\n{tail(log_path)}")
        return result
    later = [s for r, s in sorted(rounds.items()) if r > 1] or list(rounds.values())
    result.update(round_seconds={str(r): s for r, s in sorted(rounds.items())}, first_round_seconds=rounds.get(1),
                  seconds_per_round=statistics.mean(later), metrics=metrics)
    log(f"  {result['seconds_per_round']:.2f} s/round (round 1: {rounds.get(1, float('nan')):.2f} s), "
        f"wall {wall:.1f} s, peak {peak / GB:.2f} GB, {metrics}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# ---- the report ----------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def figure(r: dict[str, Any], key: str, scale: float = 1.0, digits: int = 2) -> str:
    value = r.get(key)
    return "failed" if "error" in r else "-" if value is None else f"{value / scale:.{digits}f}"


def ok(r: dict[str, Any], key: str) -> float | None:
    """A run's figure, None when the run failed."""
    return None if "error" in r else r.get(key)


def report(results: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    sites = sorted(args.sites)
    rows = []
    for n in sites:
        m, p = results[("medfed", n)], results[("plain", n)]
        rows.append(
            f"| {n} | {m['sampled']} | {figure(m, 'seconds_per_round')} | {figure(p, 'seconds_per_round')} | "
            f"{ratio(ok(m, 'seconds_per_round'), ok(p, 'seconds_per_round'))} | "
            f"{figure(m, 'first_round_seconds', digits=1)} | {figure(p, 'first_round_seconds', digits=1)} | "
            f"{figure(m, 'wall_seconds', digits=0)} | {figure(p, 'wall_seconds', digits=0)} | "
            f"{figure(m, 'peak_bytes', GB)} | {figure(p, 'peak_bytes', GB)} | "
            f"{ratio(ok(m, 'peak_bytes'), ok(p, 'peak_bytes'))} |"
        )
    big, small = (1000, 100) if {1000, 100} <= set(sites) else (sites[-1], sites[-2] if len(sites) > 1 else sites[-1])
    growth = []
    for side in SIDES:
        hi, lo = results[(side, big)], results[(side, small)]
        both = "error" not in hi and "error" not in lo
        t = ratio(hi.get("seconds_per_round"), lo.get("seconds_per_round")) if both else "-"
        mem = ratio(hi["peak_bytes"], lo["peak_bytes"]) if both else "-"
        verdict = ""
        if side == "medfed" and both:
            t_ok = hi["seconds_per_round"] <= ROUND_TARGET * lo["seconds_per_round"]
            m_ok = hi["peak_bytes"] <= MEMORY_TARGET * lo["peak_bytes"]
            verdict = (f" (target: at most {ROUND_TARGET}x and {MEMORY_TARGET}x: round time "
                       f"{'met' if t_ok else 'MISSED'}, memory {'met' if m_ok else 'MISSED'})")
        growth.append(f"- {side}, {big} sites against {small}: seconds per round {t}, peak memory {mem}{verdict}.")
    failures = [f"- {r['side']}, {r['sites']} sites failed: `{r['error'].splitlines()[-1][:300]}`"
                for r in results.values() if "error" in r]
    sizes = ", ".join(f"{n} sites: about {4708 // n} train and {524 / n:.1f} val images each" for n in sites)
    return "\n".join([
        "## Cost growth with the number of sites (CPU), beside a plain Flower app",
        "",
        f"Command: `{command}`",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, one run per cell, medfed and plain "
        f"alternating. PneumoniaMNIST (28x28), IID sites ({sizes}), {args.sampled} sampled per round for training and "
        f"as many for federated evaluation, {args.rounds} rounds of one local epoch of full fine-tuning of medfed's "
        f"CNN (width {args.width}, same initial weights) with AdamW at medfed's fine-tuning recipe, client-cpus 1 "
        "(two sites train at once on 2 cores), no pretraining.",
        "",
        "medfed is `medfed simulate --pretrain none --baselines none --label-fraction 1 --partition iid` (its own "
        "round times from metrics.jsonl); plain is `benchmarks/plain_flower_app.py`, Flower's FedAvg with the "
        "quickstart-pytorch pattern, the same model, data shares, sampling, optimiser and Ray backend config. A round "
        "is timed on both from configure_train to the end of the federated evaluation's aggregation; s/round is the "
        "mean of rounds 2 on (round 1 also pays the Ray workers' first imports of torch and medfed, shown on its "
        "own). Per round medfed also applies its batched light augmentation (about 0.06 ms per 128 images, "
        "augment_cost above), computes AUC and score histograms in evaluation, and after each round evaluates the "
        "global model on the test split and on the test shares of the sites evaluated that round at the server "
        "and writes metrics.jsonl: those last are outside s/round and inside wall time. Peak memory: the largest "
        "sum of resident memory over the run's process tree (the CLI or app process and every Ray process), "
        "sampled every 0.25 s. With one dataset cut N ways the work per site shrinks as N grows, so what grows "
        "with N is the frameworks' "
        "per-site cost.",
        "",
        "| sites | sampled | medfed s/round | plain s/round | medfed / plain | medfed round 1 (s) | plain round 1 (s) "
        "| medfed wall (s) | plain wall (s) | medfed peak (GB) | plain peak (GB) | medfed / plain memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *growth,
        *failures,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000], help="numbers of sites")
    parser.add_argument("--rounds", type=int, default=3, help="fine-tuning rounds per run")
    parser.add_argument("--sampled", type=int, default=10, help="sites sampled per round (train and evaluate)")
    parser.add_argument("--width", type=int, default=16, help="the CNN's width on both sides (medfed's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--json", default="bench-runs/site_scaling.json", help="raw figures ('' to skip)")
    parser.add_argument("--no-write", action="store_true", help="print the section only; leave docs/RESULTS.md")
    args = parser.parse_args()
    if min(args.sites) < 2 or args.rounds < 1 or args.sampled < 2:
        parser.error("--sites need at least 2 each, --rounds at least 1, --sampled at least 2")
    args.sites = sorted(set(args.sites))
    if not NPZ.is_file():
        parser.error(f"{NPZ} not found (set MEDFED_SHARED_DATA to the folder holding pneumoniamnist.npz)")
    command = (f"python benchmarks/site_scaling.py --sites {' '.join(map(str, args.sites))} --rounds {args.rounds} "
               f"--sampled {args.sampled} --width {args.width} --seed {args.seed}")
    work = Path(tempfile.mkdtemp(prefix="medfed-site-scaling-"))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for n in args.sites:
            for side in SIDES:
                results[(side, n)] = measure(side, n, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(results, args, command)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": command, "runs": list(results.values())}, indent=1))
    if not args.no_write:
        write_section("site_scaling", text)
    print(text)


if __name__ == "__main__":
    main()
