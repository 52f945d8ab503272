"""What the centre's mutual-TLS gateway costs: the same deployment run behind `medfed server`'s gateway
(client certificates required, every request authorized by identity and route, the Runtime API on a
loopback listener) and with Flower's own SuperLink on the port directly (TLS and SuperNode
authentication only: what medfed ran before), on one machine, alternating, ``--repeats`` times each.

Per round, the orchestration time is the round's wall time minus the slowest site's ClientApp process
age (what is not the site's own work: passing messages through the SuperLink, polling, aggregation).
The gateway's cost per round is the difference of the two fronts' mean orchestration times, as a
share of the direct front's mean round wall time. Target: at most 2 % of round time.

    python benchmarks/gateway_overhead.py     # writes docs/RESULTS.md (gateway_overhead)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deployment_overhead import SITES, run_federation
from results_md import write_section

from medfed.data.site_files import write_site_files


def round_figures(rows: list[dict]) -> list[tuple[str, int, float, float]]:
    """(phase, round, wall s, orchestration s) of every training round."""
    out = []
    for r in rows:
        if r["split"] != "round":
            continue
        sites = [s for s in rows if s["phase"] == r["phase"] and s["round"] == r["round"] and s["split"] == "train"
                 and s["accepted"]]
        wall = r["train-round-seconds"]
        out.append((r["phase"], r["round"], wall, wall - max(s["process-seconds"] for s in sites)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="pneumoniamnist")
    parser.add_argument("--pretrain-rounds", type=int, default=2)
    parser.add_argument("--finetune-rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medfed-gateway-bench-"))
    files = write_site_files(args.data, SITES, work / "sitedata")
    figures: dict[str, list[tuple[str, int, float, float]]] = {"direct": [], "gateway": []}
    totals: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(args.repeats):
        for front in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
            rows, total, _ = run_federation(work / f"{front}-{i}", args.data, args.pretrain_rounds,
                                            args.finetune_rounds, front=front, files=files)
            figures[front].extend(round_figures(rows))
            totals[front].append(total)
            print(front, i, f"{total:.1f} s", flush=True)
    mean = {f: {k: statistics.fmean(x[k] for x in figures[f]) for k in (2, 3)} for f in figures}
    cost = (mean["gateway"][3] - mean["direct"][3]) / mean["direct"][2]
    table = []
    for phase in ("pretrain", "finetune"):
        for front in ("direct", "gateway"):
            rounds = [x for x in figures[front] if x[0] == phase]
            table.append(f"| {phase} | {front} | {len(rounds)} | {statistics.fmean(x[2] for x in rounds):.2f} | "
                         f"{statistics.fmean(x[3] for x in rounds):.2f} |")
    command = (f"python benchmarks/gateway_overhead.py --data {args.data} --pretrain-rounds {args.pretrain_rounds} "
               f"--finetune-rounds {args.finetune_rounds} --repeats {args.repeats}")
    lines = [
        "## The centre's mutual-TLS gateway against Flower's SuperLink on the port directly",
        "",
        (f"Command: `{command}` (3 sites and the centre on loopback, {os.cpu_count()} CPU cores; the same run "
         f"{args.repeats} times behind each front, alternating). Orchestration s = round wall s - the slowest "
         "site's ClientApp process age (the part of a round that is not a site's own work). Target: the gateway "
         "adds at most 2 % of round time."),
        "",
        "| phase | front | rounds | mean round wall s | mean orchestration s |",
        "|---|---|---|---|---|",
        *table,
        "",
        (f"Over all rounds: direct {mean['direct'][2]:.2f} s per round ({mean['direct'][3]:.2f} s orchestration), "
         f"gateway {mean['gateway'][2]:.2f} s ({mean['gateway'][3]:.2f} s orchestration). The gateway's cost: "
         f"{mean['gateway'][3] - mean['direct'][3]:+.2f} s of orchestration per round, {cost:+.1%} of the direct "
         f"round time. End to end: direct {statistics.fmean(totals['direct']):.0f} s, gateway "
         f"{statistics.fmean(totals['gateway']):.0f} s (mean of {args.repeats})."),
    ]
    write_section("gateway_overhead", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
